//! Data-pipeline throughput, one core: read (parquet) + image decode + CLIP preprocess + tokenize + diff,
//! on synthetic RLHF-V-layout data with the `small` preset's processors (336 px, 576 visual tokens).
//! Run: `make bench-data` (or `scripts/with-torch cargo bench --bench data_pipeline`). Not a test.

use std::time::{Duration, Instant};

use ddpo::data::diff;
use ddpo::data::image::decode;
use ddpo::data::pipeline::Preprocessor;
use ddpo::data::reader::ShardReader;
use ddpo::data::synth::{write_synthetic, SynthOptions};
use ddpo::preset::write_model_files;

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` (which passes --bench) measures.
    if !std::env::args().any(|a| a == "--bench") {
        println!("data_pipeline: a benchmark; run it with `make bench-data`");
        return;
    }
    let pairs: usize = std::env::var("PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let image_size: u32 = std::env::var("IMAGE_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(448);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_model_files(&model, "small").unwrap();
    let data = dir.path().join("data");
    let report = write_synthetic(&SynthOptions {
        out_dir: data.clone(),
        pairs,
        shards: 1,
        seed: 7,
        image_size,
        rows_per_group: 64,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();
    let shard = report.files[0].clone();
    let pre = Preprocessor::from_model_dir(&model, "llava_v1", 2048, true, 3).unwrap();

    // Stage by stage, so the report says where the time goes.
    let mut t_read = Duration::ZERO;
    let mut t_decode = Duration::ZERO;
    let mut t_pre = Duration::ZERO;
    let mut t_tok = Duration::ZERO;
    let mut t_diff = Duration::ZERO;
    let total = Instant::now();
    let mut reader = ShardReader::open(&shard, 64).unwrap();
    let mut n = 0usize;
    let mut resp_tokens = 0usize;
    loop {
        let t = Instant::now();
        let Some(raw) = reader.next() else { break };
        let raw = raw.unwrap();
        t_read += t.elapsed();
        let t = Instant::now();
        let img = decode(&raw.image).unwrap();
        t_decode += t.elapsed();
        let t = Instant::now();
        let px = pre.image.preprocess(&img);
        t_pre += t.elapsed();
        let t = Instant::now();
        let p = pre.text.encode_prompt(&raw.question).unwrap();
        let c = pre.text.encode_response(&raw.chosen).unwrap();
        let r = pre.text.encode_response(&raw.rejected).unwrap();
        t_tok += t.elapsed();
        let t = Instant::now();
        let m = diff::changed_segments(&c, &r, 3);
        t_diff += t.elapsed();
        std::hint::black_box((px, p, m));
        resp_tokens += c.len() + r.len();
        n += 1;
    }
    let secs = total.elapsed().as_secs_f64();
    println!(
        "data pipeline, 1 thread, {n} pairs, {image_size}px PNG -> 336px, small preset tokenizer"
    );
    println!(
        "  total: {secs:.3} s = {:.1} pairs/s ({:.0} response tokens/s)",
        n as f64 / secs,
        resp_tokens as f64 / secs
    );
    for (name, d) in [
        ("read", t_read),
        ("decode", t_decode),
        ("preprocess", t_pre),
        ("tokenize", t_tok),
        ("diff", t_diff),
    ] {
        println!(
            "  {name:>10}: {:7.3} ms/pair ({:4.1}%)",
            1e3 * d.as_secs_f64() / n as f64,
            100.0 * d.as_secs_f64() / secs
        );
    }
}
