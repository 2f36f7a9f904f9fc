//! Streaming readers for preference shards (parquet), layouts detected from the columns.
//!
//! Invariants:
//! - Memory is bounded by one record batch of the projected columns (plus parquet's page buffers), never
//!   by the shard: row groups are read one at a time, `batch_rows` rows per batch.
//! - Row numbers are 0-based positions in the shard file, counted across row groups, whatever is skipped.
//! - A bad row yields `Err(RowError)` for that row and reading goes on; a row group that cannot be decoded
//!   at all yields one `RowError` per row of that group (so the count of rows is right) and reading goes on
//!   with the next group. Only a shard whose footer is unreadable fails as a whole, at `open`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StructArray};
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;

use super::{DataError, RowError};

/// Columns that match no layout; names the closest layout and what it still lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "columns [{}] match no known layout; closest is {} which also needs [{}] \
     (RLHF-V: image, text, idx; RLAIF-V: image, question, chosen, rejected, idx)",
    columns.join(", "), closest.name(), missing.join(", ")
)]
pub struct UnknownLayout {
    pub columns: Vec<String>,
    pub closest: Layout,
    pub missing: Vec<&'static str>,
}

/// Why one row's text fields are unusable (a row-level reason).
#[derive(Debug, thiserror::Error)]
enum TextFieldError {
    #[error("`{0}` is null")]
    Null(&'static str),
    #[error("`text` is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`text` JSON has no \"{0}\"")]
    Missing(&'static str),
}

/// The column layouts ddpo reads (docs/formats.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// openbmb/RLHF-V-Dataset: `text` holds JSON {"question","chosen","rejected"}; `idx` int64.
    RlhfV,
    /// openbmb/RLAIF-V-Dataset: `question`, `chosen`, `rejected` columns; `idx` string.
    RlaifV,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::RlhfV => "RLHF-V",
            Layout::RlaifV => "RLAIF-V",
        }
    }

    /// Columns this layout needs (the rest of the file is never read).
    fn columns(self) -> &'static [&'static str] {
        match self {
            Layout::RlhfV => &["image", "text", "idx"],
            Layout::RlaifV => &["image", "question", "chosen", "rejected", "idx"],
        }
    }

    /// Detects the layout from the column names; the error lists what was found and what each layout needs.
    pub fn detect(columns: &[&str]) -> Result<Layout, UnknownLayout> {
        let has = |c: &str| columns.contains(&c);
        let candidates = [Layout::RlaifV, Layout::RlhfV];
        for l in candidates {
            if l.columns().iter().all(|c| has(c)) {
                return Ok(l);
            }
        }
        // Name the closest layout's missing columns: that is almost always the user's problem.
        let best = candidates
            .iter()
            .min_by_key(|l| l.columns().iter().filter(|c| !has(c)).count())
            .expect("non-empty");
        Err(UnknownLayout {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            closest: *best,
            missing: best.columns().iter().copied().filter(|c| !has(c)).collect(),
        })
    }
}

/// One preference pair as stored, before any processing.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPair {
    /// Row number in the shard file (0-based).
    pub row: u64,
    /// The sample's own id (`idx`) as text.
    pub id: String,
    pub question: String,
    pub chosen: String,
    pub rejected: String,
    /// Encoded image file bytes (JPEG, PNG, …).
    pub image: Vec<u8>,
}

/// Streams the rows of one shard.
pub struct ShardReader {
    path: Arc<PathBuf>,
    file: File,
    meta: ArrowReaderMetadata,
    layout: Layout,
    mask: ProjectionMask,
    batch_rows: usize,
    num_rows: u64,
    next_group: usize,
    /// Row number of the first row of the current batch.
    next_row: u64,
    current: Option<ParquetRecordBatchReader>,
    pending: std::vec::IntoIter<Result<RawPair, RowError>>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("num_rows", &self.num_rows)
            .finish()
    }
}

