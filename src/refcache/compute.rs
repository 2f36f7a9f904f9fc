//! Running the reference over a shard's examples: batches through the model, log-probs split back per response.

use super::*;

/// How [`RefCache::compute_shard`] runs the reference.
#[derive(Debug, Clone, Copy)]
pub struct ComputeOptions {
    pub on_bad_row: OnBadRow,
    /// Pairs per forward.
    pub batch_pairs: usize,
    pub device: tch::Device,
    /// The shared-prefix layout (`train.shared_prefix`).
    pub shared_prefix: bool,
}

impl ComputeOptions {
    pub fn from_config(cfg: &Config, device: tch::Device) -> Self {
        Self {
            on_bad_row: cfg.data.on_bad_row,
            // A no-grad forward keeps far less than a training step, so the training micro-batch fits.
            batch_pairs: cfg.train.micro_batch_size.max(1),
            device,
            shared_prefix: cfg.train.shared_prefix,
        }
    }
}

/// Runs the reference on batches of examples and splits the `[2B, T]` log-probs back per response.
pub(super) struct Forward<'a> {
    pub(super) model: &'a Llava,
    pub(super) shard: &'a Path,
    pub(super) pad_id: u32,
    pub(super) image_hw: (usize, usize),
    pub(super) device: tch::Device,
    pub(super) shared_prefix: bool,
}

impl Forward<'_> {
    pub(super) fn run(&self, examples: &[Example]) -> Result<Vec<CachedPair>, CacheError> {
        let err = |reason: String| CacheError::Compute {
            shard: self.shard.to_owned(),
            reason,
        };
        let batch = collate(examples, self.pad_id, self.image_hw, self.shared_prefix);
        let logps = tch::no_grad(|| {
            let on_dev = if self.device == tch::Device::Cpu {
                None
            } else {
                Some(batch.to_device(self.device))
            };
            crate::logps::batch_logps(self.model, on_dev.as_ref().unwrap_or(&batch))
                .to_device(tch::Device::Cpu)
                .to_kind(Kind::Float)
        });
        let (rows, t) = logps.size2().map_err(|e| err(e.to_string()))?;
        let b = examples.len();
        if rows as usize != 2 * b {
            return Err(err(format!("log-probs have {rows} rows for {b} pairs")));
        }
        let t = t as usize;
        let lp = Vec::<f32>::try_from(logps.flatten(0, -1)).map_err(|e| err(e.to_string()))?;
        let labels =
            Vec::<i64>::try_from(batch.labels.flatten(0, -1)).map_err(|e| err(e.to_string()))?;
        let take = |r: usize, want: usize, row: u64| -> Result<Vec<f32>, CacheError> {
            let out: Vec<f32> = (r * t..(r + 1) * t)
                .filter(|&i| labels[i] != IGNORE)
                .map(|i| lp[i])
                .collect();
            if out.len() != want {
                return Err(err(format!(
                    "row {row}: {} label positions for {want} response tokens",
                    out.len()
                )));
            }
            if let Some(v) = out.iter().find(|v| !v.is_finite()) {
                return Err(err(format!(
                    "row {row}: non-finite reference log-prob {v}; check the reference checkpoint and dtype"
                )));
            }
            Ok(out)
        };
        examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Ok(CachedPair {
                    row: e.row,
                    id: e.id.clone(),
                    prompt_ids: e.prompt_ids.clone(),
                    chosen_logps: take(i, e.chosen_ids.len(), e.row)?,
                    chosen_ids: e.chosen_ids.clone(),
                    rejected_logps: take(b + i, e.rejected_ids.len(), e.row)?,
                    rejected_ids: e.rejected_ids.clone(),
                })
            })
            .collect()
    }

    /// Runs every example of `stream` in batches of `batch_pairs` into `sink`, logging progress every 10 s;
    /// returns the response tokens written.
    pub(super) fn run_all(
        &self,
        stream: &mut ExampleStream,
        sink: &mut PairSink,
        batch_pairs: usize,
        start: Instant,
    ) -> Result<u64, CacheError> {
        let mut pending = Vec::with_capacity(batch_pairs);
        let mut tokens = 0u64;
        let mut last_log = Instant::now();
        loop {
            let next = stream.next().transpose()?;
            let done = next.is_none();
            pending.extend(next);
            if pending.len() == batch_pairs || (done && !pending.is_empty()) {
                for p in self.run(&pending)? {
                    tokens += (p.chosen_ids.len() + p.rejected_ids.len()) as u64;
                    sink.push(p)?;
                }
                pending.clear();
                if last_log.elapsed().as_secs_f64() >= 10.0 {
                    last_log = Instant::now();
                    let el = start.elapsed().as_secs_f64();
                    tracing::info!(
                        shard = %self.shard.display(),
                        pairs = sink.rows,
                        pairs_per_sec = format!("{:.1}", sink.rows as f64 / el.max(1e-9)),
                        "reference log-probs"
                    );
                }
            }
            if done {
                return Ok(tokens);
            }
        }
    }
}
