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

pub mod checkpoint;
pub mod data;
pub mod lora;
pub mod optim;
pub mod schedule;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use crate::collective::{self, Collective, CollectiveError, LocalCollective};
use crate::config::{Config, Dtype, FreezeTarget, ReferenceMode};
use crate::data::collate::{collate, Batch};
use crate::data::pipeline::{Example, Preprocessor};
use crate::data::{shards, DataError};
use crate::ddpo::{self, MetricSums};
use crate::model::llava::Llava;
use crate::refcache::{self, CacheError, RefCache};

use checkpoint::{CheckpointError, TrainerState};
use data::{Feed, FeedPlan, PairSource, RowRef};
use optim::{AdamW, AdamWConfig, Grads, OptimError};

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
}

/// Gradient all-reduce bucket size (as PyTorch DDP's default).
const BUCKET_BYTES: usize = 25 << 20;
/// Steps of data the background thread prepares ahead of the step.
const FEED_DEPTH: usize = 2;

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

/// One-line progress bar with ETA, redrawn in place.
fn draw_bar(done: usize, total: usize, loss: f64, acc: f64, eta: f64) {
    let width = 30;
    let filled = (width * done) / total.max(1);
    let bar: String = (0..width)
        .map(|i| {
            if i < filled {
                '='
            } else if i == filled {
                '>'
            } else {
                ' '
            }
        })
        .collect();
    let eta = eta.max(0.0) as u64;
    eprint!(
        "\r[{bar}] {done}/{total} loss {loss:.4} acc {acc:.2} ETA {:02}:{:02}:{:02}  ",
        eta / 3600,
        (eta / 60) % 60,
        eta % 60
    );
    if done == total {
        eprintln!();
    }
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

/// The weight dtype for a device: `fp32` and `bf16` as asked (bf16 works on CPU too), `auto` is bf16 on CUDA
/// and fp32 on CPU. The reference cache uses the same rule, so cached and online references agree.
pub fn weight_kind(dtype: Dtype, device: Device) -> Kind {
    match dtype {
        Dtype::Fp32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::Auto if device.is_cuda() => Kind::BFloat16,
        Dtype::Auto => Kind::Float,
    }
}

fn pad_id(pre: &Preprocessor) -> u32 {
    pre.text
        .tokenizer()
        .token_to_id(crate::data::tokenizer::PAD)
        .unwrap_or(0)
}

fn image_hw(pre: &Preprocessor) -> (usize, usize) {
    pre.image
        .fixed_output_size()
        .expect("checked when the preprocessor was built")
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

/// Everything one run holds.
struct Run<'a> {
    cfg: &'a Config,
    device: Device,
    model: Llava,
    vs: nn::VarStore,
    /// The LoRA adapters' variables, when `lora.rank` > 0 (the base in `vs` is then frozen).
    lora: Option<nn::VarStore>,
    reference: Option<(nn::VarStore, Llava)>,
    opt: AdamW,
    eval: Option<PairSource>,
    /// Zero gradients standing in, in the gradient exchange, for parameters that receive none (the vision
    /// layers after the feature layer), so every rank's buckets have the same layout.
    zero_grads: BTreeMap<String, Tensor>,
    /// See [`TrainReport::gradient_bytes_at_update`].
    gradient_bytes_at_update: usize,
    /// Open on rank 0 only: one writer for the job's metrics.
    metrics: Option<std::fs::File>,
    state: TrainerState,
    comm: &'a mut dyn Collective,
}

impl Run<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// This rank's contiguous share of a list (equal shares; callers make lengths divisible).
    fn my_share<T: Copy>(&self, all: &[T]) -> Vec<T> {
        crate::collective::chunk_range(all.len(), self.world(), self.rank())
            .map(|i| all[i])
            .collect()
    }

    /// Data parallelism keeps one model on every rank: every `cluster.replica_check_every` steps and before
    /// every checkpoint each rank compares a fingerprint of its weights (after `step` updates) with rank 0's,
    /// so a divergence (a bug, a bad node) stops the job instead of silently training different models.
    fn check_replicas_agree(&mut self, step: usize) -> Result<(), TrainError> {
        let mut fp = [0f64; 2];
        for (_, p) in self.opt.params() {
            // Reductions accumulate in float64 without materialising a float64 copy of the weights.
            let p = p.detach();
            fp[0] += p.sum(Kind::Double).double_value(&[]);
            fp[1] += p.norm_scalaropt_dtype(2.0, Kind::Double).double_value(&[]);
        }
        let mine: Vec<u8> = fp.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut root = mine.clone();
        self.comm.broadcast_bytes(&mut root, 0)?;
        if root != mine {
            return Err(TrainError::Setup(format!(
                "rank {} holds different weights from rank 0 after step {} (fingerprint {:?} vs {:?})",
                self.rank(),
                step,
                fp,
                root
            )));
        }
        Ok(())
    }

    /// Sums metric sums (and a count of non-finite ranks) over all ranks.
    fn reduce_sums(
        &mut self,
        sums: &MetricSums,
        bad: f64,
    ) -> Result<(MetricSums, f64), TrainError> {
        let mut v = sums.to_vec();
        v.push(bad);
        self.comm.all_reduce_sum_f64(&mut v)?;
        let bad = v.pop().expect("pushed");
        Ok((MetricSums::from_slice(&v), bad))
    }
    fn eval_examples(&mut self, rows: &[RowRef]) -> Result<Vec<Example>, TrainError> {
        let src = self.eval.as_mut().expect("eval split");
        rows.iter().map(|&r| src.example(r)).collect()
    }

    fn terms(&self, batch: &Batch) -> ddpo::PairTerms {
        terms(
            &self.model,
            self.reference.as_ref().map(|r| &r.1),
            batch,
            &self.cfg.ddpo,
        )
    }

    fn eval_collate(&self, exs: &[Example]) -> Batch {
        let pre = self.eval.as_ref().expect("eval split").preprocessor();
        collate(
            exs,
            pad_id(pre),
            image_hw(pre),
            self.cfg.train.shared_prefix,
        )
        .to_device(self.device)
    }

    /// One optimizer step over this rank's share of the global batch, as micro-batches. Returns the step's
    /// metric sums, the gradient norm (before clipping) and whether the update was applied.
    fn step(&mut self, micro: Vec<Batch>, lr: f64) -> Result<(MetricSums, f64, bool), TrainError> {
        // Each rank takes its equal share; its loss is a mean over its share, and the gradient all-reduce
        // averages over ranks, so the result is the gradient of the global batch's mean loss.
        let local = micro.iter().map(|b| b.pairs).sum::<usize>() as f64;
        let mut finite = true;
        let t_fb = Instant::now();
        let dropout = self.lora.is_some() && self.cfg.lora.dropout > 0.0;
        let mut acc = Accumulated::new(self.opt.params().map(|(_, p)| p.shallow_clone()).collect());
        for (i, batch) in micro.into_iter().enumerate() {
            let batch = batch.to_device(self.device);
            let reference = self.reference.as_ref().map(|r| &r.1);
            // LoRA dropout masks are a function of (seed, step, rank, micro-batch), so a resumed run draws
            // the masks the uninterrupted one would have.
            let seed = dropout
                .then(|| dropout_seed(self.cfg.train.seed, self.state.step + 1, self.rank(), i));
            finite &= micro_step(
                &self.model,
                reference,
                &batch,
                local,
                &self.cfg.ddpo,
                seed,
                &mut acc,
            );
        }
        tracing::debug!(secs = t_fb.elapsed().as_secs_f64(), "forward and backward");
        let sums = std::mem::take(&mut acc.sums);
        // Release `.grad`'s memory however this step ends (the update, a skipped step, an error).
        let _release = ReleaseGrads(&acc.params);
        let grads = acc.grads();
        let t_compute = Instant::now();
        let (sums, bad) = self.reduce_sums(&sums, if finite { 0.0 } else { 1.0 })?;
        if self.world() > 1 {
            // Every trainable tensor takes part, in name order (a zero stand-in for one without a gradient),
            // so the buckets — and with them each element's summation order — are the same whatever the
            // ZeRO stage, and match the optimizer's ownership.
            let stand_ins = &mut self.zero_grads;
            let exchanged: Vec<Tensor> = self
                .opt
                .params()
                .zip(&grads)
                .map(|((name, p), g)| match g {
                    Some(g) => g.shallow_clone(),
                    // Made once (which parameters get no gradient does not change between steps) and zeroed
                    // again each step, in case ranks ever disagreed about one.
                    None => {
                        let mut z = stand_ins
                            .entry(name.clone())
                            .or_insert_with(|| Tensor::zeros_like(p))
                            .shallow_clone();
                        tch::no_grad(|| z.zero_())
                    }
                })
                .collect();
            if self.cfg.train.zero_stage >= 2 {
                // Each rank keeps only its reduced chunk.
                collective::reduce_scatter_mean_tensors(&mut *self.comm, &exchanged, BUCKET_BYTES)?;
            } else {
                self.comm
                    .all_reduce_mean_tensors(&exchanged, BUCKET_BYTES)?;
            }
            tracing::debug!(
                secs = t_compute.elapsed().as_secs_f64(),
                "gradient exchange"
            );
        }
        // ZeRO-2 frees the whole gradients here and keeps the owned slices; otherwise they live until the
        // update. Either way they are dropped when this step ends, before the next forward.
        let grads = if self.opt.is_sharded() && self.cfg.train.zero_stage >= 2 {
            let owned = self.opt.keep_owned(grads);
            release_grads(&acc.params);
            owned
        } else {
            Grads::Full(grads)
        };
        let norm = if self.opt.is_sharded() {
            let mut sq = [self.opt.grad_sq_local(&grads)];
            self.comm.all_reduce_sum_f64(&mut sq)?;
            sq[0].sqrt()
        } else {
            self.opt.grad_norm(&grads)
        };
        if bad > 0.0 || !norm.is_finite() {
            return Ok((sums, norm, false));
        }
        let max = self.cfg.train.max_grad_norm;
        if max > 0.0 && norm > max {
            self.opt.scale_grads(&grads, max / (norm + 1e-6));
        }
        let t_update = Instant::now();
        self.opt.update(lr, &grads);
        self.gradient_bytes_at_update = grads.bytes();
        drop(grads);
        if self.opt.is_sharded() {
            // Each rank updated its slices; now everybody takes everybody's.
            let params: Vec<Tensor> = self.opt.params().map(|(_, p)| p.detach()).collect();
            collective::all_gather_tensors(&mut *self.comm, &params, BUCKET_BYTES)?;
        }
        tracing::debug!(secs = t_update.elapsed().as_secs_f64(), "optimizer update");
        let every = self.cfg.cluster.replica_check_every;
        if self.world() > 1 && every > 0 && (self.state.step + 1) % every == 0 {
            let t_check = Instant::now();
            self.check_replicas_agree(self.state.step + 1)?;
            tracing::debug!(secs = t_check.elapsed().as_secs_f64(), "replica check");
        }
        Ok((sums, norm, true))
    }

    fn evaluate(&mut self) -> Result<Option<MetricSums>, TrainError> {
        let Some(eval) = self.eval.as_ref() else {
            return Ok(None);
        };
        let all: Vec<RowRef> = eval.rows().to_vec();
        let rows = self.my_share(&all);
        let mut sums = MetricSums::default();
        for micro in rows.chunks(self.cfg.train.micro_batch_size.max(1)) {
            let exs = self.eval_examples(micro)?;
            let batch = self.eval_collate(&exs);
            let t = tch::no_grad(|| self.terms(&batch));
            sums.add(&t, batch.response_tokens);
        }
        let (sums, _) = self.reduce_sums(&sums, 0.0)?;
        Ok(Some(sums))
    }

    fn write_metrics(&mut self, row: &serde_json::Value) -> Result<(), TrainError> {
        let path = self.cfg.train.output_dir.join("metrics.jsonl");
        let Some(f) = self.metrics.as_mut() else {
            return Ok(());
        };
        writeln!(f, "{row}")
            .and_then(|_| f.flush())
            .map_err(|source| TrainError::Io { path, source })
    }

    /// Rank 0 writes; every rank waits until it is complete. A failure on rank 0 reaches the others as an
    /// error too (they stop at the barrier's timeout or on rank 0's closed connection).
    fn checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let dir = checkpoint::checkpoint_dir(&self.cfg.train.output_dir, self.state.step);
        if self.world() > 1 && self.cfg.cluster.replica_check_every > 0 {
            // A checkpoint holds rank 0's weights only: make sure they are everybody's.
            self.check_replicas_agree(self.state.step)?;
        }
        // Sharded state is gathered by every rank together; unsharded, rank 0 has it all.
        let opt_state = if self.opt.is_sharded() || self.rank() == 0 {
            self.opt.gather_state(&mut *self.comm, 0)?
        } else {
            Vec::new()
        };
        if self.rank() == 0 {
            checkpoint::save(
                &self.cfg.train.output_dir,
                &self.vs,
                &self.cfg.model.path,
                &opt_state,
                self.lora.as_ref().map(|l| (l, &self.cfg.lora)),
                &self.state,
                self.cfg.train.keep_last,
            )?;
        }
        self.comm.barrier()?;
        Ok(dir)
    }
}

