//! LoRA (`[lora] rank > 0`) on the tiny preset: only adapters train, the base stays bit-identical, and the
//! checkpoint's PEFT-layout adapter loads in Python `peft` on transformers' LLaVA and gives our logits.
//! A LoRA run learns a preference its frozen base holds the other way round; with dropout its training
//! forward draws PEFT's very masks.

use std::path::{Path, PathBuf};
use std::process::Command;

use ddpo::config::Config;
use ddpo::data::collate::collate;
use ddpo::model::llava::Llava;
use ddpo::train::{train, TrainOptions};
use tch::{Kind, Tensor};

/// The tests of this file run one at a time (`crate::common::serial`).
use crate::common::serial;

struct Job {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Job {
    fn new(train_pairs: usize, eval_pairs: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        ddpo::preset::init_model(&root.join("model"), "tiny", 0).unwrap();
        for (prefix, pairs, seed) in [("train", train_pairs, 1), ("eval", eval_pairs, 2)] {
            ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
                out_dir: root.join("data"),
                pairs,
                shards: 1,
                seed,
                image_size: 48,
                rows_per_group: 16,
                prefix: prefix.into(),
                difficulty: ddpo::data::synth::Difficulty::Easy,
            })
            .unwrap();
        }
        Job { _dir: dir, root }
    }

    fn config(&self, name: &str, train: &str) -> Config {
        let lora = "rank = 4\nalpha = 8\ndropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\", \"gate_proj\", \"down_proj\"]\n\
                    save_merged = true";
        let r = self.root.display();
        self.config_with(
            name,
            &format!("path = \"{r}/model\""),
            &format!(
                "train = [\"{r}/data/train-*.parquet\"]\neval = [\"{r}/data/eval-*.parquet\"]"
            ),
            &format!("warmup_ratio = 0.0\n{train}"),
            lora,
        )
    }

    /// A job named `name` (output folder and reference cache under the job's root) from the given `[model]`,
    /// `[data]`, `[train]` and `[lora]` lines.
    fn config_with(&self, name: &str, model: &str, data: &str, train: &str, lora: &str) -> Config {
        let r = self.root.display();
        let text = format!(
            "[model]\n{model}\n[reference]\ncache_dir = \"{r}/cache-{name}\"\n\
             [data]\n{data}\nmax_length = 256\n\
             [train]\noutput_dir = \"{r}/{name}\"\nseed = 3\n{train}\n\
             [ddpo]\nbeta = 0.5\ngamma = 5.0\n\
             [lora]\n{lora}\n"
        );
        let p = self.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn cpu() -> TrainOptions {
    TrainOptions {
        device: tch::Device::Cpu,
        max_steps: None,
        progress_bar: false,
    }
}

fn tensors(path: &Path) -> std::collections::BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Only the adapters change; the checkpoint's adapter, loaded by PEFT onto transformers' model, gives the
/// logits ddpo computes with the same adapter.
#[test]
fn adapters_train_alone_and_load_in_peft_with_our_logits() {
    let _serial = serial();
    let job = Job::new(32, 8);
    let cfg = job.config(
        "lora",
        "batch_size = 8\nmicro_batch_size = 8\nepochs = 1\nlr = 2e-2",
    );
    let report = train(&cfg, &cpu()).unwrap();
    assert_eq!(report.steps, 4);
    let ckpt = report.last_checkpoint.unwrap();

    // The base model is bit-identical; the optimizer holds state for adapters only.
    let before = tensors(&job.root.join("model/model.safetensors"));
    let after = tensors(&ckpt.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    for (k, v) in &before {
        assert!(v.equal(&after[k]), "base tensor {k} changed under LoRA");
    }
    let opt = tensors(&ckpt.join("optimizer.safetensors"));
    assert!(opt
        .keys()
        .filter(|k| *k != "step")
        .all(|k| k.contains(".lora_")));
    let adapter = tensors(&ckpt.join("adapter_model.safetensors"));
    // 2 layers x 4 targets x (A, B).
    assert_eq!(
        adapter.len(),
        16,
        "{:?}",
        adapter.keys().collect::<Vec<_>>()
    );
    let moved = adapter
        .iter()
        .filter(|(k, v)| k.contains("lora_B") && v.abs().max().double_value(&[]) > 1e-4)
        .count();
    assert_eq!(moved, 8, "every lora_B must have moved from zero");

    // Our logits with the checkpoint's adapter.
    let (vs, mut model) = Llava::load(&ckpt, tch::Device::Cpu, Kind::Float).unwrap();
    let _lvs = ddpo::train::lora::attach(
        &mut model,
        &vs,
        &cfg,
        tch::Device::Cpu,
        Kind::Float,
        Some(&ckpt),
    )
    .unwrap();
    let pre = ddpo::data::pipeline::Preprocessor::from_config(&cfg).unwrap();
    let shards = ddpo::data::shards::discover(&cfg.data.eval).unwrap();
    let mut src =
        ddpo::train::data::PairSource::online(shards, pre.clone(), ddpo::config::OnBadRow::Fail)
            .unwrap();
    let rows: Vec<_> = src.rows()[..2].to_vec();
    let exs: Vec<_> = rows.iter().map(|&r| src.example(r).unwrap()).collect();
    let pad = pre.text.tokenizer().token_to_id("<pad>").unwrap();
    let batch = collate(&exs, pad, pre.image.fixed_output_size().unwrap(), false);
    let pixels = batch.pixel_values.index_select(0, &batch.image_rows);
    let ours = tch::no_grad(|| model.logits(&batch.input_ids, &batch.attention_mask, &pixels));

    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", batch.input_ids.shallow_clone()),
            ("attention_mask", batch.attention_mask.shallow_clone()),
            ("pixel_values", pixels.shallow_clone()),
        ],
        &inputs,
    )
    .unwrap();
    let base_dir = job.root.join("model");
    let theirs = oracle(
        "peft_logits.py",
        &[&base_dir, &ckpt, &inputs],
        &[],
        dir.path(),
    );
    let mask = batch.attention_mask.to_kind(Kind::Bool).unsqueeze(-1);
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .abs()
            .masked_select(&mask.expand_as(a))
            .max()
            .double_value(&[])
    };
    let diff = max_diff(&ours, &theirs);
    // And the adapter matters: the base model's logits differ from both.
    let (_, base) = Llava::load(&base_dir, tch::Device::Cpu, Kind::Float).unwrap();
    let plain = tch::no_grad(|| base.logits(&batch.input_ids, &batch.attention_mask, &pixels));
    let effect = max_diff(&plain, &theirs);
    eprintln!("logits vs PEFT: max diff {diff:e}; adapter's effect {effect:e}");
    assert!(
        effect > 1e-2,
        "the adapter changes the logits by only {effect}"
    );
    assert!(diff < 1e-4, "our LoRA logits differ from PEFT's by {diff}");

    // In training mode (lora.dropout = 0.1), a forward seeded alike draws PEFT's very dropout masks.
    let seed = 1234;
    model.set_lora_training(true);
    tch::manual_seed(seed);
    let ours_train =
        tch::no_grad(|| model.logits(&batch.input_ids, &batch.attention_mask, &pixels));
    model.set_lora_training(false);
    let theirs_train = oracle(
        "peft_logits.py",
        &[&base_dir, &ckpt, &inputs],
        &[&seed.to_string()],
        dir.path(),
    );
    let dropped = max_diff(&ours_train, &ours);
    let d = max_diff(&ours_train, &theirs_train);
    eprintln!("training-mode logits vs PEFT: max diff {d:e}; dropout's effect {dropped:e}");
    assert!(
        dropped > 1e-3,
        "dropout changes the logits by only {dropped}"
    );
    assert!(d < 1e-4, "training-mode logits differ from PEFT's by {d}");
    // Off again, the forward is deterministic and equals the evaluation one.
    let again = tch::no_grad(|| model.logits(&batch.input_ids, &batch.attention_mask, &pixels));
    assert!(again.equal(&ours));

    // The merged export is a plain llava-hf model: transformers alone (no PEFT) loads it cleanly and gives
    // the same logits.
    let merged = oracle(
        "llava_logits.py",
        &[&ckpt.join("merged"), &inputs],
        &[],
        dir.path(),
    );
    let d = max_diff(&ours, &merged);
    eprintln!("logits vs merged in transformers: max diff {d:e}");
    assert!(
        d < 1e-4,
        "the merged model's logits differ from ours by {d}"
    );
}

