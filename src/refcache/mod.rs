//! The reference log-prob cache (docs/formats.md): per-token reference log-probs computed once, up front, so
//! training runs one model instead of two.
//!
//! Layout: `<reference.cache_dir>/<fingerprint>/` holds one parquet file per data shard (the shard's file
//! stem, `.parquet`) and `manifest.json`; `<reference.cache_dir>/file-hashes.json` memoises the content
//! hashes of big files by (path, size, mtime) so a 14 GB checkpoint is hashed once.
//!
//! Invariants:
//! - The fingerprint (the directory name) covers everything the numbers depend on except the shard's
//!   content: reference weights, config.json, tokenizer.json, preprocessor_config.json, chat template,
//!   `data.pad_to_square`, `data.max_length`, the reference forward's dtype and [`FORMAT_VERSION`]. Bump
//!   [`FORMAT_VERSION`] when the file format or the way the numbers are computed changes.
//! - A cache file is complete or absent (written under a temporary name, then renamed). Its parquet footer
//!   holds its own [`ShardEntry`] (fingerprint, source content hash, counts), so validity is decided from the
//!   file itself; `manifest.json` is rebuilt from the footers after each shard (atomically), for people and
//!   tools to read. Concurrent writers (one shard each) can therefore never make a cache file look valid
//!   for data it was not computed from.
//! - ids in a cache file are exactly the pipeline's (prompt with the image token expanded, responses
//!   truncated to `data.max_length`); [`attach`] refuses an example whose ids differ.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Int32Builder, Int64Array, ListBuilder, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Kind;

use crate::config::{Config, OnBadRow};
use crate::data::collate::{collate, IGNORE};
use crate::data::pipeline::{Example, ExampleStream, Preprocessor, RefLogps};
use crate::data::{DataError, RowError};
use crate::model::llava::Llava;
use crate::util::fsx;

mod compute;
mod file;
mod hashes;

pub use compute::ComputeOptions;
use compute::*;
use file::*;
pub use file::{read_footer, schema};
pub use hashes::sha256_file;
use hashes::*;

