//! Synthetic preference data in the RLHF-V parquet layout (docs/formats.md), for demos, tests and smoke runs.
//!
//! Every row is a procedurally drawn PNG with one to three groups of simple shapes (circles, squares,
//! triangles, stars, rings, diamonds) in distinct colours, each group holding one to four shapes in one
//! region of the picture (left, right, top, bottom, center), plus a question about it, a correct answer
//! (`chosen`) and a corrected-hallucination answer (`rejected`). The rejected answer is the chosen one with
//! one to three *segment-level* errors — a wrong colour, shape, count or position inside some group
//! sentences — and every other word identical, which is exactly the shape of data that DDPO's
//! changed-segment weighting is built for. Only the image tells which answer is right, apart from a mild
//! textual cue (a stated total that the wrong counts contradict), so a tiny model can learn something
//! quickly and a real one has to look at the picture.
//!
//! Invariants:
//! - Output is a pure function of the options: the same seed, pairs and shards give byte-identical files.
//! - A row's content (question, answers, image) depends only on `(seed, idx, image_size)`, never on the
//!   shard layout, so the same seed with a different number of shards yields the same rows, regrouped.
//! - Randomness comes from the in-file splitmix64 (`util::prng`)/xoshiro256** generator and the drawing uses only
//!   IEEE-exact arithmetic (no transcendental functions), so pixels do not depend on platform or crate
//!   versions (the PNG byte stream depends on the encoder version).
//! - Files appear atomically: each shard is written under a temporary name in the output folder and
//!   renamed into place once complete.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::util::fsx;
use crate::util::prng::SplitMix;

/// Value of the `ds_name` column.
pub const DS_NAME: &str = "ddpo-synthetic-shapes";
/// Value of the `origin_dataset` column.
pub const ORIGIN_DATASET: &str = "ddpo-synth";
/// Names the generator version in `origin_split`; bump it when the content of rows changes.
pub const GENERATOR: &str = "ddpo-synth-v1";

/// Smallest and largest accepted `image_size`.
pub const MIN_IMAGE_SIZE: u32 = 32;
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// What to generate and where.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Folder the shards are written to (created if missing).
    pub out_dir: PathBuf,
    /// Number of preference pairs (rows) in all.
    pub pairs: usize,
    /// Number of parquet files; rows are spread evenly (sizes differ by at most one).
    pub shards: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Side of the square images in pixels (default 96).
    pub image_size: u32,
    /// Rows per parquet row group (default 64).
    pub rows_per_group: usize,
    /// File stem prefix (default "train"): `<prefix>-00000-of-00004.parquet`.
    pub prefix: String,
    /// How hard the preference is to learn (default `Standard`).
    pub difficulty: Difficulty,
}

/// How much of the image a model must understand to tell chosen from rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Difficulty {
    /// 1-3 groups of 1-4 shapes; 1-3 errors of colour, shape, count or position — what RLHF-V-style data
    /// asks of a real model.
    #[default]
    Standard,
    /// One group of one or two large shapes and exactly one wrong colour: a preference a tiny model trained
    /// from scratch can learn in a few hundred steps (tests, demos).
    Easy,
}

impl Difficulty {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "standard" => Some(Self::Standard),
            "easy" => Some(Self::Easy),
            _ => None,
        }
    }
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            out_dir: PathBuf::from("data/synthetic"),
            pairs: 1024,
            shards: 1,
            seed: 0,
            image_size: 96,
            rows_per_group: 64,
            prefix: "train".to_string(),
            difficulty: Difficulty::Standard,
        }
    }
}

/// What [`write_synthetic`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The shard files, in shard order.
    pub files: Vec<PathBuf>,
    /// Rows written in all.
    pub pairs: usize,
    /// Segment-level errors put into the rejected answers, in all (1-3 per row).
    pub edits: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth options: {0}")]
    InvalidOptions(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: writing parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{}: building arrow batch: {source}", path.display())]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("{}: encoding the image of row {idx}: {source}", path.display())]
    Image {
        path: PathBuf,
        idx: u64,
        #[source]
        source: image::ImageError,
    },
}

