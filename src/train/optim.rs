//! AdamW with state this code owns (tch's optimizers cannot export theirs), so checkpoints resume exactly.
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, the same
//! operation order), on the trainable variables only.
//!
//! ZeRO (stages 1 and 2): with [`AdamW::sharded`] a rank keeps moments and fp32 masters only for the slices of
//! the flattened parameters it owns — per gradient bucket, `collective::chunk_range` of the bucket, the very
//! chunk the ring's reduce-scatter leaves reduced on that rank — and updates only those; the caller then
//! all-gathers the parameters. Unsharded, every slot is a whole tensor. The update is elementwise, so a slice
//! gets exactly the values the whole-tensor update gives it.
//!
//! Invariants: moments are fp32 and exist only for owned slices of trainable (requires-grad) variables;
//! `step` counts the updates applied; variables are visited in sorted-name order so runs are reproducible;
//! saved state is always whole tensors (`m.<name>`, `v.<name>`, `master.<name>`), whatever the sharding, so a
//! run resumes with another world size or stage.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::collective::{owned_pieces, Collective, CollectiveError};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{}: {reason}", path.display())]
    State {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("gathering the sharded optimizer state: {0}")]
    Gather(#[from] CollectiveError),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The optimizer state of one owned slice (`range` of the flattened parameter `param`).
#[derive(Debug)]
struct Slot {
    param: usize,
    range: Range<usize>,
    /// fp32 master copy of a low-precision (bf16) parameter: updates of lr·1 ≈ 5e-7 are far below half a
    /// bf16 step and would round away if applied to the bf16 weights directly.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    /// Every trainable variable, sorted by name, whether or not this rank owns a slice of it.
    params: Vec<(String, Tensor)>,
    slots: Vec<Slot>,
    /// (world, rank, bucket bytes) when sharded.
    sharding: Option<(usize, usize, usize)>,
    /// CPU only: two fp32 buffers of the largest slot's length for the update's temporaries. Fresh
    /// temporaries of that size cost page faults on every step (half the update's time on the `small`
    /// preset); CUDA's caching allocator reuses its blocks, so there they stay temporaries.
    scratch: Option<(Tensor, Tensor)>,
    pub step: u64,
}

/// Gradients of the trainable variables for one update: handles on the whole `.grad` tensors, or under ZeRO-2
/// copies of the owned slices taken right after the reduce-scatter ([`AdamW::keep_owned`]), after which the
/// trainer releases the whole ones (`train::release_grads`), so until the update a rank holds 1/world of them.
#[derive(Debug)]
pub enum Grads {
    /// Whole gradients in the optimizer's variable order; `None` for a variable that received none.
    Full(Vec<Option<Tensor>>),
    /// One flat gradient per slot (owned slice), `None` where the variable received none.
    Owned(Vec<Option<Tensor>>),
}

impl Grads {
    /// Bytes of the gradient tensors held.
    pub fn bytes(&self) -> usize {
        let (Grads::Full(g) | Grads::Owned(g)) = self;
        g.iter()
            .flatten()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

/// Flat view of a slice of a tensor (shares storage: in-place ops write through).
fn flat_slice(t: &Tensor, r: &Range<usize>) -> Tensor {
    t.detach()
        .view([-1])
        .narrow(0, r.start as i64, r.len() as i64)
}

impl AdamW {
    /// Trainable variables by name, all owned by this process. Weight decay skips 1-D tensors (biases and norm
    /// weights), as the usual transformer recipes do.
    pub fn new(params: BTreeMap<String, Tensor>, cfg: AdamWConfig) -> Self {
        crate::util::numerics::warm_up();
        let params: Vec<(String, Tensor)> = params.into_iter().collect();
        let owned = params
            .iter()
            .enumerate()
            .map(|(i, (_, p))| (i, 0..p.numel()))
            .collect();
        Self::with_slots(params, owned, cfg, None)
    }

    /// ZeRO: this rank (of `world`) owns, per gradient bucket of `bucket_bytes`, its chunk of the bucket.
    pub fn sharded(
        params: BTreeMap<String, Tensor>,
        cfg: AdamWConfig,
        world: usize,
        rank: usize,
        bucket_bytes: usize,
    ) -> Self {
        let params: Vec<(String, Tensor)> = params.into_iter().collect();
        let numels: Vec<usize> = params.iter().map(|(_, p)| p.numel()).collect();
        let owned = owned_pieces(&numels, bucket_bytes, world, rank);
        Self::with_slots(params, owned, cfg, Some((world, rank, bucket_bytes)))
    }

    fn with_slots(
        params: Vec<(String, Tensor)>,
        owned: Vec<(usize, Range<usize>)>,
        cfg: AdamWConfig,
        sharding: Option<(usize, usize, usize)>,
    ) -> Self {
        let slots = owned
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, range)| {
                let p = &params[i].1;
                let zeros = || Tensor::zeros([range.len() as i64], (Kind::Float, p.device()));
                let master =
                    (p.kind() != Kind::Float).then(|| flat_slice(p, &range).to_kind(Kind::Float));
                Slot {
                    param: i,
                    m: zeros(),
                    v: zeros(),
                    master,
                    range,
                }
            })
            .collect();
        Self {
            cfg,
            params,
            slots,
            sharding,
            scratch: None,
            step: 0,
        }
    }

    /// Whether this optimizer owns only part of the state (ZeRO).
    pub fn is_sharded(&self) -> bool {
        self.sharding.is_some()
    }

    /// Trainable variables, sorted by name.
    pub fn params(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.params.iter().map(|(k, p)| (k, p))
    }

    /// The gradient of slot `i` (a flat view sharing storage with `grads`), if its variable has one.
    fn slot_grad(&self, grads: &Grads, i: usize) -> Option<Tensor> {
        let s = &self.slots[i];
        match grads {
            Grads::Full(g) => g[s.param].as_ref().map(|g| flat_slice(g, &s.range)),
            Grads::Owned(g) => g[i].as_ref().map(Tensor::shallow_clone),
        }
    }

    /// Copies the owned slices out of whole gradients (after a reduce-scatter, the reduced ones) and drops the
    /// whole tensors, freeing them: ZeRO-2 keeps 1/world of the gradient memory from here to the update.
    pub fn keep_owned(&self, full: Vec<Option<Tensor>>) -> Grads {
        let owned = tch::no_grad(|| {
            self.slots
                .iter()
                .map(|s| {
                    full[s.param]
                        .as_ref()
                        .map(|g| flat_slice(g, &s.range).copy())
                })
                .collect()
        });
        Grads::Owned(owned)
    }

    /// Σ g² over the owned slices' gradients (fp64 accumulation; NaN/inf propagate). Unsharded this is the
    /// squared global norm; sharded, the caller sums it over ranks.
    pub fn grad_sq_local(&self, grads: &Grads) -> f64 {
        let mut sq = 0.0f64;
        for i in 0..self.slots.len() {
            if let Some(g) = self.slot_grad(grads, i) {
                // Accumulated in float64 inside the reduction, without a float64 copy of the gradient. (fp32
                // row norms summed in fp64 run ~10x faster but differ in the ~8th digit with the slicing,
                // which would let ZeRO's clipped updates round differently from plain data parallelism's.)
                let n = g.norm_scalaropt_dtype(2.0, Kind::Double).double_value(&[]);
                sq += n * n;
            }
        }
        sq
    }

    /// Global L2 norm of the gradients of an unsharded optimizer.
    pub fn grad_norm(&self, grads: &Grads) -> f64 {
        debug_assert!(!self.is_sharded(), "sharded: sum grad_sq_local over ranks");
        self.grad_sq_local(grads).sqrt()
    }

    /// Multiplies the owned gradients by `factor` (clipping).
    pub fn scale_grads(&self, grads: &Grads, factor: f64) {
        tch::no_grad(|| {
            for i in 0..self.slots.len() {
                if let Some(g) = self.slot_grad(grads, i) {
                    let _ = g.detach().g_mul_scalar_(factor);
                }
            }
        });
    }

    /// One AdamW update with learning rate `lr` of the owned slices, from `grads`.
    pub fn update(&mut self, lr: f64, grads: &Grads) {
        self.step += 1;
        let t = self.step as f64; // Python computes beta ** float(step)
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        let on_cpu =
            self.slots.first().map(|s| self.params[s.param].1.device()) == Some(tch::Device::Cpu);
        if on_cpu && self.scratch.is_none() {
            let n = self.slots.iter().map(|s| s.range.len()).max().unwrap_or(0) as i64;
            let buf = || Tensor::empty([n], (Kind::Float, tch::Device::Cpu));
            self.scratch = Some((buf(), buf()));
        }
        let scratch = self
            .scratch
            .as_ref()
            .map(|(a, b)| (a.shallow_clone(), b.shallow_clone()));
        tch::no_grad(|| {
            for i in 0..self.slots.len() {
                let Some(g) = self.slot_grad(grads, i) else {
                    continue;
                };
                let g = g.to_kind(Kind::Float);
                let s = &mut self.slots[i];
                let param = &self.params[s.param].1;
                // fp32 parameters are updated in place; low-precision ones through their master copy.
                let mut p32 = match &s.master {
                    Some(m) => m.shallow_clone(),
                    None => flat_slice(param, &s.range),
                };
                // PyTorch's single-tensor AdamW (the CPU default), op for op, in place: `value=` arguments
                // that tch does not expose are folded into the first factor, which the kernels round the
                // same way (`value * t1` first).
                if param.dim() > 1 && c.weight_decay != 0.0 {
                    let _ = p32.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                // The same kernels write into the CPU scratch buffers instead of fresh temporaries.
                let n = s.range.len() as i64;
                let (t1, t2) = match &scratch {
                    Some((a, b)) => (Some(a.narrow(0, 0, n)), Some(b.narrow(0, 0, n))),
                    None => (None, None),
                };
                // `mul.out` with a 0-dim scalar tensor: the same kernel as `x * k` (k rounded to fp32 alike);
                // `mul.Scalar_out` would compute into a temporary and copy.
                let scaled = |x: &Tensor, k: f64| match &t1 {
                    Some(out) => x.mul_out(out, &Tensor::from(k)),
                    None => x * k,
                };
                let _ = s.m.lerp_(&g, 1.0 - c.beta1);
                let _ =
                    s.v.g_mul_scalar_(c.beta2)
                        .addcmul_(&scaled(&g, 1.0 - c.beta2), &g);
                let mut denom = match &t2 {
                    Some(out) => s.v.sqrt_out(out),
                    None => s.v.sqrt(),
                };
                let _ = denom.g_div_scalar_(bc2.sqrt()).g_add_scalar_(c.eps);
                let _ = p32.addcdiv_(&scaled(&s.m, -lr / bc1), &denom);
                if s.master.is_some() {
                    flat_slice(param, &s.range).copy_(&p32);
                }
            }
        });
    }

    /// Bytes of optimizer state this rank holds (both moments and any fp32 masters).
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| (2 + usize::from(s.master.is_some())) * s.range.len() * 4)
            .sum()
    }

    /// The whole state as named tensors on the CPU (`m.<name>`, `v.<name>`, `master.<name>`, `step`) — what
    /// [`AdamW::save`] writes. Sharded, every rank must call this together: the slices are all-gathered
    /// bucket by bucket, and only `root` assembles (and returns) the tensors; other ranks get an empty list.
    pub fn gather_state(
        &self,
        comm: &mut dyn Collective,
        root: usize,
    ) -> Result<Vec<(String, Tensor)>, OptimError> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        let has_master = self.params.iter().any(|(_, p)| p.kind() != Kind::Float);
        let Some((world, rank, bucket_bytes)) = self.sharding else {
            for s in &self.slots {
                let (name, p) = &self.params[s.param];
                let shape = p.size();
                let cpu = |t: &Tensor| t.view(shape.as_slice()).to_device(tch::Device::Cpu);
                named.push((format!("m.{name}"), cpu(&s.m)));
                named.push((format!("v.{name}"), cpu(&s.v)));
                if let Some(master) = &s.master {
                    named.push((format!("master.{name}"), cpu(master)));
                }
            }
            named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
            return Ok(named);
        };
        let numels: Vec<usize> = self.params.iter().map(|(_, p)| p.numel()).collect();
        let buckets = crate::collective::plan_buckets(&numels, bucket_bytes);
        let mine = rank == root;
        let kinds: &[&str] = if has_master {
            &["m", "v", "master"]
        } else {
            &["m", "v"]
        };
        for &which in kinds {
            let full: Vec<Vec<f32>> = if mine {
                numels.iter().map(|&n| vec![0f32; n]).collect()
            } else {
                Vec::new()
            };
            let mut full = full;
            let mut slot_iter = 0usize;
            for bucket in &buckets {
                let mut buf = vec![0f32; bucket.len];
                let chunk = crate::collective::chunk_range(bucket.len, world, rank);
                // This rank's chunk of the bucket is exactly its next slots, in order.
                let mut at = chunk.start;
                while at < chunk.end {
                    let s = &self.slots[slot_iter];
                    let src = match which {
                        "m" => s.m.shallow_clone(),
                        "v" => s.v.shallow_clone(),
                        _ => s
                            .master
                            .as_ref()
                            .map(|t| t.shallow_clone())
                            .unwrap_or_else(|| {
                                flat_slice(&self.params[s.param].1, &s.range).to_kind(Kind::Float)
                            }),
                    };
                    let vals = Vec::<f32>::try_from(src.to_device(tch::Device::Cpu))
                        .map_err(CollectiveError::Tensor)?;
                    buf[at..at + vals.len()].copy_from_slice(&vals);
                    at += vals.len();
                    slot_iter += 1;
                }
                comm.all_gather_f32(&mut buf)?;
                if mine {
                    for p in &bucket.pieces {
                        full[p.tensor][p.range.clone()]
                            .copy_from_slice(&buf[p.offset..p.offset + p.range.len()]);
                    }
                }
            }
            if mine {
                for (i, vals) in full.into_iter().enumerate() {
                    let (name, p) = &self.params[i];
                    if which == "master" && p.kind() == Kind::Float {
                        continue;
                    }
                    named.push((
                        format!("{which}.{name}"),
                        Tensor::from_slice(&vals).view(p.size().as_slice()),
                    ));
                }
            }
        }
        if mine {
            named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        }
        Ok(named)
    }

    /// Writes the state of an unsharded optimizer (see [`AdamW::gather_state`]) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        assert!(
            !self.is_sharded(),
            "sharded: gather_state on every rank, then write on the root"
        );
        let named = self.gather_state(&mut crate::collective::LocalCollective, 0)?;
        write_state(&named, path)
    }

    /// Restores state written by [`AdamW::save`] (by any world size or stage): every trainable variable must
    /// have its moments (and masters, for bf16 weights); each slot copies its slice. The file is memory-mapped,
    /// so a rank reads only what it owns.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::State {
            path: path.to_owned(),
            reason,
        };
        let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        // SAFETY: checkpoints are written once (atomically renamed) and never modified in place.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| err(e.to_string()))?;
        let step = st.tensor("step").map_err(|_| err("no step".into()))?;
        let step = match (step.dtype(), step.data().len()) {
            (safetensors::Dtype::I64, 8) => {
                i64::from_le_bytes(step.data().try_into().expect("8 bytes"))
            }
            _ => return Err(err("the step tensor is not a single int64".into())),
        };
        let has_master = |name: &str| st.tensor(&format!("master.{name}")).is_ok();
        for s in self.slots.iter_mut() {
            let (name, p) = &self.params[s.param];
            let numel = p.numel();
            let read = |which: &str| -> Result<Tensor, OptimError> {
                let key = format!("{which}.{name}");
                let t = st.tensor(&key).map_err(|_| {
                    err(format!(
                        "no {which} {} for {name} (trainable set or dtype changed?)",
                        if which == "master" {
                            "weights"
                        } else {
                            "moment"
                        }
                    ))
                })?;
                let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
                if t.dtype() != safetensors::Dtype::F32 || shape != p.size() {
                    return Err(err(format!(
                        "{key}: {:?} {:?}, expected F32 {:?}",
                        t.dtype(),
                        t.shape(),
                        p.size()
                    )));
                }
                let bytes = &t.data()[s.range.start * 4..s.range.end * 4];
                debug_assert_eq!(t.data().len(), numel * 4);
                let vals: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                Ok(Tensor::from_slice(&vals).to_device(p.device()))
            };
            s.m.copy_(&read("m")?);
            s.v.copy_(&read("v")?);
            if let Some(master) = s.master.as_mut() {
                if !has_master(name) {
                    return Err(err(format!(
                        "no fp32 master weights for {name} (dtype changed?)"
                    )));
                }
                master.copy_(&read("master")?);
                tch::no_grad(|| flat_slice(p, &s.range).copy_(&master.to_kind(p.kind())));
            }
        }
        let masters = self
            .params
            .iter()
            .filter(|(_, p)| p.kind() != Kind::Float)
            .count();
        let expected = 2 * self.params.len() + masters + 1;
        if st.len() != expected {
            return Err(err(format!(
                "{} tensors but {} trainable variables need {expected} (trainable set changed?)",
                st.len(),
                self.params.len()
            )));
        }
        self.step = step as u64;
        Ok(())
    }
}

