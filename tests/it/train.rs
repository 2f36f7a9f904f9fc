//! DDPO training on CPU with the tiny preset: ln 2 at the first step, learning on synthetic data, exact
//! resume, gradient accumulation, and bad input (stale cache, NaN in the cache, a full disk at checkpoint).

use std::path::{Path, PathBuf};
use std::process::Command;

use ddpo::config::Config;
use ddpo::train::{train, TrainOptions};

/// A job folder: tiny model, synthetic train/eval data, config text with overrides.
struct Job {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Job {
    fn new(train_pairs: usize, eval_pairs: usize) -> Self {
        Self::with_difficulty(train_pairs, eval_pairs, Default::default())
    }

    fn with_difficulty(
        train_pairs: usize,
        eval_pairs: usize,
        difficulty: ddpo::data::synth::Difficulty,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        ddpo::preset::init_model(&root.join("model"), "tiny", 0).unwrap();
        let synth = |prefix: &str, pairs: usize, seed: u64| {
            ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
                out_dir: root.join("data"),
                pairs,
                shards: 2.min(pairs),
                seed,
                image_size: 48,
                rows_per_group: 16,
                prefix: prefix.into(),
                difficulty,
            })
            .unwrap();
        };
        synth("train", train_pairs, 1);
        if eval_pairs > 0 {
            synth("eval", eval_pairs, 2);
        }
        Job { _dir: dir, root }
    }

    /// Writes `job.toml` (name) with the given `[train]`/`[ddpo]` lines and returns the loaded config.
    fn config(&self, name: &str, train: &str, extra: &str) -> (PathBuf, Config) {
        let r = self.root.display();
        let eval = if self
            .root
            .join("data")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("eval"))
        {
            format!("eval = [\"{r}/data/eval-*.parquet\"]")
        } else {
            String::new()
        };
        let warm = if train.contains("warmup_ratio") {
            ""
        } else {
            "warmup_ratio = 0.0\n"
        };
        let text = format!(
            "[model]\npath = \"{r}/model\"\n[reference]\ncache_dir = \"{r}/cache\"\n\
             [data]\ntrain = [\"{r}/data/train-*.parquet\"]\n{eval}\nmax_length = 256\n\
             [train]\noutput_dir = \"{r}/{name}\"\nseed = 3\n{warm}{train}\n{extra}\n"
        );
        let p = self.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let cfg = Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
        (p, cfg)
    }
}

fn cpu(max_steps: Option<usize>) -> TrainOptions {
    TrainOptions {
        device: tch::Device::Cpu,
        max_steps,
        progress_bar: false,
    }
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Metrics rows without the wall-clock fields.
fn comparable(rows: &[serde_json::Value]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            let mut r = r.clone();
            let m = r.as_object_mut().unwrap();
            m.remove("samples_per_sec");
            m.remove("tokens_per_sec");
            m.remove("data_wait_share");
            r
        })
        .collect()
}

#[test]
fn first_step_loss_is_ln2_when_policy_is_reference() {
    let job = Job::new(16, 0);
    let (_, cfg) = job.config(
        "run",
        "batch_size = 8\nmicro_batch_size = 4\nepochs = 1\nlr = 1e-3",
        "",
    );
    let report = train(&cfg, &cpu(Some(1))).unwrap();
    assert!(
        !report.reference_loaded,
        "cached mode must not load a reference model"
    );
    let rows = metrics(&cfg.train.output_dir);
    let loss = rows[0]["loss"].as_f64().unwrap();
    assert!(
        (loss - std::f64::consts::LN_2).abs() < 1e-6,
        "first loss {loss}"
    );
    let margin = rows[0]["rewards/margins"].as_f64().unwrap();
    assert!(margin.abs() < 1e-6, "first margin {margin}");
}