/// Policy and reference log-probs of a micro-batch and its DDPO terms (reference from the batch's cached
/// log-probs, else from `reference` under no_grad).
pub fn terms(
    model: &Llava,
    reference: Option<&Llava>,
    batch: &Batch,
    cfg: &crate::config::DdpoConfig,
) -> ddpo::PairTerms {
    let policy = ddpo::batch_logps(model, batch);
    let reference = match (&batch.ref_logps, reference) {
        (Some(r), _) => r.shallow_clone(),
        (None, Some(m)) => tch::no_grad(|| ddpo::batch_logps(m, batch)),
        (None, None) => {
            panic!("a batch without cached reference log-probs needs a reference model")
        }
    };
    ddpo::pair_terms(&policy, &reference, batch, cfg)
}

/// What a step's micro-batches add up: the gradients of `params` (in their `.grad`) and metric sums.
pub struct Accumulated {
    pub params: Vec<Tensor>,
    pub sums: MetricSums,
}

impl Accumulated {
    pub fn new(params: Vec<Tensor>) -> Self {
        Self {
            params,
            sums: MetricSums::default(),
        }
    }

    /// The accumulated gradients, parallel to `params` (`None`: no gradient), as handles on `.grad`.
    pub fn grads(&self) -> Vec<Option<Tensor>> {
        grads_of(&self.params)
    }
}

