//! DDPO training in one process (`ddpo train`): reference log-probs from the cache (or an online reference
//! model), AdamW with owned state, warm-up + decay schedule, gradient accumulation and clipping, seeded
//! shuffling, metrics to `metrics.jsonl`, evaluation, atomic checkpoints and exact resume.
//!
//! Invariants:
//! - In cached mode the reference model is never loaded; every example's ids are checked against the cache.
//! - Step `s` uses the rows `order(epoch)[pos·B .. (pos+1)·B]` with `epoch = s / steps_per_epoch`; nothing
//!   else (no wall clock, no thread timing) decides what a step sees, so a resumed run repeats a straight run
//!   bit for bit on CPU.
//! - A step whose loss or gradient norm is not finite changes no weights and no optimizer state; it is
//!   counted in `skipped_steps` and the run goes on.
//! - A metrics row describes its step's forward pass, before that step's update.

//!
//! Code map (torchtitan's split): `setup` (everything before the first step), `step` (one optimizer step:
//! forward/backward, gradient exchange, update), `eval`, `metrics` (rows, progress bar), `run` (what a rank
//! holds), `checkpoint`, `optim`, `lora`, `schedule`, `data` (the background feed); this file holds the loop.

pub mod checkpoint;
pub mod data;
mod eval;
pub mod lora;
mod metrics;
pub mod optim;
mod run;
pub mod schedule;
mod setup;
mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::Device;

use crate::collective::{Collective, CollectiveError, LocalCollective};
use crate::config::Config;
use crate::data::DataError;
use crate::refcache::CacheError;

use checkpoint::CheckpointError;
use data::Feed;
use metrics::{draw_bar, get, metrics_row};
use optim::OptimError;
use run::Run;
use setup::{Plan, Prepared};

pub use step::{grads_of, micro_step, refill_grads, release_grads, terms, Accumulated};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("model {}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Plan(#[from] crate::memplan::PlanError),
}

use crate::data::FEED_DEPTH;

/// What a caller (the worker process) learns and decides during a run.
pub trait TrainHooks {
    /// After every optimizer step (and evaluation), with that step's global metrics.
    fn on_step(&mut self, _step: usize, _total: usize, _metrics: &[(String, f64)]) {}
    /// After a checkpoint is complete.
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Checked at step boundaries; true ends the run early with a checkpoint (SIGTERM).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl TrainHooks for NoHooks {}

/// Run options that are not part of the job (they do not change what is computed).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub device: Device,
    /// Stop after this many optimizer steps in total (with a checkpoint), e.g. to split a run.
    pub max_steps: Option<usize>,
    /// Draw a progress bar on stderr (for terminals; log lines are written either way).
    pub progress_bar: bool,
}

#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: usize,
    pub total_steps: usize,
    pub skipped_steps: usize,
    pub resumed_from: Option<usize>,
    pub last_checkpoint: Option<PathBuf>,
    pub last_metrics: Vec<(String, f64)>,
    pub last_eval: Vec<(String, f64)>,
    pub reference_loaded: bool,
    /// Ended early because a stop was requested (with a checkpoint).
    pub stopped: bool,
    /// Bytes of optimizer state this rank held (moments and fp32 masters; 1/world of it under ZeRO).
    pub optimizer_state_bytes: usize,
    /// Bytes of gradients this rank held from the gradient exchange to the update, at the last applied step
    /// (whole gradients; under ZeRO-2 only the owned slices, about 1/world).
    pub gradient_bytes_at_update: usize,
}

/// Runs (or resumes) training as the config says, in this process alone.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainReport, TrainError> {
    train_distributed(cfg, opts, &mut LocalCollective, &mut NoHooks)
}

