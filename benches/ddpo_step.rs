//! The training step side by side with the Python baseline, on LLaVA-1.5 scaled down. Not a test.
//! Run: `make bench-step` (or `scripts/with-torch cargo bench --bench ddpo_step`).
//!
//! Shape (issue 7): the `small` preset (vocabulary 32,000, text 512 × 4 layers, vision 256 × 4 layers at
//! 336 px → 576 visual tokens), PAIRS pairs a step with PROMPT-token prompts (plus the 576 image tokens) and
//! ~RESPONSE-token answers, THREADS threads, fp32 CPU, every parameter trained, AdamW, lr 5e-7, clipping at 1.
//!
//! Three implementations run the same step on the same tokens and pixels, each in its own process (so each
//! peak RSS is its own), interleaved over ROUNDS rounds (so drift on a shared machine hits all alike):
//! - `python`: `benches/ddpo_step_transformers.py` — transformers `LlavaForConditionalGeneration`, the step
//!   written as the RLHF-V code does it ([chosen; rejected] rows, duplicated images, full logits);
//! - `ddpo split`: this project's step with `train.shared_prefix = false` (two rows per pair, image encoded
//!   once, vocabulary projection at response positions only);
//! - `ddpo shared`: the default, one `[image + prompt | chosen | rejected]` row per pair;
//! - `ddpo unshared`: the split rows with each image encoded for every row (what RLHF-V computes, without its
//!   full-vocabulary logits), for the share of the gain that comes from encoding the image once.
//!
//! Each reports the median of ITERS steps after one warm-up and the first step's loss (identical inputs, so
//! the three must agree to float tolerance: a correctness check riding along). The reference log-probs are
//! the initial policy's, perturbed deterministically, so that first loss is not the trivial ln 2.
//! Finally a `ddpo train` run on synthetic data (`ddpo synth`, 336 px) reports the share of step time spent
//! waiting for data (`data_wait_share` in its metrics.jsonl).
//!
//! On a GPU (`DEVICE=cuda`): ddpo's layouts in bf16 (weights bf16, fp32 masters and moments, as `ddpo train`
//! runs there), the baseline with `--device cuda --bf16` (bf16 autocast over fp32 weights, Hugging Face
//! Trainer's `bf16=True`), memory as nvidia-smi's peak `memory.used` of the card while each child runs, and the
//! matmul peak in bf16 at 8192³. `PYTHON_BASELINE=0` leaves the baseline out (a machine without transformers).
//!
//! Env: PAIRS (2), PROMPT (40), RESPONSE (100), ITERS (4), ROUNDS (2), THREADS (2), SEED (0), DEVICE (cpu),
//! PYTHON_BASELINE (1).
mod common;
use common::{env, median};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ddpo::config::DdpoConfig;
use ddpo::data::collate::{collate, Batch};
use ddpo::data::pipeline::{Example, RefLogps};
use ddpo::model::llava::Llava;
use ddpo::preset::init_model;
use ddpo::train::optim::{AdamW, AdamWConfig, Grads};
use ddpo::util::prng::SplitMix;
use tch::{Device, Kind, Tensor};

const LR: f64 = 5e-7;

/// `DEVICE`: where the measured steps run, and the weight dtype there (bf16 on CUDA, fp32 on the CPU).
fn bench_device() -> (Device, Kind) {
    match std::env::var("DEVICE").as_deref() {
        Ok("cuda") => (Device::Cuda(0), Kind::BFloat16),
        Ok(s) if s.starts_with("cuda:") => (
            Device::Cuda(s[5..].parse().expect("DEVICE=cuda:N")),
            Kind::BFloat16,
        ),
        Ok("cpu") | Err(_) => (Device::Cpu, Kind::Float),
        Ok(other) => panic!("DEVICE={other:?}: expected cpu, cuda or cuda:N"),
    }
}

/// Seconds since `t`, after the device's queued work finished (CUDA runs asynchronously).
fn elapsed(t: Instant, device: Device) -> f64 {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    t.elapsed().as_secs_f64()
}
const MAX_GRAD_NORM: f64 = 1.0;

