//! Generation throughput (new tokens/s) of `Llava::generate` on the `small` preset against transformers'
//! `generate` on the same model directory, prompts and thread count, in one run: greedy at batch 1 and 8, and
//! K = 4 sampled answers for 2 prompts (ddpo shares each prompt's prefill among its samples; transformers
//! repeats the prompt K times). fp32, CPU. Every answer is exactly NEW tokens long on both sides. Not a test.
//! Run: `make bench-generate`. Env: ITERS (default 3), THREADS (default 2), NEW (default 32).
mod common;
use common::{env, median};

use std::process::Command;
use std::time::Instant;

use ddpo::model::generate::{GenerateOptions, Sampling};
use ddpo::model::llava::Llava;
use ddpo::preset::init_model;
use tch::{Device, Kind, Tensor};

/// (prompts, samples) cases.
const CASES: [(usize, usize); 3] = [(1, 1), (8, 1), (2, 4)];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("generate: a benchmark; run it with `make bench-generate`");
        return;
    }
    let iters = env("ITERS", 3);
    let threads = env("THREADS", 2);
    let new = env("NEW", 32);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("small");
    init_model(&model_dir, "small", 0).unwrap();
    let (_vs, model) = Llava::load(&model_dir, Device::Cpu, Kind::Float).unwrap();
    let (prompts, pixels, inputs) = inputs(&model, dir.path());

    let py = std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/generate_transformers.py"
    );
    let cases = serde_json::to_string(&CASES).unwrap();
    let out = Command::new(&py)
        .args([
            script,
            model_dir.to_str().unwrap(),
            inputs.to_str().unwrap(),
        ])
        .args([
            new.to_string(),
            iters.to_string(),
            threads.to_string(),
            cases,
        ])
        .output()
        .expect("run the transformers baseline (set DDPO_PYTHON)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();

    let cfg = &model.config;
    println!(
        "generate, small preset (vocab {}, text {}x{}, {} visual tokens), fp32 CPU, {threads} threads, {new} new tokens per answer",
        cfg.text_config.vocab_size,
        cfg.text_config.hidden_size,
        cfg.text_config.num_hidden_layers,
        cfg.num_image_tokens()
    );
    println!("| prompts | samples | transformers tokens/s | ddpo tokens/s | speed-up |");
    println!("|---|---|---|---|---|");
    for (i, &(b, k)) in CASES.iter().enumerate() {
        let sampling = if k > 1 {
            Sampling::Sample {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
            }
        } else {
            Sampling::Greedy
        };
        let opts = GenerateOptions {
            max_new_tokens: new,
            sampling,
            samples: k,
            seed: 0,
            eos_id: -1,
            pad_id: 0,
            first_index: 0,
        };
        let px = pixels.narrow(0, 0, b as i64);
        let run = || model.generate(&prompts[..b], &px, &opts);
        let got = run(); // warm-up
        assert!(got.iter().flatten().all(|a| a.len() == new));
        let t = median(
            (0..iters)
                .map(|_| {
                    let s = Instant::now();
                    std::hint::black_box(run());
                    s.elapsed().as_secs_f64()
                })
                .collect(),
        );
        let ours = (b * k * new) as f64 / t;
        let theirs = base[i]["tokens_per_s"].as_f64().unwrap();
        println!(
            "| {b} | {k} | {theirs:.1} | {ours:.1} | {:.2}x |",
            ours / theirs
        );
    }
}

/// Eight prompts of different lengths (BOS, text ids, the image tokens, more text), their images, and the same
/// left-padded for transformers in a safetensors file.
fn inputs(model: &Llava, dir: &std::path::Path) -> (Vec<Vec<i64>>, Tensor, std::path::PathBuf) {
    let cfg = &model.config;
    let (n_img, img_id) = (cfg.num_image_tokens(), cfg.image_token_index() as i64);
    let prompts: Vec<Vec<i64>> = (0..8)
        .map(|i| {
            let text = 12 + 3 * i;
            let mut p = vec![1i64];
            p.extend((0..text / 2).map(|j| 3 + (j * 7 + i) as i64 % (img_id - 3)));
            p.extend(std::iter::repeat_n(img_id, n_img));
            p.extend((0..text - text / 2).map(|j| 3 + (j * 5 + i) as i64 % (img_id - 3)));
            p
        })
        .collect();
    let side = cfg.vision_config.image_size as i64;
    let pixels = Tensor::randn([8, 3, side, side], (Kind::Float, Device::Cpu));
    let t = prompts.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for p in &prompts {
        ids.extend(std::iter::repeat_n(0i64, t - p.len()).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, t - p.len()).chain(std::iter::repeat_n(1, p.len())));
    }
    let path = dir.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", Tensor::from_slice(&ids).view([8, t as i64])),
            (
                "attention_mask",
                Tensor::from_slice(&mask).view([8, t as i64]),
            ),
            ("pixel_values", pixels.shallow_clone()),
        ],
        &path,
    )
    .unwrap();
    (prompts, pixels, path)
}
