//! The preference-data side of training: parquet layouts and readers, images, chat template and
//! tokenization, the DDPO changed-segment diff, collation, and synthetic data.
//!
//! Data flow of one pair: [`reader::ShardReader`] (raw row) → [`pipeline::Preprocessor`]
//! (image decode + CLIP preprocess, template + tokenize, diff → weights) → [`collate`] (padded tensors).

pub mod collate;
pub mod diff;
pub mod image;
pub mod pipeline;
pub mod reader;
pub mod shards;
pub mod synth;
pub mod template;
pub mod tokenizer;

use std::path::PathBuf;

/// One bad row: shard path, row number and why. Skippable (`data.on_bad_row = "skip"`) or fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: row {row}: {reason}", shard.display())]
pub struct RowError {
    pub shard: PathBuf,
    pub row: u64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A data pattern from the config matched no file.
    #[error("{pattern}: {reason}")]
    NoShards { pattern: String, reason: String },
    /// A whole shard is unusable (unreadable footer, unknown layout, wrong column types).
    #[error("{}: {reason}", path.display())]
    Shard { path: PathBuf, reason: String },
    /// A bad row when the config says to stop on bad rows.
    #[error(transparent)]
    Row(#[from] RowError),
    /// Model-side inputs of the pipeline (tokenizer, processor config).
    #[error("{}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
}