/// Writes gathered optimizer state (see [`AdamW::gather_state`]).
pub fn write_state(named: &[(String, Tensor)], path: &Path) -> Result<(), OptimError> {
    Tensor::write_safetensors(named, path).map_err(|e| OptimError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 weights move at a paper-sized learning rate (through the fp32 master) and round-trip.
    #[test]
    fn bf16_parameters_learn_through_fp32_masters() {
        let p = (Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu)) * 0.02)
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let before = p.detach().copy();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(BTreeMap::from([("w".to_string(), p.shallow_clone())]), cfg);
        for _ in 0..200 {
            let g = Tensor::run_backward(
                &[p.to_kind(Kind::Float).sum(Kind::Float)],
                &[&p],
                false,
                false,
            );
            opt.update(5e-7, &Grads::Full(g.into_iter().map(Some).collect()));
        }
        let master = opt.slots[0].master.as_ref().unwrap().view([64, 64]);
        let master = &master;
        // 200 steps of ~5e-7 move every master weight by ~1e-4, enough to change most bf16 values.
        let moved = (master - before.to_kind(Kind::Float))
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((moved - 1e-4).abs() < 2e-5, "master moved {moved}");
        let changed = p
            .detach()
            .ne_tensor(&before)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(changed > 0.5, "only {changed} of the bf16 weights changed");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("opt.safetensors");
        opt.save(&f).unwrap();
        let q = before.copy().set_requires_grad(true);
        let mut opt2 = AdamW::new(BTreeMap::from([("w".to_string(), q.shallow_clone())]), cfg);
        opt2.load(&f).unwrap();
        assert!(opt2.slots[0]
            .master
            .as_ref()
            .unwrap()
            .view([64, 64])
            .equal(master));
        assert!(q.detach().equal(&p.detach()));
    }

    /// Six steps against `torch.optim.AdamW` itself, run now on this machine (tests/oracles/adamw_oracle.py):
    /// weights and both moments agree bit for bit, decay and no-decay groups, learning rates from 5e-7 to 1e-2.
    #[test]
    fn equals_torch_optim_adamw_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adamw.safetensors");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/adamw_oracle.py");
        let python = std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e} (run through scripts/with-torch)"));
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let fx: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect();
        let hyper = Vec::<f64>::try_from(&fx["hyper"]).unwrap();
        let lrs = Vec::<f64>::try_from(&fx["lr"]).unwrap();
        let names: Vec<String> = fx
            .keys()
            .filter_map(|k| k.strip_prefix("init.").map(str::to_string))
            .collect();
        assert_eq!(names.len(), 4);
        let params: BTreeMap<String, Tensor> = names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    fx[&format!("init.{n}")].copy().set_requires_grad(true),
                )
            })
            .collect();
        let cfg = AdamWConfig {
            beta1: hyper[0],
            beta2: hyper[1],
            eps: hyper[2],
            weight_decay: hyper[3],
        };
        let shared = params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect();
        let mut opt = AdamW::new(shared, cfg);
        for (step, &lr) in lrs.iter().enumerate() {
            let grads = params
                .keys()
                .map(|n| Some(fx[&format!("grad.{step}.{n}")].copy()))
                .collect();
            opt.update(lr, &Grads::Full(grads));
        }
        for (i, n) in names.iter().enumerate() {
            let s = &opt.slots[i];
            assert_eq!(&opt.params[s.param].0, n);
            let shape = opt.params[s.param].1.size();
            let (m, v) = (s.m.view(shape.as_slice()), s.v.view(shape.as_slice()));
            for (what, got) in [
                ("param", &opt.params[s.param].1.detach()),
                ("m", &m),
                ("v", &v),
            ] {
                let want = &fx[&format!("{what}.{n}")];
                let diff = (got - want).abs().max().double_value(&[]);
                assert!(
                    got.equal(want),
                    "{what}.{n} differs from torch.optim.AdamW by up to {diff}"
                );
            }
        }
    }

    /// Two AdamW steps on f(p) = Σ (p·x)² against the update PyTorch computes, written out by hand.
    #[test]
    fn matches_pytorch_adamw_arithmetic() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0])
            .view([2, 2])
            .set_requires_grad(true);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(BTreeMap::from([("w".to_string(), p.shallow_clone())]), cfg);
        let x = Tensor::from_slice(&[0.3f32, -0.7, 1.1, 0.2]).view([2, 2]);
        // Reference in f64.
        let mut pr = [1.0f64, -2.0, 0.5, 3.0];
        let xs = [0.3f64, -0.7, 1.1, 0.2];
        let (mut m, mut v) = ([0.0f64; 4], [0.0f64; 4]);
        for t in 1..=2 {
            let g =
                Tensor::run_backward(&[(&p * &x).square().sum(Kind::Float)], &[&p], false, false);
            opt.update(0.01, &Grads::Full(g.into_iter().map(Some).collect()));
            for i in 0..4 {
                let g = 2.0 * pr[i] * xs[i] * xs[i];
                pr[i] *= 1.0 - 0.01 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let denom = (v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt()) + 1e-8;
                pr[i] -= 0.01 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got = Vec::<f32>::try_from(p.detach().view([-1])).unwrap();
        for i in 0..4 {
            assert!((got[i] as f64 - pr[i]).abs() < 1e-6, "{got:?} vs {pr:?}");
        }
        assert_eq!(opt.step, 2);
        // State round-trips.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("opt.safetensors");
        opt.save(&f).unwrap();
        let q = p.detach().copy().set_requires_grad(true);
        let mut opt2 = AdamW::new(BTreeMap::from([("w".to_string(), q)]), cfg);
        opt2.load(&f).unwrap();
        assert_eq!(opt2.step, 2);
        assert!(opt2.slots[0].m.equal(&opt.slots[0].m));
        let mut opt3 = AdamW::new(
            BTreeMap::from([("other".to_string(), p.detach().copy())]),
            cfg,
        );
        let e = opt3.load(&f).unwrap_err().to_string();
        assert!(e.contains("no m moment for other"), "{e}");
    }
}
