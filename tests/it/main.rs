//! The integration tests, as one test binary (so the suite links libtorch, arrow and tonic once): one module per
//! area, `common` the shared support (data writers, model and config helpers, a loopback ring, the Python
//! oracle's interpreter, a lock for tests that must run one at a time).

mod common;

mod cli;
mod collective;
mod coordinator_state;
mod data_input;
mod determinism;
mod diff_oracle;
mod distributed;
mod evaluate;
mod generate;
mod image_oracle;
mod layering;
mod lora;
mod memplan;
mod model_oracle;
mod refcache;
mod stream_memory;
mod synth_pyarrow;
mod train;
mod zero;
