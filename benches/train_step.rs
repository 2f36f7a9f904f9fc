//! Training step and reference precompute on the `small` preset, fp32 CPU. Not a test.
//! Run: `make bench-train` (or `scripts/with-torch cargo bench --bench train_step`).
//!
//! Measures, in one run, on synthetic pairs (`ddpo synth`, 448 px PNG, standard difficulty):
//! 1. precompute throughput: `refcache::precompute` into a fresh cache (pairs/s) against transformers'
//!    `LlavaForConditionalGeneration` computing the same reference log-probs the usual way
//!    (`benches/precompute_transformers.py`: both responses as rows, images duplicated, full logits,
//!    log_softmax + gather), same pairs, ids, batch size in pairs and thread count; the two alternate, best of
//!    REPEATS each;
//! 2. the training step, cached reference vs online reference model, split into data (fetch + collate),
//!    policy forward (`logps::batch_logps`), reference forward (online only), loss + backward, optimizer
//!    (grad norm, clipping, AdamW, freeing the gradients); both modes on the same batches, interleaved, median of ITERS
//!    after one warm-up step;
//! 3. peak resident memory of `ddpo train --max-steps STEPS` in a child process, cached vs online (VmHWM
//!    from /proc/<pid>/status, polled), REPEATS runs each, with the step time its metrics.jsonl reports.
//!
//! Env: PAIRS (16), ITERS (6), STEPS (4), REPEATS (2), THREADS (2), BATCH (2 pairs), IMAGE_SIZE (448).
mod common;
use common::{env, median};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddpo::config::Config;
use ddpo::data::collate::collate;
use ddpo::data::pipeline::Preprocessor;
use ddpo::data::synth::{write_synthetic, SynthOptions};
use ddpo::ddpo::pair_terms;
use ddpo::logps::batch_logps;
use ddpo::model::llava::Llava;
use ddpo::preset::init_model;
use ddpo::refcache::{precompute, RefCache};
use ddpo::train::data::{epoch_order, PairSource, RowRef};
use ddpo::train::optim::{AdamW, AdamWConfig, Grads};
use tch::{Device, Kind, Tensor};

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// Writes `<name>.toml` for a job on `root`'s model and data and loads it.
fn job(root: &Path, name: &str, mode: &str, cache: &Path, batch: usize) -> (PathBuf, Config) {
    let r = root.display();
    let text = format!(
        "[model]\npath = \"{r}/model\"\ndtype = \"fp32\"\n\
         [reference]\nmode = \"{mode}\"\ncache_dir = \"{}\"\n\
         [data]\ntrain = [\"{r}/data/train-*.parquet\"]\nmax_length = 2048\ntemplate = \"llava_v1\"\n\
         [train]\noutput_dir = \"{r}/{name}\"\nbatch_size = {batch}\nmicro_batch_size = {batch}\n\
         epochs = 1\nlr = 1e-5\nwarmup_ratio = 0.0\nseed = 0\nlog_every = 1\n",
        cache.display()
    );
    let p = root.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    let cfg = Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
    (p, cfg)
}

#[derive(Default, Clone)]
struct StepTimes {
    data: Vec<f64>,
    forward: Vec<f64>,
    reference: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    total: Vec<f64>,
    /// Optimizer split: grad norm + clipping, AdamW update, freeing the gradients.
    opt_parts: Vec<[f64; 3]>,
}

impl StepTimes {
    fn push(&mut self, (t, parts): ([f64; 5], [f64; 3])) {
        self.data.push(t[0]);
        self.forward.push(t[1]);
        self.reference.push(t[2]);
        self.backward.push(t[3]);
        self.optimizer.push(t[4]);
        self.total.push(t.iter().sum());
        self.opt_parts.push(parts);
    }

    fn opt_part(&self, i: usize) -> f64 {
        median(self.opt_parts.iter().map(|p| p[i]).collect())
    }
}