impl ShardReader {
    /// Opens a shard and reads its footer. `batch_rows` bounds the rows decoded at once.
    pub fn open(path: &Path, batch_rows: usize) -> Result<Self, DataError> {
        let shard_err = |reason: String| DataError::Shard {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|e| shard_err(format!("cannot open: {e}")))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| shard_err(format!("not a readable parquet file: {e}")))?;
        let schema = meta.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let layout = Layout::detect(&names).map_err(|e| shard_err(e.to_string()))?;
        // Type checks up front, so a wrong schema is one clear error, not one per row.
        for col in layout.columns() {
            let f = schema.field_with_name(col).expect("detected");
            let ok = match (*col, f.data_type()) {
                ("image", DataType::Struct(fields)) => fields.iter().any(|f| f.name() == "bytes"),
                ("image", DataType::Binary | DataType::LargeBinary | DataType::BinaryView) => true,
                ("image", _) => false,
                (_, t) => is_textlike(t) || (*col == "idx" && t.is_integer()),
            };
            if !ok {
                return Err(shard_err(format!(
                    "column `{col}` has type {}, which the {} layout does not expect",
                    f.data_type(),
                    layout.name()
                )));
            }
        }
        let roots: Vec<usize> = layout
            .columns()
            .iter()
            .map(|c| schema.index_of(c).expect("detected"))
            .collect();
        let mask = ProjectionMask::roots(meta.metadata().file_metadata().schema_descr(), roots);
        let num_rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
        Ok(Self {
            path: Arc::new(path.to_owned()),
            file,
            meta,
            layout,
            mask,
            batch_rows: batch_rows.max(1),
            num_rows,
            next_group: 0,
            next_row: 0,
            current: None,
            pending: Vec::new().into_iter(),
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn num_rows(&self) -> u64 {
        self.num_rows
    }

    pub fn num_row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn row_err(&self, row: u64, reason: impl Into<String>) -> RowError {
        RowError {
            shard: (*self.path).clone(),
            row,
            reason: reason.into(),
        }
    }

    /// Fills `pending` with the next batch's rows; false when the shard is exhausted.
    fn fill(&mut self) -> bool {
        loop {
            if let Some(reader) = self.current.as_mut() {
                match reader.next() {
                    Some(Ok(batch)) => {
                        let first = self.next_row;
                        self.next_row += batch.num_rows() as u64;
                        self.pending = self.convert(&batch, first).into_iter();
                        return true;
                    }
                    Some(Err(e)) => {
                        // The rest of this row group cannot be trusted: report each of its remaining rows.
                        self.current = None;
                        let group_end = self.group_end(self.next_group - 1);
                        let first = self.next_row;
                        self.next_row = group_end;
                        self.pending = self
                            .group_failed(self.next_group - 1, first..group_end, e)
                            .into_iter();
                        if first < group_end {
                            return true;
                        }
                        continue;
                    }
                    None => self.current = None,
                }
            }
            if self.next_group >= self.num_row_groups() {
                return false;
            }
            let g = self.next_group;
            self.next_group += 1;
            self.next_row = self.group_start(g);
            match self.group_reader(g) {
                Ok(r) => self.current = Some(r),
                Err(e) => {
                    let (start, end) = (self.group_start(g), self.group_end(g));
                    self.pending = self.group_failed(g, start..end, e).into_iter();
                    self.next_row = end;
                    if start < end {
                        return true;
                    }
                }
            }
        }
    }

    /// A batch reader over row group `g` alone, projected to the layout's columns.
    fn group_reader(&self, g: usize) -> Result<ParquetRecordBatchReader, ParquetError> {
        let f = self.file.try_clone()?;
        ParquetRecordBatchReaderBuilder::new_with_metadata(f, self.meta.clone())
            .with_projection(self.mask.clone())
            .with_row_groups(vec![g])
            .with_batch_size(self.batch_rows)
            .build()
    }

    /// One error per row of `rows` (in group `g`), for a row group that could not be decoded.
    fn group_failed(
        &self,
        g: usize,
        rows: std::ops::Range<u64>,
        e: impl std::fmt::Display,
    ) -> Vec<Result<RawPair, RowError>> {
        let reason = format!("row group {g} unreadable: {e}");
        rows.map(|r| Err(self.row_err(r, reason.clone()))).collect()
    }

    /// The row group holding `row`, if any.
    pub fn group_of(&self, row: u64) -> Option<usize> {
        let md = self.meta.metadata();
        let mut start = 0u64;
        for g in 0..md.num_row_groups() {
            let end = start + md.row_group(g).num_rows().max(0) as u64;
            if row < end {
                return Some(g);
            }
            start = end;
        }
        None
    }

    /// Reads one whole row group (random access, for shuffled training): each row as a pair or its error.
    pub fn read_group(&self, g: usize) -> Vec<Result<RawPair, RowError>> {
        let (start, end) = (self.group_start(g), self.group_end(g));
        let reader = match self.group_reader(g) {
            Ok(r) => r,
            Err(e) => return self.group_failed(g, start..end, e),
        };
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut next = start;
        for batch in reader {
            match batch {
                Ok(b) => {
                    out.extend(self.convert(&b, next));
                    next += b.num_rows() as u64;
                }
                Err(e) => {
                    out.extend(self.group_failed(g, next..end, e));
                    break;
                }
            }
        }
        out
    }

    fn group_start(&self, g: usize) -> u64 {
        let md = self.meta.metadata();
        (0..g)
            .map(|i| md.row_group(i).num_rows().max(0) as u64)
            .sum()
    }

    fn group_end(&self, g: usize) -> u64 {
        self.group_start(g) + self.meta.metadata().row_group(g).num_rows().max(0) as u64
    }

    fn convert(&self, batch: &RecordBatch, first: u64) -> Vec<Result<RawPair, RowError>> {
        let n = batch.num_rows();
        let col = |name: &str| batch.column_by_name(name).expect("projected").clone();
        let texts = |name: &str| text_column(&col(name));
        let images = image_column(&col("image"));
        let ids = texts("idx");
        let fields: Result<Vec<Vec<Option<String>>>, ArrowError> = match self.layout {
            Layout::RlhfV => texts("text").map(|t| vec![t]),
            Layout::RlaifV => ["question", "chosen", "rejected"]
                .iter()
                .map(|c| texts(c))
                .collect(),
        };
        let (images, ids, fields) = match (images, ids, fields) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (a, b, c) => {
                let reason = [a.err(), b.err(), c.err()]
                    .into_iter()
                    .flatten()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                return (0..n)
                    .map(|i| Err(self.row_err(first + i as u64, reason.clone())))
                    .collect();
            }
        };
        (0..n)
            .map(|i| {
                let row = first + i as u64;
                let parsed = match self.layout {
                    Layout::RlhfV => parse_rlhfv_text(fields[0][i].as_deref()),
                    Layout::RlaifV => Ok((
                        fields[0][i].clone().unwrap_or_default(),
                        fields[1][i].clone(),
                        fields[2][i].clone(),
                    ))
                    .and_then(|(q, c, r)| {
                        let c = c.ok_or(TextFieldError::Null("chosen"))?;
                        let r = r.ok_or(TextFieldError::Null("rejected"))?;
                        Ok((q, c, r))
                    }),
                };
                let (question, chosen, rejected) =
                    parsed.map_err(|e| self.row_err(row, e.to_string()))?;
                let image = images[i]
                    .clone()
                    .ok_or_else(|| self.row_err(row, "image has no bytes"))?;
                if image.is_empty() {
                    return Err(self.row_err(row, "image bytes are empty"));
                }
                if chosen.trim().is_empty() {
                    return Err(self.row_err(row, "empty chosen response"));
                }
                if rejected.trim().is_empty() {
                    return Err(self.row_err(row, "empty rejected response"));
                }
                Ok(RawPair {
                    row,
                    id: ids[i].clone().unwrap_or_else(|| row.to_string()),
                    question,
                    chosen,
                    rejected,
                    image,
                })
            })
            .collect()
    }
}

impl Iterator for ShardReader {
    type Item = Result<RawPair, RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.pending.next() {
                return Some(item);
            }
            if !self.fill() {
                return None;
            }
        }
    }
}