/// Runs (or resumes) training as one rank of a data-parallel job: every rank calls this with the same config;
/// `comm` connects them. In cached mode the cache must be complete (in one process it is computed first).
pub fn train_distributed(
    cfg: &Config,
    opts: &TrainOptions,
    comm: &mut dyn Collective,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainReport, TrainError> {
    let Prepared {
        mut run,
        train,
        plan,
        resumed,
        reference_loaded,
    } = setup::prepare(cfg, opts.device, comm)?;
    let (start, stop) = (
        run.state.step,
        opts.max_steps
            .unwrap_or(plan.total_steps)
            .min(plan.total_steps),
    );
    tracing::info!(
        rank = run.rank(),
        world = run.world(),
        pairs = plan.rows,
        steps_per_epoch = plan.steps_per_epoch,
        total_steps = plan.total_steps,
        warmup = plan.warmup,
        accumulation = plan.batch_size / cfg.train.micro_batch_size,
        trainable = run.opt.params().count(),
        "training"
    );
    let feed_plan = plan.feed(cfg, run.world(), run.rank(), start, stop);
    let mut feed = Feed::start(train, feed_plan, FEED_DEPTH)?;
    let mut progress = Progress {
        start,
        stop,
        t0: Instant::now(),
        last_metrics: Vec::new(),
        last_eval: Vec::new(),
        last_checkpoint: resumed.as_ref().map(|(dir, _)| dir.clone()),
        saved_at: resumed.as_ref().map(|_| start),
    };
    let mut stopped = false;
    while run.state.step < stop {
        if run.stop_requested(hooks)? {
            stopped = true;
            break;
        }
        run.train_step(&plan, &mut feed, opts, hooks, &mut progress)?;
        run.evaluate_if_due(&plan, hooks, &mut progress)?;
        let done = run.state.step;
        if cfg.train.save_every > 0 && done % cfg.train.save_every == 0 && done < stop {
            run.save(hooks, &mut progress)?;
        }
    }
    if progress.saved_at != Some(run.state.step) {
        run.save(hooks, &mut progress)?;
    }
    Ok(TrainReport {
        steps: run.state.step,
        total_steps: plan.total_steps,
        skipped_steps: run.state.skipped_steps,
        resumed_from: resumed.map(|(_, s)| s.step),
        last_checkpoint: progress.last_checkpoint,
        last_metrics: progress.last_metrics,
        last_eval: progress.last_eval,
        reference_loaded,
        stopped,
        optimizer_state_bytes: run.opt.state_bytes(),
        gradient_bytes_at_update: run.gradient_bytes_at_update,
    })
}

/// What the loop tracks between steps.
struct Progress {
    start: usize,
    stop: usize,
    t0: Instant,
    last_metrics: Vec<(String, f64)>,
    last_eval: Vec<(String, f64)>,
    last_checkpoint: Option<PathBuf>,
    saved_at: Option<usize>,
}

impl Run<'_> {
    /// Every rank must agree to stop at the same step boundary (a stop asked on one rank stops all).
    fn stop_requested(&mut self, hooks: &mut dyn TrainHooks) -> Result<bool, TrainError> {
        let mut flag = [if hooks.should_stop() { 1.0 } else { 0.0 }];
        self.comm.all_reduce_sum_f64(&mut flag)?;
        if flag[0] > 0.0 {
            tracing::info!(
                step = self.state.step,
                "stop requested: checkpointing and ending"
            );
        }
        Ok(flag[0] > 0.0)
    }

    /// One step: its data, the update, its metrics row, the hooks, the progress bar and log line.
    fn train_step(
        &mut self,
        plan: &Plan,
        feed: &mut Feed,
        opts: &TrainOptions,
        hooks: &mut dyn TrainHooks,
        progress: &mut Progress,
    ) -> Result<(), TrainError> {
        let cfg = self.cfg;
        let step = self.state.step;
        let lr = schedule::lr_at(
            cfg.train.lr,
            cfg.train.schedule,
            step,
            plan.warmup,
            plan.total_steps,
        );
        let ts = Instant::now();
        let (micro, data_wait) = feed.next(step)?;
        let out = self.step(micro, lr)?;
        let secs = ts.elapsed().as_secs_f64();
        tracing::debug!(secs = data_wait, "waiting for data");
        if !out.applied {
            self.state.skipped_steps += 1;
            tracing::warn!(
                step = step + 1,
                grad_norm = out.grad_norm,
                "non-finite loss or gradient: step skipped"
            );
        }
        self.state.step += 1;
        let done = self.state.step;
        let epoch = done as f64 / plan.steps_per_epoch as f64;
        let named = out.sums.named("");
        let rates = [
            ("grad_norm", out.grad_norm),
            ("lr", lr),
            ("samples_per_sec", plan.batch_size as f64 / secs),
            ("tokens_per_sec", out.sums.tokens / secs),
        ];
        let extra = [
            ("data_wait_share", data_wait / secs),
            ("skipped_steps", self.state.skipped_steps as f64),
        ];
        let all: Vec<(&str, f64)> = rates.iter().chain(&extra).copied().collect();
        self.write_metrics(&metrics_row(done, epoch, &named, &all))?;
        let mut for_hooks = named.clone();
        for (k, v) in std::iter::once(("epoch", epoch)).chain(rates) {
            for_hooks.push((k.to_string(), v));
        }
        hooks.on_step(done, plan.total_steps, &for_hooks);
        progress.last_metrics = named;
        self.report_progress(plan, opts, progress, out.grad_norm, lr);
        Ok(())
    }

    /// The progress bar (a terminal) and, every `train.log_every` steps, the log line (rank 0).
    fn report_progress(&self, plan: &Plan, opts: &TrainOptions, p: &Progress, norm: f64, lr: f64) {
        let done = self.state.step;
        if self.rank() != 0 {
            return;
        }
        let per_step = p.t0.elapsed().as_secs_f64() / (done - p.start) as f64;
        let eta = per_step * (p.stop - done) as f64;
        let m = &p.last_metrics;
        if opts.progress_bar {
            draw_bar(
                done,
                p.stop,
                get(m, "loss"),
                get(m, "rewards/accuracies"),
                eta,
            );
        }
        if done % self.cfg.train.log_every == 0 || done == p.stop {
            if opts.progress_bar && done != p.stop {
                eprintln!();
            }
            tracing::info!(
                "step {done}/{} epoch {:.2} loss {:.4} acc {:.2} margin {:.4} grad_norm {:.3} lr {:.2e} | {:.2} s/step, ETA {:.0} s",
                plan.total_steps,
                done as f64 / plan.steps_per_epoch as f64,
                get(m, "loss"),
                get(m, "rewards/accuracies"),
                get(m, "rewards/margins"),
                norm,
                lr,
                per_step,
                eta
            );
        }
    }

    /// Evaluates at each epoch's end, or every `train.eval_every` steps and at the last one.
    fn evaluate_if_due(
        &mut self,
        plan: &Plan,
        hooks: &mut dyn TrainHooks,
        progress: &mut Progress,
    ) -> Result<(), TrainError> {
        let done = self.state.step;
        let due = match self.cfg.train.eval_every {
            0 => done % plan.steps_per_epoch == 0,
            k => done % k == 0 || done == plan.total_steps,
        };
        let Some(sums) = (if due { self.evaluate()? } else { None }) else {
            return Ok(());
        };
        let mut named = sums.named("eval/");
        if let Some(rates) = self.hallucination()? {
            tracing::info!(
                "eval at step {done}: hallucination chair_s {:.3} chair_i {:.3}",
                get(&rates, "eval/hallucination/chair_s"),
                get(&rates, "eval/hallucination/chair_i")
            );
            named.extend(rates);
        }
        let epoch = done as f64 / plan.steps_per_epoch as f64;
        self.write_metrics(&metrics_row(done, epoch, &named, &[]))?;
        hooks.on_step(done, plan.total_steps, &named);
        tracing::info!(
            "eval at step {done}: loss {:.4} accuracy {:.3}",
            named[0].1,
            get(&named, "eval/rewards/accuracies")
        );
        progress.last_eval = named;
        Ok(())
    }

    /// A checkpoint of the current step, reported to the hooks.
    fn save(
        &mut self,
        hooks: &mut dyn TrainHooks,
        progress: &mut Progress,
    ) -> Result<(), TrainError> {
        let dir = self.checkpoint()?;
        hooks.on_checkpoint(self.state.step, &dir);
        progress.last_checkpoint = Some(dir);
        progress.saved_at = Some(self.state.step);
        Ok(())
    }
}
