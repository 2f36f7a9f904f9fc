//! Synthetic preference data in the RLHF-V parquet layout (DESIGN.md §2), for demos, tests and smoke runs.
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
//! - Randomness comes from the in-file splitmix64/xoshiro256** generator and the drawing uses only
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

// ---------------------------------------------------------------------------------------------------
// Parquet output

fn schema() -> SchemaRef {
    let features = r#"{"info": {"features": {"ds_name": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}, "origin_dataset": {"dtype": "string", "_type": "Value"}, "origin_split": {"dtype": "string", "_type": "Value"}, "idx": {"dtype": "int64", "_type": "Value"}, "image_path": {"dtype": "string", "_type": "Value"}}}}"#;
    let metadata = HashMap::from([("huggingface".to_string(), features.to_string())]);
    Arc::new(
        Schema::new(vec![
            Field::new("ds_name", DataType::Utf8, true),
            Field::new("image", DataType::Struct(image_fields()), true),
            Field::new("text", DataType::Utf8, true),
            Field::new("origin_dataset", DataType::Utf8, true),
            Field::new("origin_split", DataType::Utf8, true),
            Field::new("idx", DataType::Int64, true),
            Field::new("image_path", DataType::Utf8, true),
        ])
        .with_metadata(metadata),
    )
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

/// Writes one shard under a temporary name, then renames it into place. Returns the edits it holds.
fn write_shard(
    opts: &SynthOptions,
    schema: &SchemaRef,
    rows: Range<usize>,
    path: &Path,
) -> Result<usize, SynthError> {
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = write_shard_to(opts, schema, rows, path, &tmp).and_then(|edits| {
        fs::rename(&tmp, path).map_err(|source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(edits)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_shard_to(
    opts: &SynthOptions,
    schema: &SchemaRef,
    rows: Range<usize>,
    path: &Path,
    tmp: &Path,
) -> Result<usize, SynthError> {
    let pq_err = |source| SynthError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let io_err = |source| SynthError::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(pq_err)?))
        .set_max_row_group_row_count(Some(opts.rows_per_group))
        .set_max_row_group_bytes(None)
        .build();
    let file = File::create(tmp).map_err(io_err)?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(pq_err)?;
    let origin_split = format!(
        "{{\"type\": \"synthetic\", \"seed\": {}, \"generator\": \"{GENERATOR}\"}}",
        opts.seed
    );
    let mut edits = 0;
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + opts.rows_per_group).min(rows.end);
        let generated = generate_rows(opts.seed, start..end, opts.image_size, opts.difficulty);
        let mut batch_rows = Vec::with_capacity(generated.len());
        for (i, row) in generated.into_iter().enumerate() {
            let row = row.map_err(|source| SynthError::Image {
                path: path.to_path_buf(),
                idx: (start + i) as u64,
                source,
            })?;
            edits += row.edits.len();
            batch_rows.push(row);
        }
        let batch = build_batch(schema, &batch_rows, &origin_split).map_err(|source| {
            SynthError::Arrow {
                path: path.to_path_buf(),
                source,
            }
        })?;
        writer.write(&batch).map_err(pq_err)?;
        writer.flush().map_err(pq_err)?;
        start = end;
    }
    let file = writer.into_inner().map_err(pq_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(edits)
}

fn build_batch(
    schema: &SchemaRef,
    rows: &[SynthRow],
    origin_split: &str,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let n = rows.len();
    let paths: Vec<String> = rows.iter().map(|r| image_path(r.idx)).collect();
    let texts: Vec<String> = rows.iter().map(|r| r.text_json()).collect();
    let fields = image_fields();
    let image = StructArray::try_new(
        fields,
        vec![
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.png))) as ArrayRef,
            Arc::new(StringArray::from_iter_values(&paths)) as ArrayRef,
        ],
        None,
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            DS_NAME, n,
        ))),
        Arc::new(image),
        Arc::new(StringArray::from_iter_values(&texts)),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            ORIGIN_DATASET,
            n,
        ))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            origin_split,
            n,
        ))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.idx as i64),
        )),
        Arc::new(StringArray::from_iter_values(&paths)),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

fn image_path(idx: u64) -> String {
    format!("synthetic/{idx:08}.png")
}