/// Version of the cache format and of the way its numbers are computed; part of the fingerprint.
pub const FORMAT_VERSION: u32 = 1;
/// The human-readable index in each fingerprint directory.
pub const MANIFEST: &str = "manifest.json";
/// Memo of big files' content hashes, in the cache root (shared by all fingerprints).
pub const HASH_MEMO: &str = "file-hashes.json";
/// Parquet footer key holding the file's [`ShardEntry`] as JSON.
pub const FOOTER_KEY: &str = "ddpo.refcache";
/// Files at least this big have their hash memoised by (path, size, mtime); smaller ones are always hashed
/// (cheap, and immune to a same-size rewrite within one mtime tick).
pub const MEMO_MIN_BYTES: u64 = 8 << 20;
/// Rows per parquet row group of a cache file.
pub const ROW_GROUP_ROWS: usize = 256;
/// Hex digits of the fingerprint (64 bits: a directory name, not a security boundary).
const FINGERPRINT_HEX: usize = 16;
/// Temporary files older than this are leftovers of a crashed writer.
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// What every "rebuild the cache" message tells the user to run.
const RUN_PRECOMPUTE: &str = "run `ddpo precompute --config <your job.toml>`";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The reference model directory cannot be hashed or loaded.
    #[error("reference model {}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    /// Data discovery, preprocessing, or a bad row under `on_bad_row = "fail"`.
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(
        "{}: no reference log-prob cache for this shard (expected {}); {RUN_PRECOMPUTE} first",
        shard.display(), file.display()
    )]
    Missing { shard: PathBuf, file: PathBuf },
    #[error(
        "{}: the reference cache {} is stale: it was computed from shard contents with sha256 {cached}, the \
         shard now hashes to {current}; {RUN_PRECOMPUTE} to recompute it",
        shard.display(), file.display()
    )]
    Stale {
        shard: PathBuf,
        file: PathBuf,
        cached: String,
        current: String,
    },
    #[error(
        "{}: corrupt reference cache file: {reason}; delete it and {RUN_PRECOMPUTE}",
        file.display()
    )]
    Corrupt { file: PathBuf, reason: String },
    #[error(
        "{}: row {row}: the reference cache no longer matches the data: {what} ids differ ({detail}); the \
         tokenizer, chat template, data.max_length or the data changed since the cache was built — \
         {RUN_PRECOMPUTE} to rebuild it",
        shard.display()
    )]
    Mismatch {
        shard: PathBuf,
        row: u64,
        what: &'static str,
        detail: String,
    },
    #[error("{}: writing the reference cache: {reason}", file.display())]
    Write { file: PathBuf, reason: String },
    /// The reference forward produced something unusable (non-finite log-probs, misaligned labels).
    #[error("{}: computing reference log-probs: {reason}", shard.display())]
    Compute { shard: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Everything the cached numbers depend on (besides the shard's content), as recorded in manifest.json.
/// The fingerprint hashes all of it except `reference_model` (moving a checkpoint keeps its cache).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FingerprintInputs {
    pub format_version: u32,
    /// The reference model directory (for people; not hashed).
    pub reference_model: String,
    /// sha256 of each safetensors file, by file name.
    pub weights_sha256: BTreeMap<String, String>,
    pub config_json_sha256: String,
    pub tokenizer_json_sha256: String,
    pub preprocessor_config_json_sha256: String,
    pub template: String,
    pub pad_to_square: bool,
    pub max_length: usize,
    /// dtype of the reference forward's weights (log-probs are fp32 regardless).
    pub dtype: String,
}

impl FingerprintInputs {
    pub fn fingerprint(&self) -> String {
        let mut hashed = self.clone();
        hashed.reference_model.clear();
        let bytes = serde_json::to_vec(&hashed).expect("plain data serialises");
        let mut h = hex(&Sha256::digest(&bytes));
        h.truncate(FINGERPRINT_HEX);
        h
    }
}

/// One cache file's record: in its parquet footer and, for people, in manifest.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// Cache file name within the fingerprint directory.
    pub file: String,
    /// The data shard it was computed from, as given.
    pub source: String,
    pub source_sha256: String,
    pub source_bytes: u64,
    pub fingerprint: String,
    pub format_version: u32,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    pub rows_truncated: u64,
    pub response_tokens: u64,
    /// UTC, RFC 3339.
    pub created: String,
    pub seconds: f64,
    /// The first skipped rows with their reasons (all are counted in `rows_skipped`).
    #[serde(default)]
    pub skipped_rows: Vec<String>,
}

/// manifest.json: the fingerprint, its inputs, and one entry per cache file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub fingerprint: String,
    pub inputs: FingerprintInputs,
    /// By cache file name.
    pub shards: BTreeMap<String, ShardEntry>,
}

/// One cached pair: the ids the pipeline produced and the reference log-prob of each response token.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPair {
    pub row: u64,
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_ids: Vec<u32>,
    pub rejected_logps: Vec<f32>,
}

/// What [`RefCache::compute_shard`] did.
#[derive(Debug, Clone)]
pub struct ShardReport {
    pub shard: PathBuf,
    pub file: PathBuf,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_skipped: u64,
    pub rows_truncated: u64,
    pub response_tokens: u64,
    pub seconds: f64,
    /// The first skipped rows, with reasons (all are counted in `rows_skipped`).
    pub skipped: Vec<RowError>,
}

/// What [`precompute`] did.
#[derive(Debug, Clone)]
pub struct PrecomputeReport {
    pub dir: PathBuf,
    pub fingerprint: String,
    pub shards_total: usize,
    /// Shards that already had a valid cache file.
    pub shards_cached: usize,
    pub shards_computed: usize,
    /// Whether the reference model was loaded at all (not when everything was cached).
    pub model_loaded: bool,
    pub rows_written: u64,
    pub rows_skipped: u64,
    pub seconds: f64,
    pub computed: Vec<ShardReport>,
}