/// Peak resident memory of this process (VmHWM) in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The comparison pairs: deterministic in SEED. A prompt is BOS, a few words, the 576 image tokens, the
/// question; the rejected answer is the chosen one with a changed span (and 10 tokens shorter), as the
/// diff of a corrected answer gives.
fn comparison_examples(
    model: &Llava,
    pairs: usize,
    prompt: usize,
    response: usize,
    seed: u64,
) -> Vec<Example> {
    let cfg = &model.config;
    let image_token = cfg.image_token_index();
    let n_image = cfg.num_image_tokens();
    let side = cfg.vision_config.image_size;
    let mut rng = SplitMix::new(seed);
    // Ordinary word ids: clear of the special ids at the bottom and of `<image>`.
    fn word(rng: &mut SplitMix) -> u32 {
        1000 + rng.below(30_000) as u32
    }
    (0..pairs)
        .map(|i| {
            let mut prompt_ids = vec![1u32];
            prompt_ids.extend((0..10).map(|_| word(&mut rng)));
            prompt_ids.extend(std::iter::repeat_n(image_token, n_image));
            prompt_ids.extend((0..prompt.saturating_sub(11)).map(|_| word(&mut rng)));
            let len = response + rng.below(9) as usize - 4;
            let mut chosen: Vec<u32> = (0..len).map(|_| word(&mut rng)).collect();
            chosen.push(2); // EOS
            let at = len / 3;
            let span = 12;
            let mut rejected = chosen.clone();
            let wrong: Vec<u32> = (0..span - 10).map(|_| word(&mut rng)).collect();
            rejected.splice(at..at + span, wrong.iter().copied());
            let mut chosen_changed = vec![false; chosen.len()];
            chosen_changed[at..at + span]
                .iter_mut()
                .for_each(|c| *c = true);
            let mut rejected_changed = vec![false; rejected.len()];
            rejected_changed[at..at + wrong.len()]
                .iter_mut()
                .for_each(|c| *c = true);
            let pixel_values = (0..3 * side * side)
                .map(|_| (rng.below(2001) as f32 - 1000.0) / 600.0)
                .collect();
            Example {
                shard: 0,
                row: i as u64,
                id: format!("pair-{i}"),
                pixel_values,
                prompt_ids,
                chosen_ids: chosen,
                rejected_ids: rejected,
                chosen_changed,
                rejected_changed,
                truncated: false,
                reference: None,
            }
        })
        .collect()
}

/// Attaches reference log-probs: the model's own (split layout), minus a small deterministic pattern.
fn attach_reference(model: &Llava, exs: &mut [Example]) {
    let side = model.config.vision_config.image_size;
    let batch = collate(exs, 0, (side, side), false);
    let lp = tch::no_grad(|| ddpo::logps::batch_logps(model, &batch));
    let b = exs.len();
    let t = lp.size()[1] as usize;
    let flat = Vec::<f32>::try_from(lp.reshape([-1])).unwrap();
    for (i, e) in exs.iter_mut().enumerate() {
        let p = e.prompt_ids.len();
        let take = |row: usize, n: usize| -> Vec<f32> {
            (0..n)
                .map(|k| flat[row * t + p + k] - 0.01 * ((k * 7 + row) % 5) as f32)
                .collect()
        };
        e.reference = Some(RefLogps {
            chosen: take(i, e.chosen_ids.len()),
            rejected: take(b + i, e.rejected_ids.len()),
        });
    }
}

fn inputs(model_dir: &Path) -> (Llava, Vec<Example>, (usize, usize)) {
    let (_vs, model) = Llava::load(model_dir, Device::Cpu, Kind::Float).unwrap();
    let mut exs = comparison_examples(
        &model,
        env("PAIRS", 2),
        env("PROMPT", 40),
        env("RESPONSE", 100),
        env("SEED", 0) as u64,
    );
    attach_reference(&model, &mut exs);
    let side = model.config.vision_config.image_size;
    (model, exs, (side, side))
}