/// Generates rows `range` in parallel (each row depends only on its own index, so order is preserved and
/// the result is the same whatever the number of threads).
fn generate_rows(
    seed: u64,
    range: Range<usize>,
    image_size: u32,
    level: Difficulty,
) -> Vec<Result<SynthRow, image::ImageError>> {
    let n = range.len();
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, 16)
        .min(n.div_ceil(8).max(1));
    if threads <= 1 {
        return range
            .map(|i| generate_row(seed, i as u64, image_size, level))
            .collect();
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let lo = range.start + (t * chunk).min(n);
                let hi = range.start + ((t + 1) * chunk).min(n);
                scope.spawn(move || {
                    (lo..hi)
                        .map(|i| generate_row(seed, i as u64, image_size, level))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("synthetic row generator thread panicked"))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------------
// Random numbers: splitmix64 to seed, xoshiro256** to draw. Both fully specified, so streams are the same
// on every platform and with every crate version.

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut sm = seed;
        Rng {
            s: [
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
                splitmix64(&mut sm),
            ],
        }
    }

    /// An independent stream for one row and purpose.
    fn for_row(seed: u64, idx: u64, stream: u64) -> Rng {
        let mut a = seed;
        let mut b = splitmix64(&mut a) ^ idx;
        let mut c = splitmix64(&mut b) ^ stream;
        Rng::new(splitmix64(&mut c))
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-59 for the small n used here).
    fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }

    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    /// The first `k` elements of a uniformly random permutation of `0..n`.
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            v.swap(i, j);
        }
        v.truncate(k.min(n));
        v
    }
}

// ---------------------------------------------------------------------------------------------------
// Words. Everything the generator says is assembled from these tables; `vocabulary()` reads them.

/// Colour name and fill colour.
const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 38, 38]),
    ("green", [34, 160, 60]),
    ("blue", [37, 85, 220]),
    ("yellow", [240, 200, 25]),
    ("purple", [135, 60, 190]),
    ("orange", [245, 135, 25]),
    ("pink", [240, 120, 185]),
    ("black", [30, 30, 30]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Diamond,
}

const SHAPE_KINDS: [Shape; 6] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Star,
    Shape::Ring,
    Shape::Diamond,
];

/// Singular and plural names, in `SHAPE_KINDS` order.
const SHAPES: [(&str, &str); 6] = [
    ("circle", "circles"),
    ("square", "squares"),
    ("triangle", "triangles"),
    ("star", "stars"),
    ("ring", "rings"),
    ("diamond", "diamonds"),
];

/// Regions in normalised image coordinates `[x0, y0, x1, y1]`; they do not overlap.
/// Order: left, right, top, bottom, center.
const REGIONS: [[f32; 4]; 5] = [
    [0.02, 0.22, 0.30, 0.78],
    [0.70, 0.22, 0.98, 0.78],
    [0.30, 0.02, 0.70, 0.30],
    [0.30, 0.70, 0.70, 0.98],
    [0.33, 0.33, 0.67, 0.67],
];

/// Position phrases (mid-sentence, sentence start), in `REGIONS` order; two wordings.
const POSITIONS_SHORT: [(&str, &str); 5] = [
    ("on the left", "On the left"),
    ("on the right", "On the right"),
    ("at the top", "At the top"),
    ("at the bottom", "At the bottom"),
    ("in the center", "In the center"),
];
const POSITIONS_LONG: [(&str, &str); 5] = [
    ("on the left side", "On the left side"),
    ("on the right side", "On the right side"),
    ("near the top", "Near the top"),
    ("near the bottom", "Near the bottom"),
    ("in the middle", "In the middle"),
];

/// Counts 1-4 (mid-sentence, sentence start).
const COUNT_WORDS: [(&str, &str); 4] = [
    ("one", "One"),
    ("two", "Two"),
    ("three", "Three"),
    ("four", "Four"),
];
/// Totals 1-12.
const TOTAL_WORDS: [&str; 12] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve",
];
const BE: [&str; 2] = ["is", "are"];
const OBJECTS: [&str; 2] = ["object", "objects"];
const GROUP_WORDS: [&str; 3] = ["one group", "two groups", "three groups"];

