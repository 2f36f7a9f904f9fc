//! Hugging Face `config.json` of a LLaVA checkpoint (llama-family text config, CLIP vision config), in the
//! spellings of transformers 4.x and 5.x, and the built-in presets of `ddpo init-model`.
//!
//! Invariant: [`LlavaConfig::num_image_tokens`] is the number of visual tokens the vision tower emits per
//! image, i.e. how many image-token ids the prompt carries.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default = "d::llama")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d::rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x spelling; 5.x moves it into `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default = "d::max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "d::silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub head_dim: Option<usize>,
}

impl TextConfig {
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Settings this implementation does not compute; each message names the key.
    pub fn unsupported(&self) -> Vec<String> {
        let mut out = Vec::new();
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) || rope_type != "default" {
            out.push("text_config.rope_scaling / rope_parameters.rope_type: only plain (default) RoPE is supported".into());
        }
        if self.attention_bias {
            out.push("text_config.attention_bias = true is not supported".into());
        }
        if self.mlp_bias {
            out.push("text_config.mlp_bias = true is not supported".into());
        }
        if self.hidden_act != "silu" {
            out.push(format!(
                "text_config.hidden_act = {:?}: only silu is supported",
                self.hidden_act
            ));
        }
        if self.tie_word_embeddings {
            out.push("text_config.tie_word_embeddings = true is not supported".into());
        }
        if let Some(h) = self.head_dim {
            if h * self.num_attention_heads != self.hidden_size {
                out.push(format!(
                    "text_config.head_dim = {h} differs from hidden_size / num_attention_heads; not supported"
                ));
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d::clip_vision")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "d::three")]
    pub num_channels: usize,
    #[serde(default = "d::ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d::quick_gelu")]
    pub hidden_act: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(default = "d::llava")]
    pub model_type: String,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    /// transformers 4.x `image_token_index`; 5.x also writes `image_token_id`.
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
    #[serde(default = "d::feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "d::default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "d::gelu")]
    pub projector_hidden_act: String,
}

mod d {
    pub fn llama() -> String {
        "llama".into()
    }
    pub fn llava() -> String {
        "llava".into()
    }
    pub fn clip_vision() -> String {
        "clip_vision_model".into()
    }
    pub fn rms_eps() -> f64 {
        1e-5
    }
    pub fn ln_eps() -> f64 {
        1e-5
    }
    pub fn max_pos() -> usize {
        4096
    }
    pub fn three() -> usize {
        3
    }
    pub fn quick_gelu() -> String {
        "quick_gelu".into()
    }
    pub fn silu() -> String {
        "silu".into()
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn feature_layer() -> i64 {
        -2
    }
    pub fn default_strategy() -> String {
        "default".into()
    }
}

impl LlavaConfig {
    /// Reads `<dir>/config.json`; the error names the file.
    pub fn from_dir(dir: &Path) -> Result<Self, super::ModelError> {
        let p = dir.join("config.json");
        let bad = |reason: String| super::ModelError::Config {
            path: p.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&p).map_err(|e| bad(format!("cannot read: {e}")))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a LLaVA config: {e}")))?;
        if cfg.model_type != "llava" {
            return Err(bad(format!(
                "model_type is {:?}; ddpo trains \"llava\" models",
                cfg.model_type
            )));
        }
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let zero: Vec<&str> = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads()),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
        ]
        .into_iter()
        .filter(|(_, x)| *x == 0)
        .map(|(k, _)| k)
        .collect();
        if !zero.is_empty() {
            return Err(bad(format!("{} must be > 0", zero.join(", "))));
        }
        if cfg.image_token_index.is_none() {
            return Err(bad(
                "neither image_token_index nor image_token_id is set".into()
            ));
        }
        Ok(cfg)
    }

    /// Visual tokens per image: one per patch, plus the class token when the strategy keeps it.
    pub fn num_image_tokens(&self) -> usize {
        let side = self.vision_config.image_size / self.vision_config.patch_size;
        side * side + usize::from(self.vision_feature_select_strategy == "full")
    }

    pub fn image_token_index(&self) -> u32 {
        self.image_token_index.expect("checked at load")
    }

