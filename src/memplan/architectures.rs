//! The one registry of architectures a plan can be made for: the built-in presets and LLaVA-1.5 7B/13B.

use super::*;

/// Model architectures by name for planning: the built-in presets `tiny`, `small` and `1b` (as `ddpo init-model`
/// writes them, vocabulary from the built-in tokenizer) and LLaVA-1.5 at 7B and 13B — config only, for
/// planning (`init-model` does not offer them).
pub fn architecture(name: &str) -> Option<LlavaConfig> {
    match name {
        "tiny" | "small" | "1b" => crate::preset::preset_config(name).ok().map(|(c, _)| c),
        "llava-1.5-7b" => Some(llava15(4096, 32, 32, 11008)),
        "llava-1.5-13b" => Some(llava15(5120, 40, 40, 13824)),
        _ => None,
    }
}

/// Names [`architecture`] knows.
pub const ARCHITECTURES: &[&str] = &["tiny", "small", "1b", "llava-1.5-7b", "llava-1.5-13b"];

/// LLaVA-1.5: Vicuna-v1.5 decoder (LLaMA-2 shapes, vocabulary 32,000 — llava-hf's checkpoints pad it to
/// 32,064 for the image and pad tokens, +0.5 M parameters), CLIP ViT-L/14 at 336 px (1024 wide, 24 layers,
/// 16 heads, 4096 intermediate, quick_gelu; features of the second-to-last layer without the class token),
/// `mlp2x_gelu` projector.
fn llava15(hidden: usize, layers: usize, heads: usize, intermediate: usize) -> LlavaConfig {
    let mut c = LlavaConfig::preset("small").expect("built-in preset");
    c.text_config = TextConfig {
        vocab_size: 32000,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(heads),
        ..c.text_config
    };
    c.vision_config = VisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        image_size: 336,
        patch_size: 14,
        ..c.vision_config
    };
    c.image_token_index = Some(32000);
    c.vision_feature_layer = -2;
    c.vision_feature_select_strategy = "default".into();
    c.projector_hidden_act = "gelu".into();
    c
}
