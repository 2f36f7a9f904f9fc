//! The synthetic data opens in the reference tools: pyarrow reads the schema, row groups and rows, the
//! `text` column parses as RLHF-V JSON, and Pillow decodes the images.
//!
//! Needs a Python with pyarrow and Pillow: `$DDPO_PYTHON` if set (scripts/with-torch sets it to the
//! project venv), else `python3`. Without one the test fails, saying so; it never skips.

use std::path::Path;
use std::process::Command;

use ddpo::data::synth::{write_synthetic, SynthOptions};

const CHECK: &str = r#"
import sys, json, io, os
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

files = json.loads(sys.argv[1])
size = int(sys.argv[2])
expected = pa.schema([
    ("ds_name", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("text", pa.string()),
    ("origin_dataset", pa.string()),
    ("origin_split", pa.string()),
    ("idx", pa.int64()),
    ("image_path", pa.string()),
    ("scene", pa.string()),
])
summary = {"files": []}
for f in files:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    if not schema.remove_metadata().equals(expected):
        sys.exit(f"{f}: schema\n{schema}\nis not the RLHF-V schema\n{expected}")
    groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    table = pf.read()
    rows = table.to_pylist()
    for r in rows:
        t = json.loads(r["text"])
        if sorted(t) != ["chosen", "question", "rejected"]:
            sys.exit(f"{f}: row {r['idx']}: text keys {sorted(t)}")
        if not all(isinstance(t[k], str) and t[k] for k in t):
            sys.exit(f"{f}: row {r['idx']}: empty or non-string field in {t}")
        if t["chosen"] == t["rejected"]:
            sys.exit(f"{f}: row {r['idx']}: chosen == rejected")
        img = Image.open(io.BytesIO(r["image"]["bytes"]))
        if img.format != "PNG" or img.size != (size, size):
            sys.exit(f"{f}: row {r['idx']}: image {img.format} {img.size}")
        img.convert("RGB").load()
        if r["image"]["path"] != r["image_path"]:
            sys.exit(f"{f}: row {r['idx']}: image.path {r['image']['path']} != image_path {r['image_path']}")
        scene = json.loads(r["scene"])
        if not scene or any(sorted(g) != ["colour", "count", "position", "shape"] for g in scene):
            sys.exit(f"{f}: row {r['idx']}: scene {scene}")
        split = json.loads(r["origin_split"])
        if split.get("type") != "synthetic":
            sys.exit(f"{f}: row {r['idx']}: origin_split {split}")
    hf = json.loads(schema.metadata[b"huggingface"])
    summary["files"].append({
        "name": os.path.basename(f),
        "rows": table.num_rows,
        "row_groups": groups,
        "idx": [r["idx"] for r in rows],
        "hf_image_type": hf["info"]["features"]["image"]["_type"],
        "example": json.loads(rows[0]["text"]),
    })
print(json.dumps(summary))
"#;

use crate::common::python;

fn run_check(files: &[&Path], size: u32) -> serde_json::Value {
    let py = python();
    let files_json = serde_json::to_string(
        &files
            .iter()
            .map(|f| f.to_str().unwrap())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = Command::new(&py)
        .arg("-c")
        .arg(CHECK)
        .arg(files_json)
        .arg(size.to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run Python {py:?} ({e}); this test needs Python with pyarrow and Pillow: run it \
                 through scripts/with-torch (which sets DDPO_PYTHON to the project venv) or set DDPO_PYTHON"
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("ModuleNotFoundError") {
        panic!(
            "Python {py:?} lacks pyarrow or Pillow; run the test through scripts/with-torch (the project venv \
             has both) or point DDPO_PYTHON at a Python that has them:\n{stderr}"
        );
    }
    assert!(
        out.status.success(),
        "pyarrow/Pillow check with {py:?} failed ({}):\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "unreadable output from the Python check ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn pyarrow_and_pillow_read_the_synthetic_shards() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        out_dir: dir.path().to_path_buf(),
        pairs: 45,
        shards: 2,
        seed: 17,
        image_size: 64,
        rows_per_group: 10,
        prefix: "train".into(),
        difficulty: Default::default(),
    };
    let report = write_synthetic(&opts).unwrap();
    assert_eq!(report.pairs, 45);
    assert!(report.edits >= 45 && report.edits <= 3 * 45, "{report:?}");
    let files: Vec<&Path> = report.files.iter().map(|p| p.as_path()).collect();
    let summary = run_check(&files, 64);

    let files = summary["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    let rows: Vec<u64> = files.iter().map(|f| f["rows"].as_u64().unwrap()).collect();
    assert_eq!(rows, [22, 23]);
    let groups: Vec<Vec<u64>> = files
        .iter()
        .map(|f| {
            f["row_groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_u64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(groups, [vec![10, 10, 2], vec![10, 10, 3]]);
    let idx: Vec<u64> = files
        .iter()
        .flat_map(|f| {
            f["idx"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap())
        })
        .collect();
    assert_eq!(idx, (0..45).collect::<Vec<u64>>());
    // Hugging Face `datasets` sees the image column as an Image feature.
    assert_eq!(files[0]["hf_image_type"], "Image");
    eprintln!("example row: {}", files[0]["example"]);
}
