//! LLaVA-style models: Hugging Face config and checkpoint formats, the vision tower, projector and decoder.

pub mod config;
pub mod preset;
