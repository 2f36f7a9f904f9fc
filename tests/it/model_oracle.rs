//! The LLaVA model against Hugging Face transformers: logits, image features and log-probs of tiny models
//! made and run by transformers (`tests/fixtures/gen_llava_fixtures.py`), in both weight layouts and sharded;
//! a checkpoint this code saves loads in transformers and gives the same logits; bad checkpoints are refused
//! naming the tensor.

use std::path::{Path, PathBuf};
use std::process::Command;

use ddpo::data::collate::IGNORE;
use ddpo::data::image::{ImageProcessor, ImageProcessorConfig};
use ddpo::model::config::LlavaConfig;
use ddpo::model::llava::Llava;
use ddpo::model::weights;
use tch::{nn, Kind, Tensor};

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llava")
        .join(name)
}

fn expected(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn build(dir: &Path) -> (nn::VarStore, Llava) {
    let cfg = LlavaConfig::from_dir(dir).unwrap();
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let m = Llava::new(&vs.root(), &cfg).unwrap();
    (vs, m)
}

fn load(dir: &Path) -> (nn::VarStore, Llava) {
    let (vs, m) = build(dir);
    weights::load(&vs, dir).unwrap_or_else(|e| panic!("{e}"));
    (vs, m)
}

/// Max |a − b| over positions where `mask` ([B, T]) is 1; a and b are [B, T, …].
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let mut m = mask.to_kind(Kind::Float);
    while m.dim() < a.dim() {
        m = m.unsqueeze(-1);
    }
    ((a - b).abs() * m).max().double_value(&[])
}

fn check_logits(dir: &Path, m: &Llava) {
    let e = expected(dir);
    let logits =
        tch::no_grad(|| m.logits(&e["input_ids"], &e["attention_mask"], &e["pixel_values"]));
    let spread = e["logits"].std(true).double_value(&[]);
    assert!(
        spread > 0.5,
        "fixture logits are too flat to discriminate (std {spread})"
    );
    let d = masked_max_diff(&logits, &e["logits"], &e["attention_mask"]);
    eprintln!(
        "{}: max abs logit difference {d:.2e} (logit std {spread:.2})",
        dir.display()
    );
    assert!(
        d <= TOL,
        "{}: logits differ from transformers by {d}",
        dir.display()
    );
}

#[test]
fn logits_and_image_features_match_transformers() {
    for name in ["mha", "gqa"] {
        let dir = fixture(name);
        let (_vs, m) = load(&dir);
        check_logits(&dir, &m);
        let e = expected(&dir);
        let f = tch::no_grad(|| m.image_features(&e["pixel_values"]));
        let want = e["image_features"].reshape([-1, f.size()[1]]);
        let d = (f - want).abs().max().double_value(&[]);
        assert!(d <= TOL, "{name}: image features differ by {d}");
    }
}

#[test]
fn response_logps_match_transformers_for_every_chunk_size() {
    for name in ["mha", "gqa"] {
        let dir = fixture(name);
        let (_vs, m) = load(&dir);
        let e = expected(&dir);
        let ids = &e["input_ids"];
        let mask = &e["attention_mask"];
        let labels = ids.where_self(&mask.eq(1), &Tensor::from(IGNORE));
        let hidden = tch::no_grad(|| m.hidden(ids, mask, &e["pixel_values"], None));
        let t = ids.size()[1];
        let valid = mask.narrow(1, 1, t - 1);
        for chunk in [1, 3, 7, 1024] {
            let lp = tch::no_grad(|| m.response_logps_chunked(&hidden, &labels, chunk));
            assert_eq!(lp.kind(), Kind::Float);
            let got = lp.narrow(1, 1, t - 1);
            let d = masked_max_diff(&got, &e["log_probs"], &valid);
            assert!(d <= TOL, "{name} chunk {chunk}: log-probs differ by {d}");
            // Outside labels the output is exactly 0.
            let outside = (got * (valid.ones_like() - &valid))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(outside, 0.0);
        }
    }
}

#[test]
fn image_preprocessing_matches_the_fixture_pixels() {
    for name in ["mha", "gqa"] {
        let dir = fixture(name);
        let e = expected(&dir);
        let cfg = ImageProcessorConfig::from_file(&dir.join("preprocessor_config.json")).unwrap();
        let p = ImageProcessor::new(cfg, false);
        for i in 0..2 {
            let bytes = std::fs::read(dir.join(format!("image{i}.png"))).unwrap();
            let px = Tensor::from_slice(&p.process_bytes(&bytes).unwrap());
            let want = e["pixel_values"].get(i).reshape([-1]);
            let d = (px - want).abs().max().double_value(&[]);
            assert!(d <= 1e-6, "{name} image {i}: pixel values differ by {d}");
        }
    }
}