/// Child process: ITERS + 1 training steps of one layout (`split`, `shared`, or `unshared`: the split rows
/// with each image encoded once per row, as the RLHF-V code does); prints one JSON line.
fn child(model_dir: &Path, layout: &str) {
    let shared = layout == "shared";
    let threads = env("THREADS", 2);
    tch::set_num_threads(threads as i32);
    let iters = env("ITERS", 4);
    let (_, exs, hw) = inputs(model_dir);
    // A fresh model: the reference forward above must not count as this model's history.
    let (device, kind) = bench_device();
    let (vs, model) = Llava::load(model_dir, device, kind).unwrap();
    let params = vs.variables().into_iter().collect();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    );
    let params: Vec<Tensor> = opt.params().map(|(_, p)| p.shallow_clone()).collect();
    let cfg = DdpoConfig::default();
    let batch: Batch = collate(&exs, 0, hw, shared).to_device(device);
    let tokens: i64 = batch.attention_mask.sum(Kind::Int64).int64_value(&[]);
    let (mut times, mut losses, mut phases) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..=iters {
        let t = Instant::now();
        let mut sums = ddpo::ddpo::MetricSums::default();
        let terms = if layout == "unshared" {
            let px = batch.pixel_values.index_select(0, &batch.image_rows);
            let h = model.hidden(&batch.input_ids, &batch.attention_mask, &px, None);
            let policy = model.response_logps(&h, &batch.labels);
            let reference = batch.ref_logps.as_ref().expect("cached reference");
            ddpo::ddpo::pair_terms(&policy, reference, &batch, &cfg)
        } else {
            ddpo::train::terms(&model, None, &batch, &cfg)
        };
        let t_fwd = elapsed(t, device);
        let loss = terms.loss.sum(Kind::Float) / batch.pairs as f64;
        assert!(loss.double_value(&[]).is_finite());
        ddpo::train::refill_grads(&params);
        loss.backward();
        let grads = Grads::Full(ddpo::train::grads_of(&params));
        sums.add(&terms, batch.response_tokens);
        let t_bwd = elapsed(t, device) - t_fwd;
        let norm = opt.grad_norm(&grads);
        if norm > MAX_GRAD_NORM {
            opt.scale_grads(&grads, MAX_GRAD_NORM / (norm + 1e-6));
        }
        let t_norm = elapsed(t, device) - t_fwd - t_bwd;
        opt.update(LR, &grads);
        drop(grads);
        ddpo::train::release_grads(&params);
        times.push(elapsed(t, device));
        phases.push([
            t_fwd,
            t_bwd,
            t_norm,
            times.last().unwrap() - t_fwd - t_bwd - t_norm,
        ]);
        losses.push(sums.loss / sums.pairs);
    }
    let med = median(times[1..].to_vec());
    println!(
        "{}",
        serde_json::json!({
            "impl": format!("ddpo {layout}"),
            "median_s": med,
            "best_s": times[1..].iter().cloned().fold(f64::INFINITY, f64::min),
            "pairs_per_s": batch.pairs as f64 / med,
            "peak_rss_mib": peak_rss_mib(),
            "losses": losses,
            "forward_s": median(phases[1..].iter().map(|p| p[0]).collect()),
            "backward_s": median(phases[1..].iter().map(|p| p[1]).collect()),
            "norm_and_clip_s": median(phases[1..].iter().map(|p| p[2]).collect()),
            "update_s": median(phases[1..].iter().map(|p| p[3]).collect()),
            "tokens_split_layout": tokens,
            "threads": threads,
        })
    );
}

/// Writes the split-layout batch in the format `ddpo_step_transformers.py --inputs` reads.
fn write_inputs(exs: &[Example], hw: (usize, usize), path: &Path) {
    let b = collate(exs, 0, hw, false);
    let named = [
        ("input_ids", b.input_ids.shallow_clone()),
        ("attention_mask", b.attention_mask.shallow_clone()),
        ("labels", b.labels.shallow_clone()),
        ("changed", b.changed.shallow_clone()),
        ("pixel_values", b.pixel_values.shallow_clone()),
        ("ref_logps", b.ref_logps.as_ref().unwrap().shallow_clone()),
    ];
    Tensor::write_safetensors(&named, path).unwrap();
}

