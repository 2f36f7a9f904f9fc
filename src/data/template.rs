//! Chat templates and tokenization of one preference pair into prompt and response token ids.
//!
//! Invariants:
//! - `prompt_ids` holds the image placeholder expanded to `num_image_tokens` copies of the image token id,
//!   exactly where the llava-hf processor puts them (it expands the `<image>` text; expanding the single id
//!   after tokenization gives the same ids because `<image>` is a special token that splits the text).
//! - Response ids are the answer's tokens (no BOS) followed by EOS; tokenizing the answer alone gives the
//!   same ids as tokenizing it after the prompt, because the prompt ends with `ASSISTANT:` and the answer
//!   starts a new `▁word`.
//! - The prompt is never cut: a pair whose prompt leaves no room for a response is a row error. Responses
//!   that do not fit are cut at the end (EOS included) and the pair is counted as truncated.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::Tokenizer;

use super::tokenizer::{EOS, IMAGE};

/// Why a tokenizer cannot serve a model, or why one pair's text cannot be encoded (a row-level reason).
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a tokenizer: {reason}", path.display())]
    NotTokenizer { path: PathBuf, reason: String },
    #[error("the tokenizer has no {0} token")]
    MissingToken(&'static str),
    #[error(
        "the tokenizer's {IMAGE} id is {tokenizer} but the model's image_token_index is {model}"
    )]
    ImageIdMismatch { tokenizer: u32, model: u32 },
    /// The tokenizer library refused the text (`what` is "the prompt" or "a response").
    #[error("cannot tokenize {what}: {reason}")]
    Tokenize { what: &'static str, reason: String },
    #[error("a response contains the {IMAGE} token")]
    ImageInResponse,
    #[error(
        "the prompt is {prompt_len} tokens ({visual} of them visual) and leaves no room for a response \
         within data.max_length = {max_length}"
    )]
    NoRoom {
        prompt_len: usize,
        visual: usize,
        max_length: usize,
    },
}

/// Conversation formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// LLaVA-1.5 training format (`conv_llava_v1`): system line, `USER: <image>\n{q} ASSISTANT:`.
    LlavaV1,
    /// The llava-hf model cards' format: `USER: <image>\n{q} ASSISTANT:` with no system line.
    LlavaHf,
}

const LLAVA_SYSTEM: &str =
    "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

impl Template {
    pub const NAMES: &'static [&'static str] = crate::config::TEMPLATE_NAMES;

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llava_v1" => Some(Self::LlavaV1),
            "llava_hf" => Some(Self::LlavaHf),
            _ => None,
        }
    }

    /// The prompt text with one `<image>` placeholder. A question that already carries `<image>` (some
    /// datasets embed it) has it moved to the front, as LLaVA's preprocessing does.
    pub fn prompt(self, question: &str) -> String {
        let q = question.replace(IMAGE, "");
        let q = q.trim();
        let turn = format!("USER: {IMAGE}\n{q} ASSISTANT:");
        match self {
            Self::LlavaV1 => format!("{LLAVA_SYSTEM} {turn}"),
            Self::LlavaHf => turn,
        }
    }
}

/// Token ids of one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub prompt_ids: Vec<u32>,
    /// Chosen answer + EOS (possibly truncated).
    pub chosen_ids: Vec<u32>,
    /// Rejected answer + EOS (possibly truncated).
    pub rejected_ids: Vec<u32>,
    /// Whether either response was cut to fit `max_length`.
    pub truncated: bool,
}

