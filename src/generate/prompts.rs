//! Where prompts come from: the questions and images of preference shards, or a JSON-lines prompts file; each
//! encoded as training encodes a prompt.

use std::path::{Path, PathBuf};

use super::GenerateError;
use crate::data::pipeline::{Preprocessor, RowReason};
use crate::data::reader::ShardReader;
use crate::data::{shards, DataError, RowError};

/// One prompt as given: an id, the question and the encoded image file.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub question: String,
    pub image: Vec<u8>,
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

/// One prompt of a prompts file: the file and line (1-based) it came from, its id, question and image path.
pub struct FileLine {
    file: PathBuf,
    line: u64,
    id: String,
    question: String,
    image: PathBuf,
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: PathBuf,
    question: String,
    #[serde(default)]
    id: Option<String>,
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
            out.push(FileLine {
                file: path.to_owned(),
                line: i as u64 + 1,
                id: l.id.unwrap_or_else(|| i.to_string()),
                question: l.question,
                image: dir.join(l.image),
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
                Some(match std::fs::read(&l.image) {
                    Ok(image) => {
                        let (id, question) = (l.id.clone(), l.question.clone());
                        let p = Prompt {
                            id,
                            question,
                            image,
                        };
                        Ok((p, l.file.clone(), l.line))
                    }
                    Err(e) => Err(Skipped::Row(RowError {
                        shard: l.file.clone(),
                        row: l.line,
                        reason: format!("image {}: {e}", l.image.display()),
                    })),
                })
            }
            PromptSource::Shards(files) => loop {
                if let Some((path, reader)) = self.reader.as_mut() {
                    if let Some(row) = reader.next() {
                        return Some(row.map_err(Skipped::from).map(|r| {
                            let p = Prompt {
                                id: r.id,
                                question: r.question,
                                image: r.image,
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
