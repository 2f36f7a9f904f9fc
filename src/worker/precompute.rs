//! A `Precompute` task: one leased shard's reference log-probs into the cache, then `CompleteShard`.

use std::path::{Path, PathBuf};

use super::session::Session;
use super::WorkerError;
use crate::config::Config;
use crate::data::pipeline::Preprocessor;
use crate::model::llava::Llava;
use crate::refcache::{self, ComputeOptions, RefCache};
use crate::rpc::pb;

/// The reference model, kept loaded between shards.
pub(super) type Reference = Option<(tch::nn::VarStore, Llava)>;

pub(super) async fn handle(s: &mut Session, task: pb::Precompute) -> Result<(), WorkerError> {
    s.shared.set_state(pb::WorkerState::Precomputing);
    let shard = PathBuf::from(&task.shard_path);
    let (cfg, device) = (s.cfg.clone(), s.opts.device);
    let mut model = s.reference.take();
    let (model, outcome) = tokio::task::spawn_blocking(move || {
        let r = precompute_shard(&cfg, &shard, device, &mut model);
        (model, r)
    })
    .await
    .map_err(|e| WorkerError::Setup(format!("precompute thread: {e}")))?;
    s.reference = model;
    s.complete_shard(&task.shard_path, outcome).await;
    Ok(())
}

/// Why one shard's cache could not be computed (reported to the coordinator as text).
#[derive(Debug, thiserror::Error)]
pub enum PrecomputeError {
    #[error(transparent)]
    Cache(#[from] crate::refcache::CacheError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Computes one shard's cache file (unless it is already valid), loading the reference model on first use.
fn precompute_shard(
    cfg: &Config,
    shard: &Path,
    device: tch::Device,
    model: &mut Reference,
) -> Result<(u64, u64), PrecomputeError> {
    let cache = RefCache::open_for_device(cfg, device)?;
    let missing = cache.missing_shards(&[shard.to_owned()])?;
    if missing.is_empty() {
        return Ok((0, 0));
    }
    if model.is_none() {
        let kind = refcache::reference_kind(cfg, device);
        *model = Some(Llava::load(cfg.reference_path(), device, kind)?);
    }
    let (_, m) = model.as_ref().expect("loaded");
    let pre = Preprocessor::from_model_dir(
        cfg.reference_path(),
        &cfg.data.template,
        cfg.data.max_length,
        cfg.data.pad_to_square,
        cfg.ddpo.min_match,
    )?;
    let r = cache.compute_shard(m, &pre, shard, &ComputeOptions::from_config(cfg, device))?;
    Ok((r.rows_written, r.rows_skipped))
}
