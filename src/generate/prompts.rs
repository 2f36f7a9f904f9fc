//! Where prompts come from: the questions and images of preference shards, or a JSON-lines prompts file; each
//! encoded as training encodes a prompt.

use std::path::{Path, PathBuf};

use super::GenerateError;
use crate::data::pipeline::{Preprocessor, RowReason};
use crate::data::reader::ShardReader;
use crate::data::{shards, DataError, RowError};

/// One prompt as given: an id, the question and the encoded image file, and the ids a benchmark's prompts
/// file gave it (kept for answers in that benchmark's format).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub question: String,
    pub image: Vec<u8>,
    pub image_id: Option<serde_json::Value>,
    pub question_id: Option<serde_json::Value>,
}

/// A prompt ready for the model.
#[derive(Debug, Clone)]
pub(super) struct Encoded {
    pub prompt: Prompt,
    pub prompt_ids: Vec<u32>,
    pub pixel_values: Vec<f32>,
}

/// The prompts of a run.
pub enum PromptSource {
    Shards(Vec<PathBuf>),
    /// Parsed lines of a prompts file.
    File(Vec<FileLine>),
}

/// One prompt of a prompts file: the file and line (1-based) it came from, its id, question and image.
pub struct FileLine {
    file: PathBuf,
    line: u64,
    id: String,
    question: String,
    image: ImageRef,
    image_id: Option<serde_json::Value>,
    question_id: Option<serde_json::Value>,
}

/// An image file to read when its prompt comes up, or the bytes a prompts file carried inline.
enum ImageRef {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// A prompt that could not be used (logged and counted; the run goes on).
#[derive(Debug, thiserror::Error)]
enum Skipped {
    #[error(transparent)]
    Row(#[from] RowError),
    /// A whole shard (unreadable footer, unknown layout).
    #[error(transparent)]
    Shard(#[from] DataError),
}

/// A prompts-file line: ddpo's own (`image` path, `question`, `id`) or a benchmark's as the RLHF-V evaluation
/// files have them (`question` or `prompt`; `image` as base64 bytes or `image_path`; `image_id`,
/// `question_id`). Other keys are ignored.
#[derive(serde::Deserialize)]
struct Line {
    #[serde(alias = "prompt")]
    question: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    image_path: Option<PathBuf>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    image_id: Option<serde_json::Value>,
    #[serde(default)]
    question_id: Option<serde_json::Value>,
}

/// A JSON id as text (`"12"` and `12` alike).
fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Why a prompts-file line has no usable image.
#[derive(Debug, thiserror::Error)]
enum ImageRefError {
    #[error("no `image` or `image_path`")]
    Missing,
    #[error("image {}: no such file", .0.display())]
    NoFile(PathBuf),
    #[error("`image` is neither a file nor base64 image data: {0}")]
    NotBase64(base64::DecodeError),
}

impl Line {
    /// The image: a path (relative to the prompts file's folder) when one exists, else base64 image data.
    fn image_ref(&self, dir: &Path) -> Result<ImageRef, ImageRefError> {
        use base64::Engine as _;
        if let Some(p) = &self.image_path {
            return Ok(ImageRef::Path(dir.join(p)));
        }
        let Some(image) = &self.image else {
            return Err(ImageRefError::Missing);
        };
        let path = dir.join(image);
        if image.len() < 4096 && path.exists() {
            return Ok(ImageRef::Path(path));
        }
        match base64::engine::general_purpose::STANDARD.decode(image.trim()) {
            Ok(bytes) => Ok(ImageRef::Bytes(bytes)),
            Err(_) if image.len() < 4096 => Err(ImageRefError::NoFile(path)),
            Err(e) => Err(ImageRefError::NotBase64(e)),
        }
    }
}

impl PromptSource {
    pub fn shards(patterns: &[String]) -> Result<Self, GenerateError> {
        Ok(Self::Shards(shards::discover(patterns)?))
    }

    /// Reads and checks every line of a prompts file up front (an error names the line).
    pub fn file(path: &Path) -> Result<Self, GenerateError> {
        let err = |line: usize, reason: String| GenerateError::Prompts {
            path: path.to_owned(),
            line,
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(0, e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(raw).map_err(|e| err(i + 1, e.to_string()))?;
            let image = l.image_ref(dir).map_err(|e| err(i + 1, e.to_string()))?;
            let id = [&l.id, &l.image_id, &l.question_id]
                .into_iter()
                .flatten()
                .next()
                .map_or_else(|| i.to_string(), id_text);
            out.push(FileLine {
                file: path.to_owned(),
                line: i as u64 + 1,
                id,
                question: l.question,
                image,
                image_id: l.image_id,
                question_id: l.question_id,
            });
        }
        if out.is_empty() {
            return Err(err(0, "no prompts".into()));
        }
        Ok(Self::File(out))
    }

    pub(super) fn encoded<'a>(&'a self, pre: &'a Preprocessor) -> Encoder<'a> {
        Encoder {
            source: self,
            pre,
            next: 0,
            reader: None,
        }
    }
}

/// Walks a source, encoding prompts and skipping (with a warning that names file and row) those that fail.
pub(super) struct Encoder<'a> {
    source: &'a PromptSource,
    pre: &'a Preprocessor,
    /// The next shard or file line.
    next: usize,
    reader: Option<(PathBuf, ShardReader)>,
}

impl Encoder<'_> {
    /// Up to `n` encoded prompts (empty at the end); counts the skipped ones.
    pub fn next_batch(&mut self, n: usize, skipped: &mut usize) -> Vec<Encoded> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            let Some(item) = self.next_raw() else { break };
            let encoded = item.and_then(|(p, file, row)| {
                self.encode(p).map_err(|e| {
                    Skipped::Row(RowError {
                        shard: file,
                        row,
                        reason: e.to_string(),
                    })
                })
            });
            match encoded {
                Ok(e) => batch.push(e),
                Err(why) => {
                    *skipped += 1;
                    tracing::warn!("skipped: {why}");
                }
            }
        }
        batch
    }

