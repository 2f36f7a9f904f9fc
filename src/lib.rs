//! ddpo: distributed Dense Direct Preference Optimization (RLHF-V) for LLaVA-style multimodal LLMs.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod collective;
pub mod config;
pub mod coordinator;
pub mod data;
pub mod ddpo;
pub mod evaluate;
pub mod generate;
pub mod logging;
pub mod logps;
pub mod memplan;
pub mod model;
pub mod preset;
pub mod refcache;
pub mod rpc;
pub mod train;
pub mod util;
pub mod worker;
