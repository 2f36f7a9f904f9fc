//! The reference log-prob cache (docs/formats.md) on a tiny model and synthetic data, CPU: the files pyarrow
//! reads, numbers equal to an independent unbatched forward, no model work when nothing changed, exactly
//! the stale shards recomputed, resume after a crash, refusal of a stale cache with clear messages.
//!
//! pyarrow comes from `$DDPO_PYTHON` (scripts/with-torch sets it) else `python3`; without it the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use ddpo::config::{Config, OnBadRow};
use ddpo::data::collate::collate;
use ddpo::data::pipeline::{Example, ExampleStream, Preprocessor};
use ddpo::data::synth::{write_synthetic, SynthOptions};
use ddpo::model::llava::Llava;
use ddpo::refcache::{self, attach, precompute, CacheError, CachedPair, RefCache, MANIFEST};
use tch::{Device, Kind, Tensor};

const PAIRS: usize = 24;
const IMAGE: u32 = 48;
const MAX_LENGTH: usize = 256;

struct Setup {
    tmp: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    shards: Vec<PathBuf>,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("ref");
        ddpo::preset::init_model(&model, "tiny", 1).unwrap();
        let data = tmp.path().join("data");
        let shards = synth(&data, 7);
        Self {
            tmp,
            model,
            data,
            shards,
        }
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn cache_root(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// A job config; `extra_data` lines go into `[data]`, `reference` overrides the reference model.
    fn config(&self, extra_data: &str, reference: Option<&Path>) -> Config {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let reference = reference
            .map(|r| format!("path = {}\n", q(r)))
            .unwrap_or_default();
        let max_length = if extra_data.contains("max_length") {
            String::new()
        } else {
            format!("max_length = {MAX_LENGTH}\n")
        };
        let text = format!(
            "[model]\npath = {}\ndtype = \"fp32\"\n\
             [reference]\n{reference}cache_dir = {}\n\
             [data]\ntrain = [{}]\n{max_length}{extra_data}\n\
             [train]\nbatch_size = 4\nmicro_batch_size = 4\noutput_dir = {}\n",
            q(&self.model),
            q(&self.cache_root()),
            q(&self.data.join("train-*.parquet")),
            q(&self.path().join("run")),
        );
        let path = self.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_with_env(&path, &[]).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `PAIRS` synthetic pairs in two shards.
fn synth(dir: &Path, seed: u64) -> Vec<PathBuf> {
    write_synthetic(&SynthOptions {
        out_dir: dir.to_owned(),
        pairs: PAIRS,
        shards: 2,
        seed,
        image_size: IMAGE,
        rows_per_group: 8,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap()
    .files
}

fn pre_for(cfg: &Config) -> Preprocessor {
    Preprocessor::from_model_dir(
        cfg.reference_path(),
        &cfg.data.template,
        cfg.data.max_length,
        cfg.data.pad_to_square,
        cfg.ddpo.min_match,
    )
    .unwrap()
}

fn examples(pre: &Preprocessor, shard: &Path) -> Vec<Example> {
    ExampleStream::new(pre, vec![shard.to_owned()], OnBadRow::Fail)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// No temporary files in the cache root or any fingerprint directory.
fn assert_no_temp_files(root: &Path) {
    for name in file_names(root) {
        assert!(
            !name.starts_with('.') && !name.ends_with(".tmp"),
            "temp file left: {name}"
        );
        let p = root.join(&name);
        if p.is_dir() {
            for n in file_names(&p) {
                assert!(
                    !n.starts_with('.') && !n.ends_with(".tmp"),
                    "temp file left: {}/{n}",
                    p.display()
                );
            }
        }
    }
}

const PYARROW_CHECK: &str = r#"
import sys, json, os
import pyarrow as pa
import pyarrow.parquet as pq

files = json.loads(sys.argv[1])
expected = [
    ("row", pa.int64()),
    ("id", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("chosen_logps", pa.list_(pa.float32())),
    ("rejected_ids", pa.list_(pa.int32())),
    ("rejected_logps", pa.list_(pa.float32())),
]
out = {}
for f in files:
    pf = pq.ParquetFile(f)
    got = [(fld.name, fld.type) for fld in pf.schema_arrow]
    if got != expected:
        sys.exit(f"{f}: columns {got} are not {expected}")
    meta = json.loads(pf.metadata.metadata[b"ddpo.refcache"])
    t = pf.read()
    rows = t.to_pylist()
    for r in rows:
        for side in ("chosen", "rejected"):
            if len(r[side + "_ids"]) != len(r[side + "_logps"]):
                sys.exit(f"{f}: row {r['row']}: {side} ids and logps differ in length")
            if any(not (lp <= 0.0) for lp in r[side + "_logps"]):
                sys.exit(f"{f}: row {r['row']}: a log-prob is not <= 0")
    out[os.path.basename(f)] = {
        "num_rows": t.num_rows,
        "footer_rows": meta["rows_written"],
        "rows": [r["row"] for r in rows],
        "ids": [r["id"] for r in rows],
        "chosen_logps_sum": sum(sum(r["chosen_logps"]) for r in rows),
        "rejected_logps_sum": sum(sum(r["rejected_logps"]) for r in rows),
        "prompt_ids_sum": sum(sum(r["prompt_ids"]) for r in rows),
    }
print(json.dumps(out))
"#;

fn pyarrow_read(files: &[PathBuf]) -> serde_json::Value {
    let py = crate::common::python();
    let arg = serde_json::to_string(
        &files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = Command::new(&py)
        .arg("-c")
        .arg(PYARROW_CHECK)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run Python {py:?} ({e}); this test needs Python with pyarrow: run it through \
                 scripts/with-torch (which sets DDPO_PYTHON to the project venv) or set DDPO_PYTHON"
            )
        });
    assert!(
        out.status.success(),
        "pyarrow check with {py:?} failed (it needs pyarrow: run through scripts/with-torch or set \
         DDPO_PYTHON):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// log p(resp[i] | image, prompt, resp[<i]) for one response alone (batch of 1, no padding), from the full
/// logits: independent of collation, `batch_logps` and the chunked log-prob path.
fn single_logps(model: &Llava, ex: &Example, resp: &[u32], (h, w): (usize, usize)) -> Vec<f64> {
    let ids: Vec<i64> = ex
        .prompt_ids
        .iter()
        .chain(resp)
        .map(|&i| i as i64)
        .collect();
    let input = Tensor::from_slice(&ids).view([1, -1]);
    let mask = Tensor::ones_like(&input);
    let pix = Tensor::from_slice(&ex.pixel_values).view([1, 3, h as i64, w as i64]);
    let lsm = tch::no_grad(|| model.logits(&input, &mask, &pix)).log_softmax(-1, Kind::Double);
    let p = ex.prompt_ids.len() as i64;
    resp.iter()
        .enumerate()
        .map(|(i, &tok)| lsm.double_value(&[0, p + i as i64 - 1, tok as i64]))
        .collect()
}

/// Files pyarrow reads with the documented columns, numbers equal to an unbatched forward, ids
/// equal to the pipeline's, no temp files left.
#[test]
fn precompute_writes_inspectable_files_with_correct_numbers() {
    let s = Setup::new();
    let cfg = s.config("", None);
    let report = precompute(&cfg, Device::Cpu).unwrap();
    assert!(report.model_loaded);
    assert_eq!(
        (
            report.shards_total,
            report.shards_computed,
            report.shards_cached
        ),
        (2, 2, 0)
    );
    assert_eq!(
        (report.rows_written, report.rows_skipped),
        (PAIRS as u64, 0)
    );
    let dir = s.cache_root().join(&report.fingerprint);
    assert_eq!(report.dir, dir);
    let names = file_names(&dir);
    assert_eq!(
        names,
        [
            MANIFEST,
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    assert_no_temp_files(&s.cache_root());

    // manifest.json: fingerprint inputs and one entry per shard.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    eprintln!(
        "manifest.json:\n{}",
        serde_json::to_string_pretty(&manifest).unwrap()
    );
    assert_eq!(manifest["fingerprint"], report.fingerprint.as_str());
    let inputs = &manifest["inputs"];
    assert_eq!(inputs["template"], "llava_v1");
    assert_eq!(inputs["max_length"], MAX_LENGTH);
    assert_eq!(inputs["dtype"], "fp32");
    assert_eq!(inputs["pad_to_square"], true);
    assert_eq!(
        inputs["reference_model"],
        s.model.display().to_string().as_str()
    );
    assert!(inputs["weights_sha256"]["model.safetensors"].is_string());
    let entries = manifest["shards"].as_object().unwrap();
    assert_eq!(entries.len(), 2);
    for (shard, name) in s.shards.iter().zip(&names[1..]) {
        let e = &entries[name.as_str()];
        assert_eq!(e["source"], shard.display().to_string().as_str());
        assert_eq!(
            e["source_sha256"],
            refcache::sha256_file(shard).unwrap().as_str()
        );
        assert_eq!(e["rows_written"], 12);
        assert_eq!(e["rows_skipped"], 0);
        assert!(e["created"].as_str().unwrap().ends_with('Z'));
    }

    // pyarrow reads the files: columns and types exactly, rows as load_shard returns them.
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    assert_eq!(cache.dir(), dir);
    let files: Vec<PathBuf> = s.shards.iter().map(|p| cache.file_for(p)).collect();
    let py = pyarrow_read(&files);
    for (shard, file) in s.shards.iter().zip(&files) {
        let got = &py[file.file_name().unwrap().to_str().unwrap()];
        let pairs = cache.load_shard(shard).unwrap();
        assert_eq!(got["num_rows"], pairs.len());
        assert_eq!(got["footer_rows"], pairs.len());
        let rows: Vec<u64> = pairs.iter().map(|p| p.row).collect();
        assert_eq!(got["rows"], serde_json::json!(rows));
        let ids: Vec<&str> = pairs.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(got["ids"], serde_json::json!(ids));
        let sum = |f: fn(&CachedPair) -> &[f32]| -> f64 {
            pairs
                .iter()
                .map(|p| f(p).iter().map(|&v| v as f64).sum::<f64>())
                .sum()
        };
        let close = |a: &serde_json::Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-6;
        assert!(close(&got["chosen_logps_sum"], sum(|p| &p.chosen_logps)));
        assert!(close(
            &got["rejected_logps_sum"],
            sum(|p| &p.rejected_logps)
        ));
        let psum: u64 = pairs
            .iter()
            .flat_map(|p| p.prompt_ids.iter().map(|&v| v as u64))
            .sum();
        assert_eq!(got["prompt_ids_sum"], psum);
    }

    // ids are the pipeline's; log-probs equal a forward of each response alone.
    let pre = pre_for(&cfg);
    let hw = pre.image.fixed_output_size().unwrap();
    let (_vs, model) = Llava::load(&s.model, Device::Cpu, Kind::Float).unwrap();
    let mut max_diff = 0f64;
    let mut checked = 0;
    for shard in &s.shards {
        let pairs = cache.load_shard(shard).unwrap();
        let exs = examples(&pre, shard);
        assert_eq!(exs.len(), pairs.len());
        for (ex, p) in exs.iter().zip(&pairs) {
            assert_eq!((ex.row, &ex.id), (p.row, &p.id));
            assert_eq!(ex.prompt_ids, p.prompt_ids, "row {}", ex.row);
            assert_eq!(ex.chosen_ids, p.chosen_ids, "row {}", ex.row);
            assert_eq!(ex.rejected_ids, p.rejected_ids, "row {}", ex.row);
        }
        // Rows whose batch (4 pairs) padded them: the shortest responses of their batch.
        for &i in &[0usize, 3, 5, 10] {
            let (ex, p) = (&exs[i], &pairs[i]);
            for (resp, cached) in [
                (&ex.chosen_ids, &p.chosen_logps),
                (&ex.rejected_ids, &p.rejected_logps),
            ] {
                let want = single_logps(&model, ex, resp, hw);
                assert_eq!(want.len(), cached.len());
                for (a, b) in want.iter().zip(cached) {
                    max_diff = max_diff.max((a - *b as f64).abs());
                }
                checked += want.len();
            }
        }
    }
    eprintln!("cached vs single-pair log-probs: max |diff| {max_diff:.3e} over {checked} tokens");
    assert!(checked > 50);
    assert!(max_diff <= 1e-5, "max |diff| {max_diff}");
}

/// Nothing recomputed (nor the model loaded) when nothing changed; a fingerprint input gives a new
/// directory; a changed shard or a deleted cache file recomputes exactly that shard.
#[test]
fn recomputes_exactly_what_changed() {
    let s = Setup::new();
    let cfg = s.config("", None);
    let first = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!(first.shards_computed, 2);
    let dir = first.dir.clone();
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    let files: Vec<PathBuf> = s.shards.iter().map(|p| cache.file_for(p)).collect();
    let times: Vec<_> = files.iter().map(|f| mtime(f)).collect();
    let manifest_time = mtime(&dir.join(MANIFEST));

    // 3. Second run: no model work at all.
    let again = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!(
        (
            again.shards_computed,
            again.shards_cached,
            again.model_loaded
        ),
        (0, 2, false)
    );
    assert_eq!(again.dir, dir);
    assert_eq!(files.iter().map(|f| mtime(f)).collect::<Vec<_>>(), times);
    assert_eq!(mtime(&dir.join(MANIFEST)), manifest_time);
    assert!(cache.missing_shards(&s.shards).unwrap().is_empty());

    // 4a. Fingerprint inputs: max_length, template, reference weights, dtype each give a new directory.
    let shorter = precompute(&s.config("max_length = 200", None), Device::Cpu).unwrap();
    assert_ne!(shorter.dir, dir);
    assert_eq!((shorter.shards_computed, shorter.model_loaded), (2, true));
    let other_model = s.path().join("ref2");
    ddpo::preset::init_model(&other_model, "tiny", 2).unwrap();
    let reseeded = precompute(&s.config("", Some(&other_model)), Device::Cpu).unwrap();
    assert_ne!(reseeded.dir, dir);
    assert_ne!(reseeded.dir, shorter.dir);
    assert_eq!(reseeded.shards_computed, 2);
    let template =
        RefCache::open_for_device(&s.config("template = \"llava_hf\"", None), Device::Cpu).unwrap();
    assert_ne!(template.dir(), dir);
    let mut bf16 = s.config("", None);
    bf16.model.dtype = ddpo::config::Dtype::Bf16;
    let bf16 = RefCache::open_for_device(&bf16, Device::Cpu).unwrap();
    assert_ne!(bf16.dir(), dir);
    assert_eq!(bf16.inputs().dtype, "bf16");
    // β, γ, score and min_match are not inputs.
    let mut loss_only = s.config("", None);
    loss_only.ddpo.beta = 0.1;
    loss_only.ddpo.gamma = 1.1;
    loss_only.ddpo.min_match = 5;
    assert_eq!(
        RefCache::open_for_device(&loss_only, Device::Cpu)
            .unwrap()
            .dir(),
        dir
    );
    // The original cache is untouched by all this.
    let again = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!((again.shards_computed, again.model_loaded), (0, false));

    // 4b. Rewrite shard 1 with other content: it is stale, and only it is recomputed.
    let before0 = cache.load_shard(&s.shards[0]).unwrap();
    let before1 = cache.load_shard(&s.shards[1]).unwrap();
    let other = s.path().join("other-data");
    let replacement = synth(&other, 8);
    std::fs::copy(&replacement[1], &s.shards[1]).unwrap();
    assert_eq!(
        cache.missing_shards(&s.shards).unwrap(),
        vec![s.shards[1].clone()]
    );
    let e = cache.load_shard(&s.shards[1]).unwrap_err();
    assert!(matches!(e, CacheError::Stale { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&s.shards[1].display().to_string())
            && msg.contains("stale")
            && msg.contains("ddpo precompute"),
        "{msg}"
    );
    let r = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!((r.shards_computed, r.shards_cached), (1, 1));
    assert_eq!(r.computed[0].shard, s.shards[1]);
    assert_eq!(mtime(&files[0]), times[0]);
    assert_eq!(cache.load_shard(&s.shards[0]).unwrap(), before0);
    let after1 = cache.load_shard(&s.shards[1]).unwrap();
    assert_ne!(after1, before1);
    let m = cache.manifest().unwrap();
    assert_eq!(
        m.shards["train-00001-of-00002.parquet"].source_sha256,
        refcache::sha256_file(&s.shards[1]).unwrap()
    );

    // 5a. Crash after one shard: delete shard 0's file and manifest entry; only it is recomputed.
    std::fs::remove_file(&files[0]).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    m["shards"]
        .as_object_mut()
        .unwrap()
        .remove("train-00000-of-00002.parquet");
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let e = cache.load_shard(&s.shards[0]).unwrap_err();
    assert!(matches!(e, CacheError::Missing { .. }), "{e}");
    let r = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!((r.shards_computed, r.shards_cached), (1, 1));
    assert_eq!(r.computed[0].shard, s.shards[0]);
    assert_eq!(cache.load_shard(&s.shards[0]).unwrap(), before0);
    assert_eq!(cache.manifest().unwrap().shards.len(), 2);
    assert_no_temp_files(&s.cache_root());
}

/// A run that computed only one shard (compute_shard, the unit a coordinator leases) is resumed by
/// precompute, which computes only the other.
#[test]
fn precompute_resumes_after_a_partial_run() {
    let s = Setup::new();
    let cfg = s.config("", None);
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    assert_eq!(cache.missing_shards(&s.shards).unwrap(), s.shards);
    let (_vs, model) = Llava::load(&s.model, Device::Cpu, Kind::Float).unwrap();
    let pre = pre_for(&cfg);
    let r = cache
        .compute_shard(&model, &pre, &s.shards[0], &opts(OnBadRow::Skip, 5))
        .unwrap();
    assert_eq!((r.rows_read, r.rows_written, r.rows_skipped), (12, 12, 0));
    assert_eq!(cache.manifest().unwrap().shards.len(), 1);
    assert_eq!(
        cache.missing_shards(&s.shards).unwrap(),
        vec![s.shards[1].clone()]
    );
    // What a writer killed mid-shard leaves behind, hours ago: precompute removes it.
    let leftover = cache.dir().join(".train-00001-of-00002.parquet.999.1.tmp");
    std::fs::write(&leftover, b"partial").unwrap();
    let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .unwrap()
        .set_modified(hours_ago)
        .unwrap();
    let report = precompute(&cfg, Device::Cpu).unwrap();
    assert!(!leftover.exists());
    assert_eq!(
        (report.shards_computed, report.shards_cached),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(report.computed[0].shard, s.shards[1]);
    assert_eq!(cache.manifest().unwrap().shards.len(), 2);
    // Batches of 5 pairs here, 4 in precompute: the same numbers up to float noise.
    let a = cache.load_shard(&s.shards[0]).unwrap();
    assert_eq!(a.len(), 12);
    assert_no_temp_files(&s.cache_root());
}

/// `attach` refuses a cache that no longer matches the examples; load_shard names what to do; a corrupt
/// file is named and recomputed by the next precompute.
#[test]
fn stale_missing_and_corrupt_caches_are_refused_clearly() {
    let s = Setup::new();
    let cfg = s.config("", None);
    precompute(&cfg, Device::Cpu).unwrap();
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    let shard = &s.shards[0];
    let pairs = cache.load_shard(shard).unwrap();

    // Matching examples attach, and collate carries the reference log-probs.
    let pre = pre_for(&cfg);
    let mut exs = examples(&pre, shard);
    for (ex, p) in exs.iter_mut().zip(&pairs) {
        attach(ex, refcache::find_row(&pairs, ex.row).unwrap(), shard).unwrap();
        assert_eq!(ex.reference.as_ref().unwrap().chosen, p.chosen_logps);
    }
    let hw = pre.image.fixed_output_size().unwrap();
    assert!(collate(&exs[..3], 0, hw, true).ref_logps.is_some());

    // A different template: the prompt ids differ.
    let mut other = cfg.clone();
    other.data.template = "llava_hf".into();
    let mut exs = examples(&pre_for(&other), shard);
    let e = attach(&mut exs[2], &pairs[2], shard)
        .unwrap_err()
        .to_string();
    eprintln!("template mismatch: {e}");
    assert!(
        e.contains(&shard.display().to_string())
            && e.contains(&format!("row {}", pairs[2].row))
            && e.contains("prompt ids differ")
            && e.contains("first difference at position")
            && e.contains("no longer matches")
            && e.contains("ddpo precompute"),
        "{e}"
    );
    assert!(exs[2].reference.is_none());

    // A shorter max_length: responses are truncated, so a response's ids differ in length.
    let longest = examples(&pre, shard)
        .iter()
        .map(|e| e.prompt_ids.len() + e.chosen_ids.len().max(e.rejected_ids.len()))
        .max()
        .unwrap();
    let mut short = cfg.clone();
    short.data.max_length = longest - 3;
    let mut exs = examples(&pre_for(&short), shard);
    let (i, ex) = exs
        .iter_mut()
        .enumerate()
        .find(|(_, e)| e.truncated)
        .unwrap();
    let e = attach(ex, &pairs[i], shard).unwrap_err().to_string();
    eprintln!("max_length mismatch: {e}");
    assert!(
        e.contains(&format!("row {}", pairs[i].row))
            && (e.contains("chosen ids differ") || e.contains("rejected ids differ"))
            && e.contains("tokens vs cached"),
        "{e}"
    );
    // The wrong row is refused too.
    let mut exs = examples(&pre, shard);
    let e = attach(&mut exs[0], &pairs[1], shard)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row"), "{e}");

    // A shard never cached: load_shard says to run precompute.
    let new_shard = s.path().join("more").join("extra.parquet");
    std::fs::create_dir_all(new_shard.parent().unwrap()).unwrap();
    std::fs::copy(shard, &new_shard).unwrap();
    let e = cache.load_shard(&new_shard).unwrap_err().to_string();
    assert!(
        e.contains(&new_shard.display().to_string()) && e.contains("ddpo precompute"),
        "{e}"
    );

    // A truncated cache file: an error naming the file; precompute sees it as missing and recomputes it.
    let file = cache.file_for(shard);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = cache.load_shard(shard).unwrap_err();
    assert!(matches!(e, CacheError::Corrupt { .. }), "{e}");
    let msg = e.to_string();
    eprintln!("corrupt: {msg}");
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("corrupt"),
        "{msg}"
    );
    assert_eq!(
        cache.missing_shards(&s.shards).unwrap(),
        vec![shard.clone()]
    );
    let r = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!(r.shards_computed, 1);
    assert_eq!(cache.load_shard(shard).unwrap(), pairs);
}

/// `data.eval` shards are cached too; shards sharing a file stem (train/ and eval/ alike) get distinct files.
#[test]
fn eval_shards_and_colliding_stems() {
    let s = Setup::new();
    let eval_dir = s.path().join("eval");
    let eval = synth(&eval_dir, 9);
    let pattern = format!(
        "{:?}",
        eval_dir.join("train-*.parquet").display().to_string()
    );
    let cfg = s.config(&format!("eval = [{pattern}]"), None);
    let r = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!((r.shards_total, r.shards_computed), (4, 4));
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    let all: Vec<PathBuf> = s.shards.iter().chain(&eval).cloned().collect();
    let mut files: Vec<PathBuf> = all.iter().map(|p| cache.file_for(p)).collect();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("train-0000") && name.ends_with(".parquet"));
    }
    files.sort();
    files.dedup();
    assert_eq!(files.len(), 4, "{files:?}");
    assert_eq!(cache.manifest().unwrap().shards.len(), 4);
    let train0 = cache.load_shard(&s.shards[0]).unwrap();
    let eval0 = cache.load_shard(&eval[0]).unwrap();
    assert_ne!(train0, eval0);
    let again = precompute(&cfg, Device::Cpu).unwrap();
    assert_eq!((again.shards_computed, again.model_loaded), (0, false));
}

/// Bad rows: skipped ones are counted and absent (the `row` column shows the gap); under `fail` the shard
/// fails and no cache file appears.
#[test]
fn bad_rows_follow_the_policy() {
    let s = Setup::new();
    let bad_dir = s.path().join("bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let shard = bad_dir.join("train-bad.parquet");
    let mut rows: Vec<crate::common::Row> = (0..5).map(crate::common::good_row).collect();
    rows[2].image = Some(b"not an image".to_vec());
    crate::common::write_rlhfv(&shard, &rows, 2);

    let cfg = s.config("", None);
    let cache = RefCache::open_for_device(&cfg, Device::Cpu).unwrap();
    let (_vs, model) = Llava::load(&s.model, Device::Cpu, Kind::Float).unwrap();
    let pre = pre_for(&cfg);
    let e = cache
        .compute_shard(&model, &pre, &shard, &opts(OnBadRow::Fail, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 2") && e.contains("image"), "{e}");
    assert!(!cache.file_for(&shard).exists());
    assert_no_temp_files(&s.cache_root());

    let r = cache
        .compute_shard(&model, &pre, &shard, &opts(OnBadRow::Skip, 2))
        .unwrap();
    assert_eq!((r.rows_read, r.rows_written, r.rows_skipped), (5, 4, 1));
    assert_eq!(r.skipped[0].row, 2);
    let pairs = cache.load_shard(&shard).unwrap();
    assert_eq!(
        pairs.iter().map(|p| p.row).collect::<Vec<_>>(),
        [0, 1, 3, 4]
    );
    let m = cache.manifest().unwrap();
    let entry = &m.shards["train-bad.parquet"];
    assert_eq!((entry.rows_written, entry.rows_skipped), (4, 1));
    assert!(entry.skipped_rows[0].contains("row 2"), "{entry:?}");
}

fn opts(on_bad_row: OnBadRow, batch_pairs: usize) -> ddpo::refcache::ComputeOptions {
    ddpo::refcache::ComputeOptions {
        on_bad_row,
        batch_pairs,
        device: Device::Cpu,
        shared_prefix: true,
    }
}