/// Writes `opts.shards` parquet files of synthetic preference pairs in the RLHF-V layout.
pub fn write_synthetic(opts: &SynthOptions) -> Result<SynthReport, SynthError> {
    validate(opts)?;
    fs::create_dir_all(&opts.out_dir).map_err(|source| SynthError::Io {
        path: opts.out_dir.clone(),
        source,
    })?;
    let schema = schema();
    let mut files = Vec::with_capacity(opts.shards);
    let mut edits = 0;
    for shard in 0..opts.shards {
        let path = opts
            .out_dir
            .join(shard_file_name(&opts.prefix, shard, opts.shards));
        edits += write_shard(
            opts,
            &schema,
            shard_rows(opts.pairs, opts.shards, shard),
            &path,
        )?;
        files.push(path);
    }
    Ok(SynthReport {
        files,
        pairs: opts.pairs,
        edits,
    })
}

/// Every word the generator can emit in questions and answers (lowercase and capitalised forms as
/// emitted, punctuation marks as their own entries), sorted and without duplicates.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words = BTreeSet::new();
    let mut add = |s: &'static str| {
        for w in split_words(s) {
            if !w.starts_with('{') {
                words.insert(w);
            }
        }
    };
    for q in QUESTIONS {
        add(q.0);
    }
    let tables: [&[&'static str]; 8] = [
        &GROUP_TEMPLATES,
        &INTROS,
        &TOTALS,
        &CLOSINGS,
        &TOTAL_WORDS,
        &BE,
        &OBJECTS,
        &GROUP_WORDS,
    ];
    for s in tables.into_iter().flatten() {
        add(s);
    }
    for c in COLOURS {
        add(c.0);
    }
    for s in SHAPES {
        add(s.0);
        add(s.1);
    }
    for p in POSITIONS_SHORT.iter().chain(POSITIONS_LONG.iter()) {
        add(p.0);
        add(p.1);
    }
    for c in COUNT_WORDS {
        add(c.0);
        add(c.1);
    }
    words.into_iter().collect()
}

/// The shard file name, Hugging Face style: `train-00003-of-00008.parquet`.
pub fn shard_file_name(prefix: &str, shard: usize, shards: usize) -> String {
    format!("{prefix}-{shard:05}-of-{shards:05}.parquet")
}

/// The global row indices of one shard: `pairs` spread evenly over `shards`.
pub fn shard_rows(pairs: usize, shards: usize, shard: usize) -> Range<usize> {
    let at = |k: usize| ((k as u128 * pairs as u128) / shards as u128) as usize;
    at(shard)..at(shard + 1)
}

fn validate(opts: &SynthOptions) -> Result<(), SynthError> {
    let bad = |m: String| Err(SynthError::InvalidOptions(m));
    if opts.pairs == 0 {
        return bad("pairs must be at least 1".into());
    }
    if opts.shards == 0 {
        return bad("shards must be at least 1".into());
    }
    if opts.shards > opts.pairs {
        return bad(format!(
            "shards ({}) must not exceed pairs ({}): every shard needs at least one row",
            opts.shards, opts.pairs
        ));
    }
    if opts.shards > 99_999 {
        return bad(format!("shards ({}) must be at most 99999", opts.shards));
    }
    if opts.pairs as u64 > i64::MAX as u64 {
        return bad(format!("pairs ({}) is too large", opts.pairs));
    }
    if opts.rows_per_group == 0 {
        return bad("rows_per_group must be at least 1".into());
    }
    if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&opts.image_size) {
        return bad(format!(
            "image_size ({}) must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels",
            opts.image_size
        ));
    }
    if opts.prefix.is_empty()
        || opts.prefix.starts_with('.')
        || opts.prefix.contains(['/', '\\', '\0'])
    {
        return bad(format!(
            "prefix {:?} must be a non-empty file name stem without path separators or a leading dot",
            opts.prefix
        ));
    }
    Ok(())
}