    /// The config.json transformers writes for `LlavaForConditionalGeneration` (4.x field names).
    pub fn to_hf_json(&self) -> Value {
        let t = &self.text_config;
        let v = &self.vision_config;
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "text_config": {
                "model_type": t.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads(),
                "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta(),
                "max_position_embeddings": t.max_position_embeddings, "hidden_act": "silu",
                "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": self.image_token_index.map(|i| i + 1)
            },
            "vision_config": {
                "model_type": v.model_type, "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                "num_attention_heads": v.num_attention_heads, "image_size": v.image_size,
                "patch_size": v.patch_size, "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
                "projection_dim": v.hidden_size
            }
        })
    }

    /// Built-in shapes. `tiny`: seconds on CPU, for tests. `small`: LLaVA-1.5 scaled down, for benchmarks
    /// (vocabulary 32,000, text 512 × 4 layers, vision 256 × 4 layers at 336 px / patch 14 → 576 tokens).
    /// `image_token_index` is the tokenizer's `<image>` id, filled in by the caller.
    pub fn preset(name: &str) -> Option<Self> {
        // vocab_size 0: set from the tokenizer (`preset::preset_config`).
        let (text, vision) = match name {
            "tiny" => (llama(0, 64, 128, 2, 4, 2, 1024), clip(32, 64, 2, 4, 32, 8)),
            "small" => (
                llama(32000, 512, 1376, 4, 8, 8, 4096),
                clip(256, 1024, 4, 4, 336, 14),
            ),
            // ~1.05 B parameters (decoder 0.95 B, a CLIP ViT-B/14-sized tower at 336 px): the GPU checks'
            // mid-size model, large enough for bf16 kernels and memory to matter, small enough to train on one
            // card without sharding.
            "1b" => (
                llama(32000, 2048, 5632, 16, 16, 16, 4096),
                clip(768, 3072, 12, 12, 336, 14),
            ),
            _ => return None,
        };
        Some(Self {
            model_type: "llava".into(),
            text_config: text,
            vision_config: vision,
            image_token_index: None,
            vision_feature_layer: -2,
            vision_feature_select_strategy: "default".into(),
            projector_hidden_act: "gelu".into(),
        })
    }
}

/// A LLaMA decoder config of the built-in presets (SiLU, RoPE θ 10,000, no biases, untied head).
fn llama(
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    max_position_embeddings: usize,
) -> TextConfig {
    TextConfig {
        model_type: "llama".into(),
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: Some(num_key_value_heads),
        rms_norm_eps: 1e-5,
        rope_theta: Some(10000.0),
        rope_parameters: None,
        max_position_embeddings,
        rope_scaling: None,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        tie_word_embeddings: false,
        head_dim: None,
    }
}

/// A CLIP vision tower config of the built-in presets (quick_gelu, RGB).
fn clip(
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    image_size: usize,
    patch_size: usize,
) -> VisionConfig {
    VisionConfig {
        model_type: "clip_vision_model".into(),
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        image_size,
        patch_size,
        num_channels: 3,
        layer_norm_eps: 1e-5,
        hidden_act: "quick_gelu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_preset_has_576_visual_tokens() {
        let c = LlavaConfig::preset("small").unwrap();
        assert_eq!(c.num_image_tokens(), 576);
        assert_eq!(c.text_config.vocab_size, 32000);
    }

    #[test]
    fn zero_sizes_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = LlavaConfig::preset("tiny").unwrap();
        c.image_token_index = Some(5);
        c.text_config.vocab_size = 64;
        c.vision_config.patch_size = 0;
        std::fs::write(dir.path().join("config.json"), c.to_hf_json().to_string()).unwrap();
        let e = LlavaConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("config.json")
                && e.contains("vision_config.patch_size")
                && e.contains("must be > 0"),
            "{e}"
        );
    }

    #[test]
    fn reads_both_transformers_spellings() {
        let v4 = r#"{"model_type":"llava","image_token_index":32000,
          "text_config":{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                         "num_attention_heads":2,"rope_theta":500000.0},
          "vision_config":{"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
                           "num_attention_heads":2,"image_size":28,"patch_size":14},
          "vision_feature_select_strategy":"full"}"#;
        let c: LlavaConfig = serde_json::from_str(v4).unwrap();
        assert_eq!(c.text_config.rope_theta(), 500000.0);
        assert_eq!(c.num_image_tokens(), 5);
        let v5 = v4
            .replace("\"image_token_index\"", "\"image_token_id\"")
            .replace(
                "\"rope_theta\":500000.0",
                "\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":250000.0}",
            );
        let c: LlavaConfig = serde_json::from_str(&v5).unwrap();
        assert_eq!(c.image_token_index, Some(32000));
        assert_eq!(c.text_config.rope_theta(), 250000.0);
    }
}
