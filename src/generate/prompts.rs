//! Where prompts come from: the questions and images of preference shards, or a JSON-lines prompts file; each
//! encoded as training encodes a prompt.

use std::path::{Path, PathBuf};

use super::GenerateError;
use crate::data::pipeline::Preprocessor;
use crate::data::reader::ShardReader;
use crate::data::shards;

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
    /// Parsed lines of a prompts file: where each came from (for errors), its id, question and image path.
    File(Vec<(String, String, String, PathBuf)>),
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
            let where_ = format!("{}:{}", path.display(), i + 1);
            out.push((
                where_,
                l.id.unwrap_or_else(|| i.to_string()),
                l.question,
                dir.join(l.image),
            ));
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
            match item.and_then(|(p, at)| self.encode(p).map_err(|e| format!("{at}: {e}"))) {
                Ok(e) => batch.push(e),
                Err(why) => {
                    *skipped += 1;
                    tracing::warn!("skipped: {why}");
                }
            }
        }
        batch
    }

    /// The next prompt with where it came from, or why it could not be read.
    fn next_raw(&mut self) -> Option<Result<(Prompt, String), String>> {
        match self.source {
            PromptSource::File(lines) => {
                let (at, id, question, image) = lines.get(self.next)?;
                self.next += 1;
                Some(match std::fs::read(image) {
                    Ok(bytes) => Ok((
                        Prompt {
                            id: id.clone(),
                            question: question.clone(),
                            image: bytes,
                        },
                        at.clone(),
                    )),
                    Err(e) => Err(format!("{at}: {}: {e}", image.display())),
                })
            }
            PromptSource::Shards(files) => loop {
                if let Some((path, reader)) = self.reader.as_mut() {
                    if let Some(row) = reader.next() {
                        return Some(match row {
                            Ok(r) => {
                                let at = format!("{}: row {}", path.display(), r.row);
                                Ok((
                                    Prompt {
                                        id: r.id,
                                        question: r.question,
                                        image: r.image,
                                    },
                                    at,
                                ))
                            }
                            Err(e) => Err(e.to_string()),
                        });
                    }
                }
                let path = files.get(self.next)?.clone();
                self.next += 1;
                match ShardReader::open(&path, 64) {
                    Ok(r) => self.reader = Some((path, r)),
                    Err(e) => return Some(Err(e.to_string())),
                }
            },
        }
    }

    fn encode(&self, prompt: Prompt) -> Result<Encoded, String> {
        let prompt_ids = self
            .pre
            .text
            .encode_prompt(&prompt.question)
            .map_err(|e| e.to_string())?;
        let pixel_values = self
            .pre
            .image
            .process_bytes(&prompt.image)
            .map_err(|e| format!("image: {e}"))?;
        Ok(Encoded {
            prompt,
            prompt_ids,
            pixel_values,
        })
    }
}
