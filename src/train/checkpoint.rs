//! Checkpoints: `<output_dir>/checkpoint-<step>/` holds the model in the llava-hf layout (transformers loads
//! the folder as a model), the model directory's config/tokenizer/processor files, the optimizer state and
//! `trainer_state.json` (step, epoch position, counters).
//!
//! Invariants: a checkpoint folder is complete or absent — it is written under a temporary name and renamed;
//! a failed write removes its temporary folder and leaves older checkpoints untouched; pruning keeps the
//! newest `keep_last` and runs only after a new checkpoint is complete.

use crate::util::fsx;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Kind};

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
#[error("checkpoint {}: {reason}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    pub reason: String,
}

/// Where a run stands; enough to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken (including skipped ones).
    pub step: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    pub seed: u64,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// Pairs in the training split when the run started (a changed dataset cannot resume exactly).
    pub train_rows: usize,
    pub format: u32,
}

pub const STATE_FORMAT: u32 = 1;

/// Files of the source model directory that go into every checkpoint next to the weights.
pub(crate) const MODEL_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.json",
    "processor_config.json",
];

/// Test-only fault injection: `DDPO_FAULT_CHECKPOINT=enospc` makes the write fail after the weights, as a
/// full disk would, so tests can show that nothing corrupt is left behind.
fn injected_fault() -> Option<std::io::Error> {
    match std::env::var("DDPO_FAULT_CHECKPOINT").as_deref() {
        Ok("enospc") => Some(std::io::Error::from_raw_os_error(28)),
        _ => None,
    }
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Writes a checkpoint atomically, then prunes old ones down to `keep_last`.
pub fn save(
    output_dir: &Path,
    vs: &nn::VarStore,
    model_dir: &Path,
    opt_state: &[(String, Tensor)],
    lora: Option<(&nn::VarStore, &crate::config::LoraConfig)>,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf, CheckpointError> {
    let dir = checkpoint_dir(output_dir, state.step);
    let err = |path: &Path, reason: String| CheckpointError {
        path: path.to_owned(),
        reason,
    };
    std::fs::create_dir_all(output_dir).map_err(|e| err(output_dir, e.to_string()))?;
    let tmp = fsx::temp_sibling(&dir);
    let result = (|| -> Result<(), CheckpointError> {
        std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e.to_string()))?;
        crate::model::weights::write_safetensors(vs, &tmp.join("model.safetensors"), Kind::Float)
            .map_err(|e| err(&tmp, e.to_string()))?;
        if let Some(e) = injected_fault() {
            return Err(err(&tmp, format!("writing optimizer.safetensors: {e}")));
        }
        super::optim::write_state(opt_state, &tmp.join("optimizer.safetensors"))
            .map_err(|e| err(&tmp, e.to_string()))?;
        if let Some((lvs, cfg)) = lora {
            super::lora::save_adapter(lvs, cfg, model_dir, &tmp)
                .map_err(|e| err(&tmp, format!("writing the LoRA adapter: {e}")))?;
            if cfg.save_merged {
                super::lora::save_merged(vs, lvs, cfg, model_dir, &tmp.join("merged"))
                    .map_err(|e| err(&tmp, format!("writing the merged model: {e}")))?;
            }
        }
        for f in MODEL_FILES {
            let src = model_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, tmp.join(f)).map_err(|e| err(&src, e.to_string()))?;
            }
        }
        // Written last: its presence marks the folder's content complete even before the rename.
        let state_json = serde_json::to_vec_pretty(state).expect("state serialises");
        std::fs::write(tmp.join("trainer_state.json"), state_json)
            .map_err(|e| err(&tmp, e.to_string()))?;
        // On disk before the rename makes the folder visible: a power loss or node crash after the rename
        // must not leave a complete-looking checkpoint with truncated files.
        fsx::sync_tree(&tmp).map_err(|e| err(&tmp, format!("syncing to disk: {e}")))?;
        fsx::commit(&tmp, &dir).map_err(|e| err(&dir, e.to_string()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    prune(output_dir, keep_last);
    Ok(dir)
}

/// Removes temporary checkpoint folders left by crashed runs (`.checkpoint-<step>.tmp-<pid>-<nanos>`), which are
/// never complete and can be as large as a checkpoint.
pub fn remove_stale_temps(output_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            tracing::info!("removing an incomplete checkpoint left by an earlier run: {name}");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let p = e.path();
            p.join("trainer_state.json").exists().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

fn prune(output_dir: &Path, keep_last: usize) {
    let all = list(output_dir);
    if all.len() > keep_last {
        for (_, p) in &all[..all.len() - keep_last] {
            if let Err(e) = std::fs::remove_dir_all(p) {
                tracing::warn!("could not remove old checkpoint {}: {e}", p.display());
            }
        }
    }
}

pub fn read_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let p = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| CheckpointError {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let s: TrainerState = serde_json::from_str(&text).map_err(|e| CheckpointError {
        path: p.clone(),
        reason: format!("not a trainer state: {e}"),
    })?;
    if s.format != STATE_FORMAT {
        return Err(CheckpointError {
            path: p,
            reason: format!("format {} but this ddpo writes {STATE_FORMAT}", s.format),
        });
    }
    Ok(s)
}
