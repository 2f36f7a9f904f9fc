//! Built-in model shapes for demos, tests and benchmarks (`ddpo init-model`): the Hugging Face files of a
//! model directory — config.json, tokenizer (LLaMA-style, covering the synthetic corpus), image-processor
//! config — and random-initialised weights.
//!
//! Invariant: the config's `image_token_index` is the tokenizer's `<image>` id, and `vocab_size` covers
//! every tokenizer id (padded to a multiple of 64, as llava-hf pads 32000 + 2 to 32064).

use std::path::{Path, PathBuf};

use crate::data::image::ImageProcessorConfig;
use crate::data::synth;
use crate::data::tokenizer::{llama_style_tokenizer_json, tokenizer_config_json, IMAGE};
use crate::model::config::LlavaConfig;
use crate::model::llava::Llava;
use crate::model::weights;

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset {0:?}; known: tiny, small, 1b")]
    Unknown(String),
    #[error("{0}")]
    Model(String),
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

/// The non-weight files of a preset's model directory: (file name, contents).
/// (file name, contents) of a model directory's non-weight files.
type Files = Vec<(&'static str, Vec<u8>)>;

fn model_files(name: &str) -> Result<(LlavaConfig, Files), PresetError> {
    let (cfg, tok) = preset_config(name)?;
    let (tok_cfg, special) = tokenizer_config_json(cfg.text_config.max_position_embeddings);
    let processor = ImageProcessorConfig::clip(cfg.vision_config.image_size as u32).to_json();
    let files = [
        ("config.json", cfg.to_hf_json()),
        ("tokenizer.json", tok),
        ("tokenizer_config.json", tok_cfg),
        ("special_tokens_map.json", special),
        ("preprocessor_config.json", processor),
    ];
    let files = files
        .into_iter()
        .map(|(f, v)| (f, serde_json::to_vec_pretty(&v).expect("json")))
        .collect();
    Ok((cfg, files))
}

/// A random-initialised model directory of a preset (seeded): weights in the llava-hf layout plus config,
/// tokenizer and processor files, written atomically. Returns the file names.
pub fn init_model(out: &Path, name: &str, seed: u64) -> Result<Vec<String>, PresetError> {
    let (cfg, files) = model_files(name)?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    {
        let _rng = crate::model::global_rng_lock();
        tch::manual_seed(seed as i64);
        Llava::new(&vs.root(), &cfg).map_err(|e| PresetError::Model(e.to_string()))?;
    }
    weights::save(&vs, out, tch::Kind::Float, &files)
        .map_err(|e| PresetError::Model(e.to_string()))?;
    let mut names: Vec<String> = files.iter().map(|(f, _)| f.to_string()).collect();
    names.insert(0, "model.safetensors".into());
    Ok(names)
}

/// Writes only the non-weight files (config, tokenizer, processor): enough for the data pipeline.
pub fn write_model_files(out: &Path, name: &str) -> Result<Vec<String>, PresetError> {
    let (_, files) = model_files(name)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PresetError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut names = Vec::new();
    for (file, bytes) in files {
        let path = out.join(file);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        names.push(file.to_string());
    }
    Ok(names)
}
