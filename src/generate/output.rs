//! The answers file: one parquet row per (prompt, sample) with the prompt's id, question and image (as HF
//! datasets stores images), the sample number, the response text, its token ids and whether it ended with EOS.
//! Or, for an output path ending in `.jsonl`, one JSON line per answer in the format the RLHF-V evaluation
//! scripts read (Object HalBench's `eval_gpt_obj_halbench.py`, MMHal-Bench's `eval_gpt_mmhal.py --is_jsonl`):
//! `question_id`, `image_id`, `prompt`, `text`, `model_id`, `sample`. Written under a temporary name and renamed
//! when complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArray, BooleanArray, Int32Array, Int32Builder, ListBuilder,
    RecordBatch, StringArray, StructArray,
};
use std::io::{BufWriter, Write};

use arrow::datatypes::{DataType, Field, Fields, Int32Type, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

use super::prompts::Encoded;
use super::GenerateError;
use crate::data::pipeline::Preprocessor;
use crate::util::fsx;

/// Rows buffered before a record batch is written.
const BATCH_ROWS: usize = 64;

/// One answer read back.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerRow {
    pub id: String,
    pub question: String,
    pub image: Vec<u8>,
    pub sample: i32,
    pub response: String,
    pub response_ids: Vec<i32>,
    /// The answer ended with EOS (false: `max_new_tokens` cut it).
    pub finished: bool,
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}

fn schema() -> SchemaRef {
    let ids = DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
    Arc::new(Schema::new(vec![
        Field::new("idx", DataType::Utf8, false),
        Field::new("question", DataType::Utf8, false),
        Field::new("image", DataType::Struct(image_fields()), true),
        Field::new("sample", DataType::Int32, false),
        Field::new("response", DataType::Utf8, false),
        Field::new("response_ids", ids, false),
        Field::new("finished", DataType::Boolean, false),
    ]))
}

pub(super) struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    sink: Option<Sink>,
    rows: Vec<AnswerRow>,
    /// Named in every JSON line (`model_id`).
    model_id: String,
    /// Prompts written so far: a JSON line's `question_id` when its prompt has none.
    prompts: u64,
}

/// The open temporary file, by format.
enum Sink {
    Parquet(Box<ArrowWriter<File>>),
    Jsonl(BufWriter<File>),
}

impl Writer {
    /// Starts `path` (under a temporary name until [`Writer::finish`]): JSON lines when it ends in `.jsonl`,
    /// parquet otherwise.
    pub fn create(path: &Path, model_id: &str) -> Result<Self, GenerateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| out_err(path, e))?;
        }
        let tmp = fsx::temp_sibling(path);
        let file = File::create(&tmp).map_err(|e| out_err(&tmp, e))?;
        let sink = if path.extension().is_some_and(|e| e == "jsonl") {
            Sink::Jsonl(BufWriter::new(file))
        } else {
            Sink::Parquet(Box::new(
                ArrowWriter::try_new(file, schema(), None).map_err(|e| out_err(&tmp, e))?,
            ))
        };
        Ok(Self {
            path: path.to_owned(),
            tmp,
            sink: Some(sink),
            rows: Vec::new(),
            model_id: model_id.to_owned(),
            prompts: 0,
        })
    }

    /// Adds sample `k` of prompt `p`: `ids` are the generated tokens (EOS last when it finished).
    pub fn push(
        &mut self,
        p: &Encoded,
        k: usize,
        ids: &[i64],
        pre: &Preprocessor,
    ) -> Result<(), GenerateError> {
        let finished = ids.last() == Some(&i64::from(pre.text.eos_id()));
        let response = pre
            .text
            .decode_answer(ids)
            .map_err(|e| out_err(&self.path, e))?;
        if k == 0 {
            self.prompts += 1;
        }
        if let Some(Sink::Jsonl(w)) = self.sink.as_mut() {
            let line = serde_json::json!({
                "question_id": p.prompt.question_id.clone().unwrap_or((self.prompts - 1).into()),
                "image_id": p.prompt.image_id.clone().unwrap_or(p.prompt.id.clone().into()),
                "prompt": p.prompt.question,
                "text": response,
                "model_id": self.model_id,
                "sample": k,
            });
            return writeln!(w, "{line}").map_err(|e| out_err(&self.tmp, e));
        }
        self.push_row(AnswerRow {
            id: p.prompt.id.clone(),
            question: p.prompt.question.clone(),
            image: p.prompt.image.clone(),
            sample: k as i32,
            response,
            response_ids: ids.iter().map(|&t| t as i32).collect(),
            finished,
        })
    }

    fn push_row(&mut self, row: AnswerRow) -> Result<(), GenerateError> {
        self.rows.push(row);
        if self.rows.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), GenerateError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.rows).map_err(|e| out_err(&self.tmp, e))?;
        if let Some(Sink::Parquet(w)) = self.sink.as_mut() {
            w.write(&batch).map_err(|e| out_err(&self.tmp, e))?;
        }
        self.rows.clear();
        Ok(())
    }

    /// Writes what is buffered, closes the file and renames it into place.
    pub fn finish(mut self) -> Result<(), GenerateError> {
        self.flush()?;
        let file = match self.sink.take().expect("open until finish") {
            Sink::Parquet(w) => w.into_inner().map_err(|e| out_err(&self.tmp, e))?,
            Sink::Jsonl(w) => w.into_inner().map_err(|e| out_err(&self.tmp, e.error()))?,
        };
        file.sync_all().map_err(|e| out_err(&self.tmp, e))?;
        fsx::commit(&self.tmp, &self.path).map_err(|e| out_err(&self.path, e))
    }
}