impl std::fmt::Display for PrecomputeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "reference cache: {}", self.dir.display())?;
        write!(
            f,
            "shards: {} ({} already cached, {} computed); rows written {}, skipped {}; {:.1} s",
            self.shards_total,
            self.shards_cached,
            self.shards_computed,
            self.rows_written,
            self.rows_skipped,
            self.seconds
        )?;
        if !self.model_loaded {
            write!(
                f,
                "\nnothing to compute: the reference model was not loaded"
            )?;
        }
        for r in &self.computed {
            write!(
                f,
                "\n  {} -> {}: {} rows written, {} skipped, {} truncated, {:.1} pairs/s",
                r.shard.display(),
                r.file.display(),
                r.rows_written,
                r.rows_skipped,
                r.rows_truncated,
                r.rows_written as f64 / r.seconds.max(1e-9)
            )?;
            for e in &r.skipped {
                write!(f, "\n    skipped {e}")?;
            }
        }
        Ok(())
    }
}

/// The cache directory of one fingerprint.
pub struct RefCache {
    root: PathBuf,
    dir: PathBuf,
    inputs: FingerprintInputs,
    fingerprint: String,
    /// Cache file names for the config's shards whose stems collide (others use `<stem>.parquet`).
    renamed: HashMap<PathBuf, String>,
    memo: Mutex<HashMemo>,
}

impl std::fmt::Debug for RefCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefCache")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The weight dtype of the reference forward: `model.dtype`, with `auto` = bf16 on CUDA, fp32 on CPU.
pub fn reference_kind(cfg: &Config, device: tch::Device) -> Kind {
    cfg.model.dtype.weight_kind(device)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "fp32",
    }
}

impl RefCache {
    /// Computes the fingerprint for this config's reference model + data settings and opens (creates) the
    /// directory. The dtype is resolved for the default device (CUDA if available, else CPU); use
    /// [`RefCache::open_for_device`] when the reference runs elsewhere.
    pub fn open(cfg: &Config) -> Result<Self, CacheError> {
        Self::open_for_device(cfg, tch::Device::cuda_if_available())
    }

    /// [`RefCache::open`] for a reference forward on `device` (the dtype, hence the fingerprint, depends on it
    /// when `model.dtype = "auto"`).
    pub fn open_for_device(cfg: &Config, device: tch::Device) -> Result<Self, CacheError> {
        let root = cfg.reference_cache_dir();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let mut memo = HashMemo::load(&root);
        let model = cfg.reference_path();
        let model_err = |reason: String| CacheError::Model {
            path: model.to_owned(),
            reason,
        };
        let mut weights_sha256 = BTreeMap::new();
        let files =
            crate::model::weights::checkpoint_files(model).map_err(|e| model_err(e.to_string()))?;
        for f in files {
            let name = f
                .strip_prefix(model)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            weights_sha256.insert(name, memo.hash(&f)?);
        }
        let inputs = FingerprintInputs {
            format_version: FORMAT_VERSION,
            reference_model: model.display().to_string(),
            weights_sha256,
            config_json_sha256: memo.hash(&model.join("config.json"))?,
            tokenizer_json_sha256: memo.hash(&model.join("tokenizer.json"))?,
            preprocessor_config_json_sha256: memo.hash(&model.join("preprocessor_config.json"))?,
            template: cfg.data.template.clone(),
            pad_to_square: cfg.data.pad_to_square,
            max_length: cfg.data.max_length,
            dtype: kind_name(reference_kind(cfg, device)).into(),
        };
        memo.save();
        let fingerprint = inputs.fingerprint();
        let dir = root.join(&fingerprint);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Data errors surface where shards are used; here the list only serves to name colliding stems.
        let shards = job_shards(cfg).unwrap_or_default();
        let cache = Self {
            renamed: colliding_names(&shards),
            root,
            dir,
            inputs,
            fingerprint,
            memo: Mutex::new(memo),
        };
        if !cache.dir.join(MANIFEST).exists() {
            cache.write_manifest()?;
        }
        Ok(cache)
    }

