//! A `Generate` task (generation jobs): one leased prompt shard answered with the job's model into its answers
//! file (`generate::generate_shard`, written atomically), then `CompleteShard`.

use std::path::{Path, PathBuf};

use super::precompute::Reference;
use super::session::Session;
use super::WorkerError;
use crate::config::Config;
use crate::model::llava::Llava;
use crate::rpc::pb;

pub(super) async fn handle(s: &mut Session, task: pb::Generate) -> Result<(), WorkerError> {
    s.shared.set_state(pb::WorkerState::Generating);
    let shard = PathBuf::from(&task.shard_path);
    let (cfg, device) = (s.cfg.clone(), s.opts.device);
    let mut model = s.generator.take();
    let (model, outcome) = tokio::task::spawn_blocking(move || {
        let r = answer_shard(&cfg, &shard, device, &mut model);
        (model, r)
    })
    .await
    .map_err(|e| WorkerError::Setup(format!("generation thread: {e}")))?;
    s.generator = model;
    let outcome = outcome.map(|r| (r.answers as u64, r.skipped as u64));
    s.complete_shard(&task.shard_path, outcome).await;
    Ok(())
}

/// Answers one shard, loading the job's model on first use (kept for the next shard).
fn answer_shard(
    cfg: &Config,
    shard: &Path,
    device: tch::Device,
    model: &mut Reference,
) -> Result<crate::generate::GenerateReport, crate::generate::GenerateError> {
    if model.is_none() {
        let kind = cfg.model.dtype.weight_kind(device);
        *model = Some(Llava::load(&cfg.model.path, device, kind)?);
    }
    let (_, m) = model.as_ref().expect("loaded");
    let report = crate::generate::generate_shard(cfg, m, shard, device)?;
    tracing::info!(shard = %shard.display(), "{report}");
    Ok(report)
}
