//! The memory plan end to end: training refuses to start when the plan exceeds the device's memory
//! (`DDPO_DEVICE_MEMORY_BYTES` stands in for a small device) unless `train.memory_check = false`;
//! `ddpo plan` on LLaVA-1.5-7B; and the plan of the `small` preset within 10 % of the measured peak resident
//! memory of `ddpo train` on CPU (benches/memplan.rs prints the same comparison with repeats).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ddpo::config::Config;
use ddpo::memplan::{self, MemoryPlan, PlanDevice, PlanInput, WeightDtype};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ddpo")
}

/// A job folder: a preset model, synthetic data (336 px images), a cached-reference fp32 config with
/// micro_batch_size = batch_size = 2.
fn job(root: &Path, preset: &str, pairs: usize, image_size: u32) -> (PathBuf, Config) {
    ddpo::preset::init_model(&root.join("model"), preset, 0).unwrap();
    ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
        out_dir: root.join("data"),
        pairs,
        shards: 1,
        seed: 0,
        image_size,
        rows_per_group: 64,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();
    let r = root.display();
    let text = format!(
        "[model]\npath = \"{r}/model\"\ndtype = \"fp32\"\n\
         [reference]\nmode = \"cached\"\ncache_dir = \"{r}/cache\"\n\
         [data]\ntrain = [\"{r}/data/train-*.parquet\"]\nmax_length = 2048\n\
         [train]\noutput_dir = \"{r}/run\"\nbatch_size = 2\nmicro_batch_size = 2\n\
         epochs = 1\nlr = 1e-5\nwarmup_ratio = 0.0\nseed = 0\n"
    );
    let p = root.join("job.toml");
    std::fs::write(&p, text).unwrap();
    let cfg = Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
    (p, cfg)
}

