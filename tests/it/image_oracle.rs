//! Proof that `ddpo::data::image` is transformers' slow `CLIPImageProcessor` (+ LLaVA's `expand2square`):
//!
//! * `fixtures_match_transformers`: the committed cases in `tests/fixtures/image/` (made by
//!   `tests/fixtures/gen_image_fixtures.py` with transformers and Pillow) must match to 1e-6 — in practice
//!   bit for bit — for every lossless image; JPEG cases get the looser tolerance their manifest entry names,
//!   because PIL's libjpeg-turbo and the `image` crate's decoder differ by a level or two.
//! * `random_sizes_match_transformers_live`: a sweep of random image sizes, resize targets (up to 336 px),
//!   crops, filters and padding, run through `tests/oracles/clip_image_oracle.py` in one Python process.
//!   Python comes from `DDPO_PYTHON` (set by `scripts/with-torch`) or `python3`; if it cannot run, the test
//!   fails rather than skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use ddpo::data::image::{decode, ImageProcessor, ImageProcessorConfig};
use image::RgbImage;
use serde::Deserialize;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image")
}

#[derive(Deserialize)]
struct Manifest {
    transformers: String,
    pillow: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    image: String,
    config: String,
    pad_to_square: bool,
    shape: [usize; 3],
    expected: String,
    max_abs_diff: f32,
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{}", path.display());
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// (max |a - b|, number of elements that differ at all).
fn compare(got: &[f32], want: &[f32]) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).fold((0f32, 0usize), |(m, n), (a, b)| {
        let d = (a - b).abs();
        (m.max(d), n + usize::from(a.to_bits() != b.to_bits()))
    })
}