/// Runs a child to completion and returns its last JSON line; on CUDA with `peak_gpu_mib` added: the peak of
/// nvidia-smi's `memory.used` on the card while it ran (polled every 100 ms; the child runs alone).
fn run_json(cmd: &mut Command) -> serde_json::Value {
    let (device, _) = bench_device();
    let Device::Cuda(index) = device else {
        return run_json_plain(cmd);
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let (mut v, peak) = std::thread::scope(|s| {
        let poll = s.spawn(|| {
            let mut peak = 0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let used = Command::new("nvidia-smi")
                    .args([
                        "--query-gpu=memory.used",
                        "--format=csv,noheader,nounits",
                        &format!("--id={index}"),
                    ])
                    .output()
                    .ok()
                    .and_then(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .trim()
                            .parse::<f64>()
                            .ok()
                    });
                peak = peak.max(used.unwrap_or(0.0));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            peak
        });
        let v = run_json_plain(cmd);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (v, poll.join().unwrap())
    });
    v["peak_gpu_mib"] = peak.into();
    v
}

fn run_json_plain(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("start a benchmark child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("{cmd:?} printed no JSON:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

fn python() -> String {
    std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `ddpo::train` (as `ddpo train` runs it) on synthetic data with a cached reference, in a child process:
/// the median `data_wait_share` of steps 2.. and the median step seconds.
fn data_wait(root: &Path, threads: usize) -> (f64, f64) {
    ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
        out_dir: root.join("data"),
        pairs: 16,
        shards: 2,
        seed: 1,
        image_size: 336,
        rows_per_group: 8,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();
    let r = root.display();
    let cfg = root.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{r}/model\"\n[reference]\ncache_dir = \"{r}/cache\"\n\
             [data]\ntrain = [\"{r}/data/train-*.parquet\"]\nmax_length = 2048\n\
             [train]\noutput_dir = \"{r}/run\"\nbatch_size = 4\nmicro_batch_size = 2\nepochs = 1\n\
             lr = 1e-5\nwarmup_ratio = 0.0\nlog_every = 1\n"
        ),
    )
    .unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .env("DDPO_STEP_CHILD", "train")
        .env("DDPO_STEP_CONFIG", &cfg)
        .env("THREADS", threads.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "the training child failed");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(root.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["data_wait_share"].is_number())
        .collect();
    let share = median(
        rows[1..]
            .iter()
            .map(|v| v["data_wait_share"].as_f64().unwrap())
            .collect(),
    );
    let step = median(
        rows[1..]
            .iter()
            .map(|v| 4.0 / v["samples_per_sec"].as_f64().unwrap())
            .collect(),
    );
    (share, step)
}

fn train_child(config: &Path) {
    tch::set_num_threads(env("THREADS", 2) as i32);
    let cfg = ddpo::config::Config::load_with_env(config, &[]).unwrap_or_else(|e| panic!("{e}"));
    let opts = ddpo::train::TrainOptions {
        device: bench_device().0,
        max_steps: None,
        progress_bar: false,
    };
    ddpo::train::train(&cfg, &opts).unwrap_or_else(|e| panic!("{e}"));
}

fn main() {
    // As the binaries do: the VML warm-up, and no cuDNN attention (its per-shape plans; util::numerics).
    ddpo::util::numerics::init_process();
    if let Ok(what) = std::env::var("DDPO_STEP_CHILD") {
        if what == "train" {
            train_child(&PathBuf::from(std::env::var("DDPO_STEP_CONFIG").unwrap()));
        } else {
            let dir = PathBuf::from(std::env::var("DDPO_STEP_MODEL").unwrap());
            child(&dir, &what);
        }
        return;
    }
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` (which passes --bench) measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("ddpo_step: a benchmark; run it with `make bench-step`");
        return;
    }
    let threads = env("THREADS", 2);
    let rounds = env("ROUNDS", 2);
    let iters = env("ITERS", 4);
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_start = load();
    let wall = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model_dir = root.join("model");
    init_model(&model_dir, "small", 0).unwrap();
    let (_, exs, hw) = inputs(&model_dir);
    let batch_file = root.join("batch.safetensors");
    write_inputs(&exs, hw, &batch_file);
    let me = std::env::current_exe().unwrap();
    // The checkout's script (a binary carried to another machine runs from its checkout's root).
    let script = [
        PathBuf::from("benches/ddpo_step_transformers.py"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/ddpo_step_transformers.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("benches/ddpo_step_transformers.py");
    let (device, _) = bench_device();
    let device_arg = std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into());
    let gpu_args: Vec<&str> = if device.is_cuda() {
        vec!["--device", &device_arg, "--bf16"]
    } else {
        vec![]
    };
    let with_python = env("PYTHON_BASELINE", 1) == 1;

    let mut results: Vec<(String, Vec<serde_json::Value>)> = [
        "python",
        "ddpo split",
        "ddpo shared",
        "ddpo unshared (image per row)",
    ]
    .iter()
    .map(|n| (n.to_string(), Vec::new()))
    .collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let mut py = Command::new(python());
        py.arg(&script)
            .arg("--model")
            .arg(&model_dir)
            .arg("--inputs")
            .arg(&batch_file)
            .args([
                "--iters",
                &iters.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .args(["--beta", "0.5", "--gamma", "5", "--score", "mean"])
            .args([
                "--lr",
                &LR.to_string(),
                "--max-grad-norm",
                &MAX_GRAD_NORM.to_string(),
            ]);
        py.args(&gpu_args);
        if with_python {
            results[0].1.push(run_json(&mut py));
        }
        for (i, layout) in [(1, "split"), (2, "shared"), (3, "unshared")] {
            let mut c = Command::new(&me);
            c.env("DDPO_STEP_CHILD", layout)
                .env("DDPO_STEP_MODEL", &model_dir)
                .env("OMP_NUM_THREADS", threads.to_string());
            results[i].1.push(run_json(&mut c));
        }
    }
    let peak = run_json_plain(
        Command::new(python())
            .arg(&script)
            .args(["--matmul-peak", "--threads", &threads.to_string()])
            .args(&gpu_args)
            .arg("--model")
            .arg(&model_dir),
    );
    let (wait_share, wait_step) = data_wait(root, threads);

    let n_image = 576;
    let tokens: Vec<usize> = exs
        .iter()
        .map(|e| 2 * e.prompt_ids.len() + e.chosen_ids.len() + e.rejected_ids.len())
        .collect();
    let (where_, mem_col, mem_key) = if device.is_cuda() {
        (
            format!(
                "bf16 on {device_arg} ({})",
                peak["gpu"].as_str().unwrap_or("GPU")
            ),
            "peak GPU MiB (nvidia-smi, card)",
            "peak_gpu_mib",
        )
    } else {
        (
            format!("fp32 CPU, {threads} threads"),
            "peak RSS MiB",
            "peak_rss_mib",
        )
    };
    println!(
        "DDPO training step, `small` preset (LLaVA-1.5 shape scaled down), {where_}, \
         {} pairs/step, prompts {} tokens incl. {n_image} image tokens, answers {}–{} tokens; \
         median of {iters} steps after a warm-up, {rounds} interleaved rounds",
        exs.len(),
        exs[0].prompt_ids.len(),
        exs.iter().map(|e| e.rejected_ids.len()).min().unwrap(),
        exs.iter().map(|e| e.chosen_ids.len()).max().unwrap(),
    );
    println!("split-layout tokens per pair: {tokens:?}");
    println!();
    println!(
        "| implementation | step s (median of rounds) | pairs/s | {mem_col} | first-step loss |"
    );
    println!("|---|---|---|---|---|");
    // (median step s, peak memory MiB, first-step loss) per implementation; None when it did not run.
    let mut med: Vec<Option<(f64, f64, f64)>> = Vec::new();
    for (name, rs) in &results {
        if rs.is_empty() {
            println!("| {name} | not run | | | |");
            med.push(None);
            continue;
        }
        let m = median(rs.iter().map(|r| r["median_s"].as_f64().unwrap()).collect());
        let mem = rs
            .iter()
            .map(|r| r[mem_key].as_f64().unwrap_or(f64::NAN))
            .fold(0.0, f64::max);
        let loss = rs[0]["losses"][0].as_f64().unwrap();
        println!(
            "| {name} | {m:.3} | {:.3} | {mem:.0} | {loss:.6} |",
            exs.len() as f64 / m
        );
        med.push(Some((m, mem, loss)));
    }
    println!();
    // Where ddpo's step goes (medians over rounds of each child's per-phase medians).
    for (name, rs) in &results[1..] {
        let phase = |k: &str| median(rs.iter().map(|r| r[k].as_f64().unwrap()).collect());
        println!(
            "{name}: forward {:.3} s, backward {:.3} s, grad norm + clipping {:.3} s, AdamW update + releasing the gradients {:.3} s",
            phase("forward_s"),
            phase("backward_s"),
            phase("norm_and_clip_s"),
            phase("update_s")
        );
    }
    println!();
    let (split, shared, unshared) = (med[1].unwrap(), med[2].unwrap(), med[3].unwrap());
    println!(
        "shared-prefix step vs split step: {:.2}x faster (target >= 1.5x); vs the unshared step with each \
         image encoded per row (RLHF-V's layout): {:.2}x",
        split.0 / shared.0,
        unshared.0 / shared.0
    );
    match med[0] {
        Some(py) => {
            println!(
                "ddpo (shared) vs the Python baseline: {:.2}x the throughput (target >= 2.5x); peak memory {:.0} vs {:.0} MiB",
                py.0 / shared.0,
                shared.1,
                py.1
            );
            println!(
                "first-step loss: python {:.6}, split {:.6}, shared {:.6}, unshared {:.6} (max diff {:.1e})",
                py.2,
                split.2,
                shared.2,
                unshared.2,
                [split, shared, unshared]
                    .iter()
                    .map(|m| (m.2 - py.2).abs())
                    .fold(0.0, f64::max)
            );
        }
        None => println!("the Python baseline was not run (PYTHON_BASELINE=0)"),
    }
    let flops = results[0]
        .1
        .first()
        .and_then(|r| r["flops_per_pair"]["step"].as_f64());
    let minimal = results[0]
        .1
        .first()
        .and_then(|r| r["minimal_flops_per_pair"]["step"].as_f64());
    let gflops = peak["peak"]["median_gflops"].as_f64();
    let peak_shape = peak["peak"]["shape"].as_str().unwrap_or("?");
    if let (Some(f), Some(m), Some(p)) = (flops, minimal, gflops) {
        println!(
            "model FLOPs per pair and step (forward + backward = 3 x forward, counted by the Python script): \
             {:.1} GFLOP as the baseline computes (LM head everywhere, images twice), {:.1} GFLOP at least \
             (each image once, LM head at response positions); matmul peak {p:.0} GFLOP/s (torch.mm {peak_shape}, median)",
            f / 1e9,
            m / 1e9
        );
        for (i, (name, _)) in results.iter().enumerate() {
            let Some((step_s, _, _)) = med[i] else {
                continue;
            };
            let pairs_s = exs.len() as f64 / step_s;
            println!(
                "  {name}: baseline-equivalent {:.0} GFLOP/s = {:.0} % of peak; minimal-work {:.0} GFLOP/s = {:.0} % of peak",
                pairs_s * f / 1e9,
                100.0 * pairs_s * f / 1e9 / p,
                pairs_s * m / 1e9,
                100.0 * pairs_s * m / 1e9 / p
            );
        }
    } else {
        println!("(no FLOP count without the Python baseline's JSON; matmul peak JSON {peak})");
    }
    println!(
        "data wait (`ddpo train`, synthetic 336 px pairs, batch 4, micro-batch 2): median {:.2} % of a {:.2} s step (target < 2 %)",
        100.0 * wait_share,
        wait_step
    );
    println!(
        "wall {:.0} s; load average at start {} at end {}",
        wall.elapsed().as_secs_f64(),
        load_start.trim(),
        load().trim()
    );
}