    /// The next prompt with the file and row it came from, or why it could not be read.
    fn next_raw(&mut self) -> Option<Result<(Prompt, PathBuf, u64), Skipped>> {
        match self.source {
            PromptSource::File(lines) => {
                let l = lines.get(self.next)?;
                self.next += 1;
                let image = match &l.image {
                    ImageRef::Bytes(b) => Ok(b.clone()),
                    ImageRef::Path(p) => std::fs::read(p).map_err(|e| {
                        Skipped::Row(RowError {
                            shard: l.file.clone(),
                            row: l.line,
                            reason: format!("image {}: {e}", p.display()),
                        })
                    }),
                };
                Some(image.map(|image| {
                    let p = Prompt {
                        id: l.id.clone(),
                        question: l.question.clone(),
                        image,
                        image_id: l.image_id.clone(),
                        question_id: l.question_id.clone(),
                    };
                    (p, l.file.clone(), l.line)
                }))
            }
            PromptSource::Shards(files) => loop {
                if let Some((path, reader)) = self.reader.as_mut() {
                    if let Some(row) = reader.next() {
                        return Some(row.map_err(Skipped::from).map(|r| {
                            let p = Prompt {
                                id: r.id,
                                question: r.question,
                                image: r.image,
                                image_id: None,
                                question_id: None,
                            };
                            (p, path.clone(), r.row)
                        }));
                    }
                }
                let path = files.get(self.next)?.clone();
                self.next += 1;
                match ShardReader::open(&path, 64) {
                    Ok(r) => self.reader = Some((path, r)),
                    Err(e) => return Some(Err(Skipped::from(e))),
                }
            },
        }
    }

    fn encode(&self, prompt: Prompt) -> Result<Encoded, RowReason> {
        let prompt_ids = self.pre.text.encode_prompt(&prompt.question)?;
        let pixel_values = self.pre.image.process_bytes(&prompt.image)?;
        Ok(Encoded {
            prompt,
            prompt_ids,
            pixel_values,
        })
    }
}
