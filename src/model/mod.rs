//! LLaVA-style models: Hugging Face config and checkpoint formats, the CLIP vision tower, the projector and
//! the LLaMA decoder (one file each), and the built-in presets.

pub mod clip;
pub mod config;
pub mod generate;
pub mod llama;
pub mod llava;
pub mod weights;

/// Why a model could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` missing, unreadable, not a LLaVA config, or with an impossible value (names the key).
    #[error("{}: {reason}", path.display())]
    Config {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A setting this implementation does not compute (names the key and its value).
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// Hugging Face's ignore index: a label position with this value has no log-prob.
pub const IGNORE: i64 = -100;

/// Segment ids of the shared-prefix layout (`Llava::hidden_packed`): a token sees the prompt and the earlier
/// tokens of its own segment, never another response; padding is never a key.
pub const SEG_PROMPT: i64 = 0;
pub const SEG_CHOSEN: i64 = 1;
pub const SEG_REJECTED: i64 = 2;
pub const SEG_PAD: i64 = 3;

/// Serialises the code that draws from libtorch's process-wide generator: variable creation (initial values)
/// and the trainer's seeded LoRA-dropout forward. `crate::preset::init_model` seeds it and must see its own draws in
/// order, so a model loaded (or adapters attached) on another thread meanwhile — tests, a worker's
/// precompute beside its trainer — cannot change which random model a seed gives.
pub fn global_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
