//! Setting a run up, before its first step: the memory plan's check, the data and the reference (cache or
//! model), the step plan, the newest checkpoint to resume from, the policy (LoRA adapters attached), the
//! optimizer (ZeRO-sharded or not), the trainer state and the metrics file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::{self, TrainerState};
use super::data::{FeedPlan, PairSource};
use super::optim::{AdamW, AdamWConfig};
use super::run::Run;
use super::{lora, schedule, TrainError};
use crate::collective::{Collective, BUCKET_BYTES};
use crate::config::{Config, FreezeTarget, LossKind, ReferenceMode};
use crate::data::pipeline::Preprocessor;
use crate::data::shards;
use crate::data::synth::truth::SceneGroup;
use crate::model::llava::Llava;
use crate::refcache::{self, RefCache};

/// The step plan: fixed by the data and the config, and checked against a checkpoint on resume.
pub(super) struct Plan {
    pub rows: usize,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub warmup: usize,
}

/// A run ready for its first step.
pub(super) struct Prepared<'a> {
    pub run: Run<'a>,
    pub train: PairSource,
    pub plan: Plan,
    /// The checkpoint resumed from: its folder and state.
    pub resumed: Option<(PathBuf, TrainerState)>,
    pub reference_loaded: bool,
}

/// The training and eval pair sources and, in online mode, the frozen reference model.
type Sources = (
    PairSource,
    Option<PairSource>,
    Option<(nn::VarStore, Llava)>,
);

pub(super) fn prepare<'a>(
    cfg: &'a Config,
    device: Device,
    comm: &'a mut dyn Collective,
) -> Result<Prepared<'a>, TrainError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let kind = cfg.model.dtype.weight_kind(device);
    // The memory plan (src/memplan/), before anything is loaded: logged, and a job that cannot fit is refused.
    crate::memplan::check_before_training(cfg, device, kind, rank, world)?;
    let out_dir = &cfg.train.output_dir;
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.clone(),
        source,
    })?;
    let (train, eval, reference) = open_sources(cfg, device, kind, world)?;
    let plan = Plan::new(cfg, train.rows().len(), world)?;
    if rank == 0 {
        checkpoint::remove_stale_temps(out_dir);
    }
    let resumed = match checkpoint::list(out_dir).pop() {
        Some((_, dir)) => {
            let state = checkpoint::read_state(&dir)?;
            plan.check_resume(&state, cfg, &dir)?;
            Some((dir, state))
        }
        None => None,
    };
    let weights_dir = resumed.as_ref().map_or(&cfg.model.path, |(d, _)| d).clone();
    let (vs, model, lora) = load_policy(cfg, device, kind, &weights_dir, resumed.is_some())?;
    let params = match &lora {
        Some(lvs) => lvs.variables().into_iter().collect(),
        None => trainable(&vs, &cfg.model.freeze),
    };
    if params.is_empty() {
        return Err(TrainError::Setup(
            "model.freeze leaves nothing to train".into(),
        ));
    }
    let mut opt = optimizer(cfg, params, world, rank);
    let state = initial_state(cfg, &plan, resumed.as_ref(), &mut opt, rank)?;
    let metrics = open_metrics(out_dir, rank)?;
    // Every rank must have read the checkpoint and truncated nothing before rank 0 writes anything new.
    comm.barrier()?;
    let reference_loaded = reference.is_some();
    let run = Run {
        cfg,
        device,
        model,
        vs,
        lora,
        reference,
        opt,
        scenes: eval_scenes(cfg, eval.as_ref())?,
        eval,
        zero_grads: BTreeMap::new(),
        gradient_bytes_at_update: 0,
        metrics,
        state,
        comm,
    };
    Ok(Prepared {
        run,
        train,
        plan,
        resumed,
        reference_loaded,
    })
}

/// The eval split's scenes for `train.eval_generate`: an error at set-up (naming the file) when the eval data
/// carries none, rather than at the first evaluation.
fn eval_scenes(
    cfg: &Config,
    eval: Option<&PairSource>,
) -> Result<Option<HashMap<String, Vec<SceneGroup>>>, TrainError> {
    if cfg.train.eval_generate == 0 {
        return Ok(None);
    }
    let Some(eval) = eval else {
        return Err(TrainError::Setup(
            "train.eval_generate needs an eval split (data.eval)".into(),
        ));
    };
    Ok(Some(crate::data::synth::truth::read_scenes(eval.shards())?))
}