/// The parameters' gradients (handles on `.grad`; `None` where there is none or it is released).
pub fn grads_of(params: &[Tensor]) -> Vec<Option<Tensor>> {
    params
        .iter()
        .map(|p| {
            let g = p.grad();
            (g.defined() && g.numel() > 0).then_some(g)
        })
        .collect()
}

/// Gives each released gradient its shape back, zeroed, for backward to add into: call it after the forward,
/// right before the first backward of a step.
pub fn refill_grads(params: &[Tensor]) {
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if g.defined() && g.numel() == 0 {
                let _ = g.resize_as_(p).zero_();
            }
        }
    });
}

/// Frees the memory of the parameters' gradients between steps, as `zero_grad(set_to_none=True)` does: tch
/// cannot unset `.grad`, so each becomes an empty tensor (its storage released) until [`micro_step`] gives
/// it back its shape, zeroed, right before the next backward ([`refill_grads`]). So no gradient memory
/// exists during a step's first forward, and backward still adds each gradient into `.grad` as soon as it
/// is ready.
pub fn release_grads(params: &[Tensor]) {
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if g.defined() && g.numel() > 0 {
                let _ = g.set_();
            }
        }
    });
}

/// Calls [`release_grads`] when dropped.
struct ReleaseGrads<'a>(&'a [Tensor]);