mod draw;
mod output;
mod rng;
mod scenes;
pub mod truth;
mod words;

use draw::*;
use output::*;
use rng::*;
use scenes::*;
use words::*;

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn easy_rows_differ_in_exactly_one_colour_word() {
        for idx in 0..200 {
            let row = generate_row(4, idx, 48, Difficulty::Easy).unwrap();
            assert_eq!(row_scene(4, idx, Difficulty::Easy).len(), 1);
            let (a, b): (Vec<&str>, Vec<&str>) = (
                row.chosen.split_whitespace().collect(),
                row.rejected.split_whitespace().collect(),
            );
            assert_eq!(a.len(), b.len(), "{} / {}", row.chosen, row.rejected);
            let diff: Vec<(&str, &str)> = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x != y)
                .map(|(x, y)| (*x, *y))
                .collect();
            assert_eq!(diff.len(), 1, "{} / {}", row.chosen, row.rejected);
            let is_colour = |w: &str| {
                COLOURS
                    .iter()
                    .any(|c| c.0 == w.trim_matches(|c: char| !c.is_alphabetic()))
            };
            assert!(is_colour(diff[0].0) && is_colour(diff[0].1), "{diff:?}");
        }
    }

    fn opts(dir: &Path, pairs: usize, shards: usize, seed: u64) -> SynthOptions {
        SynthOptions {
            out_dir: dir.to_path_buf(),
            pairs,
            shards,
            seed,
            ..SynthOptions::default()
        }
    }

    /// (idx, text, image bytes) of a row.
    type StoredRow = (i64, String, Vec<u8>);

    /// Every row of a file, and its row-group sizes.
    fn read_rows(path: &Path) -> (Vec<StoredRow>, Vec<i64>) {
        let file = File::open(path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let groups = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        let mut rows = Vec::new();
        for batch in builder.build().unwrap() {
            let batch = batch.unwrap();
            let idx = batch
                .column_by_name("idx")
                .unwrap()
                .as_primitive::<Int64Type>();
            let text = batch.column_by_name("text").unwrap().as_string::<i32>();
            let image = batch.column_by_name("image").unwrap().as_struct();
            let bytes = image.column_by_name("bytes").unwrap().as_binary::<i32>();
            for i in 0..batch.num_rows() {
                rows.push((
                    idx.value(i),
                    text.value(i).to_string(),
                    bytes.value(i).to_vec(),
                ));
            }
        }
        (rows, groups)
    }

    /// Words of `a` and `b` outside their longest common subsequence.
    fn changed_words(a: &str, b: &str) -> (usize, usize) {
        let a = split_words(a);
        let b = split_words(b);
        let mut l = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                l[i][j] = if a[i] == b[j] {
                    l[i + 1][j + 1] + 1
                } else {
                    l[i + 1][j].max(l[i][j + 1])
                };
            }
        }
        (a.len() - l[0][0], b.len() - l[0][0])
    }

    #[test]
    fn xoshiro_matches_reference_values() {
        // xoshiro256** reference: state [1, 2, 3, 4] gives 11520, 0, 1509978240, 1215971899390074240.
        let mut r = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            vec![11520, 0, 1_509_978_240, 1_215_971_899_390_074_240]
        );
    }

    #[test]
    fn same_seed_gives_byte_identical_files_and_other_seeds_differ() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        let ra = write_synthetic(&opts(a.path(), 40, 3, 7)).unwrap();
        let rb = write_synthetic(&opts(b.path(), 40, 3, 7)).unwrap();
        let rc = write_synthetic(&opts(c.path(), 40, 3, 8)).unwrap();
        assert_eq!(ra.files.len(), 3);
        assert_eq!(ra.edits, rb.edits);
        for ((fa, fb), fc) in ra.files.iter().zip(&rb.files).zip(&rc.files) {
            assert_eq!(fa.file_name(), fb.file_name());
            let (ba, bb, bc) = (
                fs::read(fa).unwrap(),
                fs::read(fb).unwrap(),
                fs::read(fc).unwrap(),
            );
            assert!(ba == bb, "{} differs between two runs", fa.display());
            assert!(ba != bc, "seeds 7 and 8 gave the same {}", fa.display());
        }
        // No temporary files are left behind.
        for dir in [a.path(), b.path(), c.path()] {
            let names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 3, "{names:?}");
            assert!(names
                .iter()
                .all(|n| n.ends_with(".parquet") && !n.starts_with('.')));
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_number_of_shards() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ra = write_synthetic(&opts(a.path(), 23, 1, 3)).unwrap();
        let rb = write_synthetic(&opts(b.path(), 23, 4, 3)).unwrap();
        assert_eq!(ra.edits, rb.edits);
        let one = read_rows(&ra.files[0]).0;
        let many: Vec<_> = rb.files.iter().flat_map(|f| read_rows(f).0).collect();
        assert_eq!(one, many);
    }

    #[test]
    fn shards_hold_even_counts_with_global_idx_and_hf_names() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_synthetic(&SynthOptions {
            prefix: "eval".into(),
            ..opts(dir.path(), 10, 3, 1)
        })
        .unwrap();
        assert_eq!(report.pairs, 10);
        let names: Vec<_> = report
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "eval-00000-of-00003.parquet",
                "eval-00001-of-00003.parquet",
                "eval-00002-of-00003.parquet"
            ]
        );
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for f in &report.files {
            let rows = read_rows(f).0;
            counts.push(rows.len());
            all.extend(rows.into_iter().map(|r| r.0));
        }
        assert_eq!(counts, [3, 3, 4]);
        assert_eq!(all, (0..10).collect::<Vec<i64>>());
        for (pairs, shards) in [(7, 7), (1000, 3), (5, 2), (64, 5)] {
            let sizes: Vec<usize> = (0..shards)
                .map(|k| shard_rows(pairs, shards, k).len())
                .collect();
            assert_eq!(sizes.iter().sum::<usize>(), pairs);
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn row_groups_follow_rows_per_group() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_synthetic(&SynthOptions {
            rows_per_group: 16,
            image_size: 48,
            ..opts(dir.path(), 70, 2, 5)
        })
        .unwrap();
        let g0 = read_rows(&report.files[0]).1;
        let g1 = read_rows(&report.files[1]).1;
        assert_eq!(g0, [16, 16, 3]);
        assert_eq!(g1, [16, 16, 3]);
    }

    #[test]
    fn schema_is_the_rlhf_v_layout_plus_the_scene() {
        let dir = tempfile::tempdir().unwrap();
        let report = write_synthetic(&opts(dir.path(), 3, 1, 0)).unwrap();
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&report.files[0]).unwrap())
                .unwrap();
        let schema = builder.schema();
        let cols: Vec<(&str, &DataType)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().as_str(), f.data_type()))
            .collect();
        let image = DataType::Struct(image_fields());
        assert_eq!(
            cols,
            [
                ("ds_name", &DataType::Utf8),
                ("image", &image),
                ("text", &DataType::Utf8),
                ("origin_dataset", &DataType::Utf8),
                ("origin_split", &DataType::Utf8),
                ("idx", &DataType::Int64),
                ("image_path", &DataType::Utf8),
                ("scene", &DataType::Utf8),
            ]
        );
        let batch = builder.build().unwrap().next().unwrap().unwrap();
        let split = batch
            .column_by_name("origin_split")
            .unwrap()
            .as_string::<i32>();
        let v: serde_json::Value = serde_json::from_str(split.value(0)).unwrap();
        assert_eq!(v["type"], "synthetic");
        assert_eq!(v["seed"], 0);
        let image = batch.column_by_name("image").unwrap().as_struct();
        assert_eq!(image.null_count(), 0);
        let path = image.column_by_name("path").unwrap().as_string::<i32>();
        let image_path = batch
            .column_by_name("image_path")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(path.value(2), "synthetic/00000002.png");
        assert_eq!(image_path.value(2), "synthetic/00000002.png");
    }

    #[test]
    fn rejected_differs_from_chosen_in_a_few_words_only() {
        let mut edit_counts = [0usize; 4];
        let mut attr_counts = HashMap::new();
        for idx in 0..400 {
            let row = generate_row(11, idx, 32, Difficulty::Standard).unwrap();
            assert_ne!(row.chosen, row.rejected, "row {idx}");
            let (ra, rb) = changed_words(&row.rejected, &row.chosen);
            let n = row.edits.len();
            assert!((1..=3).contains(&n), "row {idx}: {n} edits");
            edit_counts[n] += 1;
            for e in &row.edits {
                *attr_counts.entry(e.attr as u8).or_insert(0) += 1;
            }
            // A colour or shape edit changes one word; a count edit up to three ("is one circle" ->
            // "are two circles"); a position edit up to three ("at the top" -> "on the left side").
            assert!(
                ra >= 1 && rb >= 1,
                "row {idx}: {:?} / {:?}",
                row.chosen,
                row.rejected
            );
            assert!(
                ra <= 3 * n && rb <= 3 * n,
                "row {idx}: {ra}/{rb} changed words for {n} edits:\n{}\n{}",
                row.chosen,
                row.rejected
            );
            for text in [&row.chosen, &row.rejected] {
                let words = text.split_whitespace().count();
                assert!(
                    (15..=80).contains(&words),
                    "row {idx}: {words} words: {text}"
                );
            }
            // Same sentence count and the sentences that carry no edit are identical.
            let cs: Vec<_> = row.chosen.split(". ").collect();
            let rs: Vec<_> = row.rejected.split(". ").collect();
            assert_eq!(cs.len(), rs.len());
            let differing = cs.iter().zip(&rs).filter(|(a, b)| a != b).count();
            let edited_groups: BTreeSet<_> = row.edits.iter().map(|e| e.group).collect();
            assert_eq!(differing, edited_groups.len(), "row {idx}");
        }
        // All edit counts and all four kinds of error occur.
        assert!(edit_counts[1..].iter().all(|&c| c > 20), "{edit_counts:?}");
        assert_eq!(attr_counts.len(), 4, "{attr_counts:?}");
    }

    #[test]
    fn chosen_describes_the_scene() {
        for idx in 0..50 {
            let row = generate_row(2, idx, 96, Difficulty::Standard).unwrap();
            for g in &row_scene(2, idx, Difficulty::Standard) {
                let colour = COLOURS[g.colour].0;
                let count = COUNT_WORDS[g.count - 1];
                let shape = if g.count == 1 {
                    SHAPES[g.shape].0
                } else {
                    SHAPES[g.shape].1
                };
                let phrase = format!("{} {colour} {shape}", count.0);
                let phrase_cap = format!("{} {colour} {shape}", count.1);
                assert!(
                    row.chosen.contains(&phrase) || row.chosen.contains(&phrase_cap),
                    "row {idx}: {:?} lacks {phrase:?}",
                    row.chosen
                );
                let pos_s = POSITIONS_SHORT[g.region];
                let pos_l = POSITIONS_LONG[g.region];
                assert!(
                    [pos_s.0, pos_s.1, pos_l.0, pos_l.1]
                        .iter()
                        .any(|p| row.chosen.contains(p)),
                    "row {idx}: {:?} lacks the position of {g:?}",
                    row.chosen
                );
            }
        }
    }

    #[test]
    fn images_decode_and_show_the_described_colours_where_described() {
        for idx in 0..30 {
            let row = generate_row(5, idx, 96, Difficulty::Standard).unwrap();
            let img = image::load_from_memory(&row.png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (96, 96));
            assert!(
                row.png.len() > 8_000,
                "row {idx}: PNG only {} bytes",
                row.png.len()
            );
            for g in &row_scene(5, idx, Difficulty::Standard) {
                let [x0, y0, x1, y1] = REGIONS[g.region].map(|v| v * 96.0);
                let target = COLOURS[g.colour].1;
                let near = |p: &image::Rgb<u8>| {
                    p.0.iter()
                        .zip(target)
                        .map(|(&a, b)| (a as i32 - b as i32).abs())
                        .max()
                        .unwrap()
                        <= 12
                };
                let mut inside = 0;
                let mut outside = 0;
                for (x, y, p) in img.enumerate_pixels() {
                    if near(p) {
                        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                        if fx >= x0 - 2.0 && fx <= x1 + 2.0 && fy >= y0 - 2.0 && fy <= y1 + 2.0 {
                            inside += 1;
                        } else {
                            outside += 1;
                        }
                    }
                }
                assert!(
                    inside >= 6 * g.count,
                    "row {idx}: {g:?}: {inside} pixels of its colour in its region"
                );
                assert_eq!(
                    outside, 0,
                    "row {idx}: {g:?}: colour found outside its region"
                );
            }
        }
    }

    #[test]
    fn vocabulary_covers_every_generated_word() {
        let vocab = vocabulary();
        let set: BTreeSet<&str> = vocab.iter().copied().collect();
        assert_eq!(set.len(), vocab.len(), "vocabulary has duplicates");
        for w in [
            "There", "there", "circles", "In", "center", ".", ",", "?", "twelve", "Four",
        ] {
            assert!(set.contains(w), "{w} missing from the vocabulary");
        }
        assert!(vocab.iter().all(|w| !w.contains(' ') && !w.is_empty()));
        let mut used = BTreeSet::new();
        for idx in 0..2000 {
            let t = write_texts(
                &row_scene(9, idx, Difficulty::Standard),
                &mut Rng::for_row(9, idx, 2),
                Difficulty::Standard,
            );
            for text in [&t.question, &t.chosen, &t.rejected] {
                for w in split_words(text) {
                    assert!(
                        set.contains(w),
                        "{w:?} (in {text:?}) is not in the vocabulary"
                    );
                    used.insert(w.to_string());
                }
            }
        }
        // The vocabulary is tight: nearly every entry is actually produced.
        let unused: Vec<_> = vocab.iter().filter(|w| !used.contains(**w)).collect();
        assert!(unused.len() <= 3, "never generated: {unused:?}");
    }

    #[test]
    fn bad_options_are_rejected_with_clear_messages() {
        let dir = tempfile::tempdir().unwrap();
        let base = opts(dir.path(), 10, 2, 0);
        let cases: Vec<(SynthOptions, &str)> = vec![
            (
                SynthOptions {
                    pairs: 0,
                    ..base.clone()
                },
                "pairs must be at least 1",
            ),
            (
                SynthOptions {
                    shards: 0,
                    ..base.clone()
                },
                "shards must be at least 1",
            ),
            (
                SynthOptions {
                    shards: 11,
                    ..base.clone()
                },
                "shards (11) must not exceed pairs (10)",
            ),
            (
                SynthOptions {
                    rows_per_group: 0,
                    ..base.clone()
                },
                "rows_per_group must be at least 1",
            ),
            (
                SynthOptions {
                    image_size: 8,
                    ..base.clone()
                },
                "image_size (8)",
            ),
            (
                SynthOptions {
                    prefix: "a/b".into(),
                    ..base.clone()
                },
                "prefix \"a/b\"",
            ),
            (
                SynthOptions {
                    prefix: String::new(),
                    ..base.clone()
                },
                "prefix \"\"",
            ),
        ];
        for (o, want) in cases {
            let err = write_synthetic(&o).unwrap_err();
            assert!(matches!(err, SynthError::InvalidOptions(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn io_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, b"x").unwrap();
        let err = write_synthetic(&opts(&blocker.join("sub"), 2, 1, 0)).unwrap_err();
        assert!(matches!(err, SynthError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
