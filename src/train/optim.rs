//! AdamW with state this code owns (tch's optimizers cannot export theirs), so checkpoints resume exactly.
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, the same
//! operation order), on the trainable variables only.
//!
//! Invariants: moments are fp32 and exist only for trainable (requires-grad) variables; `step` counts the
//! updates applied; variables are visited in sorted-name order so runs are reproducible.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{}: {reason}", path.display())]
    State {
        path: std::path::PathBuf,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Debug)]
struct Slot {
    param: Tensor,
    /// fp32 master copy of a low-precision (bf16) parameter: updates of lr·1 ≈ 5e-7 are far below half a
    /// bf16 step and would round away if applied to the bf16 weights directly.
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    pub step: u64,
}

impl AdamW {
    /// Trainable variables by name. Weight decay skips 1-D tensors (biases and norm weights), as the usual
    /// transformer recipes do.
    pub fn new(params: BTreeMap<String, Tensor>, cfg: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, p)| {
                let zeros = || Tensor::zeros_like(&p).to_kind(Kind::Float);
                let decay = p.dim() > 1;
                let master = (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float));
                (
                    name,
                    Slot {
                        m: zeros(),
                        v: zeros(),
                        master,
                        param: p,
                        decay,
                    },
                )
            })
            .collect();
        Self {
            cfg,
            slots,
            step: 0,
        }
    }

    /// Trainable variables, sorted by name.
    pub fn params(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.slots.iter().map(|(k, s)| (k, &s.param))
    }

    /// Global L2 norm of the gradients (fp64 accumulation); NaN/inf propagate.
    pub fn grad_norm(&self) -> f64 {
        let mut sq = 0.0f64;
        for s in self.slots.values() {
            let g = s.param.grad();
            if g.defined() {
                // Accumulated in float64 inside the reduction, without a float64 copy of the gradient.
                let n = g.norm_scalaropt_dtype(2.0, Kind::Double).double_value(&[]);
                sq += n * n;
            }
        }
        sq.sqrt()
    }

    /// Multiplies every gradient by `factor` (clipping).
    pub fn scale_grads(&self, factor: f64) {
        tch::no_grad(|| {
            for s in self.slots.values() {
                let mut g = s.param.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    pub fn zero_grad(&self) {
        for s in self.slots.values() {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One AdamW update with learning rate `lr`.
    pub fn update(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as f64; // Python computes beta ** float(step)
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        tch::no_grad(|| {
            for s in self.slots.values_mut() {
                let g = s.param.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                // fp32 parameters are updated in place; low-precision ones through their master copy.
                let mut p32 = match &s.master {
                    Some(m) => m.shallow_clone(),
                    None => s.param.shallow_clone(),
                };
                // PyTorch's single-tensor AdamW (the CPU default), op for op, in place: `value=` arguments
                // that tch does not expose are folded into the first factor, which the kernels round the
                // same way (`value * t1` first).
                if s.decay && c.weight_decay != 0.0 {
                    let _ = p32.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = s.m.lerp_(&g, 1.0 - c.beta1);
                let _ =
                    s.v.g_mul_scalar_(c.beta2)
                        .addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let mut denom = s.v.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt()).g_add_scalar_(c.eps);
                let _ = p32.addcdiv_(&(&s.m * (-lr / bc1)), &denom);
                if s.master.is_some() {
                    s.param.copy_(&p32);
                }
            }
        });
    }

    /// Bytes of optimizer state (both moments), for memory plans and tests.
    pub fn state_bytes(&self) -> usize {
        self.slots.values().map(|s| 2 * s.m.numel() * 4).sum()
    }

    /// Writes moments (`m.<name>`, `v.<name>`) and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.slots.len() + 1);
        for (k, s) in &self.slots {
            named.push((format!("m.{k}"), s.m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{k}"), s.v.to_device(tch::Device::Cpu)));
            if let Some(master) = &s.master {
                named.push((format!("master.{k}"), master.to_device(tch::Device::Cpu)));
            }
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step as i64])));
        Tensor::write_safetensors(&named, path).map_err(|e| OptimError::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Restores state written by [`AdamW::save`]; every trainable variable must have its moments.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let err = |reason: String| OptimError::State {
            path: path.to_owned(),
            reason,
        };
        let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .collect();
        let step = tensors.get("step").ok_or_else(|| err("no step".into()))?;
        if step.numel() != 1 {
            return Err(err("the step tensor is not a single value".into()));
        }
        let step = i64::try_from(step.reshape([-1]).get(0)).map_err(|e| err(e.to_string()))?;
        for (k, s) in self.slots.iter_mut() {
            for (which, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let src = tensors.get(&format!("{which}.{k}")).ok_or_else(|| {
                    err(format!(
                        "no {which} moment for {k} (trainable set changed?)"
                    ))
                })?;
                if src.size() != dst.size() {
                    return Err(err(format!(
                        "{which}.{k}: shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.copy_(&src.to_device(dst.device()));
            }
            if let Some(master) = s.master.as_mut() {
                let src = tensors.get(&format!("master.{k}")).ok_or_else(|| {
                    err(format!("no fp32 master weights for {k} (dtype changed?)"))
                })?;
                master.copy_(&src.to_device(master.device()));
                tch::no_grad(|| s.param.copy_(&master.to_kind(s.param.kind())));
            }
        }
        let masters = self.slots.values().filter(|s| s.master.is_some()).count();
        let expected = 2 * self.slots.len() + masters + 1;
        if tensors.len() != expected {
            return Err(err(format!(
                "{} tensors but {} trainable variables need {expected} (trainable set changed?)",
                tensors.len(),
                self.slots.len()
            )));
        }
        self.step = step as u64;
        Ok(())
    }
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
            opt.zero_grad();
            p.to_kind(Kind::Float).sum(Kind::Float).backward();
            opt.update(5e-7);
        }
        let master = opt.slots["w"].master.as_ref().unwrap();
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
        assert!(opt2.slots["w"].master.as_ref().unwrap().equal(master));
        assert!(q.detach().equal(&p.detach()));
    }

    /// Six steps against `torch.optim.AdamW` itself (tests/fixtures/gen_adamw_fixture.py): weights and both
    /// moments agree bit for bit, decay and no-decay groups, learning rates from 5e-7 to 1e-2.
    #[test]
    fn equals_torch_optim_adamw_bit_for_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/adamw/adamw.safetensors");
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
            for (n, p) in &params {
                let mut g = p.grad();
                if !g.defined() {
                    // Materialise .grad the way backward does, then overwrite it.
                    p.sum(Kind::Float).backward();
                    g = p.grad();
                }
                tch::no_grad(|| g.copy_(&fx[&format!("grad.{step}.{n}")]));
            }
            opt.update(lr);
        }
        for n in &names {
            let s = &opt.slots[n];
            for (what, got) in [("param", &s.param.detach()), ("m", &s.m), ("v", &s.v)] {
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
            opt.zero_grad();
            (&p * &x).square().sum(Kind::Float).backward();
            opt.update(0.01);
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
        assert!(opt2.slots["w"].m.equal(&opt.slots["w"].m));
        let mut opt3 = AdamW::new(
            BTreeMap::from([("other".to_string(), p.detach().copy())]),
            cfg,
        );
        let e = opt3.load(&f).unwrap_err().to_string();
        assert!(e.contains("no m moment for other"), "{e}");
    }
}