/// Runs `tests/oracles/<script> PATHS… OUT EXTRA…` and returns the `logits` it wrote to OUT (a file in `dir`).
fn oracle(script: &str, paths: &[&Path], extra: &[&str], dir: &Path) -> Tensor {
    let out = dir.join(format!("{script}.out.safetensors"));
    let python = crate::common::python();
    let mut cmd = Command::new(&python);
    cmd.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/oracles")
            .join(script),
    );
    cmd.args(paths).arg(&out).args(extra);
    let run = cmd.output().expect("run the oracle");
    assert!(
        run.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    tensors(&out)
        .remove("logits")
        .expect("logits in the oracle's output")
}

/// A LoRA run stopped after 2 steps and resumed ends with the adapters of a run that never stopped.
#[test]
fn a_resumed_lora_run_equals_a_straight_one() {
    let _serial = serial();
    let job = Job::new(32, 8);
    let t = "batch_size = 8\nmicro_batch_size = 4\nepochs = 1\nlr = 2e-2";
    let straight = train(&job.config("straight", t), &cpu()).unwrap();
    let cfg = job.config("split", t);
    let first = train(
        &cfg,
        &TrainOptions {
            max_steps: Some(2),
            ..cpu()
        },
    )
    .unwrap();
    assert_eq!(first.steps, 2);
    let second = train(&cfg, &cpu()).unwrap();
    assert_eq!(second.resumed_from, Some(2));
    // Resuming with other adapter settings is refused with the file and the setting named.
    let mut other = job.config("split", t);
    other.lora.rank = 8;
    let e = train(&other, &cpu()).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("lora.rank"),
        "{e}"
    );
    let a = std::fs::read(
        straight
            .last_checkpoint
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    let b = std::fs::read(
        second
            .last_checkpoint
            .unwrap()
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    assert!(a == b, "adapters differ after resume");
}

/// A LoRA run on the synthetic data learns: its held-out reward accuracy rises from chance to ≥ 0.85, and
/// it does so against its base. The base is first trained in full on the *reversed* preference (the
/// hallucinated answer preferred), which teaches its vision tower and projector to see colours and its
/// decoder to favour the wrong one. Adapters on the frozen decoder then have to learn the right preference
/// themselves: at the end the policy prefers the correct answers in absolute terms, while the frozen base,
/// the reference, still prefers the hallucinated ones. (On a random base, whose image features are random
/// projections, adapters alone reached 0.5–0.7: not a test.)
#[test]
fn lora_learns_a_preference_its_frozen_base_holds_reversed() {
    let _serial = serial();
    let job = Job::new(512, 128);
    let r = job.root.display();
    ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
        out_dir: job.root.join("reversed"),
        pairs: 512,
        shards: 1,
        seed: 11,
        image_size: 48,
        rows_per_group: 16,
        prefix: "train".into(),
        difficulty: ddpo::data::synth::Difficulty::Easy,
    })
    .unwrap();
    swap_chosen_and_rejected(&job.root.join("reversed/train-00000-of-00001.parquet"));
    let common =
        "batch_size = 16\nmicro_batch_size = 16\nepochs = 3\nlr = 3e-3\nwarmup_ratio = 0.05";

    // Stage 1: full training on the reversed preference.
    let base = train(
        &job.config_with(
            "base",
            &format!("path = \"{r}/model\""),
            &format!("train = [\"{r}/reversed/train-*.parquet\"]"),
            common,
            "",
        ),
        &cpu(),
    )
    .unwrap();
    let base_dir = base.last_checkpoint.unwrap();

    // Stage 2: LoRA from that base on the right preference.
    let cfg = job.config_with(
        "adapters",
        &format!("path = \"{}\"", base_dir.display()),
        &format!("train = [\"{r}/data/train-*.parquet\"]\neval = [\"{r}/data/eval-*.parquet\"]"),
        &format!("{common}\neval_every = 16"),
        "rank = 8\nalpha = 16\ndropout = 0.05\n\
         target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]",
    );
    let report = train(&cfg, &cpu()).unwrap();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(cfg.train.output_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let evals: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r.get("eval/rewards/accuracies").is_some())
        .collect();
    let acc: Vec<f64> = evals
        .iter()
        .map(|r| r["eval/rewards/accuracies"].as_f64().unwrap())
        .collect();
    let last = evals.last().expect("eval rows");
    let get = |k: &str| last[k].as_f64().unwrap();
    eprintln!(
        "eval accuracies {acc:?}; logps chosen {:.3} rejected {:.3}, reference chosen {:.3} rejected {:.3}",
        get("eval/logps/chosen"),
        get("eval/logps/rejected"),
        get("eval/logps/ref_chosen"),
        get("eval/logps/ref_rejected")
    );
    // Step 1 starts at the base: every reward is 0 and the loss is ln 2.
    assert!((rows[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5);
    assert!(
        *acc.last().unwrap() >= 0.85,
        "held-out reward accuracy only reached {acc:?}"
    );
    assert!(
        get("eval/loss") < std::f64::consts::LN_2 - 0.2,
        "eval loss {}",
        get("eval/loss")
    );
    // The frozen base prefers the hallucinated answers; the adapted policy the correct ones.
    assert!(
        get("eval/logps/ref_chosen") < get("eval/logps/ref_rejected") - 0.5,
        "the base was meant to hold the reversed preference"
    );
    assert!(
        get("eval/logps/chosen") > get("eval/logps/rejected") + 0.3,
        "the adapted policy does not prefer the correct answers"
    );
    // Only adapters trained.
    let before = tensors(&base_dir.join("model.safetensors"));
    let after = tensors(&report.last_checkpoint.unwrap().join("model.safetensors"));
    for (k, v) in &before {
        assert!(v.equal(&after[k]), "base tensor {k} changed under LoRA");
    }
}

/// Rewrites an RLHF-V shard with every pair's `chosen` and `rejected` answers exchanged.
fn swap_chosen_and_rejected(path: &Path) {
    use arrow::array::{Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let col = schema.index_of("text").unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema.clone(),
        None,
    )
    .unwrap();
    for b in &batches {
        let text = b
            .column(col)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let swapped: StringArray = text
            .iter()
            .map(|t| {
                let mut v: serde_json::Value = serde_json::from_str(t.unwrap()).unwrap();
                let chosen = v["chosen"].take();
                v["chosen"] = v["rejected"].take();
                v["rejected"] = chosen;
                Some(v.to_string())
            })
            .collect();
        assert_eq!(swapped.len(), text.len());
        let mut cols = b.columns().to_vec();
        cols[col] = std::sync::Arc::new(swapped);
        w.write(&arrow::record_batch::RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}