/// Turns question and answers into token ids for one model's tokenizer and vision tower.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    template: Template,
    image_token_id: u32,
    eos_id: u32,
    num_image_tokens: usize,
    max_length: usize,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("template", &self.template)
            .field("image_token_id", &self.image_token_id)
            .field("num_image_tokens", &self.num_image_tokens)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl TextEncoder {
    /// `image_token_id` comes from the model config (`image_token_index`) and must be the tokenizer's
    /// `<image>` id: a mismatch would feed text embeddings where image features belong.
    pub fn new(
        tokenizer: Tokenizer,
        template: Template,
        image_token_id: u32,
        num_image_tokens: usize,
        max_length: usize,
    ) -> Result<Self, TextError> {
        let tok_image = tokenizer
            .token_to_id(IMAGE)
            .ok_or(TextError::MissingToken(IMAGE))?;
        if tok_image != image_token_id {
            return Err(TextError::ImageIdMismatch {
                tokenizer: tok_image,
                model: image_token_id,
            });
        }
        let eos_id = tokenizer
            .token_to_id(EOS)
            .ok_or(TextError::MissingToken(EOS))?;
        Ok(Self {
            tokenizer,
            template,
            image_token_id,
            eos_id,
            num_image_tokens,
            max_length,
        })
    }

    /// Loads `tokenizer.json` from a model directory.
    pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer, TextError> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|source| TextError::Read {
            path: path.clone(),
            source,
        })?;
        Tokenizer::from_str(&text).map_err(|e| TextError::NotTokenizer {
            path,
            reason: e.to_string(),
        })
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Prompt ids with the image placeholder expanded.
    pub fn encode_prompt(&self, question: &str) -> Result<Vec<u32>, TextError> {
        let text = self.template.prompt(question);
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| TextError::Tokenize {
                what: "the prompt",
                reason: e.to_string(),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + self.num_image_tokens);
        for &id in enc.get_ids() {
            if id == self.image_token_id {
                ids.extend(std::iter::repeat_n(id, self.num_image_tokens));
            } else {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Answer ids + EOS.
    pub fn encode_response(&self, answer: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tokenizer
            .encode(answer.trim(), false)
            .map_err(|e| TextError::Tokenize {
                what: "a response",
                reason: e.to_string(),
            })?;
        if enc.get_ids().contains(&self.image_token_id) {
            return Err(TextError::ImageInResponse);
        }
        let mut ids = enc.get_ids().to_vec();
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// A generated answer's text: its ids without EOS, decoded with special tokens skipped.
    pub fn decode_answer(&self, ids: &[i64]) -> Result<String, TextError> {
        let eos = i64::from(self.eos_id);
        let ids: Vec<u32> = ids
            .iter()
            .filter(|&&t| t != eos)
            .map(|&t| t as u32)
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| TextError::Tokenize {
                what: "an answer (decoding)",
                reason: e.to_string(),
            })
    }

    /// Response tokens that fit after a prompt of `prompt_len` tokens; an error if none do.
    pub fn response_room(&self, prompt_len: usize) -> Result<usize, TextError> {
        if prompt_len >= self.max_length {
            return Err(TextError::NoRoom {
                prompt_len,
                visual: self.num_image_tokens,
                max_length: self.max_length,
            });
        }
        Ok(self.max_length - prompt_len)
    }

    /// Encodes a pair; the error is the row-level reason.
    pub fn encode(
        &self,
        question: &str,
        chosen: &str,
        rejected: &str,
    ) -> Result<EncodedPair, TextError> {
        let prompt_ids = self.encode_prompt(question)?;
        let mut chosen_ids = self.encode_response(chosen)?;
        let mut rejected_ids = self.encode_response(rejected)?;
        let room = self.response_room(prompt_ids.len())?;
        let truncated = chosen_ids.len() > room || rejected_ids.len() > room;
        chosen_ids.truncate(room);
        rejected_ids.truncate(room);
        Ok(EncodedPair {
            prompt_ids,
            chosen_ids,
            rejected_ids,
            truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::llama_style_tokenizer_json;

    fn encoder(max_length: usize) -> TextEncoder {
        let tok = Tokenizer::from_str(
            &llama_style_tokenizer_json(&["What", "is", "here", "A", "red", "circle", "blue"])
                .to_string(),
        )
        .unwrap();
        let img = tok.token_to_id(IMAGE).unwrap();
        TextEncoder::new(tok, Template::LlavaHf, img, 5, max_length).unwrap()
    }

    #[test]
    fn prompt_expands_image_and_matches_joint_tokenization() {
        let e = encoder(64);
        let p = e.encode_prompt("What is here?").unwrap();
        let img = e.image_token_id();
        assert_eq!(p.iter().filter(|&&i| i == img).count(), 5);
        assert_eq!(p[0], 1, "BOS first");
        // Joint tokenization of prompt + " " + answer gives prompt ids (with one <image>) then the answer's.
        let r = e.encode_response("A red circle.").unwrap();
        assert_eq!(*r.last().unwrap(), e.eos_id());
        let joint = e
            .tokenizer()
            .encode(
                format!(
                    "{} A red circle.",
                    Template::LlavaHf.prompt("What is here?")
                )
                .as_str(),
                true,
            )
            .unwrap();
        let prompt_one_image = e
            .tokenizer()
            .encode(Template::LlavaHf.prompt("What is here?").as_str(), true)
            .unwrap();
        let n = prompt_one_image.len();
        assert_eq!(&joint.get_ids()[..n], prompt_one_image.get_ids());
        assert_eq!(&joint.get_ids()[n..], &r[..r.len() - 1]);
    }

    #[test]
    fn question_with_embedded_image_token_gets_one_image() {
        assert_eq!(
            Template::LlavaHf.prompt("<image>\nWhat is here?"),
            Template::LlavaHf.prompt("What is here?")
        );
        assert!(Template::LlavaV1.prompt("q").starts_with("A chat between"));
    }

    #[test]
    fn truncation_cuts_responses_never_the_prompt() {
        let e = encoder(64);
        let p = e.encode_prompt("What is here?").unwrap().len();
        let e = encoder(p + 3);
        let x = e
            .encode("What is here?", "A red circle is here.", "A blue circle.")
            .unwrap();
        assert!(x.truncated);
        assert_eq!(x.chosen_ids.len(), 3);
        assert_eq!(x.rejected_ids.len(), 3);
        let e = encoder(p);
        let err = e.encode("What is here?", "A", "B").unwrap_err();
        assert!(matches!(err, TextError::NoRoom { .. }), "{err}");
        assert!(err.to_string().contains("data.max_length"), "{err}");
    }

    #[test]
    fn mismatched_image_token_is_refused() {
        let tok = Tokenizer::from_str(&llama_style_tokenizer_json(&["a"]).to_string()).unwrap();
        let err = TextEncoder::new(tok, Template::LlavaV1, 7, 5, 64).unwrap_err();
        assert!(err.to_string().contains("image_token_index is 7"), "{err}");
    }
}
