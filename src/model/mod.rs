//! LLaVA-style models: Hugging Face config and checkpoint formats, the CLIP vision tower, the projector and
//! the LLaMA decoder (one file each), and the built-in presets.

pub mod clip;
pub mod config;
pub mod llama;
pub mod llava;
pub mod preset;
pub mod weights;