/// One optimizer step over `rows` (one micro-batch), as `ddpo::train` runs it, timed by phase:
/// [data, policy forward, reference forward, loss + backward, optimizer], and the optimizer's parts
/// [grad norm + clipping, update, freeing the gradients].
fn step(
    model: &Llava,
    reference: Option<&Llava>,
    opt: &mut AdamW,
    src: &mut PairSource,
    rows: &[RowRef],
    cfg: &Config,
) -> ([f64; 5], [f64; 3]) {
    let pre = src.preprocessor();
    let pad = pre
        .text
        .tokenizer()
        .token_to_id(ddpo::data::tokenizer::PAD)
        .unwrap_or(0);
    let hw = pre.image.fixed_output_size().unwrap();
    let t = Instant::now();
    let exs: Vec<_> = rows.iter().map(|&r| src.example(r).unwrap()).collect();
    let batch = collate(&exs, pad, hw, true);
    let t_data = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let policy = batch_logps(model, &batch);
    let t_fwd = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let reference = match (&batch.ref_logps, reference) {
        (Some(r), None) => r.shallow_clone(),
        (None, Some(m)) => tch::no_grad(|| batch_logps(m, &batch)),
        _ => panic!("cached mode must carry reference log-probs and load no reference model"),
    };
    let t_ref = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let terms = pair_terms(&policy, &reference, &batch, &cfg.ddpo);
    let loss = terms.loss.sum(Kind::Float) / rows.len() as f64;
    assert!(loss.double_value(&[]).is_finite());
    let params: Vec<Tensor> = opt.params().map(|(_, p)| p.shallow_clone()).collect();
    ddpo::train::refill_grads(&params);
    loss.backward();
    let grads = Grads::Full(ddpo::train::grads_of(&params));
    let t_bwd = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let norm = opt.grad_norm(&grads);
    let max = cfg.train.max_grad_norm;
    if max > 0.0 && norm > max {
        opt.scale_grads(&grads, max / (norm + 1e-6));
    }
    let t_norm = t.elapsed().as_secs_f64();
    let t = Instant::now();
    opt.update(cfg.train.lr, &grads);
    let t_update = t.elapsed().as_secs_f64();
    let t = Instant::now();
    drop(grads);
    ddpo::train::release_grads(&params);
    let t_zero = t.elapsed().as_secs_f64();
    (
        [t_data, t_fwd, t_ref, t_bwd, t_norm + t_update + t_zero],
        [t_norm, t_update, t_zero],
    )
}