#[test]
fn online_reference_gives_the_same_first_step() {
    let job = Job::new(16, 0);
    let (_, cached) = job.config(
        "cached",
        "batch_size = 8\nmicro_batch_size = 4\nepochs = 1",
        "",
    );
    // The same job with `reference.mode = "online"`.
    let r = job.root.display();
    let text = std::fs::read_to_string(job.root.join("cached.toml"))
        .unwrap()
        .replace("[reference]\n", "[reference]\nmode = \"online\"\n")
        .replace(&format!("{r}/cached"), &format!("{r}/online"));
    let p = job.root.join("online2.toml");
    std::fs::write(&p, text).unwrap();
    let online = Config::load_with_env(&p, &[]).unwrap();
    let a = train(&cached, &cpu(Some(2))).unwrap();
    let b = train(&online, &cpu(Some(2))).unwrap();
    assert!(b.reference_loaded);
    let (ma, mb) = (
        metrics(&cached.train.output_dir),
        metrics(&online.train.output_dir),
    );
    for (x, y) in ma.iter().zip(&mb) {
        for k in ["loss", "rewards/chosen", "logps/ref_chosen"] {
            let (x, y) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
            assert!((x - y).abs() < 1e-5, "{k}: cached {x} vs online {y}");
        }
    }
    assert_eq!(a.steps, b.steps);
}

#[test]
fn resume_repeats_a_straight_run_bit_for_bit() {
    let job = Job::new(24, 8);
    let t = "batch_size = 4\nmicro_batch_size = 2\nepochs = 2\nlr = 2e-3\neval_every = 3\nsave_every = 2\nkeep_last = 2";
    let (_, straight) = job.config("straight", t, "");
    let (_, split) = job.config("split", t, "");
    let a = train(&straight, &cpu(None)).unwrap();
    assert_eq!(a.steps, 12);
    let first = train(&split, &cpu(Some(5))).unwrap();
    assert_eq!(first.steps, 5);
    let second = train(&split, &cpu(None)).unwrap();
    assert_eq!(second.resumed_from, Some(5));
    assert_eq!(second.steps, 12);
    let wa = std::fs::read(a.last_checkpoint.unwrap().join("model.safetensors")).unwrap();
    let wb = std::fs::read(second.last_checkpoint.unwrap().join("model.safetensors")).unwrap();
    assert!(wa == wb, "weights differ after resume");
    assert_eq!(
        comparable(&metrics(&straight.train.output_dir)),
        comparable(&metrics(&split.train.output_dir))
    );
    // keep_last = 2: only the newest two checkpoints remain.
    let kept = ddpo::train::checkpoint::list(&split.train.output_dir);
    assert_eq!(
        kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![10, 12]
    );
}

/// `model.freeze`: the vision tower and projector keep their exact weights and get no optimizer state; the
/// language model trains.
#[test]
fn frozen_modules_keep_their_weights_and_get_no_optimizer_state() {
    use ddpo::config::FreezeTarget;
    let job = Job::new(8, 0);
    let (_, mut cfg) = job.config(
        "frozen",
        "batch_size = 4\nmicro_batch_size = 2\nepochs = 1\nlr = 1e-2",
        "",
    );
    cfg.model.freeze = vec![FreezeTarget::VisionTower, FreezeTarget::Projector];
    let report = train(&cfg, &cpu(None)).unwrap();
    assert_eq!(report.steps, 2);
    let read = |p: PathBuf| -> std::collections::BTreeMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(p)
            .unwrap()
            .into_iter()
            .collect()
    };
    let before = read(job.root.join("model/model.safetensors"));
    let ckpt = report.last_checkpoint.unwrap();
    let after = read(ckpt.join("model.safetensors"));
    let frozen =
        |k: &str| k.starts_with("vision_tower.") || k.starts_with("multi_modal_projector.");
    let (mut same, mut moved) = (0, 0);
    for (k, b) in &before {
        let a = &after[k];
        if frozen(k) {
            assert!(a.equal(b), "frozen {k} changed");
            same += 1;
        } else if !a.equal(b) {
            moved += 1;
        }
    }
    assert!(same > 10, "only {same} frozen tensors");
    assert!(moved > 10, "only {moved} language-model tensors moved");
    let opt = read(ckpt.join("optimizer.safetensors"));
    assert!(opt.keys().any(|k| k.starts_with("m.language_model.")));
    let leaked: Vec<_> = opt
        .keys()
        .filter(|k| frozen(k.trim_start_matches("m.").trim_start_matches("v.")))
        .collect();
    assert!(
        leaked.is_empty(),
        "optimizer state for frozen tensors: {leaked:?}"
    );
}