#[test]
fn fixtures_match_transformers() {
    let dir = fixtures();
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.cases.len() >= 30);
    println!(
        "fixtures from transformers {} / Pillow {}",
        manifest.transformers, manifest.pillow
    );
    let mut failures = Vec::new();
    for case in &manifest.cases {
        let config = ImageProcessorConfig::from_file(&dir.join(&case.config)).unwrap();
        let proc = ImageProcessor::new(config, case.pad_to_square);
        let bytes = std::fs::read(dir.join(&case.image)).unwrap();
        let img = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let [c, h, w] = case.shape;
        assert_eq!(c, 3);
        assert_eq!(
            proc.output_size_for(img.height(), img.width()),
            (h, w),
            "{}",
            case.name
        );
        if let Some(fixed) = proc.fixed_output_size() {
            assert_eq!(fixed, (h, w), "{}", case.name);
        }
        let got = proc.process_bytes(&bytes).unwrap();
        let want = read_f32(&dir.join(&case.expected));
        assert_eq!(got.len(), want.len(), "{}", case.name);
        let (max, n) = compare(&got, &want);
        println!(
            "{:<48} {h:>3}x{w:<3} max |diff| {max:.3e}  ({n} of {} values differ)",
            case.name,
            got.len()
        );
        if max > case.max_abs_diff {
            failures.push(format!(
                "{}: max |diff| {max:e} > {:e}",
                case.name, case.max_abs_diff
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn clip_preset_matches_transformers_dict() {
    // What CLIPImageProcessor(llava-1.5 values).to_dict() holds; every key our to_json() writes must agree,
    // and every key transformers uses for processing must be written.
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("clip336_to_dict.json")).unwrap(),
    )
    .unwrap();
    let got = ImageProcessorConfig::clip(336).to_json();
    let (want, got) = (want.as_object().unwrap(), got.as_object().unwrap());
    for (k, v) in got {
        assert_eq!(want.get(k), Some(v), "key {k}");
    }
    for k in want.keys().filter(|k| !k.starts_with('_')) {
        assert!(got.contains_key(k), "to_json() lacks {k}");
    }
    // ... and it parses back to the same config, as does the fixture's llava-hf-style file.
    let back = ImageProcessorConfig::from_json(&Value::Object(got.clone())).unwrap();
    assert_eq!(back, ImageProcessorConfig::clip(336));
    let a = ImageProcessorConfig::from_file(
        &fixtures().join("configs/a_se32_crop32/preprocessor_config.json"),
    )
    .unwrap();
    assert_eq!(a, ImageProcessorConfig::clip(32));
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Noise, gradients and hard edges: every rounding and clipping path of the resampler gets exercised.
fn random_image(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
    let seed = rng.next();
    let cell = rng.range(1, 12);
    RgbImage::from_fn(w, h, |x, y| {
        let mut r = Rng(seed ^ (u64::from(y) << 32 | u64::from(x)));
        let noise = r.next();
        let checker = if (x / cell + y / cell) % 2 == 0 {
            255
        } else {
            0
        };
        match (x * 4 / w.max(1), y * 3 / h.max(1)) {
            (0, _) | (_, 0) => image::Rgb([noise as u8, (noise >> 8) as u8, (noise >> 16) as u8]),
            (1, _) => image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, checker]),
            _ => image::Rgb([checker, 255 - checker, (noise % 3 * 127) as u8]),
        }
    })
}

use crate::common::python;

#[test]
fn random_sizes_match_transformers_live() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1ab5_c11b);
    let mut cases = Vec::new();
    let mut procs = Vec::new();
    // Realistic photo sizes first (the training path: ~500 px JPEG-sized images to 336), then random ones.
    let mut sizes = vec![
        (500, 375),
        (640, 427),
        (375, 500),
        (336, 336),
        (1024, 683),
        (337, 335),
    ];
    // DDPO_IMAGE_SWEEP_CASES=1000 runs a longer sweep.
    let n_cases: usize = std::env::var("DDPO_IMAGE_SWEEP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
        .max(sizes.len());
    while sizes.len() < n_cases {
        let w = rng.range(2, 700);
        let h = rng.range(2, 700);
        // transformers reads an HxWx3 array whose height is 1 or 3 as channels-first; no real image is that
        // flat, so the sweep leaves those out.
        if h != 1 && h != 3 {
            sizes.push((w, h));
        }
    }
    for (i, &(w, h)) in sizes.iter().enumerate() {
        let img = random_image(&mut rng, w, h);
        let name = format!("{i}.png");
        img.save(dir.path().join(&name)).unwrap();
        let se = if i < 6 {
            336
        } else {
            rng.pick(&[336, 224, 64, 32, 17, 5])
        };
        let crop = match rng.range(0, 3) {
            0 => json!({"height": se, "width": se}),
            1 => json!(rng.range(1, se + 20)),
            _ => json!({"height": rng.range(1, se + 20), "width": rng.range(1, se + 20)}),
        };
        let config = json!({
            "size": {"shortest_edge": se},
            "crop_size": crop,
            "do_center_crop": rng.range(0, 9) != 0,
            "resample": rng.pick(&[3, 3, 2]),
            "image_mean": rng.pick(&[[0.48145466, 0.4578275, 0.40821073], [0.5, 0.5, 0.5]]),
            "image_std": rng.pick(&[[0.26862954, 0.26130258, 0.27577711], [0.5, 0.5, 0.5]]),
        });
        let pad = rng.range(0, 2) == 0;
        procs.push(ImageProcessor::new(
            ImageProcessorConfig::from_json(&config).unwrap(),
            pad,
        ));
        cases.push(json!({"image": name, "config": config, "pad": pad}));
    }
    std::fs::write(
        dir.path().join("cases.json"),
        serde_json::to_string(&cases).unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/clip_image_oracle.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set DDPO_PYTHON): {e}", python()));
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut worst = 0f32;
    for (i, (proc, &(w, h))) in procs.iter().zip(&sizes).enumerate() {
        let bytes = std::fs::read(dir.path().join(format!("{i}.png"))).unwrap();
        let got = proc.process_bytes(&bytes).unwrap();
        let want = read_f32(&dir.path().join(format!("{i}.f32")));
        let (oh, ow) = proc.output_size_for(h, w);
        assert_eq!(want.len(), 3 * oh * ow, "case {i}: {}", cases[i]);
        let (max, n) = compare(&got, &want);
        assert!(
            max <= 1e-6,
            "case {i} ({w}x{h}, {}): max |diff| {max:e}, {n} values differ",
            cases[i]
        );
        worst = worst.max(max);
    }
    println!("{} live cases, worst max |diff| {worst:e}", sizes.len());
}
