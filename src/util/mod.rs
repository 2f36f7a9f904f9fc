//! Small facilities every layer may use; `util` knows nothing of the rest of the crate.
//!
//! - [`fsx`]: files that appear complete or not at all (write to a temporary name, fsync, rename).
//! - [`prng`]: splitmix64, the one seeding generator whose output never changes with crate versions.
//! - [`numerics`]: process-wide numeric set-up that keeps libtorch's CPU results deterministic.

pub mod fsx;
pub mod numerics;
pub mod prng;
