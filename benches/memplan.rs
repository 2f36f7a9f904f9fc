//! The memory plan (`src/memplan/`) against the measured peak resident memory of `ddpo train` on CPU. Not a
//! test (tests/it/memplan.rs checks the same within 10 %); this prints the numbers and re-derives the runtime
//! overhead constant. Run: `scripts/with-torch cargo bench --bench memplan`.
//!
//! For the `tiny` and the `small` preset, on the same synthetic data (`ddpo synth`, 336 px images, PAIRS
//! pairs), fp32, cached reference (precomputed first, in its own process), micro_batch_size = batch_size = 2,
//! shared prefix: REPEATS child runs of `ddpo train --max-steps 3 --device cpu` with OMP_NUM_THREADS=THREADS;
//! the peak is the child's `ru_maxrss` (its VmHWM) from `wait4`. The plan uses the lengths of the longest
//! pair of the data (`memplan::measure_lengths`).
//!
//! Calibration: `CPU_RUNTIME_OVERHEAD` is the tiny run's peak minus the tiny plan's model terms (weights,
//! gradients, optimizer state, activations, transients: a few MiB), i.e. what a training process holds that
//! does not scale with the model. The small preset — 49 M parameters, 576 visual tokens, 32 k vocabulary —
//! then tests the whole plan with that constant.
//!
//! Env: PAIRS (8), REPEATS (3), THREADS (2), KEEP (unset: the work folder is deleted).
mod common;
use common::env;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ddpo::config::Config;
use ddpo::memplan::{self, fmt_bytes, MemoryPlan, PlanDevice, PlanInput, WeightDtype};

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn run(bin: &Path, args: &[&str], threads: usize) -> (bool, u64) {
    memplan::run_measuring_peak_rss(
        Command::new(bin)
            .args(args)
            .env("OMP_NUM_THREADS", threads.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start ddpo")
}

/// The job config of one preset: fp32, cached reference, micro_batch_size = batch_size = 2.
fn job(root: &Path, preset: &str) -> (PathBuf, Config) {
    let r = root.display();
    let text = format!(
        "[model]\npath = \"{r}/{preset}\"\ndtype = \"fp32\"\n\
         [reference]\nmode = \"cached\"\ncache_dir = \"{r}/cache-{preset}\"\n\
         [data]\ntrain = [\"{r}/data/train-*.parquet\"]\nmax_length = 2048\n\
         [train]\noutput_dir = \"{r}/run-{preset}\"\nbatch_size = 2\nmicro_batch_size = 2\n\
         epochs = 1\nlr = 1e-5\nwarmup_ratio = 0.0\nseed = 0\n"
    );
    let p = root.join(format!("{preset}.toml"));
    std::fs::write(&p, text).unwrap();
    let cfg = Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
    (p, cfg)
}

fn main() {
    let pairs = env("PAIRS", 8);
    let repeats = env("REPEATS", 3);
    let threads = env("THREADS", 2);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ddpo"));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
        out_dir: root.join("data"),
        pairs,
        shards: 1,
        seed: 0,
        image_size: 336,
        rows_per_group: 64,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();

    println!(
        "memory plan vs peak RSS of `ddpo train --max-steps 3 --device cpu` ({pairs} synthetic 336 px pairs, \
         fp32, cached reference, micro-batch 2, {threads} threads, {repeats} runs)\n"
    );
    println!("| preset | parameters | longest pair (prompt + 2 x response) | planned | measured peak RSS | plan / measured |");
    println!("|---|---|---|---|---|---|");
    let mut tiny_overhead = None;
    let mut small = None;
    for preset in ["tiny", "small"] {
        ddpo::preset::init_model(&root.join(preset), preset, 0).unwrap();
        let (toml, cfg) = job(&root, preset);
        let toml = toml.to_str().unwrap();
        let (ok, _) = run(
            &bin,
            &["precompute", "--config", toml, "--device", "cpu"],
            threads,
        );
        assert!(ok, "ddpo precompute failed for {preset}");
        let (longest, _mean) = memplan::measure_lengths(&cfg).unwrap();
        let mut input = PlanInput::from_config(
            &cfg,
            preset.into(),
            ddpo::model::config::LlavaConfig::from_dir(&cfg.model.path).unwrap(),
            PlanDevice::Cpu,
            WeightDtype::Fp32,
            1,
        );
        input.lengths = longest;
        let plan = MemoryPlan::new(input);
        let mut peaks = Vec::new();
        for _ in 0..repeats {
            let _ = std::fs::remove_dir_all(&cfg.train.output_dir);
            let (ok, peak) = run(
                &bin,
                &[
                    "train",
                    "--config",
                    toml,
                    "--max-steps",
                    "3",
                    "--device",
                    "cpu",
                ],
                threads,
            );
            assert!(ok, "ddpo train failed for {preset}");
            peaks.push(peak);
        }
        let max = *peaks.iter().max().unwrap();
        let runs: Vec<String> = peaks.iter().map(|&p| format!("{:.0}", mib(p))).collect();
        println!(
            "| {preset} | {} | {} + 2 x {} | {:.0} MiB | {} MiB (max {:.0}) | {:.3} |",
            memplan::count(plan.params.total()),
            plan.input.lengths.prompt,
            plan.input.lengths.response,
            mib(plan.total),
            runs.join(" / "),
            mib(max),
            plan.total as f64 / max as f64
        );
        if preset == "tiny" {
            tiny_overhead = Some((max.saturating_sub(plan.model_terms()), plan.model_terms()));
        } else {
            small = Some((plan, max));
        }
        if preset == "small" {
            let (plan, _) = small.as_ref().unwrap();
            println!("\nsmall preset plan:\n{}", plan.table(None));
        }
    }
    let (overhead, tiny_terms) = tiny_overhead.unwrap();
    let (plan, measured) = small.unwrap();
    println!(
        "runtime overhead derived from the tiny run: {} (its peak minus {} of model terms); built-in \
         CPU_RUNTIME_OVERHEAD = {}",
        fmt_bytes(overhead),
        fmt_bytes(tiny_terms),
        fmt_bytes(memplan::CPU_RUNTIME_OVERHEAD)
    );
    let recal = plan.model_terms() + overhead;
    println!(
        "small with the derived overhead: planned {:.0} MiB vs measured {:.0} MiB ({:+.1} %)",
        mib(recal),
        mib(measured),
        100.0 * (recal as f64 / measured as f64 - 1.0)
    );
    if std::env::var_os("KEEP").is_some() {
        println!("work folder kept: {}", dir.keep().display());
    }
}