fn is_textlike(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Any string or integer column as optional owned strings.
fn text_column(a: &Arc<dyn Array>) -> Result<Vec<Option<String>>, ArrowError> {
    let a = arrow::compute::cast(a, &DataType::Utf8)?;
    let s = a.as_string::<i32>();
    Ok((0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_owned()))
        .collect())
}

/// The `image` column: struct{bytes, path} as HF datasets writes it, or plain binary.
fn image_column(a: &Arc<dyn Array>) -> Result<Vec<Option<Vec<u8>>>, ArrowError> {
    let (bytes, outer): (Arc<dyn Array>, Option<&StructArray>) = match a.data_type() {
        DataType::Struct(_) => {
            let st = a.as_struct();
            let b = st
                .column_by_name("bytes")
                .ok_or_else(|| ArrowError::SchemaError("image struct has no `bytes` field".into()))?
                .clone();
            (b, Some(st))
        }
        _ => (a.clone(), None),
    };
    let bytes = arrow::compute::cast(&bytes, &DataType::Binary)?;
    let b = bytes.as_binary::<i32>();
    Ok((0..b.len())
        .map(|i| {
            let valid = b.is_valid(i) && outer.is_none_or(|s| s.is_valid(i));
            valid.then(|| b.value(i).to_vec())
        })
        .collect())
}

