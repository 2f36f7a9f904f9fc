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

use crate::config::Config;

/// Training steps of micro-batches the background data feed prepares ahead of the step (a bounded queue;
/// counted by the memory plan).
pub const FEED_DEPTH: usize = 2;

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

/// Checks that the files a job needs exist: the model directory and at least one shard per data pattern.
pub fn check_files(cfg: &Config) -> Vec<String> {
    let mut p = Vec::new();
    if !cfg.model.path.is_dir() {
        p.push(format!(
            "model.path = {}: no such directory",
            cfg.model.path.display()
        ));
    }
    if let Some(r) = &cfg.reference.path {
        if !r.is_dir() {
            p.push(format!(
                "reference.path = {}: no such directory",
                r.display()
            ));
        }
    }
    for (key, pats) in [
        ("data.train", &cfg.data.train),
        ("data.eval", &cfg.data.eval),
        ("generate.prompts", &cfg.generate.prompts),
    ] {
        for pat in pats.iter() {
            if let Err(e) = shards::discover(std::slice::from_ref(pat)) {
                p.push(format!("{key}: {e}"));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[model]\npath = \"{d}/m\"\n[data]\ntrain = [\"{d}/d/*.parquet\"]\n[train]\noutput_dir = \"{d}/o\"\n",
            d = dir.path().display()
        );
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        let c = Config::load_with_env(&path, &[]).unwrap();
        let p = check_files(&c);
        assert!(
            p.iter()
                .any(|m| m.contains("model.path =") && m.contains("/m: no such directory")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.contains("data.train") && m.contains("d/*.parquet")),
            "{p:?}"
        );
    }
}