impl Drop for ReleaseGrads<'_> {
    fn drop(&mut self) {
        release_grads(self.0);
    }
}

/// Forward and backward of one micro-batch; each pair's loss enters with weight 1/`global_pairs`, and
/// backward adds the gradients into `.grad`, so over a step's micro-batches they sum to the gradient of the
/// global batch's mean loss. With `lora_dropout_seed`, LoRA dropout is on for the policy's forward, its masks
/// drawn from libtorch's default generator seeded with it. Returns whether the micro-batch's loss was finite.
pub fn micro_step(
    model: &Llava,
    reference: Option<&Llava>,
    batch: &Batch,
    global_pairs: f64,
    cfg: &crate::config::DdpoConfig,
    lora_dropout_seed: Option<i64>,
    acc: &mut Accumulated,
) -> bool {
    let t = match lora_dropout_seed {
        Some(seed) => {
            /// Turns dropout off again however the forward ends.
            struct Off<'a>(&'a Llava);
            impl Drop for Off<'_> {
                fn drop(&mut self) {
                    self.0.set_lora_training(false);
                }
            }
            // Seeding and drawing hold the global-generator lock: ranks run as threads of one process (tests)
            // must not draw from each other's seeds, nor reseed a model initialisation.
            let _rng = crate::model::global_rng_lock();
            tch::manual_seed(seed);
            model.set_lora_training(true);
            let _off = Off(model);
            terms(model, reference, batch, cfg)
        }
        None => terms(model, reference, batch, cfg),
    };
    let loss = t.loss.sum(Kind::Float) / global_pairs;
    let finite = loss.double_value(&[]).is_finite();
    // A gradient released after the last step gets its shape back, zeroed, only now: after the forward.
    refill_grads(&acc.params);
    loss.backward();
    acc.sums.add(&t, batch.response_tokens);
    finite
}

