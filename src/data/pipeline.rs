//! One pair from stored row to training example: image decode + CLIP preprocessing, chat template and
//! tokenization, and the DDPO changed-segment diff; plus a stream over many shards that applies the
//! `data.on_bad_row` policy.
//!
//! Invariants:
//! - The diff runs on the full response ids (EOS included) before any truncation, then masks are cut with
//!   the ids, so a truncated pair keeps exactly the weights its kept tokens had.
//! - A skipped row is counted and reported with shard, row number and reason; no good row is dropped.

use std::path::{Path, PathBuf};

use super::diff;
use super::image::{ImageError, ImageProcessor, ImageProcessorConfig};
use super::reader::{Layout, RawPair, ShardReader};
use super::template::{Template, TextEncoder, TextError};
use super::{DataError, RowError};
use crate::config::{Config, OnBadRow};
use crate::model::config::LlavaConfig;

/// Why one row cannot become an example; becomes a [`RowError`]'s reason.
#[derive(Debug, thiserror::Error)]
pub enum RowReason {
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Text(#[from] TextError),
}

/// A training example, ready for collation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub shard: usize,
    pub row: u64,
    pub id: String,
    /// CHW float32, the vision tower's input.
    pub pixel_values: Vec<f32>,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// Per response token: inside a changed segment (weight γ) or not (weight 1).
    pub chosen_changed: Vec<bool>,
    pub rejected_changed: Vec<bool>,
    pub truncated: bool,
    /// Reference log-probs of each response token (from the cache), when training.
    pub reference: Option<RefLogps>,
}

/// Reference per-token log-probs of one pair's responses, aligned with `chosen_ids` / `rejected_ids`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// Everything per-model that turning a row into an example needs.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub text: TextEncoder,
    pub image: ImageProcessor,
    pub min_match: usize,
}

impl Preprocessor {
    /// The tokenizer's `<pad>` id (0 when it has none), what collation pads with.
    pub fn pad_id(&self) -> u32 {
        self.text
            .tokenizer()
            .token_to_id(super::tokenizer::PAD)
            .unwrap_or(0)
    }

    /// The image processor's output (height, width); fixed for every CLIP processor this pipeline builds.
    pub fn image_hw(&self) -> (usize, usize) {
        self.image
            .fixed_output_size()
            .expect("checked when the preprocessor was built")
    }

    /// Builds from a model directory (config.json, tokenizer.json, preprocessor_config.json) and the job config.
    pub fn from_config(cfg: &Config) -> Result<Self, DataError> {
        Self::from_model_dir(
            &cfg.model.path,
            &cfg.data.template,
            cfg.data.max_length,
            cfg.data.pad_to_square,
            cfg.ddpo.min_match,
        )
    }

    pub fn from_model_dir(
        dir: &Path,
        template: &str,
        max_length: usize,
        pad_to_square: bool,
        min_match: usize,
    ) -> Result<Self, DataError> {
        let model_err = |reason: String| DataError::Model {
            path: dir.to_owned(),
            reason,
        };
        let mcfg = LlavaConfig::from_dir(dir).map_err(|e| model_err(e.to_string()))?;
        let template = Template::from_name(template)
            .ok_or_else(|| model_err(format!("unknown template {template:?}")))?;
        let tok = TextEncoder::load_tokenizer(dir).map_err(|e| model_err(e.to_string()))?;
        let text = TextEncoder::new(
            tok,
            template,
            mcfg.image_token_index(),
            mcfg.num_image_tokens(),
            max_length,
        )
        .map_err(|e| model_err(e.to_string()))?;
        let pcfg = ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json"))
            .map_err(|e| model_err(e.to_string()))?;
        let image = ImageProcessor::new(pcfg, pad_to_square);
        let (h, w) = image.fixed_output_size().ok_or_else(|| {
            model_err(
                "preprocessor_config.json does not centre-crop to a fixed size; the vision tower needs one"
                    .into(),
            )
        })?;
        let vs = mcfg.vision_config.image_size;
        if (h, w) != (vs, vs) {
            return Err(model_err(format!(
                "preprocessor_config.json produces {h}x{w} images but the vision tower takes {vs}x{vs}"
            )));
        }
        Ok(Self {
            text,
            image,
            min_match,
        })
    }

