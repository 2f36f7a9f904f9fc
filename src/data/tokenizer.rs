//! A LLaMA-style tokenizer built from a word list, for the built-in demo and test models.
//!
//! Real checkpoints bring their own `tokenizer.json`; the presets of `ddpo init-model` need one that covers
//! the synthetic corpus with whole-word tokens, the way SentencePiece covers English. The result has the shape
//! of Hugging Face's LLaMA `tokenizer.json` (BPE with byte fallback, `▁` word prefix via a Metaspace
//! pre-tokenizer with prepend scheme `first`, BOS added by the post-processor, `<image>` and `<pad>` appended
//! as special tokens as llava-hf does), so transformers' `LlamaTokenizerFast` loads it unchanged.
//!
//! Invariant: the same word list always gives byte-identical JSON (ids are assigned in sorted order).

use std::collections::BTreeSet;

use serde_json::{json, Value};

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const IMAGE: &str = "<image>";
pub const PAD: &str = "<pad>";
const SPACE: char = '▁';

/// Words every built-in tokenizer covers besides the caller's: the chat templates' fixed text.
const TEMPLATE_WORDS: &str =
    "A chat between a curious human and an artificial intelligence assistant \
The assistant gives helpful detailed and polite answers to the human's questions USER ASSISTANT";

/// Builds the tokenizer JSON. The base vocabulary is: `<unk>`, `<s>`, `</s>`, the 256 byte-fallback tokens,
/// printable ASCII characters, then `▁`-prefixed words and all their prefixes (BPE reaches a whole word
/// through a chain of merges, each extending the word by one character); then `<image>` and `<pad>`.
pub fn llama_style_tokenizer_json(words: &[&str]) -> Value {
    let mut vocab: Vec<String> = vec![UNK.into(), BOS.into(), EOS.into()];
    vocab.extend((0u32..256).map(|b| format!("<0x{b:02X}>")));
    let mut chars: Vec<String> = (0x21u8..0x7f).map(|c| (c as char).to_string()).collect();
    chars.push(SPACE.to_string());
    vocab.extend(chars.iter().cloned());

    let mut all_words: BTreeSet<String> = BTreeSet::new();
    for w in words
        .iter()
        .copied()
        .chain(TEMPLATE_WORDS.split_whitespace())
    {
        // Words are split at non-alphanumerics: punctuation stays a token of its own, as in the corpus.
        for part in w.split(|c: char| !c.is_ascii_alphanumeric()) {
            if !part.is_empty() {
                all_words.insert(part.to_string());
            }
        }
    }
    // Every prefix of every ▁word, in a fixed order; merges extend the left symbol by one character.
    let mut pieces: BTreeSet<String> = BTreeSet::new();
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut seen_merge: BTreeSet<(String, String)> = BTreeSet::new();
    for w in &all_words {
        let mut prefix = SPACE.to_string();
        for c in w.chars() {
            let next = format!("{prefix}{c}");
            if seen_merge.insert((prefix.clone(), c.to_string())) {
                merges.push((prefix.clone(), c.to_string()));
            }
            pieces.insert(next.clone());
            prefix = next;
        }
    }
    // Shorter merges first: a chain must be applied in order, and shorter-first is a valid order for all.
    merges
        .sort_by(|a, b| (a.0.chars().count(), &a.0, &a.1).cmp(&(b.0.chars().count(), &b.0, &b.1)));
    let mut sorted_pieces: Vec<String> = pieces.into_iter().collect();
    sorted_pieces.sort_by(|a, b| (a.chars().count(), a).cmp(&(b.chars().count(), b)));
    vocab.extend(sorted_pieces);

    let base = vocab.len() as u32;
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, UNK), added(1, BOS), added(2, EOS), added(base, IMAGE), added(base + 1, PAD)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": UNK, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    })
}

/// `tokenizer_config.json` and `special_tokens_map.json` contents that make transformers load the tokenizer
/// as a LLaMA tokenizer with the right special tokens.
pub fn tokenizer_config_json(model_max_length: usize) -> (Value, Value) {
    let config = json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "add_bos_token": true, "add_eos_token": false, "legacy": false,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "extra_special_tokens": {"image_token": IMAGE}
    });
    let special = json!({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
                         "additional_special_tokens": [IMAGE]});
    (config, special)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn tok() -> Tokenizer {
        let j = llama_style_tokenizer_json(&[
            "There", "are", "two", "red", "circles", "on", "the", "left",
        ]);
        Tokenizer::from_str(&j.to_string()).unwrap()
    }

    #[test]
    fn words_are_single_tokens_and_unknown_text_falls_back_to_bytes() {
        let t = tok();
        let e = t
            .encode("There are two red circles on the left.", false)
            .unwrap();
        assert_eq!(
            e.get_tokens(),
            &[
                "▁There",
                "▁are",
                "▁two",
                "▁red",
                "▁circles",
                "▁on",
                "▁the",
                "▁left",
                "."
            ]
        );
        let e = t.encode("é", true).unwrap();
        assert_eq!(e.get_tokens(), &["<s>", "▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(t.decode(e.get_ids(), true).unwrap(), "é");
    }

    #[test]
    fn image_token_splits_and_only_first_segment_gets_a_prefix_space() {
        let t = tok();
        let e = t
            .encode("USER: <image>\nthe left ASSISTANT:", true)
            .unwrap();
        let toks = e.get_tokens();
        assert_eq!(toks[0], BOS);
        assert_eq!(&toks[1..4], &["▁USER", ":", "▁"]);
        assert_eq!(toks[4], IMAGE);
        assert_eq!(toks[5], "<0x0A>");
        assert_eq!(toks[6], "t", "no prefix space after an added token");
        let img = t.token_to_id(IMAGE).unwrap();
        assert_eq!(t.token_to_id(PAD), Some(img + 1));
        assert_eq!(t.get_vocab_size(true) as u32, img + 2);
    }

    #[test]
    fn deterministic() {
        let a = llama_style_tokenizer_json(&["b", "a", "ab"]).to_string();
        let b = llama_style_tokenizer_json(&["ab", "a", "b", "a"]).to_string();
        assert_eq!(a, b);
    }
}