/// Peak resident memory of a child `ddpo train` (VmHWM, KiB, polled every 5 ms) and its wall time.
fn peak_rss(bin: &Path, config: &Path, steps: usize, threads: usize, log: &Path) -> (u64, f64) {
    let err = std::fs::File::create(log).unwrap();
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(["train", "--config"])
        .arg(config)
        .args(["--max-steps", &steps.to_string(), "--device", "cpu"])
        .env("OMP_NUM_THREADS", threads.to_string())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start ddpo train");
    let status_file = format!("/proc/{}/status", child.id());
    let mut hwm = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                hwm = hwm.max(kib);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(
                st.success(),
                "ddpo train failed:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (hwm, start.elapsed().as_secs_f64())
}

/// Median seconds per step from a run's metrics.jsonl (first step left out: warm-up).
fn metrics_step_secs(out_dir: &Path, batch: usize) -> f64 {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let secs: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s > 1))
        .filter_map(|v| v["samples_per_sec"].as_f64())
        .map(|sps| batch as f64 / sps)
        .collect();
    median(secs)
}

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` (which passes --bench) measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("train_step: a benchmark; run it with `make bench-train`");
        return;
    }
    let pairs = env("PAIRS", 16);
    let iters = env("ITERS", 6);
    let steps = env("STEPS", 4);
    let repeats = env("REPEATS", 2).max(1);
    let threads = env("THREADS", 2);
    let batch = env("BATCH", 2);
    let image_size = env("IMAGE_SIZE", 448) as u32;
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let wall = Instant::now();
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let load_start = load();

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model_dir = root.join("model");
    init_model(&model_dir, "small", 0).unwrap();
    let report = write_synthetic(&SynthOptions {
        out_dir: root.join("data"),
        pairs,
        shards: 1,
        seed: 1,
        image_size,
        rows_per_group: 16,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();
    let shard = report.files[0].clone();
    let weights_bytes: u64 = std::fs::read_dir(&model_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();

    // 1. Precompute: ddpo into a fresh cache, then transformers on the same pairs, alternating, best of
    // `repeats` each (alternating spreads the machine's load over both).
    let py = std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/precompute_transformers.py"
    );
    let mut best_compute = f64::INFINITY;
    let mut best_total = f64::INFINITY;
    let mut hf_secs = f64::INFINITY;
    let mut hf_fwd = f64::INFINITY;
    let mut hf_diff = 0.0f64;
    let mut hf_versions = (String::new(), String::new());
    let mut cache_dir = PathBuf::new();
    let mut rows_written = 0;
    for rep in 0..repeats {
        cache_dir = root.join(format!("cache-{rep}"));
        let (_, cfg) = job(root, "precompute", "cached", &cache_dir, batch);
        let r = precompute(&cfg, Device::Cpu).unwrap();
        assert!(r.model_loaded && r.shards_computed == 1);
        rows_written = r.rows_written;
        best_compute = best_compute.min(r.computed.iter().map(|s| s.seconds).sum());
        best_total = best_total.min(r.seconds);

        let out = Command::new(&py)
            .arg(script)
            .arg(&model_dir)
            .arg(&shard)
            .arg(&r.computed[0].file)
            .arg(batch.to_string())
            .arg(threads.to_string())
            .arg("1")
            .output()
            .expect("run the transformers baseline (set DDPO_PYTHON)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        assert_eq!(
            v["pairs"].as_u64().unwrap(),
            rows_written,
            "the baseline ran other pairs"
        );
        hf_secs = hf_secs.min(v["best_s"].as_f64().unwrap());
        hf_fwd = hf_fwd.min(v["forward_s"].as_f64().unwrap());
        hf_diff = hf_diff.max(v["max_abs_logp_diff"].as_f64().unwrap());
        hf_versions = (
            v["transformers"].as_str().unwrap_or("?").to_owned(),
            v["torch"].as_str().unwrap_or("?").to_owned(),
        );
    }
    let ddpo_pps = rows_written as f64 / best_compute;
    let hf_pps = rows_written as f64 / hf_secs;

    // 2. Step-time breakdown, cached vs online, same batches, interleaved.
    let (cached_toml, cached_cfg) = job(root, "run-cached", "cached", &cache_dir, batch);
    let (online_toml, online_cfg) = job(root, "run-online", "online", &cache_dir, batch);
    let pre = Preprocessor::from_config(&cached_cfg).unwrap();
    let shards = ddpo::data::shards::discover(&cached_cfg.data.train).unwrap();
    let cache = RefCache::open_for_device(&cached_cfg, Device::Cpu).unwrap();
    assert!(cache.missing_shards(&shards).unwrap().is_empty());
    let mut src_cached = PairSource::cached(shards.clone(), pre.clone(), &cache).unwrap();
    let mut src_online = PairSource::online(shards, pre, online_cfg.data.on_bad_row).unwrap();
    assert_eq!(src_cached.rows(), src_online.rows());
    let n = src_cached.rows().len();
    let order = epoch_order(n, cached_cfg.train.seed, 0);
    let batches: Vec<Vec<RowRef>> = order
        .chunks_exact(batch)
        .map(|c| c.iter().map(|&i| src_cached.rows()[i]).collect())
        .collect();

    let (vs, model) = Llava::load(&model_dir, Device::Cpu, Kind::Float).unwrap();
    let params: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let n_params: i64 = params.values().map(|t| t.numel() as i64).sum();
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cached_cfg.train.weight_decay,
        },
    );
    let (rvs, reference) = Llava::load(&model_dir, Device::Cpu, Kind::Float).unwrap();
    rvs.variables().values_mut().for_each(|t| {
        let _ = t.requires_grad_(false);
    });

    let mut cached = StepTimes::default();
    let mut online = StepTimes::default();
    for k in 0..=iters {
        let rows = &batches[k % batches.len()];
        let c = step(&model, None, &mut opt, &mut src_cached, rows, &cached_cfg);
        let o = step(
            &model,
            Some(&reference),
            &mut opt,
            &mut src_online,
            rows,
            &online_cfg,
        );
        if k > 0 {
            cached.push(c);
            online.push(o);
        }
    }
    let state_bytes = opt.state_bytes();
    drop((opt, model, vs, reference, rvs));

    // 3. Peak RSS of `ddpo train` as a child process, cached (cache complete) vs online, alternating,
    // `repeats` runs each from a fresh output folder (the peak moves by tens of MiB with allocator timing).
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ddpo"));
    let mut runs: [(Vec<u64>, Vec<f64>, Vec<f64>); 2] = Default::default();
    for rep in 0..repeats {
        for (i, (name, toml, cfg)) in [
            ("cached", &cached_toml, &cached_cfg),
            ("online", &online_toml, &online_cfg),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = std::fs::remove_dir_all(&cfg.train.output_dir);
            let log = root.join(format!("{name}-{rep}.log"));
            let (rss, secs) = peak_rss(&bin, toml, steps, threads, &log);
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(
                i == 1 || !text.contains("loading the reference model"),
                "cached training loaded a reference model:\n{text}"
            );
            runs[i].0.push(rss);
            runs[i]
                .1
                .push(metrics_step_secs(&cfg.train.output_dir, batch));
            runs[i].2.push(secs);
        }
    }

    // Report.
    let tokens: usize = cache
        .load_shard(&shard)
        .unwrap()
        .iter()
        .map(|p| p.prompt_ids.len() * 2 + p.chosen_ids.len() + p.rejected_ids.len())
        .sum();
    println!(
        "train step + precompute, small preset ({n_params} parameters, weights {:.0} MiB), fp32 CPU, {threads} threads",
        mib(weights_bytes as f64)
    );
    println!(
        "  data: {n} synthetic pairs ({image_size} px PNG), {:.0} tokens per row on average; batch {batch} pairs = {} rows",
        tokens as f64 / (2 * n) as f64,
        2 * batch
    );
    println!();
    println!(
        "precompute (reference log-probs, {rows_written} pairs, batch {batch} pairs, best of {repeats}):"
    );
    println!(
        "  transformers {} (torch {}):  {hf_secs:7.2} s  {hf_pps:6.2} pairs/s  1.00x   (forward + log_softmax {hf_fwd:.2} s; max |logp diff| vs ddpo {hf_diff:.1e})",
        hf_versions.0, hf_versions.1
    );
    println!(
        "  ddpo refcache::precompute:     {best_compute:7.2} s  {ddpo_pps:6.2} pairs/s  {:.2}x   ({:.2} s with model load, manifest)",
        ddpo_pps / hf_pps,
        best_total
    );
    println!();
    println!(
        "training step, batch {batch} pairs, median of {iters} steps after a warm-up (seconds):"
    );
    println!(
        "  {:<8} {:>7} {:>8} {:>10} {:>9} {:>10} {:>7}",
        "mode", "data", "forward", "reference", "backward", "optimizer", "total"
    );
    for (name, t) in [("cached", &cached), ("online", &online)] {
        println!(
            "  {:<8} {:>7.3} {:>8.3} {:>10.3} {:>9.3} {:>10.3} {:>7.3}",
            name,
            median(t.data.clone()),
            median(t.forward.clone()),
            median(t.reference.clone()),
            median(t.backward.clone()),
            median(t.optimizer.clone()),
            median(t.total.clone())
        );
    }
    println!(
        "  optimizer (cached) = grad norm + clipping {:.3} + AdamW update {:.3} + releasing the gradients {:.3}",
        cached.opt_part(0),
        cached.opt_part(1),
        cached.opt_part(2)
    );
    println!(
        "  online / cached: {:.2}x step time",
        median(online.total.clone()) / median(cached.total.clone())
    );
    println!();
    println!("`ddpo train --max-steps {steps}` (child process, {repeats} runs each):");
    println!(
        "  {:<8} {:>14} {:>18} {:>14} {:>10}",
        "mode", "peak RSS (MiB)", "runs (MiB)", "s/step (log)", "wall (s)"
    );
    let peak = |i: usize| *runs[i].0.iter().max().unwrap() as f64 / 1024.0;
    let mean = |i: usize| runs[i].0.iter().sum::<u64>() as f64 / 1024.0 / runs[i].0.len() as f64;
    for (i, name) in ["cached", "online"].into_iter().enumerate() {
        let all: Vec<String> = runs[i]
            .0
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect();
        println!(
            "  {:<8} {:>14.0} {:>18} {:>14.3} {:>10.1}",
            name,
            peak(i),
            all.join(", "),
            median(runs[i].1.clone()),
            runs[i].2.iter().cloned().fold(f64::INFINITY, f64::min)
        );
    }
    println!(
        "  online - cached: {:.0} MiB (highest peaks), {:.0} MiB (mean peaks); one model's weights: {:.0} MiB; AdamW moments {:.0} MiB",
        peak(1) - peak(0),
        mean(1) - mean(0),
        mib(weights_bytes as f64),
        mib(state_bytes as f64)
    );
    println!();
    println!(
        "bench wall time {:.0} s; load average at start {load_start}, at end {} (the machine's other work slows every number)",
        wall.elapsed().as_secs_f64(),
        load()
    );
}
