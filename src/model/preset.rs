//! Built-in model shapes for demos, tests and benchmarks (`ddpo init-model`): the Hugging Face files of a
//! model directory — config.json, tokenizer (LLaMA-style, covering the synthetic corpus), image-processor
//! config. Random weights are written by the model code (issue: LLaVA model in tch).
//!
//! Invariant: the config's `image_token_index` is the tokenizer's `<image>` id, and `vocab_size` covers
//! every tokenizer id (padded to a multiple of 64, as llava-hf pads 32000 + 2 to 32064).

use std::path::{Path, PathBuf};

use super::config::LlavaConfig;
use crate::data::image::ImageProcessorConfig;
use crate::data::synth;
use crate::data::tokenizer::{llama_style_tokenizer_json, tokenizer_config_json, IMAGE};

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset {0:?}; known: tiny, small")]
    Unknown(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The preset's config with tokenizer-dependent fields filled in, and the tokenizer JSON.
pub fn preset_config(name: &str) -> Result<(LlavaConfig, serde_json::Value), PresetError> {
    let mut cfg = LlavaConfig::preset(name).ok_or_else(|| PresetError::Unknown(name.into()))?;
    let tok = llama_style_tokenizer_json(&synth::vocabulary());
    let image_id = tok["added_tokens"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["content"] == IMAGE))
        .and_then(|t| t["id"].as_u64())
        .expect("the builder adds <image>") as u32;
    cfg.image_token_index = Some(image_id);
    let needed = (image_id as usize + 2).div_ceil(64) * 64;
    cfg.text_config.vocab_size = cfg.text_config.vocab_size.max(needed);
    Ok((cfg, tok))
}

/// Writes the model directory's non-weight files; returns their names.
pub fn write_model_files(out: &Path, name: &str, _seed: u64) -> Result<Vec<String>, PresetError> {
    let (cfg, tok) = preset_config(name)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PresetError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (tok_cfg, special) = tokenizer_config_json(cfg.text_config.max_position_embeddings);
    let processor = ImageProcessorConfig::clip(cfg.vision_config.image_size as u32).to_json();
    let files = [
        ("config.json", cfg.to_hf_json()),
        ("tokenizer.json", tok),
        ("tokenizer_config.json", tok_cfg),
        ("special_tokens_map.json", special),
        ("preprocessor_config.json", processor),
    ];
    let mut names = Vec::new();
    for (file, value) in files {
        let path = out.join(file);
        let text = serde_json::to_string_pretty(&value).expect("json");
        std::fs::write(&path, text).map_err(io(&path))?;
        names.push(file.to_string());
    }
    Ok(names)
}
