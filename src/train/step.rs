//! One optimizer step, as torchtitan splits it: forward and backward over the rank's micro-batches
//! ([`micro_step`], gradients accumulating in `.grad`), the gradient exchange between ranks (all-reduce, or
//! reduce-scatter under ZeRO-2), then the update (norm, clipping, AdamW, the ZeRO all-gather, the periodic
//! replica check). Gradient memory is released after every step however it ends.

use std::collections::BTreeMap;
use std::time::Instant;

use tch::{Kind, Tensor};

use super::optim::Grads;
use super::run::Run;
use super::TrainError;
use crate::collective::{self, BUCKET_BYTES};
use crate::data::collate::Batch;
use crate::ddpo::{self, MetricSums};
use crate::model::llava::Llava;

/// What one step did: its global metric sums, the gradient norm before clipping, whether the update applied.
pub(super) struct StepOutcome {
    pub sums: MetricSums,
    pub grad_norm: f64,
    pub applied: bool,
}

impl Run<'_> {
    /// One optimizer step over this rank's share of the global batch, as micro-batches.
    pub(super) fn step(&mut self, micro: Vec<Batch>, lr: f64) -> Result<StepOutcome, TrainError> {
        let (acc, finite) = self.forward_backward(micro);
        // Release `.grad`'s memory however this step ends (the update, a skipped step, an error).
        let _release = ReleaseGrads(&acc.params);
        let grads = acc.grads();
        let (sums, bad) = self.reduce_sums(&acc.sums, if finite { 0.0 } else { 1.0 })?;
        self.exchange(&grads)?;
        // ZeRO-2 frees the whole gradients here and keeps the owned slices; otherwise they live until the
        // update. Either way they are dropped when this step ends, before the next forward.
        let grads = if self.opt.is_sharded() && self.cfg.train.zero_stage >= 2 {
            let owned = self.opt.keep_owned(grads);
            release_grads(&acc.params);
            owned
        } else {
            Grads::Full(grads)
        };
        let grad_norm = self.grad_norm(&grads)?;
        let applied = bad == 0.0 && grad_norm.is_finite();
        if applied {
            self.update(grads, grad_norm, lr)?;
        }
        Ok(StepOutcome {
            sums,
            grad_norm,
            applied,
        })
    }

    /// Forward and backward of every micro-batch. Each rank's loss is a mean over its share, and the
    /// exchange averages over ranks, so the result is the gradient of the global batch's mean loss.
    fn forward_backward(&mut self, micro: Vec<Batch>) -> (Accumulated, bool) {
        let local = micro.iter().map(|b| b.pairs).sum::<usize>() as f64;
        let t = Instant::now();
        let dropout = self.lora.is_some() && self.cfg.lora.dropout > 0.0;
        let mut acc = Accumulated::new(self.opt.params().map(|(_, p)| p.shallow_clone()).collect());
        let mut finite = true;
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
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "forward and backward");
        (acc, finite)
    }

    /// Averages the gradients over ranks in buckets (world > 1). Every trainable tensor takes part, in name
    /// order (a zero stand-in for one without a gradient), so the buckets, and with them each element's
    /// summation order, are the same whatever the ZeRO stage, and match the optimizer's ownership.
    fn exchange(&mut self, grads: &[Option<Tensor>]) -> Result<(), TrainError> {
        if self.world() == 1 {
            return Ok(());
        }
        let t = Instant::now();
        let exchanged = stand_in_zeros(&mut self.zero_grads, self.opt.params(), grads);
        if self.cfg.train.zero_stage >= 2 {
            // Each rank keeps only its reduced chunk.
            collective::reduce_scatter_mean_tensors(&mut *self.comm, &exchanged, BUCKET_BYTES)?;
        } else {
            self.comm
                .all_reduce_mean_tensors(&exchanged, BUCKET_BYTES)?;
        }
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "gradient exchange");
        Ok(())
    }

    /// The global gradient norm (sharded: each rank's owned share summed over ranks).
    fn grad_norm(&mut self, grads: &Grads) -> Result<f64, TrainError> {
        if !self.opt.is_sharded() {
            return Ok(self.opt.grad_norm(grads));
        }
        let mut sq = [self.opt.grad_sq_local(grads)];
        self.comm.all_reduce_sum_f64(&mut sq)?;
        Ok(sq[0].sqrt())
    }

    /// Clipping, the AdamW update, the ZeRO all-gather of the updated shares and the periodic replica check.
    fn update(&mut self, grads: Grads, norm: f64, lr: f64) -> Result<(), TrainError> {
        let max = self.cfg.train.max_grad_norm;
        if max > 0.0 && norm > max {
            self.opt.scale_grads(&grads, max / (norm + 1e-6));
        }
        let t = Instant::now();
        self.opt.update(lr, &grads);
        self.gradient_bytes_at_update = grads.bytes();
        drop(grads);
        if self.opt.is_sharded() {
            // Each rank updated its slices; now everybody takes everybody's.
            let params: Vec<Tensor> = self.opt.params().map(|(_, p)| p.detach()).collect();
            collective::all_gather_tensors(&mut *self.comm, &params, BUCKET_BYTES)?;
        }
        tracing::debug!(secs = t.elapsed().as_secs_f64(), "optimizer update");
        let every = self.cfg.cluster.replica_check_every;
        if self.world() > 1 && every > 0 && (self.state.step + 1) % every == 0 {
            let t = Instant::now();
            self.check_replicas_agree(self.state.step + 1)?;
            tracing::debug!(secs = t.elapsed().as_secs_f64(), "replica check");
        }
        Ok(())
    }
}

/// The tensors a gradient exchange sends: each gradient, or a zero stand-in for a parameter without one. The
/// stand-ins are made once (which parameters get no gradient does not change between steps) and zeroed again
/// each step, in case ranks ever disagreed about one.
fn stand_in_zeros<'p>(
    stand_ins: &mut BTreeMap<String, Tensor>,
    params: impl Iterator<Item = (&'p String, &'p Tensor)>,
    grads: &[Option<Tensor>],
) -> Vec<Tensor> {
    params
        .zip(grads)
        .map(|((name, p), g)| match g {
            Some(g) => g.shallow_clone(),
            None => {
                let mut z = stand_ins
                    .entry(name.clone())
                    .or_insert_with(|| Tensor::zeros_like(p))
                    .shallow_clone();
                tch::no_grad(|| z.zero_())
            }
        })
        .collect()
}

/// Policy and reference log-probs of a micro-batch and its DDPO terms (reference from the batch's cached
/// log-probs, else from `reference` under no_grad).
pub fn terms(
    model: &Llava,
    reference: Option<&Llava>,
    batch: &Batch,
    cfg: &crate::config::DdpoConfig,
) -> ddpo::PairTerms {
    let policy = crate::logps::batch_logps(model, batch);
    let reference = match (&batch.ref_logps, reference) {
        _ if cfg.loss == crate::config::LossKind::Sft => policy.detach(),
        (Some(r), _) => r.shallow_clone(),
        (None, Some(m)) => tch::no_grad(|| crate::logps::batch_logps(m, batch)),
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
pub(super) fn dropout_seed(seed: u64, step: usize, rank: usize, micro: usize) -> i64 {
    let mut h = seed;
    for v in [step, rank, micro] {
        h = crate::util::prng::SplitMix::new(h ^ v as u64).next_u64();
    }
    (h >> 1) as i64
}
