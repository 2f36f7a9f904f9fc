//! Process-wide numeric set-up, done once before any tensor work: the MKL VML warm-up that keeps libtorch's CPU
//! results the same in every process ([`warm_up`]), and the attention-kernel choice on CUDA ([`init_process`]).
//!
//! The PyTorch 2.11 wheel routes contiguous fp32/fp64 unary ops (`cos`, `sin`, `exp`, `log`, `sqrt`, `tanh`, …) to
//! MKL's VML, each intra-op thread calling it on its chunk. oneMKL 2024.2 picks a VML function's kernel lazily on
//! that function's first call, and when the first call happens on several threads at once one thread can run a
//! low-accuracy kernel for its whole chunk of that one call (pytorch/pytorch issue 188792: errors up to thousands
//! of ulp). In ddpo that was the rotary cos/sin tables of a fresh process's first forward: now and then a
//! precompute process under load wrote reference log-probs off by up to 6e-4, and the wrong cache stood for the
//! whole run. Calling every VML-routed function once on one element, before any parallel work, resolves each
//! dispatch on a single thread; later calls are then exact and unchanged (the warm-up changes no result).

use std::sync::Once;
use tch::{Device, Kind, Tensor};

static WARM: Once = Once::new();

/// A unary tensor op.
type UnaryOp = fn(&Tensor) -> Tensor;

/// The unary ops ATen hands to MKL VML (`aten/src/ATen/cpu/vml.h`, `IMPLEMENT_VML_MKL`) plus `log`'s own VML
/// path, each in fp32 and fp64 (separate MKL functions).
const VML_OPS: &[(&str, UnaryOp)] = &[
    ("acos", Tensor::acos),
    ("asin", Tensor::asin),
    ("atan", Tensor::atan),
    ("cos", Tensor::cos),
    ("erf", Tensor::erf),
    ("erfc", Tensor::erfc),
    ("erfinv", Tensor::erfinv),
    ("exp", Tensor::exp),
    ("log", Tensor::log),
    ("log10", Tensor::log10),
    ("log2", Tensor::log2),
    ("sin", Tensor::sin),
    ("sqrt", Tensor::sqrt),
    ("tan", Tensor::tan),
    ("tanh", Tensor::tanh),
    ("trunc", Tensor::trunc),
];

/// Resolves MKL VML's kernel dispatch once per process, on the calling thread. Idempotent and cheap after the
/// first call; other threads calling it meanwhile wait until it is done. Call before any tensor work: every
/// binary does at start ([`init_process`]), and so do model construction and the optimizer, for library users.
pub fn warm_up() {
    WARM.call_once(|| {
        for kind in [Kind::Float, Kind::Double] {
            // One element: below ATen's grain size, so the call stays on this thread.
            let x = Tensor::full([1], 0.5, (kind, Device::Cpu));
            for (_, op) in VML_OPS {
                let _ = op(&x);
            }
        }
    });
}

/// The environment variable that stops libtorch from preferring cuDNN's attention kernel on Hopper and newer GPUs.
pub const CUDNN_SDPA_DEPRIORITIZED: &str = "TORCH_CUDNN_SDPA_DEPRIORITIZED";

/// What every binary does first, before any thread or tensor exists: [`warm_up`], and, unless the user set it,
/// `TORCH_CUDNN_SDPA_DEPRIORITIZED=1`. On an H200 (cuDNN 9.19, PyTorch 2.11) bf16 attention otherwise goes to
/// cuDNN, which builds an execution plan for every new sequence length: about 135 ms per new shape against
/// 0.7 ms for the memory-efficient kernel (measured, BENCHMARKS.md). Training batches have a new length almost
/// every step, so `ddpo train` in bf16 ran 3-6 times slower than in fp32 until this was set.
pub fn init_process() {
    if std::env::var_os(CUDNN_SDPA_DEPRIORITIZED).is_none() {
        // Before any other thread exists (the binaries call this first in `main`): setenv is not thread-safe.
        std::env::set_var(CUDNN_SDPA_DEPRIORITIZED, "1");
    }
    warm_up();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the warm-up, multi-threaded fp32 calls are within 1 ulp of the correctly rounded result (the
    /// low-accuracy kernel of the race is off by hundreds to thousands of ulp).
    #[test]
    fn warm_ops_are_accurate_on_every_thread() {
        warm_up();
        let host: Vec<f32> = (0..200_000).map(|i| 0.001 + i as f32 * 0.0173).collect();
        let x = Tensor::from_slice(&host);
        type Exact = fn(f64) -> f64;
        let checks: [(&str, UnaryOp, Exact); 4] = [
            ("cos", Tensor::cos, f64::cos),
            ("sin", Tensor::sin, f64::sin),
            ("sqrt", Tensor::sqrt, f64::sqrt),
            ("log", Tensor::log, f64::ln),
        ];
        for (name, op, exact) in checks {
            let got = Vec::<f32>::try_from(&op(&x)).unwrap();
            let worst = host
                .iter()
                .zip(&got)
                .map(|(&v, &g)| ulps(exact(v as f64) as f32, g))
                .max()
                .unwrap();
            assert!(
                worst <= 1,
                "{name}: {worst} ulp from the correctly rounded value"
            );
        }
    }

    fn ulps(a: f32, b: f32) -> u32 {
        let key = |v: f32| {
            let b = v.to_bits() as i32;
            if b < 0 {
                i32::MIN - b
            } else {
                b
            }
        };
        key(a).abs_diff(key(b))
    }
}
