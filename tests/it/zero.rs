//! ZeRO stages 1 and 2 on the CPU ring (ranks as threads on loopback, tiny preset): the same weights as plain
//! data parallelism, optimizer state split 1/world, and a run saved with 3 ranks resumed on 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ddpo::config::Config;
use ddpo::train::optim::{AdamW, AdamWConfig};
use ddpo::train::{train_distributed, NoHooks, TrainOptions, TrainReport};
use tch::{Kind, Tensor};

/// The tests of this file run one at a time (`crate::common::serial`).
use crate::common::serial;

struct Job {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Job {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        ddpo::preset::init_model(&root.join("model"), "tiny", 0).unwrap();
        ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
            out_dir: root.join("data"),
            pairs: 24,
            shards: 2,
            seed: 1,
            image_size: 48,
            rows_per_group: 8,
            prefix: "train".into(),
            difficulty: ddpo::data::synth::Difficulty::Easy,
        })
        .unwrap();
        let job = Job { _dir: dir, root };
        ddpo::refcache::precompute(&job.config("pre", 1, 0), tch::Device::Cpu).unwrap();
        job
    }

    /// Global batch 6, micro-batch 1: accumulation 3 on 2 ranks, 2 on 3; 4 steps an epoch, 2 epochs.
    fn config(&self, name: &str, world: usize, stage: u8) -> Config {
        self.config_with(name, world, stage, "")
    }

    fn config_with(&self, name: &str, world: usize, stage: u8, train: &str) -> Config {
        let r = self.root.display();
        let text = format!(
            "[model]\npath = \"{r}/model\"\n[reference]\ncache_dir = \"{r}/cache\"\n\
             [data]\ntrain = [\"{r}/data/train-*.parquet\"]\nmax_length = 256\n\
             [train]\noutput_dir = \"{r}/{name}\"\nseed = 3\nwarmup_ratio = 0.0\nbatch_size = 6\n\
             micro_batch_size = 1\nepochs = 2\nlr = 2e-3\nweight_decay = 0.01\nzero_stage = {stage}\n{train}\n\
             [cluster]\nworld_size = {world}\nreplica_check_every = 1\n"
        );
        let p = self.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Trains `cfg` with `world` ranks as threads joined by a TCP ring.
fn run(cfg: &Config, world: usize, max_steps: Option<usize>) -> Vec<TrainReport> {
    let rings = crate::common::ring(world, Duration::from_secs(30));
    std::thread::scope(|s| {
        let handles: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(rank, mut ring)| {
                s.spawn(move || {
                    let opts = TrainOptions {
                        device: tch::Device::Cpu,
                        max_steps,
                        progress_bar: false,
                    };
                    train_distributed(cfg, &opts, &mut ring, &mut NoHooks)
                        .unwrap_or_else(|e| panic!("rank {rank}: {e}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest |a − b| over the tensors of two safetensors files (same names required), and the largest |a|.
fn max_diff(a: &Path, b: &Path) -> (f64, f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let (mut worst, mut largest) = (0f64, 0f64);
    for (k, x) in &ta {
        if k == "step" {
            assert!(x.equal(&tb[k]));
            continue;
        }
        let (x, y) = (x.to_kind(Kind::Double), tb[k].to_kind(Kind::Double));
        worst = worst.max((&x - &y).abs().max().double_value(&[]));
        largest = largest.max(x.abs().max().double_value(&[]));
    }
    (worst, largest)
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// ZeRO-1 and ZeRO-2 with 2 and 3 ranks end with plain data parallelism's weights and optimizer state, bit for
/// bit: the reduced chunks are the all-reduce's bytes and the update is elementwise.
#[test]
fn zero_stages_equal_plain_data_parallel() {
    let _serial = serial();
    let job = Job::new();
    for world in [2, 3] {
        let plain = run(&job.config(&format!("plain{world}"), world, 0), world, None);
        let plain_dir = plain[0].last_checkpoint.clone().unwrap();
        assert_eq!(plain[0].steps, 8);
        for stage in [1u8, 2] {
            let name = format!("zero{stage}-{world}");
            let reports = run(&job.config(&name, world, stage), world, None);
            let dir = reports[0].last_checkpoint.clone().unwrap();
            // The trainer really sharded: the ranks' state adds up to one unsharded rank's.
            let shares: Vec<usize> = reports.iter().map(|r| r.optimizer_state_bytes).collect();
            assert_eq!(
                shares.iter().sum::<usize>(),
                plain[0].optimizer_state_bytes,
                "{shares:?}"
            );
            // ZeRO-2 keeps only the owned gradient slices after the reduce-scatter: the ranks' add up to one
            // plain rank's whole gradients. ZeRO-1 keeps whole gradients.
            let grads: Vec<usize> = reports.iter().map(|r| r.gradient_bytes_at_update).collect();
            let full = plain[0].gradient_bytes_at_update;
            assert!(full > 0);
            if stage == 2 {
                assert_eq!(grads.iter().sum::<usize>(), full, "{grads:?}");
                assert!(
                    grads.iter().all(|&g| g <= full / world + full / 10),
                    "{grads:?} of {full}"
                );
            } else {
                assert!(grads.iter().all(|&g| g == full), "{grads:?} vs {full}");
            }
            for file in ["model.safetensors", "optimizer.safetensors"] {
                let (worst, largest) = max_diff(&plain_dir.join(file), &dir.join(file));
                eprintln!(
                    "world {world} stage {stage} {file}: max diff {worst:e} (largest {largest:e})"
                );
                assert!(largest > 1e-3, "{file}: nothing to compare");
                assert_eq!(
                    worst, 0.0,
                    "world {world}, ZeRO-{stage}: {file} differs from plain DP by {worst}"
                );
            }
            let (a, b) = (
                losses(&job.root.join(format!("plain{world}"))),
                losses(&job.root.join(&name)),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-6, "losses {a:?} vs {b:?}");
            }
        }
    }
}

/// With clipping on every step (max_grad_norm far below the gradient norm), ZeRO-2 on 3 ranks still ends
/// with plain data parallelism's weights: the global norm is summed from per-rank slices, and its last bits
/// must not change the clipped update.
#[test]
fn zero_with_clipping_equals_plain_data_parallel() {
    let _serial = serial();
    let job = Job::new();
    let clip = "max_grad_norm = 0.001";
    let plain = run(&job.config_with("plain-clip", 3, 0, clip), 3, None);
    let zero = run(&job.config_with("zero-clip", 3, 2, clip), 3, None);
    let norms = |name: &str| -> Vec<f64> {
        std::fs::read_to_string(job.root.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["grad_norm"].as_f64())
            .collect()
    };
    let (a, b) = (norms("plain-clip"), norms("zero-clip"));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            *x > 0.01,
            "clipping must fire at every step: grad norms {a:?}"
        );
        assert!((x - y).abs() <= 1e-9 * x, "grad norms {a:?} vs {b:?}");
    }
    let (worst, largest) = max_diff(
        &plain[0]
            .last_checkpoint
            .clone()
            .unwrap()
            .join("model.safetensors"),
        &zero[0]
            .last_checkpoint
            .clone()
            .unwrap()
            .join("model.safetensors"),
    );
    eprintln!("clipped: weights max diff {worst:e} (largest {largest:e})");
    assert_eq!(
        worst, 0.0,
        "clipped ZeRO-2 weights differ from plain DP by {worst}"
    );
}

/// Each rank's optimizer state is its 1/world share: the shares add up to the unsharded state.
#[test]
fn sharded_state_is_one_world_th_per_rank() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    ddpo::preset::init_model(dir.path(), "tiny", 0).unwrap();
    let (vs, _model) =
        ddpo::model::llava::Llava::load(dir.path(), tch::Device::Cpu, Kind::Float).unwrap();
    let params = || -> BTreeMap<String, Tensor> {
        vs.variables()
            .into_iter()
            .map(|(k, v)| (k, v.shallow_clone()))
            .collect()
    };
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let full = AdamW::new(params(), cfg).state_bytes();
    for world in [2usize, 3] {
        // Small buckets: many of them, so the split is tested across bucket boundaries.
        let shares: Vec<usize> = (0..world)
            .map(|r| AdamW::sharded(params(), cfg, world, r, 4096).state_bytes())
            .collect();
        assert_eq!(
            shares.iter().sum::<usize>(),
            full,
            "world {world}: {shares:?}"
        );
        for s in &shares {
            let ideal = full as f64 / world as f64;
            assert!(
                (*s as f64 - ideal).abs() / ideal < 0.01,
                "world {world}: shares {shares:?} of {full}"
            );
        }
        eprintln!("world {world}: optimizer state per rank {shares:?} bytes of {full}");
    }
}

/// A ZeRO-2 run checkpointed by 3 ranks continues on 2 ranks (ZeRO-1) with the loss curve of a run that
/// never stopped.
#[test]
fn zero_run_saved_on_three_ranks_resumes_on_two() {
    let _serial = serial();
    let job = Job::new();
    let straight = run(&job.config("straight", 3, 2), 3, None);
    assert_eq!(straight[0].steps, 8);
    let first = run(&job.config("moved", 3, 2), 3, Some(3));
    assert_eq!(first[0].steps, 3);
    let second = run(&job.config("moved", 2, 1), 2, None);
    assert_eq!(second[0].resumed_from, Some(3));
    assert_eq!(second[0].steps, 8);
    let (a, b) = (
        losses(&job.root.join("straight")),
        losses(&job.root.join("moved")),
    );
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "loss curves differ: {a:?} vs {b:?}");
    }
    // Two ranks sum gradients in another order than three, and Adam turns last-bit differences of near-zero
    // gradients into up to ±lr per step for those elements; a resume that lost or misplaced optimizer state
    // would move weights by many lr steps (and change the losses above).
    let (worst, _) = max_diff(
        &straight[0]
            .last_checkpoint
            .clone()
            .unwrap()
            .join("model.safetensors"),
        &second[0]
            .last_checkpoint
            .clone()
            .unwrap()
            .join("model.safetensors"),
    );
    assert!(worst < 0.25 * 2e-3, "weights differ by {worst}");
}

/// bf16 weights with fp32 master weights under ZeRO-2 on 2 ranks — the mixed precision a CUDA run uses, here on
/// the CPU: the loss curve follows fp32's within bf16 rounding, and every checkpointed weight is its gathered
/// fp32 master rounded to bf16 (the weights come from the masters, not from bf16 arithmetic on themselves).
#[test]
fn bf16_weights_follow_fp32_masters_under_zero2() {
    let _serial = serial();
    let job = Job::new();
    let fp32 = run(&job.config("f32", 2, 0), 2, None);
    let mut cfg = job.config("b16", 2, 2);
    cfg.model.dtype = ddpo::config::Dtype::Bf16;
    // The bf16 reference cache (its own fingerprint), as the coordinator would make it.
    ddpo::refcache::precompute(&cfg, tch::Device::Cpu).unwrap();
    let reports = run(&cfg, 2, None);
    assert_eq!(reports[0].steps, fp32[0].steps);
    let (a, b) = (losses(&job.root.join("f32")), losses(&job.root.join("b16")));
    eprintln!("fp32 losses {a:?}\nbf16 losses {b:?}");
    assert_eq!(a.len(), b.len());
    let moved = (a[0] - a[a.len() - 1]).abs();
    assert!(
        moved > 0.01,
        "the fp32 loss barely moved ({moved}): nothing to compare"
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 0.1 * moved.max(0.05),
            "fp32 {x} vs bf16 {y}"
        );
    }
    let dir = reports[0].last_checkpoint.clone().unwrap();
    let weights = tensors(&dir.join("model.safetensors"));
    let opt = tensors(&dir.join("optimizer.safetensors"));
    let (mut masters, mut finer) = (0, 0);
    for (name, w) in &weights {
        let Some(m) = opt.get(&format!("master.{name}")) else {
            continue;
        };
        masters += 1;
        assert_eq!(m.kind(), Kind::Float);
        let rounded = m.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        assert!(
            rounded.equal(w),
            "{name}: the weight is not its master rounded to bf16"
        );
        finer += usize::from(!m.equal(w));
    }
    // Updates far below a bf16 step accumulate in the masters (the vision layer after the feature layer and
    // post_layernorm get no gradient and stay as loaded: 46 of the tiny model's 64 tensors move).
    assert!(
        masters > 10 && finer * 3 > masters * 2,
        "{finer} of {masters} masters finer than bf16"
    );
}

/// LoRA composes with data parallelism and ZeRO-2: two ranks training adapters (dropout on) under ZeRO-2 end
/// with the adapters of plain two-rank data parallelism, bit for bit, and the base weights untouched.
#[test]
fn lora_under_zero2_equals_plain_data_parallel_lora() {
    let _serial = serial();
    let job = Job::new();
    let lora = "[lora]\nrank = 4\nalpha = 8\ndropout = 0.1";
    let plain = run(&job.config_with("lora-plain", 2, 0, lora), 2, None);
    let zero = run(&job.config_with("lora-zero2", 2, 2, lora), 2, None);
    assert_eq!(plain[0].steps, 8);
    let file = "adapter_model.safetensors";
    let (a, b) = (
        plain[0].last_checkpoint.clone().unwrap(),
        zero[0].last_checkpoint.clone().unwrap(),
    );
    let (worst, largest) = max_diff(&a.join(file), &b.join(file));
    eprintln!("LoRA world 2, ZeRO-2 vs plain: adapters max diff {worst:e} (largest {largest:e})");
    assert!(largest > 1e-3, "nothing to compare");
    assert_eq!(
        worst, 0.0,
        "ZeRO-2 adapters differ from plain DP by {worst}"
    );
    // The adapters' optimizer state is what ZeRO shards: the ranks' shares add up to one plain rank's.
    let shares: usize = zero.iter().map(|r| r.optimizer_state_bytes).sum();
    assert_eq!(shares, plain[0].optimizer_state_bytes);
    let (base, _) = max_diff(
        &job.root.join("model/model.safetensors"),
        &b.join("model.safetensors"),
    );
    assert_eq!(base, 0.0, "the frozen base moved");
}