/// One sentence per group. Placeholders: `{count}`/`{Count}`, `{colour}`, `{shape}` (number-agreeing),
/// `{be}` (is/are), `{pos}`/`{Pos}`.
const GROUP_TEMPLATES: [&str; 5] = [
    "There {be} {count} {colour} {shape} {pos}.",
    "{Count} {colour} {shape} {be} {pos}.",
    "I can see {count} {colour} {shape} {pos}.",
    "{Pos}, there {be} {count} {colour} {shape}.",
    "The image contains {count} {colour} {shape} {pos}.",
];
/// Opening sentences; `{groups}` is "one group", "two groups", ...
const INTROS: [&str; 4] = [
    "The image shows simple colored shapes on a light background.",
    "This is a simple picture of geometric shapes on a plain light background.",
    "The picture contains {groups} of shapes.",
    "The image shows {groups} of colored shapes.",
];
/// Total counts; `{be}`, `{total}`, `{objects}` agree with the true total.
const TOTALS: [&str; 3] = [
    "There {be} {total} {objects} in total.",
    "In total, I can count {total} {objects}.",
    "Altogether the image has {total} {objects}.",
];
const CLOSINGS: [&str; 3] = [
    "The background is light and there is nothing else in the image.",
    "No other objects appear in the picture.",
    "Nothing else is visible.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuestionKind {
    Describe,
    Shapes,
    Count,
}

const QUESTIONS: [(&str, QuestionKind); 13] = [
    ("Describe the image.", QuestionKind::Describe),
    ("Describe this image in detail.", QuestionKind::Describe),
    ("What do you see in this picture?", QuestionKind::Describe),
    ("What is shown in the image?", QuestionKind::Describe),
    (
        "Can you describe what is in the picture?",
        QuestionKind::Describe,
    ),
    (
        "Please give a detailed description of the image.",
        QuestionKind::Describe,
    ),
    (
        "What shapes can you see in this picture?",
        QuestionKind::Shapes,
    ),
    (
        "Which shapes and colors appear in the image?",
        QuestionKind::Shapes,
    ),
    ("Where are the shapes in this image?", QuestionKind::Shapes),
    (
        "How many objects are there and where are they?",
        QuestionKind::Count,
    ),
    (
        "How many shapes are in the image, and where are they located?",
        QuestionKind::Count,
    ),
    (
        "Count the objects in the image and tell me where they are.",
        QuestionKind::Count,
    ),
    (
        "How many objects can you count in this picture?",
        QuestionKind::Count,
    ),
];