/// The gradients of 4 micro-batches of 2 (accumulated by `micro_step`, as a training step does) equal those
/// of one batch of 8.
#[test]
fn accumulation_equals_one_big_batch() {
    use ddpo::data::collate::collate;
    use ddpo::model::llava::Llava;
    let job = Job::new(16, 0);
    let (_, cfg) = job.config(
        "acc",
        "batch_size = 8\nmicro_batch_size = 2\nepochs = 1",
        "",
    );
    ddpo::refcache::precompute(&cfg, tch::Device::Cpu).unwrap();
    let cache = ddpo::refcache::RefCache::open_for_device(&cfg, tch::Device::Cpu).unwrap();
    let pre = ddpo::data::pipeline::Preprocessor::from_config(&cfg).unwrap();
    let shards = ddpo::data::shards::discover(&cfg.data.train).unwrap();
    let mut src = ddpo::train::data::PairSource::cached(shards, pre.clone(), &cache).unwrap();
    let rows: Vec<_> = src.rows()[..8].to_vec();
    let exs: Vec<_> = rows.iter().map(|&r| src.example(r).unwrap()).collect();
    let pad = pre.text.tokenizer().token_to_id("<pad>").unwrap();
    let hw = pre.image.fixed_output_size().unwrap();
    let grads = |micro: usize| -> (Vec<(String, tch::Tensor)>, f64) {
        let (vs, model) = Llava::load(&cfg.model.path, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
        let mut acc =
            ddpo::train::Accumulated::new(vars.iter().map(|(_, v)| v.shallow_clone()).collect());
        // Twice, as two training steps do: the second pass starts from the gradients released after the
        // first (emptied, then reshaped and zeroed before backward) and must give the same sums.
        let mut passes = Vec::new();
        for _ in 0..2 {
            for chunk in exs.chunks(micro) {
                let batch = collate(chunk, pad, hw, cfg.train.shared_prefix);
                assert!(ddpo::train::micro_step(
                    &model, None, &batch, 8.0, &cfg.ddpo, None, &mut acc
                ));
            }
            let g: Vec<Option<tch::Tensor>> = acc
                .grads()
                .iter()
                .map(|g| g.as_ref().map(|g| g.copy()))
                .collect();
            ddpo::train::release_grads(&acc.params);
            assert!(
                acc.grads().iter().all(Option::is_none),
                "released gradients still held"
            );
            passes.push(g);
        }
        let second = passes.pop().unwrap();
        for (a, b) in passes[0].iter().zip(&second) {
            assert_eq!(a.is_some(), b.is_some());
            if let (Some(a), Some(b)) = (a, b) {
                assert!(a.equal(b), "a released-and-refilled gradient differs");
            }
        }
        let sums = std::mem::take(&mut acc.sums);
        let mut g: Vec<(String, tch::Tensor)> = vars
            .into_iter()
            .zip(second)
            .filter_map(|((k, _), g)| Some((k, g?)))
            .collect();
        g.sort_by(|a, b| a.0.cmp(&b.0));
        (g, sums.loss / sums.pairs)
    };
    let (full, loss_full) = grads(8);
    let (acc, loss_acc) = grads(2);
    assert!(
        (loss_full - loss_acc).abs() < 1e-6,
        "loss {loss_full} vs {loss_acc}"
    );
    let mut worst = 0f64;
    let mut largest = 0f64;
    for ((na, ga), (nb, gb)) in full.iter().zip(&acc) {
        assert_eq!(na, nb);
        worst = worst.max((ga - gb).abs().max().double_value(&[]));
        largest = largest.max(ga.abs().max().double_value(&[]));
    }
    assert!(
        largest > 1e-3,
        "gradients are all ~0 ({largest}): the test would prove nothing"
    );
    assert!(
        worst <= 1e-5 * largest,
        "accumulated gradients differ by {worst} (largest gradient {largest})"
    );
}

/// The shared-prefix layout (one sequence per pair, responses masked from each other) gives the split
/// layout's per-token log-probs and the same gradients, on pairs of different lengths (padding in both
/// layouts) and the tiny preset's grouped-query attention.
#[test]
fn shared_prefix_equals_the_split_layout_with_gradients() {
    use ddpo::data::collate::collate;
    use ddpo::model::llava::Llava;
    let job = Job::new(8, 0);
    let (_, cfg) = job.config("shared", "batch_size = 4\nmicro_batch_size = 4", "");
    let pre = ddpo::data::pipeline::Preprocessor::from_config(&cfg).unwrap();
    let shards = ddpo::data::shards::discover(&cfg.data.train).unwrap();
    let mut src =
        ddpo::train::data::PairSource::online(shards, pre.clone(), ddpo::config::OnBadRow::Fail)
            .unwrap();
    let rows: Vec<_> = src.rows()[..5].to_vec();
    let exs: Vec<_> = rows.iter().map(|&r| src.example(r).unwrap()).collect();
    let lens: std::collections::BTreeSet<usize> = exs
        .iter()
        .map(|e| e.chosen_ids.len() + e.rejected_ids.len())
        .collect();
    assert!(
        lens.len() > 1,
        "pairs of one length would not exercise padding"
    );
    let pad = pre.text.tokenizer().token_to_id("<pad>").unwrap();
    let hw = pre.image.fixed_output_size().unwrap();
    let (vs, model) = Llava::load(&cfg.model.path, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let run = |shared: bool| {
        let batch = collate(&exs, pad, hw, shared);
        assert_eq!(batch.packed.is_some(), shared);
        for (_, v) in vs.variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let lp = ddpo::logps::batch_logps(&model, &batch);
        (lp.shallow_clone() * batch.weights(5.0))
            .sum(tch::Kind::Float)
            .backward();
        let mut grads: Vec<(String, tch::Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.grad().defined())
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (lp.detach(), batch.labels.ne(-100), grads)
    };
    let (split, on_label, g_split) = run(false);
    let (shared, _, g_shared) = run(true);
    assert_eq!(split.size(), shared.size());
    assert_eq!(g_split.len(), g_shared.len());
    let off = shared.masked_select(&on_label.logical_not());
    assert_eq!(off.abs().max().double_value(&[]), 0.0);
    let lp_diff = (&split - &shared).abs().max().double_value(&[]);
    let lp_min = split.masked_select(&on_label).min().double_value(&[]);
    assert!(lp_min < -1.0, "log-probs {lp_min}: nothing to compare");
    assert!(lp_diff < 1e-5, "log-probs differ by {lp_diff}");
    let (mut worst, mut largest) = (0f64, 0f64);
    for ((na, ga), (nb, gb)) in g_split.iter().zip(&g_shared) {
        assert_eq!(na, nb);
        worst = worst.max((ga - gb).abs().max().double_value(&[]));
        largest = largest.max(ga.abs().max().double_value(&[]));
    }
    assert!(largest > 1e-3, "gradients ~0 ({largest})");
    assert!(
        worst <= 1e-5 * largest,
        "gradients differ by {worst} (largest {largest})"
    );
    eprintln!("log-probs max diff {lp_diff:e}; gradients max diff {worst:e} of {largest:e}");
}

/// Held-out reward accuracy rises well above chance on `ddpo synth --difficulty easy` data: the wrong colour
/// can only be told from the image, so this is the model learning a grounded preference. (The standard
/// difficulty, small shapes among several groups, is not learnt by a from-scratch tiny model in a test-sized
/// run — nor by the same recipe written in PyTorch/transformers, measured.) Five epochs (160 steps): with
/// three, whether accuracy had passed 0.8 by the end depended on last-bit differences (0.625 with the
/// torch-exact AdamW run alone, above 0.8 beside other tests); with five it sits at ~0.89 from step ~110.
#[test]
fn eval_reward_accuracy_rises_on_synthetic_data() {
    let job = Job::with_difficulty(512, 64, ddpo::data::synth::Difficulty::Easy);
    let (_, cfg) = job.config(
        "learn",
        "batch_size = 16\nmicro_batch_size = 16\nepochs = 5\nlr = 3e-3\nwarmup_ratio = 0.05\neval_every = 16",
        "[ddpo]\nbeta = 0.5\ngamma = 5.0",
    );
    let report = train(&cfg, &cpu(None)).unwrap();
    let rows = metrics(&cfg.train.output_dir);
    let evals: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["eval/rewards/accuracies"].as_f64())
        .collect();
    eprintln!("eval accuracies: {evals:?}; last {:?}", report.last_eval);
    let last = *evals.last().unwrap();
    assert!(
        last >= 0.8,
        "held-out reward accuracy only reached {last} ({evals:?})"
    );
    let first_loss = rows[0]["loss"].as_f64().unwrap();
    let last_eval_loss = rows
        .iter()
        .rev()
        .find_map(|r| r["eval/loss"].as_f64())
        .unwrap();
    assert!(
        last_eval_loss < first_loss - 0.1,
        "eval loss {last_eval_loss} vs first {first_loss}"
    );
}

#[test]
fn stale_cache_is_refused_with_a_clear_message() {
    let job = Job::new(16, 0);
    let (_, cfg) = job.config("stale", "batch_size = 8\nepochs = 1", "");
    ddpo::refcache::precompute(&cfg, tch::Device::Cpu).unwrap();
    let cache = ddpo::refcache::RefCache::open_for_device(&cfg, tch::Device::Cpu).unwrap();
    let shards = ddpo::data::shards::discover(&cfg.data.train).unwrap();
    let stem = shards[0].file_stem().unwrap().to_string_lossy().to_string();
    // A cache whose ids no longer match what this code builds (as after a tokenizer or template change
    // the fingerprint could not see): one id of the first row differs.
    edit_cache::<arrow::datatypes::Int32Type>(
        &cache.dir().join(format!("{stem}.parquet")),
        "chosen_ids",
        |v| v[0] += 1,
    );
    // One epoch sees every row, the tampered one included.
    let err = train(&cfg, &cpu(None)).unwrap_err().to_string();
    assert!(err.contains(&stem) && err.contains("row"), "{err}");
    assert!(err.to_lowercase().contains("cache"), "{err}");
}

#[test]
fn nan_in_the_cache_skips_the_step_and_training_goes_on() {
    let job = Job::new(16, 0);
    let (_, cfg) = job.config(
        "nan",
        "batch_size = 8\nmicro_batch_size = 4\nepochs = 2\nlr = 1e-3",
        "",
    );
    ddpo::refcache::precompute(&cfg, tch::Device::Cpu).unwrap();
    let cache = ddpo::refcache::RefCache::open_for_device(&cfg, tch::Device::Cpu).unwrap();
    let shards = ddpo::data::shards::discover(&cfg.data.train).unwrap();
    edit_cache::<arrow::datatypes::Float32Type>(
        &cache.dir().join(format!(
            "{}.parquet",
            shards[0].file_stem().unwrap().to_string_lossy()
        )),
        "chosen_logps",
        |v| v[0] = f32::NAN,
    );
    let report = train(&cfg, &cpu(None)).unwrap();
    assert_eq!(report.steps, 4);
    // The poisoned pair is in one batch per epoch: 2 skipped steps, the others applied.
    assert_eq!(report.skipped_steps, 2, "{report:?}");
    let rows = metrics(&cfg.train.output_dir);
    assert_eq!(rows.last().unwrap()["skipped_steps"].as_f64(), Some(2.0));
    let w =
        tch::Tensor::read_safetensors(report.last_checkpoint.unwrap().join("model.safetensors"))
            .unwrap();
    for (n, t) in &w {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "{n} has non-finite values"
        );
    }
}