fn train(config: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(["train", "--config", config.to_str().unwrap()])
        .args(["--max-steps", "1", "--device", "cpu"])
        .env_remove(memplan::DEVICE_MEMORY_ENV)
        .env_remove("DDPO__TRAIN__MEMORY_CHECK");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn training_refuses_to_start_when_the_plan_exceeds_device_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cfg) = job(dir.path(), "tiny", 4, 48);
    // The tiny job plans ~520 MiB on CPU (mostly the runtime overhead): a 100 MB device cannot hold it.
    let o = train(&config, &[(memplan::DEVICE_MEMORY_ENV, "100000000")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("memory plan: one rank needs")
            && err.contains("but the device has 95.4 MiB (DDPO_DEVICE_MEMORY_BYTES)"),
        "{err}"
    );
    assert!(
        err.contains("runtime overhead") && err.contains("AdamW moments"),
        "{err}"
    );
    assert!(err.contains("nothing tried here fits"), "{err}");
    assert!(err.contains("set train.memory_check = false"), "{err}");
    // Refused before anything was loaded or computed: no reference cache, no checkpoint.
    assert!(!cfg.reference_cache_dir().exists());
    assert!(!cfg.train.output_dir.join("checkpoint-1").exists());

    // A device that holds the plan starts; memory_check = false turns the refusal into a warning.
    let o = train(&config, &[(memplan::DEVICE_MEMORY_ENV, "100000000000")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&cfg.train.output_dir);
    let o = train(
        &config,
        &[
            (memplan::DEVICE_MEMORY_ENV, "100000000"),
            ("DDPO__TRAIN__MEMORY_CHECK", "false"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("train.memory_check = false: starting anyway"),
        "{err}"
    );
}

#[test]
fn plan_command_on_llava15_7b() {
    let plan = |args: &[&str]| {
        let o = Command::new(bin())
            .arg("plan")
            .args(args)
            .env_remove(memplan::DEVICE_MEMORY_ENV)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let base = ["--preset", "llava-1.5-7b", "--device-memory-gib", "80"];
    let (ok, out) = plan(&[&base[..], &["--world", "8", "--zero-stage", "2"]].concat());
    assert!(ok, "{out}");
    assert!(
        out.contains("7.06 B parameters") && out.contains("fits:"),
        "{out}"
    );
    let (ok, out) = plan(&[&base[..], &["--world", "8"]].concat());
    assert!(!ok, "{out}");
    assert!(out.contains("DOES NOT FIT"), "{out}");
    assert!(
        out.contains("train.zero_stage = 2 (with the 8 ranks)"),
        "{out}"
    );
    let (ok, out) = plan(
        &[
            &base[..],
            &["--preset", "llava-1.5-7b,llava-1.5-13b"][..],
            &["--world", "1,8", "--zero-stage", "0,2"],
        ]
        .concat()[2..],
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("| llava")).count(),
        8,
        "{out}"
    );
}

/// The plan (with the lengths of the data's longest pair) against the peak resident memory of a child
/// `ddpo train --max-steps 3` on the small preset: 49 M parameters, 576 visual tokens, 32 k vocabulary.
#[test]
fn small_preset_plan_is_within_10_percent_of_the_peak_rss() {
    let dir = tempfile::tempdir().unwrap();
    let (config, cfg) = job(dir.path(), "small", 8, 336);
    let config = config.to_str().unwrap();
    let run = |args: &[&str]| {
        memplan::run_measuring_peak_rss(
            Command::new(bin())
                .args(args)
                .env("OMP_NUM_THREADS", "2")
                .env_remove(memplan::DEVICE_MEMORY_ENV)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap()
    };
    let (ok, _) = run(&["precompute", "--config", config, "--device", "cpu"]);
    assert!(ok, "precompute failed");
    let (ok, peak) = run(&[
        "train",
        "--config",
        config,
        "--max-steps",
        "3",
        "--device",
        "cpu",
    ]);
    assert!(ok, "train failed");
    let (longest, _) = memplan::measure_lengths(&cfg).unwrap();
    let mut input = PlanInput::from_config(
        &cfg,
        "small".into(),
        ddpo::model::config::LlavaConfig::from_dir(&cfg.model.path).unwrap(),
        PlanDevice::Cpu,
        WeightDtype::Fp32,
        1,
    );
    input.lengths = longest;
    let plan = MemoryPlan::new(input);
    let ratio = plan.total as f64 / peak as f64;
    eprintln!(
        "small preset: planned {} vs measured peak RSS {} (plan / measured = {ratio:.3})\n{}",
        memplan::fmt_bytes(plan.total),
        memplan::fmt_bytes(peak),
        plan.table(None)
    );
    assert!((ratio - 1.0).abs() < 0.10, "plan / measured = {ratio:.3}");
}

/// The activation term against PyTorch autograd itself: `tests/oracles/saved_tensors.py` runs the same op
/// sequence as the Rust model and counts the storages saved for backward, by part. Small preset (MHA, 336 px)
/// in fp32 and bf16, shared-prefix and split layouts; tiny preset (grouped-query attention).
#[test]
fn activation_term_matches_autograd_saved_tensors() {
    let python = crate::common::python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/saved_tensors.py");
    let cases: Vec<(&str, WeightDtype, bool)> = vec![
        ("small", WeightDtype::Fp32, true),
        ("small", WeightDtype::Fp32, false),
        ("small", WeightDtype::Bf16, true),
        ("small", WeightDtype::Bf16, false),
        ("tiny", WeightDtype::Fp32, true),
    ];
    let (pairs, prompt_text, response) = (2usize, 48usize, 43usize);
    let mut requests = Vec::new();
    let mut planned = Vec::new();
    for &(preset, dtype, shared) in &cases {
        let model = memplan::architecture(preset).unwrap();
        let prompt = model.num_image_tokens() + prompt_text;
        requests.push(serde_json::json!({
            "config": model.to_hf_json(), "dtype": dtype.name(), "shared": shared,
            "pairs": pairs, "prompt": prompt, "response": response,
        }));
        planned.push(memplan::Activations::of(&PlanInput {
            name: preset.into(),
            lengths: memplan::Lengths::measured(prompt, response, "test"),
            model,
            dtype,
            freeze: vec![],
            world: 1,
            zero_stage: 0,
            micro_batch_size: pairs,
            batch_size: pairs,
            shared_prefix: shared,
            reference: ddpo::config::ReferenceMode::Cached,
            device: PlanDevice::Cpu,
            lora: None,
        }));
    }
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} (set DDPO_PYTHON, e.g. through scripts/with-torch): {e}")
        });
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        serde_json::to_string(&requests).unwrap().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{script:?} failed");
    let measured: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    for ((case, plan), m) in cases.iter().zip(&planned).zip(&measured) {
        let parts = [
            ("vision", plan.vision),
            ("projector", plan.projector),
            ("language_model", plan.language_model),
            ("logits", plan.logits),
        ];
        for (part, bytes) in parts {
            let real = m[part].as_u64().unwrap();
            let err = bytes as f64 / real as f64 - 1.0;
            eprintln!(
                "{case:?} {part}: planned {bytes}, autograd saved {real} ({:+.3} %)",
                100.0 * err
            );
            assert!(
                err.abs() < 0.005,
                "{case:?} {part}: planned {bytes}, saved {real}"
            );
        }
    }
}
