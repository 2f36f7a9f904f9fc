//! Forward throughput (tokens/s) of the LLaVA model on the `small` preset against transformers on the same
//! model directory, inputs and thread count, in one run. fp32, CPU, inference mode. Not a test.
//! Run: `make bench-forward` (or `scripts/with-torch cargo bench --bench forward`).
//! Env: ITERS (default 5), THREADS (default 2), PAIRS (default 2), RESPONSE (default 100), PROMPT (default 40).
mod common;
use common::{env, median};

use std::process::Command;
use std::time::Instant;

use ddpo::data::collate::IGNORE;
use ddpo::model::llava::Llava;
use ddpo::preset::init_model;
use tch::{Device, Kind, Tensor};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("forward: a benchmark; run it with `make bench-forward`");
        return;
    }
    let iters = env("ITERS", 5);
    let threads = env("THREADS", 2);
    let pairs = env("PAIRS", 2) as i64;
    let resp = env("RESPONSE", 100) as i64;
    let prompt = env("PROMPT", 40) as i64;
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);

    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("small");
    init_model(&model_dir, "small", 0).unwrap();
    let (_vs, model) = Llava::load(&model_dir, Device::Cpu, Kind::Float).unwrap();
    let cfg = &model.config;
    let n_img = cfg.num_image_tokens() as i64;
    let img_id = cfg.image_token_index() as i64;

    // [chosen; rejected] rows: BOS, prompt text, image tokens, response; rejected rows 10 tokens shorter,
    // right-padded, as the collator lays them out.
    let rows = 2 * pairs;
    let t = 1 + prompt + n_img + resp;
    // Text ids below the image token (the tokenizer's own words), never the image token itself.
    let mut ids = Tensor::randint_low(3, img_id, [rows, t], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(1);
    let _ = ids.narrow(1, 1 + prompt / 2, n_img).fill_(img_id);
    let mask = Tensor::ones([rows, t], (Kind::Int64, Device::Cpu));
    for r in pairs..rows {
        let _ = mask.get(r).narrow(0, t - 10, 10).fill_(0);
        let _ = ids.get(r).narrow(0, t - 10, 10).fill_(0);
    }
    let resp_start = 1 + prompt + n_img;
    let mut labels = ids.where_self(&mask.eq(1), &Tensor::from(IGNORE));
    let _ = labels.narrow(1, 0, resp_start).fill_(IGNORE);
    ids = ids.contiguous();
    labels = labels.contiguous();
    let side = cfg.vision_config.image_size as i64;
    let px = Tensor::randn([pairs, 3, side, side], (Kind::Float, Device::Cpu));
    let image_rows = Tensor::arange(pairs, (Kind::Int64, Device::Cpu)).repeat([2]);
    let tokens = i64::try_from(mask.sum(Kind::Int64)).unwrap() as f64;

    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", &ids),
            ("attention_mask", &mask),
            ("pixel_values", &px),
        ],
        &inputs,
    )
    .unwrap();

    let time = |f: &dyn Fn()| -> f64 {
        f(); // warm-up
        median(
            (0..iters)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64()
                })
                .collect(),
        )
    };
    // Same work as transformers: vision per row (images duplicated), full-vocabulary logits everywhere.
    let px_rows = px.repeat([2, 1, 1, 1]);
    let full = time(&|| {
        tch::no_grad(|| {
            let l = model.logits(&ids, &mask, &px_rows);
            let _ = std::hint::black_box(l);
        })
    });
    // What training uses: each image encoded once, log-probs only at response positions.
    let used = time(&|| {
        tch::no_grad(|| {
            let h = model.hidden(&ids, &mask, &px, Some(&image_rows));
            let _ = std::hint::black_box(model.response_logps(&h, &labels));
        })
    });

    // Where the time goes (same work as transformers).
    let vision = time(&|| {
        tch::no_grad(|| drop(std::hint::black_box(model.image_features(&px_rows))));
    });
    let hidden = time(&|| {
        tch::no_grad(|| {
            drop(std::hint::black_box(
                model.hidden(&ids, &mask, &px_rows, None),
            ))
        });
    });

    let py = std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/forward_transformers.py"
    );
    let out = Command::new(&py)
        .args([
            script,
            model_dir.to_str().unwrap(),
            inputs.to_str().unwrap(),
        ])
        .arg(iters.to_string())
        .arg(threads.to_string())
        .output()
        .expect("run the transformers baseline (set DDPO_PYTHON)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let base = v["median_s"].as_f64().unwrap();

    println!(
        "forward, small preset (vocab {}, text {}x{}, vision {}x{} at {} px, {} visual tokens), fp32 CPU, {threads} threads",
        cfg.text_config.vocab_size,
        cfg.text_config.hidden_size,
        cfg.text_config.num_hidden_layers,
        cfg.vision_config.hidden_size,
        cfg.vision_config.num_hidden_layers,
        side,
        n_img
    );
    println!("  batch: {pairs} pairs = {rows} rows x {t} tokens ({tokens} real tokens), median of {iters}");
    println!(
        "  transformers {}:            {base:.3} s  {:8.0} tokens/s  1.00x",
        v["torch"],
        tokens / base
    );
    println!(
        "  ddpo, same work (full logits):    {full:.3} s  {:8.0} tokens/s  {:.2}x",
        tokens / full,
        base / full
    );
    println!(
        "  transformers breakdown: vision tower + projector {:.3} s, + decoder {:.3} s, + full LM head {:.3} s",
        v["vision_s"].as_f64().unwrap(),
        v["hidden_s"].as_f64().unwrap() - v["vision_s"].as_f64().unwrap(),
        base - v["hidden_s"].as_f64().unwrap()
    );
    println!(
        "  ddpo breakdown: vision tower + projector {vision:.3} s, + decoder {:.3} s, + full LM head {:.3} s",
        hidden - vision,
        full - hidden
    );
    println!(
        "  ddpo, as trained (response logps): {used:.3} s  {:8.0} tokens/s  {:.2}x",
        tokens / used,
        base / used
    );
}