/// Rewrites a list column of a cache file, applying `f` to the flattened values of the first batch.
fn edit_cache<T>(path: &Path, column: &str, f: impl Fn(&mut Vec<T::Native>))
where
    T: arrow::datatypes::ArrowPrimitiveType,
{
    use arrow::array::{Array, AsArray, ListArray, PrimitiveArray};
    use std::sync::Arc;
    let file = std::fs::File::open(path).unwrap();
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    // Keep the footer's key-value metadata (the cache's own record of what it holds).
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned();
    let reader = builder.build().unwrap();
    let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let idx = schema.index_of(column).unwrap();
    let field = match schema.field(idx).data_type() {
        arrow::datatypes::DataType::List(f) => f.clone(),
        t => panic!("{t}"),
    };
    let mut out = Vec::new();
    for (bi, b) in batches.iter().enumerate() {
        let col = b.column(idx).as_list::<i32>();
        let mut values: Vec<T::Native> = col.values().as_primitive::<T>().values().to_vec();
        if bi == 0 {
            f(&mut values);
        }
        let values: PrimitiveArray<T> = PrimitiveArray::from_iter_values(values);
        let list = ListArray::new(
            field.clone(),
            col.offsets().clone(),
            Arc::new(values),
            col.nulls().cloned(),
        );
        let mut cols = b.columns().to_vec();
        cols[idx] = Arc::new(list);
        out.push(arrow::record_batch::RecordBatch::try_new(schema.clone(), cols).unwrap());
    }
    let file = std::fs::File::create(path).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_key_value_metadata(kv)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    for b in &out {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

#[test]
fn full_disk_at_checkpoint_leaves_nothing_corrupt() {
    let job = Job::new(16, 0);
    let (path, cfg) = job.config(
        "disk",
        "batch_size = 4\nmicro_batch_size = 4\nepochs = 1\nsave_every = 2",
        "",
    );
    let bin = env!("CARGO_BIN_EXE_ddpo");
    let run = |fault: bool, steps: Option<usize>| {
        let mut c = Command::new(bin);
        c.args([
            "train",
            "--config",
            path.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        if let Some(s) = steps {
            c.args(["--max-steps", &s.to_string()]);
        }
        if fault {
            c.env("DDPO_FAULT_CHECKPOINT", "enospc");
        }
        c.output().unwrap()
    };
    let o = run(false, Some(2));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(true, None);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(
        err.contains("checkpoint") && err.contains("No space left on device"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(&cfg.train.output_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".tmp")),
        "temporary folder left behind: {names:?}"
    );
    assert!(names.contains(&"checkpoint-2".to_string()), "{names:?}");
    // Without the fault the run resumes from checkpoint-2 and finishes.
    let o = run(false, None);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("resumed from step 2") && out.contains("trained 4/4"),
        "{out}"
    );
}

/// With a reference model different from the policy, the first step's loss (all 6 pairs in one batch)
/// equals the docs/algorithm.md formula computed independently from transformers' log-probs and Python's difflib
/// (`tests/fixtures/gen_ddpo_loss_fixture.py`).
#[test]
fn first_step_loss_matches_the_independent_computation() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddpo_loss");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "paper_sigmoid",
            "beta = 0.5\ngamma = 5.0\nscore = \"mean\"\nloss = \"sigmoid\"",
        ),
        (
            "released_sigmoid",
            "beta = 0.1\ngamma = 1.1\nscore = \"sum\"\nloss = \"sigmoid\"",
        ),
        (
            "paper_ipo",
            "beta = 0.5\ngamma = 5.0\nscore = \"mean\"\nloss = \"ipo\"",
        ),
        (
            "paper_hinge",
            "beta = 0.5\ngamma = 5.0\nscore = \"mean\"\nloss = \"hinge\"",
        ),
    ];
    for (name, ddpo) in cases {
        let out = dir.path().join(name);
        let text = format!(
            "[model]\npath = \"{f}/policy\"\n[reference]\npath = \"{f}/reference\"\ncache_dir = \"{c}/cache\"\n\
             [data]\ntrain = [\"{f}/data/*.parquet\"]\nmax_length = 256\n[ddpo]\n{ddpo}\n\
             [train]\nbatch_size = 6\nmicro_batch_size = 3\nepochs = 1\nwarmup_ratio = 0.0\noutput_dir = \"{o}\"\n",
            f = fx.display(),
            c = dir.path().display(),
            o = out.display()
        );
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let cfg = Config::load_with_env(&p, &[]).unwrap();
        train(&cfg, &cpu(Some(1))).unwrap();
        let row = &metrics(&out)[0];
        let want = &expected["configs"][name]["metrics"];
        for k in [
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/ref_rejected",
        ] {
            let (got, want) = (
                row[k].as_f64().unwrap(),
                want[k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: no {k} in fixture")),
            );
            // Summed scores over ~100 fp32 log-probs carry fp32's relative precision; losses are O(1).
            let tol = 1e-5 * want.abs().max(1.0);
            assert!(
                (got - want).abs() < tol,
                "{name} {k}: ddpo {got} vs independent {want}"
            );
        }
    }
}

/// SFT (`ddpo.loss = "sft"`): the first step's loss (all 6 pairs in one batch) is the mean over pairs of the
/// chosen response's mean token NLL, computed from transformers' per-token log-probs in the fixture; no
/// reference is loaded or cached; later steps lower it.
#[test]
fn sft_first_step_loss_is_the_chosen_nll_of_transformers() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddpo_loss");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let rows = expected["rows"].as_array().unwrap();
    let nll: Vec<f64> = rows
        .iter()
        .map(|r| {
            let lp: Vec<f64> = r["policy_chosen_logps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            -lp.iter().sum::<f64>() / lp.len() as f64
        })
        .collect();
    let want = nll.iter().sum::<f64>() / nll.len() as f64;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft");
    let text = format!(
        "[model]\npath = \"{f}/policy\"\n[reference]\ncache_dir = \"{c}/cache\"\n\
         [data]\ntrain = [\"{f}/data/*.parquet\"]\nmax_length = 256\n[ddpo]\nloss = \"sft\"\ngamma = 5.0\n\
         [train]\nbatch_size = 6\nmicro_batch_size = 3\nepochs = 4\nwarmup_ratio = 0.0\nlr = 1e-3\noutput_dir = \"{o}\"\n",
        f = fx.display(),
        c = dir.path().display(),
        o = out.display()
    );
    let p = dir.path().join("sft.toml");
    std::fs::write(&p, text).unwrap();
    let cfg = Config::load_with_env(&p, &[]).unwrap();
    train(&cfg, &cpu(None)).unwrap();
    let m = metrics(&out);
    let got = m[0]["loss"].as_f64().unwrap();
    // Means of ~25 fp32 log-probs each: fp32's relative precision, on an O(1) loss (as the DDPO test above).
    assert!(
        (got - want).abs() < 1e-5 * want.max(1.0),
        "ddpo {got} vs independent {want}"
    );
    assert_eq!(m[0]["rewards/margins"].as_f64(), Some(0.0));
    let last = m.iter().rev().find_map(|r| r["loss"].as_f64()).unwrap();
    assert!(last < got, "SFT did not lower the loss: {got} -> {last}");
    assert!(
        !dir.path().join("cache").exists(),
        "SFT must not compute a reference cache"
    );
}

/// `train.eval_generate` is refused at set-up, naming why: without an eval split, and on eval data that
/// carries no scenes (the fixture's shards are plain RLHF-V data).
#[test]
fn eval_generate_without_scenes_is_refused_at_setup() {
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddpo_loss");
    let dir = tempfile::tempdir().unwrap();
    for (name, eval) in [
        ("no-eval", String::new()),
        (
            "no-scenes",
            format!("eval = [\"{}/data/*.parquet\"]\n", fx.display()),
        ),
    ] {
        let text = format!(
            "[model]\npath = \"{f}/policy\"\n[data]\ntrain = [\"{f}/data/*.parquet\"]\n{eval}max_length = 256\n\
             [ddpo]\nloss = \"sft\"\n[train]\nbatch_size = 6\nmicro_batch_size = 3\neval_generate = 4\noutput_dir = \"{o}\"\n",
            f = fx.display(),
            o = dir.path().join(name).display()
        );
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let cfg = Config::load_with_env(&p, &[]).unwrap();
        let e = train(&cfg, &cpu(None)).unwrap_err().to_string();
        let want = if eval.is_empty() {
            "needs an eval split"
        } else {
            "scene"
        };
        assert!(e.contains(want), "{name}: {e}");
    }
}