#[test]
fn other_layout_and_sharded_checkpoints_load_the_same() {
    let src = fixture("mha");
    let tmp = tempfile::tempdir().unwrap();
    // The other weight-name layout, as a single file.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(src.join("config.json"), other.join("config.json")).unwrap();
    std::fs::copy(
        src.join("model-other-layout.safetensors"),
        other.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        src.join("expected.safetensors"),
        other.join("expected.safetensors"),
    )
    .unwrap();
    let (_vs, m) = load(&other);
    check_logits(&other, &m);

    // Sharded: the tensors split over two files with an index.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(src.join("config.json"), sharded.join("config.json")).unwrap();
    std::fs::copy(
        src.join("expected.safetensors"),
        sharded.join("expected.safetensors"),
    )
    .unwrap();
    let all = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let a: Vec<(String, Tensor)> = a.into_iter().map(|(_, x)| x).collect();
    let b: Vec<(String, Tensor)> = b.into_iter().map(|(_, x)| x).collect();
    Tensor::write_safetensors(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    Tensor::write_safetensors(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for (n, _) in &a {
        map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for (n, _) in &b {
        map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let (_vs, m) = load(&sharded);
    check_logits(&sharded, &m);
}

use crate::common::python;

#[test]
fn saved_checkpoint_loads_in_transformers_with_the_same_logits() {
    for name in ["mha", "gqa"] {
        let src = fixture(name);
        let (vs, _m) = load(&src);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        let files = [
            (
                "config.json",
                std::fs::read(src.join("config.json")).unwrap(),
            ),
            (
                "preprocessor_config.json",
                std::fs::read(src.join("preprocessor_config.json")).unwrap(),
            ),
        ];
        let files: Vec<(&str, Vec<u8>)> = files.into_iter().collect();
        weights::save(&vs, &out, Kind::Float, &files).unwrap();
        let got = tmp.path().join("logits.safetensors");
        let o = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/llava_logits.py"))
            .arg(&out)
            .arg(src.join("expected.safetensors"))
            .arg(&got)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (set DDPO_PYTHON): {e}", python()));
        assert!(
            o.status.success(),
            "transformers could not load the saved checkpoint:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let logits: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&got)
            .unwrap()
            .into_iter()
            .collect();
        let e = expected(&src);
        let d = masked_max_diff(&logits["logits"], &e["logits"], &e["attention_mask"]);
        assert!(
            d <= TOL,
            "{name}: transformers on our checkpoint differs by {d}"
        );
    }
}

#[test]
fn bad_checkpoints_are_refused_naming_the_tensor() {
    let src = fixture("mha");
    let all = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(String, Tensor)]| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        Tensor::write_safetensors(tensors, d.join("model.safetensors")).unwrap();
        d
    };
    let err = |dir: &Path| {
        let (vs, _m) = build(dir);
        weights::load(&vs, dir).unwrap_err().to_string()
    };
    // Missing.
    let victim = all[3].0.clone();
    let missing: Vec<_> = all
        .iter()
        .filter(|(n, _)| *n != victim)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let e = err(&write("missing", &missing));
    assert!(
        e.contains("missing tensor") && e.contains(&weights::canonical_name(&victim).unwrap()),
        "{e}"
    );
    // Mis-shaped.
    let mut shaped: Vec<_> = all
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    shaped[5].1 = Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu));
    let e = err(&write("shaped", &shaped));
    assert!(
        e.contains(&shaped[5].0) && e.contains("shape [3, 3]"),
        "{e}"
    );
    // Unexpected.
    let mut extra: Vec<_> = all
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    extra.push((
        "language_model.model.layers.9.mlp.up_proj.weight".into(),
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
    ));
    let e = err(&write("extra", &extra));
    assert!(
        e.contains("unexpected tensor language_model.model.layers.9.mlp.up_proj.weight"),
        "{e}"
    );
    // No weights at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(src.join("config.json"), empty.join("config.json")).unwrap();
    let e = err(&empty);
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn init_model_output_loads_here_and_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    ddpo::preset::init_model(&dir, "tiny", 3).unwrap();
    let (_vs, _m) = load(&dir);
    let script = r#"
import sys
from transformers import LlavaForConditionalGeneration, AutoTokenizer, CLIPImageProcessor
m, info = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)
bad = {k: v for k, v in info.items() if v}
assert not bad, bad
tok = AutoTokenizer.from_pretrained(sys.argv[1])
assert tok.convert_tokens_to_ids("<image>") == m.config.image_token_index, "image token id"
CLIPImageProcessor.from_pretrained(sys.argv[1])
print("ok")
"#;
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// bf16 weights (what CUDA runs use) on CPU: the forward runs with fp32 pixels, log-probs come out fp32,
/// and they stay close to the fp32 model's.
#[test]
fn bf16_forward_runs_and_stays_close_to_fp32() {
    let dir = fixture("gqa");
    let e = expected(&dir);
    let (_vs32, m32) = Llava::load(&dir, tch::Device::Cpu, Kind::Float).unwrap();
    let (_vs16, m16) = Llava::load(&dir, tch::Device::Cpu, Kind::BFloat16).unwrap();
    let ids = &e["input_ids"];
    let mask = &e["attention_mask"];
    let labels = ids.where_self(&mask.eq(1), &Tensor::from(IGNORE));
    let lp = |m: &Llava| {
        tch::no_grad(|| {
            let h = m.hidden(ids, mask, &e["pixel_values"], None);
            m.response_logps(&h, &labels)
        })
    };
    let (a, b) = (lp(&m32), lp(&m16));
    assert_eq!(
        b.kind(),
        Kind::Float,
        "log-probs must be fp32 whatever the weights"
    );
    let d = (&a - &b).abs().mean(Kind::Float).double_value(&[]);
    let scale = a.abs().mean(Kind::Float).double_value(&[]);
    eprintln!("bf16 vs fp32 log-probs: mean |Δ| {d:.4} (mean |logp| {scale:.3})");
    assert!(
        d < 0.05 * scale.max(1.0),
        "bf16 log-probs differ by {d} on average"
    );
}