impl Drop for Writer {
    /// An unfinished file is removed: the output is complete or absent.
    fn drop(&mut self) {
        if self.sink.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn out_err(path: &Path, e: impl std::fmt::Display) -> GenerateError {
    GenerateError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn to_batch(rows: &[AnswerRow]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let image = StructArray::try_new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.image))) as ArrayRef,
            Arc::new(StringArray::from(vec![None::<&str>; rows.len()])) as ArrayRef,
        ],
        None,
    )?;
    let mut ids = ListBuilder::new(Int32Builder::new());
    for r in rows {
        ids.values().append_slice(&r.response_ids);
        ids.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.id))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &r.question),
        )),
        Arc::new(image),
        Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.sample))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &r.response),
        )),
        Arc::new(ids.finish()),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.finished)),
        )),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Writes answers made elsewhere (another tool's, or reference texts) as an answers file, e.g. for
/// `ddpo evaluate --responses`.
pub fn write_answers(path: &Path, rows: &[AnswerRow]) -> Result<(), GenerateError> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return Err(out_err(
            path,
            "write_answers writes parquet; name the file .parquet",
        ));
    }
    let mut w = Writer::create(path, "")?;
    for r in rows {
        w.push_row(r.clone())?;
    }
    w.finish()
}

/// Reads an answers file back (tests, evaluation).
pub fn read_answers(path: &Path) -> Result<Vec<AnswerRow>, GenerateError> {
    let err = |e: &dyn std::fmt::Display| out_err(path, e);
    let file = File::open(path).map_err(|e| err(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| err(&e))?;
        if b.schema().fields() != schema().fields() {
            return Err(err(&"not a `ddpo generate` answers file (other columns)"));
        }
        let s = |i: usize| b.column(i).as_string::<i32>().clone();
        let (ids, questions, responses) = (s(0), s(1), s(4));
        let images = b.column(2).as_struct().column(0).as_binary::<i32>().clone();
        let samples = b.column(3).as_primitive::<Int32Type>().clone();
        let tokens = b.column(5).as_list::<i32>().clone();
        let finished = b.column(6).as_boolean().clone();
        for r in 0..b.num_rows() {
            let t = tokens.value(r);
            out.push(AnswerRow {
                id: ids.value(r).to_owned(),
                question: questions.value(r).to_owned(),
                image: images.value(r).to_vec(),
                sample: samples.value(r),
                response: responses.value(r).to_owned(),
                response_ids: t.as_primitive::<Int32Type>().values().to_vec(),
                finished: finished.value(r),
            });
        }
    }
    Ok(out)
}