#[derive(serde::Deserialize)]
struct RlhfVText {
    question: Option<String>,
    chosen: Option<String>,
    rejected: Option<String>,
}

/// RLHF-V's `text` column: JSON {"question","chosen","rejected"}.
fn parse_rlhfv_text(text: Option<&str>) -> Result<(String, String, String), TextFieldError> {
    let text = text.ok_or(TextFieldError::Null("text"))?;
    let t: RlhfVText = serde_json::from_str(text)?;
    let missing = TextFieldError::Missing;
    Ok((
        t.question.ok_or(missing("question"))?,
        t.chosen.ok_or(missing("chosen"))?,
        t.rejected.ok_or(missing("rejected"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_layouts_and_names_missing_columns() {
        let rlhfv = [
            "ds_name",
            "image",
            "text",
            "origin_dataset",
            "origin_split",
            "idx",
            "image_path",
        ];
        assert_eq!(Layout::detect(&rlhfv), Ok(Layout::RlhfV));
        let rlaifv = [
            "ds_name",
            "image",
            "question",
            "chosen",
            "rejected",
            "origin_dataset",
            "origin_split",
            "idx",
            "image_path",
        ];
        assert_eq!(Layout::detect(&rlaifv), Ok(Layout::RlaifV));
        let e = Layout::detect(&["image", "question", "chosen", "idx"]).unwrap_err();
        assert_eq!(
            (e.closest, e.missing.as_slice()),
            (Layout::RlaifV, &["rejected"][..])
        );
        let e = e.to_string();
        assert!(e.contains("RLAIF-V") && e.contains("[rejected]"), "{e}");
    }

    #[test]
    fn rlhfv_text_errors_are_specific() {
        assert!(parse_rlhfv_text(Some("{not json"))
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
        assert!(parse_rlhfv_text(Some(r#"{"question":"q","chosen":"c"}"#))
            .unwrap_err()
            .to_string()
            .contains("no \"rejected\""));
        assert_eq!(
            parse_rlhfv_text(Some(r#"{"question":"q","chosen":"c","rejected":"r"}"#)).unwrap(),
            ("q".into(), "c".into(), "r".into())
        );
    }
}