/// Splits text into words (letters, digits, hyphens), punctuation marks, and `{placeholders}`.
fn split_words(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphanumeric() || c == b'-' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'-') {
                i += 1;
            }
            out.push(&s[start..i]);
        } else if c == b'{' {
            let start = i;
            while i < bytes.len() && bytes[i] != b'}' {
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            out.push(&s[start..i]);
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else {
            // One punctuation mark (the tables are ASCII; keep whole UTF-8 characters anyway).
            let len = s[i..].chars().next().map_or(1, char::len_utf8);
            out.push(&s[i..i + len]);
            i += len;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// Scenes, answers and hallucinations

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    colour: usize,
    shape: usize,
    /// 1..=4
    count: usize,
    region: usize,
}

/// What a rejected answer got wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Colour,
    Shape,
    Count,
    Position,
}

const ATTRS: [Attr; 4] = [Attr::Colour, Attr::Shape, Attr::Count, Attr::Position];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Edit {
    group: usize,
    attr: Attr,
}

/// One generated row.
#[derive(Debug, Clone)]
struct SynthRow {
    idx: u64,
    question: String,
    chosen: String,
    rejected: String,
    png: Vec<u8>,
    edits: Vec<Edit>,
}

impl SynthRow {
    /// The `text` column, as RLHF-V stores it (Python `json.dumps` style).
    fn text_json(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
        format!(
            "{{\"question\": {}, \"chosen\": {}, \"rejected\": {}}}",
            q(&self.question),
            q(&self.chosen),
            q(&self.rejected)
        )
    }
}

/// Per-group sentence choices shared by the chosen and the rejected answer.
#[derive(Debug, Clone, Copy)]
struct Wording {
    template: usize,
    long_positions: bool,
}

fn generate_row(
    seed: u64,
    idx: u64,
    image_size: u32,
    level: Difficulty,
) -> Result<SynthRow, image::ImageError> {
    let groups = row_scene(seed, idx, level);
    let png = render_png(&groups, seed, idx, image_size, level == Difficulty::Easy)?;
    let texts = write_texts(&groups, &mut Rng::for_row(seed, idx, 2), level);
    Ok(SynthRow {
        idx,
        question: texts.question,
        chosen: texts.chosen,
        rejected: texts.rejected,
        png,
        edits: texts.edits,
    })
}

/// The scene of row `idx` (its own random stream, so text and drawing choices never shift it).
fn row_scene(seed: u64, idx: u64, level: Difficulty) -> Vec<Group> {
    draw_scene(&mut Rng::for_row(seed, idx, 1), level)
}

fn draw_scene(rng: &mut Rng, level: Difficulty) -> Vec<Group> {
    if level == Difficulty::Easy {
        return vec![Group {
            colour: rng.below(COLOURS.len()),
            shape: rng.below(SHAPES.len()),
            count: 1 + rng.below(2),
            region: rng.below(REGIONS.len()),
        }];
    }
    let n = match rng.below(10) {
        0..=2 => 1,
        3..=6 => 2,
        _ => 3,
    };
    let colours = rng.sample(COLOURS.len(), n);
    let regions = rng.sample(REGIONS.len(), n);
    (0..n)
        .map(|g| Group {
            colour: colours[g],
            shape: rng.below(SHAPES.len()),
            count: 1 + rng.below(4),
            region: regions[g],
        })
        .collect()
}

/// A row's question and answers.
#[derive(Debug, Clone)]
struct Texts {
    question: String,
    chosen: String,
    rejected: String,
    edits: Vec<Edit>,
}

fn write_texts(groups: &[Group], rng: &mut Rng, level: Difficulty) -> Texts {
    let (question, kind) = *rng.pick(&QUESTIONS);
    let long_positions = rng.below(2) == 1;
    let wordings: Vec<Wording> = groups
        .iter()
        .map(|_| Wording {
            template: rng.below(GROUP_TEMPLATES.len()),
            long_positions,
        })
        .collect();
    let total: usize = groups.iter().map(|g| g.count).sum();
    let intro_t = rng.below(INTROS.len());
    let total_t = rng.below(TOTALS.len());
    let closing_t = rng.below(CLOSINGS.len());
    let (mut intro, total_sentence, mut closing) = match kind {
        QuestionKind::Describe => (true, false, rng.below(2) == 0),
        QuestionKind::Shapes => (rng.below(10) < 3, false, rng.below(2) == 0),
        QuestionKind::Count => (false, true, rng.below(10) < 3),
    };
    let pre = |intro: bool| -> Vec<String> {
        let mut v = Vec::new();
        if intro {
            v.push(INTROS[intro_t].replace("{groups}", GROUP_WORDS[groups.len() - 1]));
        }
        if total_sentence {
            v.push(
                TOTALS[total_t]
                    .replace("{be}", BE[usize::from(total != 1)])
                    .replace("{total}", TOTAL_WORDS[total - 1])
                    .replace("{objects}", OBJECTS[usize::from(total != 1)]),
            );
        }
        v
    };
    let compose = |gs: &[Group], intro: bool, closing: bool| -> String {
        let mut sentences = pre(intro);
        for (g, w) in gs.iter().zip(&wordings) {
            sentences.push(group_sentence(g, *w));
        }
        if closing {
            sentences.push(CLOSINGS[closing_t].to_string());
        }
        sentences.join(" ")
    };
    let (wrong, edits) = hallucinate(groups, rng, level);
    // Keep both answers at least 15 words (a wrong position can be a word shorter than the right one):
    // add a closing, then an opening sentence, when short.
    let words = |s: &str| s.split_whitespace().count();
    let shortest = |intro, closing| {
        words(&compose(groups, intro, closing)).min(words(&compose(&wrong, intro, closing)))
    };
    if shortest(intro, closing) < 15 {
        closing = true;
    }
    if shortest(intro, closing) < 15 {
        intro = true;
    }
    let chosen = compose(groups, intro, closing);
    let rejected = compose(&wrong, intro, closing);
    Texts {
        question: question.to_string(),
        chosen,
        rejected,
        edits,
    }
}

fn group_sentence(g: &Group, w: Wording) -> String {
    let plural = g.count != 1;
    let pos = if w.long_positions {
        POSITIONS_LONG[g.region]
    } else {
        POSITIONS_SHORT[g.region]
    };
    let shape = if plural {
        SHAPES[g.shape].1
    } else {
        SHAPES[g.shape].0
    };
    GROUP_TEMPLATES[w.template]
        .replace("{be}", BE[usize::from(plural)])
        .replace("{count}", COUNT_WORDS[g.count - 1].0)
        .replace("{Count}", COUNT_WORDS[g.count - 1].1)
        .replace("{colour}", COLOURS[g.colour].0)
        .replace("{shape}", shape)
        .replace("{pos}", pos.0)
        .replace("{Pos}", pos.1)
}

/// Puts 1-3 wrong attributes into a copy of the scene description. Wrong colours and positions are ones
/// the scene does not use, so the rejected text stays plausible on its own.
fn hallucinate(groups: &[Group], rng: &mut Rng, level: Difficulty) -> (Vec<Group>, Vec<Edit>) {
    if level == Difficulty::Easy {
        let mut wrong = groups.to_vec();
        let free: Vec<usize> = (0..COLOURS.len())
            .filter(|&c| c != groups[0].colour)
            .collect();
        wrong[0].colour = *rng.pick(&free);
        return (
            wrong,
            vec![Edit {
                group: 0,
                attr: Attr::Colour,
            }],
        );
    }
    let want = match rng.below(20) {
        0..=9 => 1,
        10..=16 => 2,
        _ => 3,
    };
    let mut wrong = groups.to_vec();
    let mut edits = Vec::new();
    let mut used_colours: Vec<usize> = groups.iter().map(|g| g.colour).collect();
    let mut used_regions: Vec<usize> = groups.iter().map(|g| g.region).collect();
    let slots = rng.sample(groups.len() * ATTRS.len(), groups.len() * ATTRS.len());
    for slot in slots {
        if edits.len() == want {
            break;
        }
        let (group, attr) = (slot / ATTRS.len(), ATTRS[slot % ATTRS.len()]);
        let g = &mut wrong[group];
        match attr {
            Attr::Colour => {
                let free: Vec<usize> = (0..COLOURS.len())
                    .filter(|c| !used_colours.contains(c))
                    .collect();
                if free.is_empty() {
                    continue;
                }
                g.colour = *rng.pick(&free);
                used_colours.push(g.colour);
            }
            Attr::Shape => {
                let other: Vec<usize> = (0..SHAPES.len()).filter(|&s| s != g.shape).collect();
                g.shape = *rng.pick(&other);
            }
            Attr::Count => {
                let other: Vec<usize> = (1..=4).filter(|&c| c != g.count).collect();
                g.count = *rng.pick(&other);
            }
            Attr::Position => {
                let free: Vec<usize> = (0..REGIONS.len())
                    .filter(|r| !used_regions.contains(r))
                    .collect();
                if free.is_empty() {
                    continue;
                }
                g.region = *rng.pick(&free);
                used_regions.push(g.region);
            }
        }
        edits.push(Edit { group, attr });
    }
    edits.sort_by_key(|e| (e.group, e.attr as u8));
    (wrong, edits)
}

// ---------------------------------------------------------------------------------------------------
// Drawing. Signed distance functions in pixel units, antialiased by coverage, with a dark outline.

/// Unit vectors at -90° + 36°·k (k = 0..10): the star's alternating outer and inner vertices.
/// Written out so that no platform-dependent `sin`/`cos` is involved.
const STAR_DIRS: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.587_785_3, -0.809_017),
    (0.951_056_5, -0.309_017),
    (0.951_056_5, 0.309_017),
    (0.587_785_3, 0.809_017),
    (0.0, 1.0),
    (-0.587_785_3, 0.809_017),
    (-0.951_056_5, 0.309_017),
    (-0.951_056_5, -0.309_017),
    (-0.587_785_3, -0.809_017),
];
const SQRT3_2: f32 = 0.866_025_4;