/// The LoRA dropout seed of one micro-batch: splitmix64 over (train.seed, step, rank, micro-batch index).
fn dropout_seed(seed: u64, step: usize, rank: usize, micro: usize) -> i64 {
    let mut h = seed;
    for v in [step, rank, micro] {
        h = data::SplitMix::new(h ^ v as u64).next_u64();
    }
    (h >> 1) as i64
}

fn metrics_row(
    step: usize,
    epoch: f64,
    named: &[(String, f64)],
    extra: &[(&str, f64)],
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), step.into());
    m.insert("epoch".into(), epoch.into());
    for (k, v) in named {
        m.insert(k.clone(), json_num(*v));
    }
    for (k, v) in extra {
        m.insert(k.to_string(), json_num(*v));
    }
    serde_json::Value::Object(m)
}

/// JSON has no NaN/inf: write them as strings so a skipped step's row stays valid JSON.
fn json_num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        v.into()
    } else {
        v.to_string().into()
    }
}

/// Keeps only the metrics rows of steps ≤ `step` (a resumed run rewrites what came after its checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })
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
    let (rank, world) = (comm.rank(), comm.world_size());
    let device = opts.device;
    let kind = weight_kind(cfg.model.dtype, device);
    // The memory plan (src/memplan.rs), before anything is loaded: logged, and a job that cannot fit is refused.
    crate::memplan::check_before_training(cfg, device, kind, rank, world)
        .map_err(TrainError::Setup)?;
    let out_dir = &cfg.train.output_dir;
    std::fs::create_dir_all(out_dir).map_err(|source| TrainError::Io {
        path: out_dir.clone(),
        source,
    })?;
    let train_shards = shards::discover(&cfg.data.train)?;
    let eval_shards = if cfg.data.eval.is_empty() {
        Vec::new()
    } else {
        shards::discover(&cfg.data.eval)?
    };
    let pre = Preprocessor::from_config(cfg)?;

    // Reference: the cache (computed first if anything is missing), or a frozen second model.
    let (train_src, eval_src, reference) = match cfg.reference.mode {
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
            let e = if eval_shards.is_empty() {
                None
            } else {
                Some(PairSource::cached(eval_shards, pre, &cache)?)
            };
            (t, e, None)
        }
        ReferenceMode::Online => {
            let path = cfg.reference_path();
            let (rvs, rm) =
                Llava::load(path, device, kind).map_err(|reason| TrainError::Model {
                    path: path.to_owned(),
                    reason,
                })?;
            rvs.variables().values_mut().for_each(|t| {
                let _ = t.requires_grad_(false);
            });
            let t = PairSource::online(train_shards, pre.clone(), cfg.data.on_bad_row)?;
            let e = if eval_shards.is_empty() {
                None
            } else {
                Some(PairSource::online(eval_shards, pre, cfg.data.on_bad_row)?)
            };
            (t, e, Some((rvs, rm)))
        }
    };

    let n = train_src.rows().len();
    let bs = cfg.train.batch_size;
    if bs % (world * cfg.train.micro_batch_size) != 0 {
        return Err(TrainError::Setup(format!(
            "train.batch_size = {bs} is not a multiple of train.micro_batch_size ({}) x world size ({world})",
            cfg.train.micro_batch_size
        )));
    }
    let steps_per_epoch = n / bs;
    if steps_per_epoch == 0 {
        return Err(TrainError::Setup(format!(
            "the training split has {n} usable pairs, fewer than train.batch_size = {bs}"
        )));
    }
    let total_steps = cfg.train.epochs * steps_per_epoch;
    let warmup = schedule::warmup_steps(cfg.train.warmup_ratio, total_steps);

    // Resume from the newest complete checkpoint, if any.
    if rank == 0 {
        checkpoint::remove_stale_temps(out_dir);
    }
    let latest = checkpoint::list(out_dir).pop();
    let (weights_dir, resumed) = match &latest {
        Some((_, dir)) => (dir.clone(), Some(checkpoint::read_state(dir)?)),
        None => (cfg.model.path.clone(), None),
    };
    if let Some(s) = &resumed {
        if s.train_rows != n
            || s.total_steps != total_steps
            || s.seed != cfg.train.seed
            || s.steps_per_epoch != steps_per_epoch
        {
            return Err(TrainError::Setup(format!(
                "{}: the checkpoint was made with {} pairs, {} steps per epoch, {} total steps, seed {}; this job has {n}, {steps_per_epoch}, {total_steps}, {} \
                 — resuming would not continue the same run (use a new train.output_dir)",
                weights_dir.display(),
                s.train_rows,
                s.steps_per_epoch,
                s.total_steps,
                s.seed,
                cfg.train.seed
            )));
        }
    }
    let (vs, mut model) =
        Llava::load(&weights_dir, device, kind).map_err(|reason| TrainError::Model {
            path: weights_dir.clone(),
            reason,
        })?;
    let lora = if cfg.lora.rank > 0 {
        Some(lora::attach(
            &mut model,
            &vs,
            cfg,
            device,
            kind,
            resumed.is_some().then_some(weights_dir.as_path()),
        )?)
    } else {
        None
    };
    let params = match &lora {
        Some(lvs) => lvs.variables().into_iter().collect(),
        None => trainable(&vs, &cfg.model.freeze),
    };
    if params.is_empty() {
        return Err(TrainError::Setup(
            "model.freeze leaves nothing to train".into(),
        ));
    }
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.train.weight_decay,
    };
    let mut opt = if world > 1 && cfg.train.zero_stage >= 1 {
        AdamW::sharded(params, adamw, world, rank, BUCKET_BYTES)
    } else {
        AdamW::new(params, adamw)
    };
    let metrics_path = out_dir.join("metrics.jsonl");
    let state = match &resumed {
        Some(s) => {
            opt.load(&weights_dir.join("optimizer.safetensors"))?;
            if rank == 0 {
                truncate_metrics(&metrics_path, s.step)?;
            }
            tracing::info!(step = s.step, checkpoint = %weights_dir.display(), "resuming");
            s.clone()
        }
        None => {
            if rank == 0 {
                let _ = std::fs::remove_file(&metrics_path);
            }
            TrainerState {
                step: 0,
                total_steps,
                steps_per_epoch,
                seed: cfg.train.seed,
                skipped_steps: 0,
                train_rows: n,
                format: checkpoint::STATE_FORMAT,
            }
        }
    };
    let metrics = if rank == 0 {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|source| TrainError::Io {
                    path: metrics_path.clone(),
                    source,
                })?,
        )
    } else {
        None
    };
    // Every rank must have read the checkpoint and truncated nothing before rank 0 writes anything new.
    comm.barrier()?;
    let reference_loaded = reference.is_some();
    let mut run = Run {
        cfg,
        device,
        model,
        vs,
        lora,
        reference,
        opt,
        zero_grads: BTreeMap::new(),
        gradient_bytes_at_update: 0,
        eval: eval_src,
        metrics,
        state,
        comm,
    };
    tracing::info!(
        rank,
        world,
        pairs = n,
        steps_per_epoch,
        total_steps,
        warmup,
        accumulation = bs / cfg.train.micro_batch_size,
        trainable = run.opt.params().count(),
        "training"
    );

    let start_step = run.state.step;
    let stop = opts.max_steps.unwrap_or(total_steps).min(total_steps);
    let mut feed = Feed::start(
        train_src,
        FeedPlan {
            rows: n,
            batch_size: bs,
            micro_batch_size: cfg.train.micro_batch_size,
            steps_per_epoch,
            seed: cfg.train.seed,
            world,
            rank,
            start: start_step,
            stop,
            shared_prefix: cfg.train.shared_prefix,
        },
        FEED_DEPTH,
    )?;
    let mut last_metrics = Vec::new();
    let mut last_eval = Vec::new();
    let mut last_checkpoint = latest.map(|(_, p)| p);
    let mut saved_at = if resumed.is_some() {
        Some(start_step)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut stopped = false;
    while run.state.step < stop {
        // Every rank must agree to stop at the same step boundary.
        let mut flag = [if hooks.should_stop() { 1.0 } else { 0.0 }];
        run.comm.all_reduce_sum_f64(&mut flag)?;
        if flag[0] > 0.0 {
            tracing::info!(
                step = run.state.step,
                "stop requested: checkpointing and ending"
            );
            stopped = true;
            break;
        }
        let step = run.state.step;
        let lr = schedule::lr_at(cfg.train.lr, cfg.train.schedule, step, warmup, total_steps);
        let ts = Instant::now();
        let (micro, data_wait) = feed.next(step)?;
        let (sums, norm, applied) = run.step(micro, lr)?;
        let secs = ts.elapsed().as_secs_f64();
        tracing::debug!(secs = data_wait, "waiting for data");
        if !applied {
            run.state.skipped_steps += 1;
            tracing::warn!(
                step = step + 1,
                grad_norm = norm,
                "non-finite loss or gradient: step skipped"
            );
        }
        run.state.step += 1;
        let done = run.state.step;
        let named = sums.named("");
        let row = metrics_row(
            done,
            done as f64 / steps_per_epoch as f64,
            &named,
            &[
                ("grad_norm", norm),
                ("lr", lr),
                ("samples_per_sec", bs as f64 / secs),
                ("tokens_per_sec", sums.tokens / secs),
                ("data_wait_share", data_wait / secs),
                ("skipped_steps", run.state.skipped_steps as f64),
            ],
        );
        run.write_metrics(&row)?;
        let mut for_hooks = named.clone();
        for (k, v) in [
            ("epoch", done as f64 / steps_per_epoch as f64),
            ("grad_norm", norm),
            ("lr", lr),
            ("samples_per_sec", bs as f64 / secs),
            ("tokens_per_sec", sums.tokens / secs),
        ] {
            for_hooks.push((k.to_string(), v));
        }
        hooks.on_step(done, total_steps, &for_hooks);
        last_metrics = named;
        let elapsed = t0.elapsed().as_secs_f64();
        let per_step = elapsed / (done - start_step) as f64;
        let eta = per_step * (stop - done) as f64;
        let get = |k: &str| {
            last_metrics
                .iter()
                .find(|(n, _)| n == k)
                .map(|x| x.1)
                .unwrap_or(f64::NAN)
        };
        if opts.progress_bar && rank == 0 {
            draw_bar(done, stop, get("loss"), get("rewards/accuracies"), eta);
        }
        if rank == 0 && (done % cfg.train.log_every == 0 || done == stop) {
            if opts.progress_bar && done != stop {
                eprintln!();
            }
            tracing::info!(
                "step {done}/{total_steps} epoch {:.2} loss {:.4} acc {:.2} margin {:.4} grad_norm {:.3} lr {:.2e} | {:.2} s/step, ETA {:.0} s",
                done as f64 / steps_per_epoch as f64,
                get("loss"),
                get("rewards/accuracies"),
                get("rewards/margins"),
                norm,
                lr,
                per_step,
                eta
            );
        }
        let end_of_epoch = done % steps_per_epoch == 0;
        let eval_now = match cfg.train.eval_every {
            0 => end_of_epoch,
            k => done % k == 0 || done == total_steps,
        };
        if eval_now {
            if let Some(sums) = run.evaluate()? {
                let named = sums.named("eval/");
                let row = metrics_row(done, done as f64 / steps_per_epoch as f64, &named, &[]);
                run.write_metrics(&row)?;
                let acc = named
                    .iter()
                    .find(|(k, _)| k == "eval/rewards/accuracies")
                    .map(|x| x.1);
                hooks.on_step(done, total_steps, &named);
                tracing::info!(
                    "eval at step {done}: loss {:.4} accuracy {:.3}",
                    named[0].1,
                    acc.unwrap_or(f64::NAN)
                );
                last_eval = named;
            }
        }
        if cfg.train.save_every > 0 && done % cfg.train.save_every == 0 && done < stop {
            let dir = run.checkpoint()?;
            hooks.on_checkpoint(done, &dir);
            last_checkpoint = Some(dir);
            saved_at = Some(done);
        }
    }
    if saved_at != Some(run.state.step) {
        let dir = run.checkpoint()?;
        hooks.on_checkpoint(run.state.step, &dir);
        last_checkpoint = Some(dir);
    }
    Ok(TrainReport {
        steps: run.state.step,
        total_steps,
        skipped_steps: run.state.skipped_steps,
        resumed_from: resumed.map(|s| s.step),
        last_checkpoint,
        last_metrics,
        last_eval,
        reference_loaded,
        stopped,
        optimizer_state_bytes: run.opt.state_bytes(),
        gradient_bytes_at_update: run.gradient_bytes_at_update,
    })
}