    /// `<cache_dir>/<fingerprint>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn inputs(&self) -> &FingerprintInputs {
        &self.inputs
    }

    /// The cache file for `shard`: `<dir>/<stem>.parquet` (a path-hash suffix when two of the config's
    /// shards share a stem).
    pub fn file_for(&self, shard: &Path) -> PathBuf {
        let name = self
            .renamed
            .get(&absolute(shard))
            .cloned()
            .unwrap_or_else(|| format!("{}.parquet", stem(shard)));
        self.dir.join(name)
    }

    /// Content hash of a data shard (memoised for big files).
    pub fn shard_hash(&self, shard: &Path) -> Result<String, CacheError> {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        let h = memo.hash(shard)?;
        memo.save();
        Ok(h)
    }

    /// Shards (of those given) with no valid cache file: missing, stale (content hash changed), or with an
    /// unreadable footer (it will be overwritten).
    pub fn missing_shards(&self, shards: &[PathBuf]) -> Result<Vec<PathBuf>, CacheError> {
        let mut out = Vec::new();
        for s in shards {
            let hash = self.shard_hash(s)?;
            let file = self.file_for(s);
            let valid = file.exists()
                && read_footer(&file)
                    .map(|e| e.source_sha256 == hash && e.fingerprint == self.fingerprint)
                    .unwrap_or(false);
            if !valid {
                out.push(s.clone());
            }
        }
        Ok(out)
    }

    /// Reads one shard's cache rows, in row order; an error naming the shard if the cache is missing or
    /// stale, naming the file if it is corrupt.
    pub fn load_shard(&self, shard: &Path) -> Result<Vec<CachedPair>, CacheError> {
        let file = self.file_for(shard);
        if !file.exists() {
            return Err(CacheError::Missing {
                shard: shard.to_owned(),
                file,
            });
        }
        let entry = read_footer(&file)?;
        let current = self.shard_hash(shard)?;
        if entry.source_sha256 != current {
            return Err(CacheError::Stale {
                shard: shard.to_owned(),
                file,
                cached: entry.source_sha256,
                current,
            });
        }
        if entry.fingerprint != self.fingerprint {
            return Err(CacheError::Corrupt {
                reason: format!(
                    "its footer says fingerprint {} but it lies in the directory of {}",
                    entry.fingerprint, self.fingerprint
                ),
                file,
            });
        }
        let pairs = read_pairs(&file)?;
        if pairs.len() as u64 != entry.rows_written {
            return Err(CacheError::Corrupt {
                reason: format!(
                    "{} rows, its footer says {}",
                    pairs.len(),
                    entry.rows_written
                ),
                file,
            });
        }
        Ok(pairs)
    }

    /// Computes and writes one shard's cache file (the unit a coordinator leases out), then rewrites
    /// manifest.json. `pre` must come from the reference model directory with this cache's template and
    /// max_length. With `OnBadRow::Fail` a bad row fails the shard and nothing is written for it.
    pub fn compute_shard(
        &self,
        model: &Llava,
        pre: &Preprocessor,
        shard: &Path,
        opts: &ComputeOptions,
    ) -> Result<ShardReport, CacheError> {
        let start = Instant::now();
        let ComputeOptions {
            on_bad_row: policy,
            batch_pairs,
            device,
            shared_prefix,
        } = *opts;
        let batch_pairs = batch_pairs.max(1);
        let source_sha256 = self.shard_hash(shard)?;
        let source_bytes = fs::metadata(shard).map_err(io_err(shard))?.len();
        let file = self.file_for(shard);
        let name = file_name(&file);
        let tmp = fsx::temp_sibling(&file);
        let (pad_id, image_hw) = (pre.pad_id(), pre.image_hw());
        let fwd = Forward {
            model,
            shard,
            pad_id,
            image_hw,
            device,
            shared_prefix,
        };

        let result = (|| {
            let out = File::create(&tmp).map_err(io_err(&tmp))?;
            let mut sink = PairSink::new(out, &tmp)?;
            let mut stream = ExampleStream::new(pre, vec![shard.to_owned()], policy);
            let tokens = fwd.run_all(&mut stream, &mut sink, batch_pairs, start)?;
            let stats = stream.stats;
            let entry = ShardEntry {
                file: name.clone(),
                source: shard.display().to_string(),
                source_sha256,
                source_bytes,
                fingerprint: self.fingerprint.clone(),
                format_version: FORMAT_VERSION,
                rows_read: stats.rows,
                rows_written: sink.rows,
                rows_skipped: stats.skipped,
                rows_truncated: stats.truncated,
                response_tokens: tokens,
                created: rfc3339_now(),
                seconds: start.elapsed().as_secs_f64(),
                skipped_rows: stats.first_errors.iter().map(|e| e.to_string()).collect(),
            };
            sink.finish(&entry)?;
            fsx::commit(&tmp, &file).map_err(io_err(&file))?;
            Ok((entry, stats.first_errors))
        })();
        let (entry, skipped) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.write_manifest()?;
        Ok(ShardReport {
            shard: shard.to_owned(),
            file,
            rows_read: entry.rows_read,
            rows_written: entry.rows_written,
            rows_skipped: entry.rows_skipped,
            rows_truncated: entry.rows_truncated,
            response_tokens: entry.response_tokens,
            seconds: entry.seconds,
            skipped,
        })
    }

    /// Rebuilds manifest.json from the cache files' footers and writes it atomically (only when it changed).
    pub fn write_manifest(&self) -> Result<(), CacheError> {
        let mut shards = BTreeMap::new();
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        for e in entries {
            let path = e.map_err(io_err(&self.dir))?.path();
            let name = file_name(&path);
            if name.starts_with('.') || !name.ends_with(".parquet") {
                continue;
            }
            match read_footer(&path) {
                Ok(entry) => {
                    shards.insert(name, entry);
                }
                Err(e) => tracing::warn!("not listed in {MANIFEST}: {e}"),
            }
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            fingerprint: self.fingerprint.clone(),
            inputs: self.inputs.clone(),
            shards,
        };
        let mut bytes = serde_json::to_vec_pretty(&manifest).expect("plain data serialises");
        bytes.push(b'\n');
        let path = self.dir.join(MANIFEST);
        if fs::read(&path).ok().as_deref() == Some(&bytes[..]) {
            return Ok(());
        }
        write_atomic(&path, &bytes)
    }

    /// Removes temporary files a crashed writer left in the directory, once older than `age` (a live
    /// writer flushes every row group, so its file is never that old).
    pub fn remove_stale_temp_files(&self, age: std::time::Duration) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = file_name(&path);
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|el| el >= age);
            // `fsx`'s temporaries, and the `.<name>.<pid>.<nanos>.tmp` ones of earlier versions.
            let temp =
                fsx::is_temp_name(&name) || (name.starts_with('.') && name.ends_with(".tmp"));
            if temp && old {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), "removed a stale temporary file")
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "cannot remove a stale temporary file: {e}")
                    }
                }
            }
        }
    }

    /// Reads manifest.json.
    pub fn manifest(&self) -> Result<Manifest, CacheError> {
        let path = self.dir.join(MANIFEST);
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| CacheError::Corrupt {
            file: path,
            reason: format!("not a manifest: {e}"),
        })
    }

    /// The cache root (parent of the fingerprint directories).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The pair with row `row` in rows sorted by row (as [`RefCache::load_shard`] returns them).