/// The reference: the cache (computed first in one process if anything is missing), or a frozen second model.
fn open_sources(
    cfg: &Config,
    device: Device,
    kind: Kind,
    world: usize,
) -> Result<Sources, TrainError> {
    let train_shards = shards::discover(&cfg.data.train)?;
    let eval_shards = if cfg.data.eval.is_empty() {
        Vec::new()
    } else {
        shards::discover(&cfg.data.eval)?
    };
    let pre = Preprocessor::from_config(cfg)?;
    let eval_split =
        |make: &dyn Fn(Vec<PathBuf>, Preprocessor) -> Result<PairSource, TrainError>| {
            match eval_shards.is_empty() {
                true => Ok(None),
                false => make(eval_shards.clone(), pre.clone()).map(Some),
            }
        };
    if cfg.ddpo.loss == LossKind::Sft {
        // SFT has no reference: the rows are read as in online mode, nothing is loaded or cached.
        let t = PairSource::online(train_shards, pre.clone(), cfg.data.on_bad_row)?;
        let e = eval_split(&|s, p| PairSource::online(s, p, cfg.data.on_bad_row))?;
        return Ok((t, e, None));
    }
    match cfg.reference.mode {
        ReferenceMode::Cached => {
            let cache = RefCache::open_for_device(cfg, device)?;
            let mut all = train_shards.clone();
            all.extend(eval_shards.iter().cloned());
            let missing = cache.missing_shards(&all)?;
            if !missing.is_empty() {
                if world > 1 {
                    return Err(TrainError::Setup(format!(
                        "the reference cache lacks {} shard(s) (first: {}); the coordinator precomputes before training",
                        missing.len(),
                        missing[0].display()
                    )));
                }
                tracing::info!("reference cache incomplete: precomputing first");
                refcache::precompute(cfg, device)?;
            }
            let t = PairSource::cached(train_shards, pre.clone(), &cache)?;
            let e = eval_split(&|s, p| PairSource::cached(s, p, &cache))?;
            Ok((t, e, None))
        }
        ReferenceMode::Online => {
            let path = cfg.reference_path();
            let (rvs, rm) = Llava::load(path, device, kind).map_err(|e| TrainError::Model {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            rvs.variables().values_mut().for_each(|t| {
                let _ = t.requires_grad_(false);
            });
            let t = PairSource::online(train_shards, pre.clone(), cfg.data.on_bad_row)?;
            let e = eval_split(&|s, p| PairSource::online(s, p, cfg.data.on_bad_row))?;
            Ok((t, e, Some((rvs, rm))))
        }
    }
}

impl Plan {
    fn new(cfg: &Config, rows: usize, world: usize) -> Result<Self, TrainError> {
        let bs = cfg.train.batch_size;
        if bs % (world * cfg.train.micro_batch_size) != 0 {
            return Err(TrainError::Setup(format!(
                "train.batch_size = {bs} is not a multiple of train.micro_batch_size ({}) x world size ({world})",
                cfg.train.micro_batch_size
            )));
        }
        let steps_per_epoch = rows / bs;
        if steps_per_epoch == 0 {
            return Err(TrainError::Setup(format!(
                "the training split has {rows} usable pairs, fewer than train.batch_size = {bs}"
            )));
        }
        let total_steps = cfg.train.epochs * steps_per_epoch;
        let warmup = schedule::warmup_steps(cfg.train.warmup_ratio, total_steps);
        Ok(Self {
            rows,
            batch_size: bs,
            steps_per_epoch,
            total_steps,
            warmup,
        })
    }

    /// A checkpoint continues this run only if it was made with the same data, steps and seed.
    fn check_resume(&self, s: &TrainerState, cfg: &Config, dir: &Path) -> Result<(), TrainError> {
        let (n, spe, total) = (self.rows, self.steps_per_epoch, self.total_steps);
        if s.train_rows == n
            && s.total_steps == total
            && s.seed == cfg.train.seed
            && s.steps_per_epoch == spe
        {
            return Ok(());
        }
        Err(TrainError::Setup(format!(
            "{}: the checkpoint was made with {} pairs, {} steps per epoch, {} total steps, seed {}; this job has {n}, {spe}, {total}, {} \
             — resuming would not continue the same run (use a new train.output_dir)",
            dir.display(),
            s.train_rows,
            s.steps_per_epoch,
            s.total_steps,
            s.seed,
            cfg.train.seed
        )))
    }

    /// What the data feed prepares for this rank, steps `start..stop`.
    pub fn feed(
        &self,
        cfg: &Config,
        world: usize,
        rank: usize,
        start: usize,
        stop: usize,
    ) -> FeedPlan {
        FeedPlan {
            rows: self.rows,
            batch_size: self.batch_size,
            micro_batch_size: cfg.train.micro_batch_size,
            steps_per_epoch: self.steps_per_epoch,
            seed: cfg.train.seed,
            world,
            rank,
            start,
            stop,
            shared_prefix: cfg.train.shared_prefix,
        }
    }
}

/// The policy from `weights_dir` (the base model, or the checkpoint resumed from), with its LoRA adapters.
fn load_policy(
    cfg: &Config,
    device: Device,
    kind: Kind,
    weights_dir: &Path,
    resuming: bool,
) -> Result<(nn::VarStore, Llava, Option<nn::VarStore>), TrainError> {
    let (vs, mut model) =
        Llava::load(weights_dir, device, kind).map_err(|e| TrainError::Model {
            path: weights_dir.to_owned(),
            reason: e.to_string(),
        })?;
    let lora = if cfg.lora.rank > 0 {
        let resume_from = resuming.then_some(weights_dir);
        Some(lora::attach(
            &mut model,
            &vs,
            cfg,
            device,
            kind,
            resume_from,
        )?)
    } else {
        None
    };
    Ok((vs, model, lora))
}

/// AdamW over the trainable parameters; with world > 1 and ZeRO stage ≥ 1 each rank owns a share of its state.
fn optimizer(cfg: &Config, params: BTreeMap<String, Tensor>, world: usize, rank: usize) -> AdamW {
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.train.weight_decay,
    };
    if world > 1 && cfg.train.zero_stage >= 1 {
        AdamW::sharded(params, adamw, world, rank, BUCKET_BYTES)
    } else {
        AdamW::new(params, adamw)
    }
}

/// The resumed state (optimizer state loaded, later metrics rows dropped) or a fresh one (old metrics removed).
fn initial_state(
    cfg: &Config,
    plan: &Plan,
    resumed: Option<&(PathBuf, TrainerState)>,
    opt: &mut AdamW,
    rank: usize,
) -> Result<TrainerState, TrainError> {
    let metrics_path = cfg.train.output_dir.join("metrics.jsonl");
    if let Some((dir, s)) = resumed {
        opt.load(&dir.join("optimizer.safetensors"))?;
        if rank == 0 {
            super::metrics::truncate_metrics(&metrics_path, s.step)?;
        }
        tracing::info!(step = s.step, checkpoint = %dir.display(), "resuming");
        return Ok(s.clone());
    }
    if rank == 0 {
        let _ = std::fs::remove_file(&metrics_path);
    }
    Ok(TrainerState {
        step: 0,
        total_steps: plan.total_steps,
        steps_per_epoch: plan.steps_per_epoch,
        seed: cfg.train.seed,
        skipped_steps: 0,
        train_rows: plan.rows,
        format: checkpoint::STATE_FORMAT,
    })
}

/// metrics.jsonl, opened for appending on rank 0 (the one writer).
fn open_metrics(out_dir: &Path, rank: usize) -> Result<Option<std::fs::File>, TrainError> {
    if rank != 0 {
        return Ok(None);
    }
    let path = out_dir.join("metrics.jsonl");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(Some)
        .map_err(|source| TrainError::Io { path, source })
}

/// Marks frozen modules' variables as not requiring gradients; returns the trainable ones by name.
fn trainable(vs: &nn::VarStore, freeze: &[FreezeTarget]) -> BTreeMap<String, Tensor> {
    let prefix = |f: &FreezeTarget| match f {
        FreezeTarget::VisionTower => "vision_tower.",
        FreezeTarget::Projector => "multi_modal_projector.",
        FreezeTarget::LanguageModel => "language_model.",
    };
    let mut out = BTreeMap::new();
    for (name, mut t) in vs.variables() {
        if freeze.iter().any(|f| name.starts_with(prefix(f))) {
            let _ = t.requires_grad_(false);
        } else {
            out.insert(name, t);
        }
    }
    out
}