    /// Processes one row; the error is the row-level reason.
    pub fn process(&self, shard: usize, raw: &RawPair) -> Result<Example, RowReason> {
        let pixel_values = self.image.process_bytes(&raw.image)?;
        let prompt_ids = self.text.encode_prompt(&raw.question)?;
        let mut chosen_ids = self.text.encode_response(&raw.chosen)?;
        let mut rejected_ids = self.text.encode_response(&raw.rejected)?;
        let mask = diff::changed_segments(&chosen_ids, &rejected_ids, self.min_match);
        let (mut chosen_changed, mut rejected_changed) = (mask.chosen, mask.rejected);
        let room = self.text.response_room(prompt_ids.len())?;
        let truncated = chosen_ids.len() > room || rejected_ids.len() > room;
        chosen_ids.truncate(room);
        rejected_ids.truncate(room);
        chosen_changed.truncate(room);
        rejected_changed.truncate(room);
        Ok(Example {
            shard,
            row: raw.row,
            id: raw.id.clone(),
            pixel_values,
            prompt_ids,
            chosen_ids,
            rejected_ids,
            chosen_changed,
            rejected_changed,
            truncated,
            reference: None,
        })
    }
}

/// Counts kept while streaming, for reports and the status endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub rows: u64,
    pub ok: u64,
    pub skipped: u64,
    pub truncated: u64,
    /// The first bad rows, for reports (all are counted in `skipped`).
    pub first_errors: Vec<RowError>,
}

/// How many bad rows are kept verbatim in [`StreamStats::first_errors`].
pub const KEEP_ERRORS: usize = 20;

/// Streams examples from shards in order, applying the bad-row policy.
pub struct ExampleStream<'a> {
    pre: &'a Preprocessor,
    shards: Vec<PathBuf>,
    next_shard: usize,
    current: Option<(usize, ShardReader)>,
    policy: OnBadRow,
    batch_rows: usize,
    pub stats: StreamStats,
    /// Layout detected per opened shard, for reports.
    pub layouts: Vec<(PathBuf, Layout)>,
}

impl<'a> ExampleStream<'a> {
    pub fn new(pre: &'a Preprocessor, shards: Vec<PathBuf>, policy: OnBadRow) -> Self {
        Self {
            pre,
            shards,
            next_shard: 0,
            current: None,
            policy,
            batch_rows: 64,
            stats: StreamStats::default(),
            layouts: Vec::new(),
        }
    }

    fn bad_row(&mut self, e: RowError) -> Option<Result<Example, DataError>> {
        self.stats.skipped += 1;
        match self.policy {
            OnBadRow::Fail => Some(Err(DataError::Row(e))),
            OnBadRow::Skip => {
                tracing::warn!("skipping {e}");
                if self.stats.first_errors.len() < KEEP_ERRORS {
                    self.stats.first_errors.push(e);
                }
                None
            }
        }
    }
}

impl Iterator for ExampleStream<'_> {
    type Item = Result<Example, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some((idx, reader)) = self.current.as_mut() else {
                let idx = self.next_shard;
                let path = self.shards.get(idx)?.clone();
                self.next_shard += 1;
                match ShardReader::open(&path, self.batch_rows) {
                    Ok(r) => {
                        tracing::info!(
                            shard = %path.display(),
                            layout = r.layout().name(),
                            rows = r.num_rows(),
                            row_groups = r.num_row_groups(),
                            "reading shard"
                        );
                        self.layouts.push((path, r.layout()));
                        self.current = Some((idx, r));
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            };
            let idx = *idx;
            let Some(item) = reader.next() else {
                self.current = None;
                continue;
            };
            self.stats.rows += 1;
            let raw = match item {
                Ok(raw) => raw,
                Err(e) => match self.bad_row(e) {
                    Some(err) => return Some(err),
                    None => continue,
                },
            };
            match self.pre.process(idx, &raw) {
                Ok(ex) => {
                    self.stats.ok += 1;
                    self.stats.truncated += u64::from(ex.truncated);
                    return Some(Ok(ex));
                }
                Err(reason) => {
                    let e = RowError {
                        shard: self.shards[idx].clone(),
                        row: raw.row,
                        reason: reason.to_string(),
                    };
                    if let Some(err) = self.bad_row(e) {
                        return Some(err);
                    }
                }
            }
        }
    }
}