pub fn find_row(pairs: &[CachedPair], row: u64) -> Option<&CachedPair> {
    pairs
        .binary_search_by_key(&row, |p| p.row)
        .ok()
        .map(|i| &pairs[i])
}

/// Attaches cached reference log-probs to an example, refusing a stale cache: the example's prompt, chosen
/// and rejected ids must equal the cached ids exactly.
pub fn attach(example: &mut Example, cached: &CachedPair, shard: &Path) -> Result<(), CacheError> {
    let mismatch = |what: &'static str, detail: String| CacheError::Mismatch {
        shard: shard.to_owned(),
        row: example.row,
        what,
        detail,
    };
    if example.row != cached.row {
        return Err(mismatch(
            "row",
            format!(
                "the example is row {}, the cached pair row {}",
                example.row, cached.row
            ),
        ));
    }
    for (what, have, want) in [
        ("prompt", &example.prompt_ids, &cached.prompt_ids),
        ("chosen", &example.chosen_ids, &cached.chosen_ids),
        ("rejected", &example.rejected_ids, &cached.rejected_ids),
    ] {
        if let Some(detail) = first_difference(have, want) {
            return Err(mismatch(what, detail));
        }
    }
    if cached.chosen_logps.len() != cached.chosen_ids.len()
        || cached.rejected_logps.len() != cached.rejected_ids.len()
    {
        return Err(mismatch(
            "log-prob",
            "the cached log-probs do not align with the cached ids".into(),
        ));
    }
    example.reference = Some(RefLogps {
        chosen: cached.chosen_logps.clone(),
        rejected: cached.rejected_logps.clone(),
    });
    Ok(())
}

