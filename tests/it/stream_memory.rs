//! Readers stream: a shard far larger than the reader's working set is read with bounded memory.
//! Measured as the peak resident memory `ddpo validate` reports for a ~150 MB shard versus a small one.

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A PNG of noise: incompressible, so the shard's size is real.
fn noise_png(side: u32, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn peak_mib(cfg: &Path) -> f64 {
    let o = Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("peak memory:"))
        .unwrap_or_else(|| panic!("no peak memory line in {out}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn large_shard_streams_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let rows = |n: usize| -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                image: Some(noise_png(128, i as u64)),
                ..good_row(i as i64)
            })
            .collect()
    };
    let small_dir = dir.path().join("small");
    let big_dir = dir.path().join("big");
    std::fs::create_dir_all(&small_dir).unwrap();
    std::fs::create_dir_all(&big_dir).unwrap();
    write_rlhfv(&small_dir.join("s.parquet"), &rows(50), 50);
    let big = big_dir.join("b.parquet");
    write_rlhfv(&big, &rows(3000), 50);
    let size_mib = std::fs::metadata(&big).unwrap().len() as f64 / (1 << 20) as f64;
    assert!(size_mib > 120.0, "the big shard is only {size_mib:.0} MiB");

    let small_cfg = write_config(
        &small_dir,
        &model,
        &format!("{}/*.parquet", small_dir.display()),
        "",
    );
    let big_cfg = write_config(
        &big_dir,
        &model,
        &format!("{}/*.parquet", big_dir.display()),
        "",
    );
    let small = peak_mib(&small_cfg);
    let large = peak_mib(&big_cfg);
    eprintln!("peak RSS: {small:.1} MiB for 50 rows, {large:.1} MiB for 3000 rows ({size_mib:.0} MiB shard)");
    assert!(
        large - small < 40.0,
        "reading a {size_mib:.0} MiB shard grew peak memory by {:.1} MiB",
        large - small
    );
}
