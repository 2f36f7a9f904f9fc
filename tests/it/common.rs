//! Helpers shared by the integration tests: hand-made parquet shards (good and bad rows) and a model dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// One row of an RLHF-V-layout shard, fields as stored.
#[derive(Clone, Debug)]
pub struct Row {
    pub image: Option<Vec<u8>>,
    pub text: Option<String>,
    pub idx: i64,
}

/// A small valid PNG (solid colour with a gradient).
pub fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(3).wrapping_add(seed),
            (y as u8).wrapping_mul(5),
            seed,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn text(q: &str, c: &str, r: &str) -> String {
    serde_json::json!({"question": q, "chosen": c, "rejected": r}).to_string()
}

pub fn good_row(i: i64) -> Row {
    Row {
        image: Some(png(40, 30, i as u8)),
        text: Some(text(
            "What is in the image?",
            "There are two red circles on the left.",
            "There are three blue circles on the left.",
        )),
        idx: i,
    }
}

fn image_struct(images: Vec<Option<Vec<u8>>>) -> (Field, ArrayRef) {
    let bytes: ArrayRef = Arc::new(BinaryArray::from(
        images.iter().map(|b| b.as_deref()).collect::<Vec<_>>(),
    ));
    let paths: ArrayRef = Arc::new(StringArray::from(
        (0..images.len())
            .map(|i| Some(format!("{i}.png")))
            .collect::<Vec<_>>(),
    ));
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let arr = StructArray::new(fields.clone(), vec![bytes, paths], None);
    (
        Field::new("image", DataType::Struct(fields), true),
        Arc::new(arr),
    )
}

/// Writes an RLHF-V-layout shard with the given rows and row-group size.
pub fn write_rlhfv(path: &Path, rows: &[Row], rows_per_group: usize) {
    let n = rows.len();
    let (img_field, img) = image_struct(rows.iter().map(|r| r.image.clone()).collect());
    let s = |v: Vec<Option<String>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let schema = Arc::new(Schema::new(vec![
        Field::new("ds_name", DataType::Utf8, true),
        img_field,
        Field::new("text", DataType::Utf8, true),
        Field::new("origin_dataset", DataType::Utf8, true),
        Field::new("origin_split", DataType::Utf8, true),
        Field::new("idx", DataType::Int64, true),
        Field::new("image_path", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        s(vec![Some("test".into()); n]),
        img,
        s(rows.iter().map(|r| r.text.clone()).collect()),
        s(vec![Some("test".into()); n]),
        s(vec![Some("{}".into()); n]),
        Arc::new(Int64Array::from(
            rows.iter().map(|r| r.idx).collect::<Vec<_>>(),
        )),
        s(vec![Some("x.png".into()); n]),
    ];
    write_batches(path, schema, cols, rows_per_group);
}

/// Writes an RLAIF-V-layout shard (question/chosen/rejected columns, string idx).
pub fn write_rlaifv(path: &Path, rows: &[(Vec<u8>, &str, &str, &str, &str)]) {
    let n = rows.len();
    let (img_field, img) = image_struct(rows.iter().map(|r| Some(r.0.clone())).collect());
    let s = |v: Vec<Option<String>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let col = |k: usize| {
        s(rows
            .iter()
            .map(|r| Some([r.1, r.2, r.3, r.4][k].to_string()))
            .collect())
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("ds_name", DataType::Utf8, true),
        img_field,
        Field::new("question", DataType::Utf8, true),
        Field::new("chosen", DataType::Utf8, true),
        Field::new("rejected", DataType::Utf8, true),
        Field::new("origin_dataset", DataType::Utf8, true),
        Field::new("origin_split", DataType::Utf8, true),
        Field::new("idx", DataType::Utf8, true),
        Field::new("image_path", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        s(vec![Some("test".into()); n]),
        img,
        col(0),
        col(1),
        col(2),
        s(vec![Some("test".into()); n]),
        s(vec![Some("{}".into()); n]),
        col(3),
        s(vec![Some("x.png".into()); n]),
    ];
    write_batches(path, schema, cols, 1000);
}

/// Writes arbitrary columns (for layout-error tests).
pub fn write_batches(path: &Path, schema: Arc<Schema>, cols: Vec<ArrayRef>, rows_per_group: usize) {
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A model directory with the tiny preset's tokenizer and processor files.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    ddpo::preset::write_model_files(&m, "tiny").unwrap();
    m
}

/// A job config pointing at `model` and the given train glob.
pub fn write_config(dir: &Path, model: &Path, train_glob: &str, extra: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {:?}\n[data]\ntrain = [{:?}]\n{extra}\n[train]\noutput_dir = {:?}\n",
            model.display().to_string(),
            train_glob,
            dir.join("run").display().to_string()
        ),
    )
    .unwrap();
    p
}

/// Forms a TCP ring of `world` ranks on loopback (ranks connect in threads); the collectives in rank order.
pub fn ring(world: usize, timeout: std::time::Duration) -> Vec<ddpo::collective::RingCollective> {
    use ddpo::collective::{RingCollective, RingListener};
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingCollective::listen(loopback).unwrap())
        .collect();
    let peers: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let peers = peers.clone();
                s.spawn(move || RingCollective::connect(l, r, &peers, 1, timeout).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Serialises the tests of one test binary that call it: trainings running side by side make MKL pick
/// thread counts dynamically, and a different thread count rounds differently, which bit-for-bit
/// comparisons (resume, ZeRO vs plain data parallelism) must not see.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Python interpreter of the oracles (transformers, PyTorch, pyarrow, difflib): `DDPO_PYTHON`, which
/// `scripts/with-torch` sets to the project's venv, else `python3`.
pub fn python() -> String {
    std::env::var("DDPO_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs the `ddpo` binary (without `RUST_LOG`) to completion.
pub fn ddpo_cmd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ddpo")
}

/// A process's stdout and stderr, for assertions and failure messages.
pub fn text_of(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Trains the job config at `cfg` in this process on the CPU; returns its last checkpoint.
pub fn train_on_cpu(cfg: &Path) -> PathBuf {
    let cfg = ddpo::config::Config::load_with_env(cfg, &[]).unwrap();
    let opts = ddpo::train::TrainOptions {
        device: tch::Device::Cpu,
        max_steps: None,
        progress_bar: false,
    };
    ddpo::train::train(&cfg, &opts)
        .unwrap()
        .last_checkpoint
        .unwrap()
}