fn first_difference(have: &[u32], cached: &[u32]) -> Option<String> {
    if let Some(i) = have.iter().zip(cached).position(|(a, b)| a != b) {
        return Some(format!(
            "first difference at position {i}: built {} vs cached {}; {} vs {} tokens",
            have[i],
            cached[i],
            have.len(),
            cached.len()
        ));
    }
    (have.len() != cached.len()).then(|| {
        format!(
            "built {} tokens vs cached {}, equal up to position {}",
            have.len(),
            cached.len(),
            have.len().min(cached.len())
        )
    })
}

/// `ddpo precompute`: computes the cache files missing among `data.train` + `data.eval`. The reference model
/// is loaded once, and only when something is missing.
pub fn precompute(cfg: &Config, device: tch::Device) -> Result<PrecomputeReport, CacheError> {
    let start = Instant::now();
    let cache = RefCache::open_for_device(cfg, device)?;
    let shards = job_shards(cfg)?;
    cache.remove_stale_temp_files(STALE_TEMP_AGE);
    let missing = cache.missing_shards(&shards)?;
    tracing::info!(
        dir = %cache.dir().display(),
        shards = shards.len(),
        cached = shards.len() - missing.len(),
        missing = missing.len(),
        "reference cache"
    );
    let mut report = PrecomputeReport {
        dir: cache.dir().to_owned(),
        fingerprint: cache.fingerprint().to_owned(),
        shards_total: shards.len(),
        shards_cached: shards.len() - missing.len(),
        shards_computed: 0,
        model_loaded: false,
        rows_written: 0,
        rows_skipped: 0,
        seconds: 0.0,
        computed: Vec::new(),
    };
    if missing.is_empty() {
        cache.write_manifest()?;
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    }
    let path = cfg.reference_path();
    let kind = reference_kind(cfg, device);
    tracing::info!(model = %path.display(), dtype = kind_name(kind), ?device, "loading the reference model");
    let (_vs, model) = Llava::load(path, device, kind).map_err(|e| CacheError::Model {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    report.model_loaded = true;
    let pre = Preprocessor::from_model_dir(
        path,
        &cfg.data.template,
        cfg.data.max_length,
        cfg.data.pad_to_square,
        cfg.ddpo.min_match,
    )?;
    let opts = ComputeOptions::from_config(cfg, device);
    let n = missing.len();
    for (i, shard) in missing.iter().enumerate() {
        tracing::info!(shard = %shard.display(), "shard {}/{n}", i + 1);
        let r = cache.compute_shard(&model, &pre, shard, &opts)?;
        tracing::info!(
            shard = %shard.display(),
            rows = r.rows_written,
            skipped = r.rows_skipped,
            seconds = format!("{:.1}", r.seconds),
            pairs_per_sec = format!("{:.1}", r.rows_written as f64 / r.seconds.max(1e-9)),
            "shard {}/{n} cached",
            i + 1
        );
        report.rows_written += r.rows_written;
        report.rows_skipped += r.rows_skipped;
        report.shards_computed += 1;
        report.computed.push(r);
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The job's shards: `data.train` then `data.eval`, each discovered, de-duplicated.
fn job_shards(cfg: &Config) -> Result<Vec<PathBuf>, CacheError> {
    let mut shards = crate::data::shards::discover(&cfg.data.train)?;
    if !cfg.data.eval.is_empty() {
        for s in crate::data::shards::discover(&cfg.data.eval)? {
            if !shards.contains(&s) {
                shards.push(s);
            }
        }
    }
    Ok(shards)
}

/// Cache file names for shards whose stems collide: `<stem>-<8 hex of the absolute path>.parquet`.
fn colliding_names(shards: &[PathBuf]) -> HashMap<PathBuf, String> {
    let mut by_stem: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for s in shards {
        let abs = absolute(s);
        let v = by_stem.entry(stem(s)).or_default();
        if !v.contains(&abs) {
            v.push(abs);
        }
    }
    let mut out = HashMap::new();
    for (stem, paths) in by_stem {
        if paths.len() < 2 {
            continue;
        }
        for p in paths {
            let h = hex(&Sha256::digest(p.to_string_lossy().as_bytes()));
            let name = format!("{stem}-{}.parquet", &h[..8]);
            tracing::warn!(shard = %p.display(), file = %name, "shards share the stem {stem:?}; cache file renamed");
            out.insert(p, name);
        }
    }
    out
}

fn absolute(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shard".into())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn first_difference_names_position_and_lengths() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        let d = first_difference(&[1, 2, 4], &[1, 2, 3]).unwrap();
        assert!(
            d.contains("position 2") && d.contains("built 4 vs cached 3"),
            "{d}"
        );
        let d = first_difference(&[1, 2], &[1, 2, 3]).unwrap();
        assert!(d.contains("built 2 tokens vs cached 3"), "{d}");
    }

    /// The memo is consulted for big files: a same-size rewrite with the old mtime restored is not seen
    /// (which is why small files are never memoised), a changed size is.
    #[test]
    fn hash_memo_keys_on_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.bin");
        fs::write(&f, b"aaaa").unwrap();
        let mut memo = HashMemo::load(dir.path());
        memo.min_bytes = 1;
        let h1 = memo.hash(&f).unwrap();
        assert_eq!(h1, sha256_file(&f).unwrap());
        memo.save();
        assert!(dir.path().join(HASH_MEMO).exists());
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        fs::write(&f, b"bbbb").unwrap();
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let mut again = HashMemo::load(dir.path());
        again.min_bytes = 1;
        assert_eq!(again.hash(&f).unwrap(), h1, "memo hit after reload");
        fs::write(&f, b"bbbbb").unwrap();
        assert_eq!(again.hash(&f).unwrap(), sha256_file(&f).unwrap());
        assert_ne!(again.hash(&f).unwrap(), h1);
        // Small files are never memoised.
        let mut fresh = HashMemo::load(dir.path());
        fs::write(&f, b"cccc").unwrap();
        assert_eq!(fresh.hash(&f).unwrap(), sha256_file(&f).unwrap());
    }

    #[test]
    fn colliding_stems_get_distinct_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("train/x.parquet");
        let b = dir.path().join("eval/x.parquet");
        let c = dir.path().join("eval/y.parquet");
        for p in [&a, &b, &c] {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        let names = colliding_names(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(names.len(), 2);
        let (na, nb) = (&names[&absolute(&a)], &names[&absolute(&b)]);
        assert!(na.starts_with("x-") && nb.starts_with("x-") && na != nb);
        assert!(!names.contains_key(&absolute(&c)));
    }
}