#[derive(Debug, Clone, Copy)]
struct Instance {
    shape: Shape,
    cx: f32,
    cy: f32,
    r: f32,
    fill: [f32; 3],
}

/// Exact signed distance to a polygon (negative inside); after Inigo Quilez.
fn polygon_sdf(v: &[(f32, f32)], px: f32, py: f32) -> f32 {
    let n = v.len();
    let (dx, dy) = (px - v[0].0, py - v[0].1);
    let mut d = dx * dx + dy * dy;
    let mut s = 1.0f32;
    let mut j = n - 1;
    for i in 0..n {
        let (ex, ey) = (v[j].0 - v[i].0, v[j].1 - v[i].1);
        let (wx, wy) = (px - v[i].0, py - v[i].1);
        let t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0);
        let (bx, by) = (wx - ex * t, wy - ey * t);
        d = d.min(bx * bx + by * by);
        let c1 = py >= v[i].1;
        let c2 = py < v[j].1;
        let c3 = ex * wy > ey * wx;
        if (c1 && c2 && c3) || (!c1 && !c2 && !c3) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

/// Signed distance (pixels, negative inside) from `(x, y)`, relative to the centre, to a shape of
/// nominal radius `r`; `line` is the outline width, which keeps ring walls thick enough to show colour.
fn shape_sdf(shape: Shape, r: f32, line: f32, x: f32, y: f32) -> f32 {
    match shape {
        Shape::Circle => (x * x + y * y).sqrt() - r,
        Shape::Ring => {
            let t = (0.45 * r).max(2.0 * line + 1.5);
            ((x * x + y * y).sqrt() - (r - 0.5 * t)).abs() - 0.5 * t
        }
        Shape::Square => {
            let s = 0.82 * r;
            let (qx, qy) = (x.abs() - s, y.abs() - s);
            let (ox, oy) = (qx.max(0.0), qy.max(0.0));
            (ox * ox + oy * oy).sqrt() + qx.max(qy).min(0.0)
        }
        Shape::Diamond => {
            let v = [(0.0, -r), (0.8 * r, 0.0), (0.0, r), (-0.8 * r, 0.0)];
            polygon_sdf(&v, x, y)
        }
        Shape::Triangle => {
            // Equilateral, pointing up, centroid at the origin, slightly enlarged to look balanced.
            let k = 1.12 * r;
            let v = [(0.0, -k), (SQRT3_2 * k, 0.5 * k), (-SQRT3_2 * k, 0.5 * k)];
            polygon_sdf(&v, x, y)
        }
        Shape::Star => {
            let outer = 1.2 * r;
            let inner = 0.5 * outer;
            let mut v = [(0.0f32, 0.0f32); 10];
            for (k, d) in STAR_DIRS.iter().enumerate() {
                let m = if k % 2 == 0 { outer } else { inner };
                v[k] = (d.0 * m, d.1 * m);
            }
            polygon_sdf(&v, x, y)
        }
    }
}

/// Places every shape of every group: a 2x2 grid of cells per region, `count` of them used.
/// Shape instances; `big` draws each shape about two thirds of the image wide, centred towards its region.
fn layout(groups: &[Group], size: f32, rng: &mut Rng, big: bool) -> Vec<Instance> {
    let mut out = Vec::new();
    if big {
        for g in groups {
            let [x0, y0, x1, y1] = REGIONS[g.region];
            let fill = COLOURS[g.colour].1.map(f32::from);
            let r = size * rng.uniform(0.28, 0.34);
            let clamp = |v: f32| v.clamp(r * 1.1, size - r * 1.1);
            for k in 0..g.count {
                // Two shapes sit side by side (or one above the other) around the region's centre.
                let off = if g.count == 2 {
                    (k as f32 - 0.5) * r * 0.9
                } else {
                    0.0
                };
                out.push(Instance {
                    shape: SHAPE_KINDS[g.shape],
                    cx: clamp(0.5 * (x0 + x1) * size + off),
                    cy: clamp(0.5 * (y0 + y1) * size),
                    r: if g.count == 2 { 0.6 * r } else { r },
                    fill,
                });
            }
        }
        return out;
    }
    for g in groups {
        let [x0, y0, x1, y1] = REGIONS[g.region];
        let (w, h) = ((x1 - x0) * size, (y1 - y0) * size);
        // Grid of cells: one big cell for a single shape, two along the longer side for a pair, 2x2
        // otherwise (so fewer shapes are drawn larger).
        let (cols, rows) = match g.count {
            1 => (1, 1),
            2 if w >= h => (2, 1),
            2 => (1, 2),
            _ => (2, 2),
        };
        let (cw, ch) = (w / cols as f32, h / rows as f32);
        let fill = COLOURS[g.colour].1.map(f32::from);
        for cell in rng.sample(cols * rows, g.count) {
            let (col, row) = ((cell % cols) as f32, (cell / cols) as f32);
            let r = 0.5 * cw.min(ch) * rng.uniform(0.72, 0.9);
            let (sx, sy) = ((0.5 * cw - 1.2 * r).max(0.0), (0.5 * ch - 1.2 * r).max(0.0));
            let cx = x0 * size + (col + 0.5) * cw + sx * rng.uniform(-1.0, 1.0);
            let cy = y0 * size + (row + 0.5) * ch + sy * rng.uniform(-1.0, 1.0);
            out.push(Instance {
                shape: SHAPE_KINDS[g.shape],
                cx,
                cy,
                r,
                fill,
            });
        }
    }
    out
}

/// Draws the scene into an RGB8 buffer of `size`×`size` pixels.
fn render(groups: &[Group], seed: u64, idx: u64, size: u32, big: bool) -> Vec<u8> {
    let mut rng = Rng::for_row(seed, idx, 3);
    let n = size as usize;
    let sf = size as f32;
    // Light two-colour gradient background in a random direction.
    let c0: [f32; 3] = [0; 3].map(|_| rng.uniform(205.0, 250.0));
    let c1: [f32; 3] = [0; 3].map(|_| rng.uniform(205.0, 250.0));
    let wx = rng.unit();
    let wy = 1.0 - wx;
    let (flip_x, flip_y) = (rng.below(2) == 1, rng.below(2) == 1);
    let mut buf = vec![0f32; n * n * 3];
    let denom = (n.max(2) - 1) as f32;
    for y in 0..n {
        let fy = (if flip_y { n - 1 - y } else { y }) as f32 / denom;
        for x in 0..n {
            let fx = (if flip_x { n - 1 - x } else { x }) as f32 / denom;
            let t = wx * fx + wy * fy;
            let p = (y * n + x) * 3;
            for c in 0..3 {
                buf[p + c] = c0[c] + (c1[c] - c0[c]) * t;
            }
        }
    }
    // Shapes: fill colour inside, a darker outline band at the edge, antialiased over one pixel.
    let outline = (sf / 96.0).max(1.0);
    for inst in layout(groups, sf, &mut rng, big) {
        let dark = inst.fill.map(|v| v * 0.45);
        let reach = 1.3 * inst.r + 2.0;
        let xa = ((inst.cx - reach).floor().max(0.0)) as usize;
        let xb = ((inst.cx + reach).ceil().min(sf)) as usize;
        let ya = ((inst.cy - reach).floor().max(0.0)) as usize;
        let yb = ((inst.cy + reach).ceil().min(sf)) as usize;
        for y in ya..yb {
            for x in xa..xb {
                let d = shape_sdf(
                    inst.shape,
                    inst.r,
                    outline,
                    x as f32 + 0.5 - inst.cx,
                    y as f32 + 0.5 - inst.cy,
                );
                let cover = (0.5 - d).clamp(0.0, 1.0);
                if cover <= 0.0 {
                    continue;
                }
                let inner = (0.5 - (d + outline)).clamp(0.0, 1.0);
                let p = (y * n + x) * 3;
                for c in 0..3 {
                    buf[p + c] = buf[p + c] * (1.0 - cover)
                        + dark[c] * (cover - inner)
                        + inst.fill[c] * inner;
                }
            }
        }
    }
    // Mild luminance noise, then 8-bit.
    let mut out = vec![0u8; n * n * 3];
    for (px, o) in buf.chunks_exact(3).zip(out.chunks_exact_mut(3)) {
        let noise = rng.below(9) as f32 - 4.0;
        for c in 0..3 {
            o[c] = (px[c] + noise + 0.5).floor().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

fn render_png(
    groups: &[Group],
    seed: u64,
    idx: u64,
    size: u32,
    big: bool,
) -> Result<Vec<u8>, image::ImageError> {
    let rgb = render(groups, seed, idx, size, big);
    let mut png = Vec::with_capacity(rgb.len());
    PngEncoder::new_with_quality(&mut png, CompressionType::Default, FilterType::Adaptive)
        .write_image(&rgb, size, size, ExtendedColorType::Rgb8)?;
    Ok(png)
}

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
    fn splitmix_and_xoshiro_match_reference_values() {
        // splitmix64 reference: first output from state 0.
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
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
    fn schema_is_the_rlhf_v_layout() {
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
