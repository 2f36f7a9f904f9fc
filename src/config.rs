//! The job configuration: one TOML file, every key overridable by environment variables
//! (`DDPO__TRAIN__LR=1e-6` overrides `[train] lr`), validated at start with messages that name the key.
//!
//! Invariant: a `Config` returned by [`Config::load`] has passed [`Config::validate`]; code downstream may
//! rely on the ranges checked there (β > 0, γ ≥ 1, batch sizes dividing, …). File existence is checked
//! separately by `data::check_files` so configs can be parsed on machines without the data.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment variables with this prefix (then `__`-separated keys) override the file.
pub const ENV_PREFIX: &str = "DDPO";

/// The chat templates `data.template` may name (built by `data::template`).
pub const TEMPLATE_NAMES: &[&str] = &["llava_v1", "llava_hf"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole job. Sections as in docs/interfaces.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub reference: ReferenceConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub ddpo: DdpoConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub generate: GenerateConfig,
}

/// A generation job (`generate.prompts` non-empty): the coordinator leases the prompt shards to workers, each
/// answers its shard with the model at `model.path` into `<out_dir>/<shard stem>.answers.parquet` (the format of
/// `ddpo generate`), and the job ends; nothing is trained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Prompt shards (RLHF-V / RLAIF-V layouts): paths or globs.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default = "defaults::generate_out_dir")]
    pub out_dir: PathBuf,
    /// Answers per prompt.
    #[serde(default = "defaults::one")]
    pub samples: usize,
    #[serde(default = "defaults::generate_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "defaults::top_p")]
    pub top_p: f64,
    /// 0 = no top-k limit.
    #[serde(default)]
    pub top_k: usize,
    #[serde(default)]
    pub seed: u64,
    /// Prompts per forward.
    #[serde(default = "defaults::generate_batch_size")]
    pub batch_size: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            out_dir: defaults::generate_out_dir(),
            samples: 1,
            max_new_tokens: defaults::generate_max_new_tokens(),
            temperature: 0.0,
            top_p: defaults::top_p(),
            top_k: 0,
            seed: 0,
            batch_size: defaults::generate_batch_size(),
        }
    }
}

/// LoRA adapters on the language model's projections (`rank` 0 = off, full fine-tuning). With LoRA only the
/// adapters train; the base weights stay frozen, so the reference is the base model itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default)]
    pub rank: usize,
    /// The update is scaled by alpha / rank (PEFT's `lora_alpha`).
    #[serde(default = "defaults::lora_alpha")]
    pub alpha: f64,
    /// Dropout on each adapter's input while training (PEFT's `lora_dropout`); 0 turns it off.
    #[serde(default)]
    pub dropout: f64,
    /// Decoder projections: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    #[serde(default = "defaults::lora_targets")]
    pub target_modules: Vec<String>,
    /// Also write `merged/` in each checkpoint: the base with the adapters folded into its weights, a plain
    /// llava-hf model directory (transformers loads it without PEFT).
    #[serde(default)]
    pub save_merged: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: defaults::lora_alpha(),
            dropout: 0.0,
            target_modules: defaults::lora_targets(),
            save_merged: false,
        }
    }
}

/// The decoder projections LoRA can adapt.
pub const LORA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bf16 on CUDA, fp32 on CPU.
    #[default]
    Auto,
    Fp32,
    Bf16,
}

impl Dtype {
    /// The weight dtype on `device`: `auto` is bf16 on CUDA, fp32 on CPU.
    pub fn weight_kind(self, device: tch::Device) -> tch::Kind {
        match self {
            Dtype::Fp32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::Auto if device.is_cuda() => tch::Kind::BFloat16,
            Dtype::Auto => tch::Kind::Float,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FreezeTarget {
    VisionTower,
    Projector,
    LanguageModel,
}

impl FreezeTarget {
    pub const ALL: [FreezeTarget; 3] = [Self::VisionTower, Self::Projector, Self::LanguageModel];

    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            FreezeTarget::VisionTower => "vision_tower",
            FreezeTarget::Projector => "projector",
            FreezeTarget::LanguageModel => "language_model",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Hugging Face-format LLaVA checkpoint directory (config.json, safetensors, tokenizer.json, …).
    pub path: PathBuf,
    #[serde(default)]
    pub dtype: Dtype,
    #[serde(default)]
    pub freeze: Vec<FreezeTarget>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceMode {
    /// Reference log-probs computed once up front and cached (training runs one model).
    #[default]
    Cached,
    /// Reference forward every step, no cache.
    Online,
}

impl ReferenceMode {
    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ReferenceMode::Cached => "cached",
            ReferenceMode::Online => "online",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ReferenceConfig {
    /// Reference model directory; default: `model.path`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub mode: ReferenceMode,
    /// Where the log-prob cache lives; default: `<train.output_dir>/reference-cache`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Report the row (shard, row number, reason), count it, go on.
    #[default]
    Skip,
    /// Stop the job with that message.
    Fail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training shards: paths or globs (required unless the job generates: `generate.prompts`).
    #[serde(default)]
    pub train: Vec<String>,
    /// Held-out shards: paths or globs.
    #[serde(default)]
    pub eval: Vec<String>,
    /// Maximum tokens of one prompt + response sequence (visual tokens included).
    #[serde(default = "defaults::max_length")]
    pub max_length: usize,
    /// Chat template name, see `data::template`.
    #[serde(default = "defaults::template")]
    pub template: String,
    #[serde(default)]
    pub on_bad_row: OnBadRow,
    /// Pad images to a square with the mean colour before the CLIP processor, as LLaVA-1.5 trains.
    #[serde(default = "defaults::yes")]
    pub pad_to_square: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// Σ w·ℓ / Σ w — the paper's Eq. 5.
    #[default]
    Mean,
    /// Σ w·ℓ — what the released scripts ran.
    Sum,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    #[default]
    Sigmoid,
    Ipo,
    Hinge,
    /// Supervised fine-tuning: the mean negative log-likelihood of the chosen response's tokens (every token
    /// weighs 1; no reference model, rejected responses unused). `ddpo sft` sets it.
    Sft,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DdpoConfig {
    #[serde(default = "defaults::beta")]
    pub beta: f64,
    #[serde(default = "defaults::gamma")]
    pub gamma: f64,
    #[serde(default)]
    pub score: Score,
    #[serde(default)]
    pub loss: LossKind,
    #[serde(default)]
    pub sft_weight: f64,
    #[serde(default = "defaults::min_match")]
    pub min_match: usize,
}

impl Default for DdpoConfig {
    fn default() -> Self {
        Self {
            beta: defaults::beta(),
            gamma: defaults::gamma(),
            score: Score::Mean,
            loss: LossKind::Sigmoid,
            sft_weight: 0.0,
            min_match: defaults::min_match(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    /// Global pairs per optimizer step, whatever the world size.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Pairs per forward on one rank.
    #[serde(default = "defaults::micro_batch_size")]
    pub micro_batch_size: usize,
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Gradient clipping by global norm; 0 turns it off.
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    #[serde(default = "defaults::output_dir")]
    pub output_dir: PathBuf,
    /// Optimizer steps between checkpoints; 0 = only at the end.
    #[serde(default)]
    pub save_every: usize,
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// Optimizer steps between evaluations; 0 = only at the end of each epoch.
    #[serde(default)]
    pub eval_every: usize,
    /// At each evaluation, answer this many eval prompts greedily and score the answers against their scenes
    /// (`eval/hallucination/*`; synthetic eval data only, it carries the scenes); 0 = off.
    #[serde(default)]
    pub eval_generate: usize,
    /// Longest answer of that evaluation, in tokens.
    #[serde(default = "defaults::eval_generate_max_new_tokens")]
    pub eval_generate_max_new_tokens: usize,
    #[serde(default = "defaults::log_every")]
    pub log_every: usize,
    /// Run each pair as one sequence `[image + prompt | chosen | rejected]` (prefix encoded once, responses
    /// masked from each other) instead of two; same log-probs, less work. Also used by precompute.
    #[serde(default = "defaults::shared_prefix")]
    pub shared_prefix: bool,
    /// Sharding across data-parallel ranks (ZeRO): 0 = none, 1 = optimizer state (AdamW moments and fp32
    /// masters), 2 = that plus gradients reduce-scattered instead of all-reduced (each rank receives only its
    /// slice: half the gradient traffic of stage 1). Each rank updates only its slice of the flattened
    /// parameters and the updated slices are all-gathered. Stage 2 keeps only the owned gradient slices from
    /// the exchange to the update; during backward the gradients are whole at every stage (tch has no
    /// per-parameter hooks to reduce them as they appear).
    #[serde(default)]
    pub zero_stage: u8,
    /// Refuse to start when the memory plan (`memplan`) exceeds the device's memory; false: warn and start.
    #[serde(default = "defaults::yes")]
    pub memory_check: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: defaults::epochs(),
            batch_size: defaults::batch_size(),
            micro_batch_size: defaults::micro_batch_size(),
            lr: defaults::lr(),
            weight_decay: 0.0,
            warmup_ratio: defaults::warmup_ratio(),
            schedule: Schedule::Cosine,
            max_grad_norm: defaults::max_grad_norm(),
            seed: defaults::seed(),
            output_dir: defaults::output_dir(),
            save_every: 0,
            keep_last: defaults::keep_last(),
            eval_every: 0,
            eval_generate: 0,
            eval_generate_max_new_tokens: defaults::eval_generate_max_new_tokens(),
            log_every: defaults::log_every(),
            shared_prefix: defaults::shared_prefix(),
            zero_stage: 0,
            memory_check: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL on CUDA devices, the TCP ring on CPU.
    #[default]
    Auto,
    Nccl,
    Ring,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default = "defaults::world_size")]
    pub world_size: usize,
    #[serde(default)]
    pub backend: Backend,
    /// Coordinator listen address.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    #[serde(default = "defaults::heartbeat_secs")]
    pub heartbeat_secs: u64,
    #[serde(default = "defaults::heartbeat_timeout_secs")]
    pub heartbeat_timeout_secs: u64,
    #[serde(default = "defaults::collective_timeout_secs")]
    pub collective_timeout_secs: u64,
    /// Every this many steps (and at every checkpoint) the ranks compare a fingerprint of their weights, so a
    /// divergence stops the job; 0 turns it off. A pass over all weights: per step it costs ~7 % of a
    /// small-model CPU step, hence not every step by default.
    #[serde(default = "defaults::replica_check_every")]
    pub replica_check_every: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            world_size: defaults::world_size(),
            backend: Backend::Auto,
            listen: defaults::listen(),
            heartbeat_secs: defaults::heartbeat_secs(),
            heartbeat_timeout_secs: defaults::heartbeat_timeout_secs(),
            collective_timeout_secs: defaults::collective_timeout_secs(),
            replica_check_every: defaults::replica_check_every(),
        }
    }
}

/// Defaults: the paper's values (β 0.5, γ 5, mean score, lr 5e-7, batch 32, 7 epochs, 10 % warm-up).
mod defaults {
    use std::path::PathBuf;
    pub fn yes() -> bool {
        true
    }
    pub fn max_length() -> usize {
        2048
    }
    pub fn template() -> String {
        "llava_v1".into()
    }
    pub fn beta() -> f64 {
        0.5
    }
    pub fn gamma() -> f64 {
        5.0
    }
    pub fn min_match() -> usize {
        3
    }
    pub fn epochs() -> usize {
        7
    }
    pub fn batch_size() -> usize {
        32
    }
    pub fn micro_batch_size() -> usize {
        1
    }
    pub fn lr() -> f64 {
        5e-7
    }
    pub fn warmup_ratio() -> f64 {
        0.1
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn output_dir() -> PathBuf {
        PathBuf::from("runs/ddpo")
    }
    pub fn keep_last() -> usize {
        2
    }
    pub fn generate_out_dir() -> PathBuf {
        PathBuf::from("runs/answers")
    }
    pub fn one() -> usize {
        1
    }
    pub fn generate_max_new_tokens() -> usize {
        128
    }
    pub fn top_p() -> f64 {
        1.0
    }
    pub fn generate_batch_size() -> usize {
        8
    }
    pub fn eval_generate_max_new_tokens() -> usize {
        64
    }
    pub fn log_every() -> usize {
        1
    }
    pub fn world_size() -> usize {
        1
    }
    pub fn listen() -> String {
        "0.0.0.0:50051".into()
    }
    pub fn heartbeat_secs() -> u64 {
        5
    }
    pub fn heartbeat_timeout_secs() -> u64 {
        30
    }
    pub fn shared_prefix() -> bool {
        true
    }
    pub fn lora_alpha() -> f64 {
        16.0
    }
    pub fn lora_targets() -> Vec<String> {
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec()
    }
    pub fn replica_check_every() -> usize {
        50
    }
    pub fn collective_timeout_secs() -> u64 {
        300
    }
}

/// A `--device` value that names no device of this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {0:?}: expected cpu, cuda, cuda:N or auto")]
    Unknown(String),
    #[error("--device {name}: this machine has {count} CUDA device(s)")]
    Missing { name: String, count: i64 },
}

/// Parses a `--device` value (`cpu`, `cuda`, `cuda:N`, `auto`); a CUDA device this machine does not have
/// is an error here rather than a libtorch crash later. Shared by every binary.
pub fn parse_device(s: &str) -> Result<tch::Device, DeviceError> {
    let d = match s {
        "auto" => tch::Device::cuda_if_available(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => return Err(DeviceError::Unknown(other.to_string())),
        },
    };
    if let tch::Device::Cuda(i) = d {
        let n = tch::Cuda::device_count();
        if (i as i64) >= n {
            return Err(DeviceError::Missing {
                name: s.to_string(),
                count: n,
            });
        }
    }
    Ok(d)
}

/// Keys whose environment values are comma-separated lists.
const LIST_KEYS: &[&str] = &[
    "data.train",
    "data.eval",
    "model.freeze",
    "lora.target_modules",
];

impl Config {
    /// Reads `path`, applies `DDPO__SECTION__KEY` environment overrides, checks for unknown keys and types,
    /// then validates ranges. Every problem found is reported at once, each naming its key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &vars)
    }

    /// [`Config::load`] with an explicit environment (tests pass their own).
    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, env)
    }

    /// Parses TOML text; `origin` names it in messages.
    pub fn from_toml_str(
        text: &str,
        origin: &Path,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: origin.to_owned(),
            message,
        };
        let source = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(env.iter().cloned().collect()));
        let source = LIST_KEYS
            .iter()
            .fold(source, |s, k| s.with_list_parse_key(k));
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(source)
            .build()
            .map_err(|e| parse_err(e.to_string()))?;

        // Unknown keys first: a typo is the most common mistake and serde's message does not say where.
        let raw: serde_json::Value = built
            .clone()
            .try_deserialize()
            .map_err(|e| parse_err(e.to_string()))?;
        let mut problems = Vec::new();
        unknown_keys(&raw, &known_keys(), "", &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            });
        }
        let cfg: Config = built.try_deserialize().map_err(|e| {
            let msg = e.to_string();
            // config's messages say "for key `x.y`"; a missing section is the other common case.
            parse_err(msg.replace("missing field", "missing required key"))
        })?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            })
        }
    }

    /// A generation job (`generate.prompts` set): answers, no training.
    pub fn is_generation_job(&self) -> bool {
        !self.generate.prompts.is_empty()
    }

    /// Whether training reads reference log-probs from the cache (so they must be precomputed first): not for
    /// SFT, which has no reference, nor for an online reference.
    pub fn needs_reference_cache(&self) -> bool {
        self.ddpo.loss != LossKind::Sft && self.reference.mode == ReferenceMode::Cached
    }

    /// Range and consistency checks; each message names the key.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Problems::default();
        if self.lora.rank > 0 {
            check_lora(&self.lora, &mut p);
        }
        check_ddpo(&self.ddpo, &mut p);
        check_train(&self.train, &mut p);
        check_cluster(&self.cluster, &self.train, &mut p);
        check_data(&self.data, &mut p);
        if self.is_generation_job() {
            check_generate(&self.generate, &mut p);
        } else {
            p.check(
                !self.data.train.is_empty(),
                "data.train is empty: list at least one parquet path or glob".into(),
            );
        }
        p.check(
            !self.model.path.as_os_str().is_empty(),
            "model.path is empty".into(),
        );
        p.0
    }

    /// The job's model identity: sha256 over the model directory's config, tokenizer and image-processor files
    /// and the seed. Every worker of a job must compute the same digest (the coordinator refuses others).
    pub fn model_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
            h.update(f.as_bytes());
            match std::fs::read(self.model.path.join(f)) {
                Ok(b) => h.update(&b),
                Err(_) => h.update(b"<missing>"),
            }
        }
        h.update(self.train.seed.to_le_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The reference model directory (defaults to the policy's).
    pub fn reference_path(&self) -> &Path {
        self.reference.path.as_deref().unwrap_or(&self.model.path)
    }

    /// The reference log-prob cache root.
    pub fn reference_cache_dir(&self) -> PathBuf {
        self.reference
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.train.output_dir.join("reference-cache"))
    }

    /// Micro-batches each rank accumulates per optimizer step.
    pub fn accumulation_steps(&self) -> usize {
        self.train.batch_size / (self.train.micro_batch_size * self.cluster.world_size)
    }
}

/// Problems found by `validate`, all of them, in the order checked.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: String) {
        if !ok {
            self.0.push(msg);
        }
    }
}

/// `[lora]`, checked only when adapters are on (`rank > 0`).
fn check_lora(l: &LoraConfig, p: &mut Problems) {
    p.check(
        l.alpha.is_finite() && l.alpha > 0.0,
        format!("lora.alpha = {}: must be > 0", l.alpha),
    );
    p.check(
        (0.0..1.0).contains(&l.dropout),
        format!("lora.dropout = {}: must be in [0, 1)", l.dropout),
    );
    p.check(
        !l.target_modules.is_empty(),
        "lora.target_modules is empty".into(),
    );
    for t in &l.target_modules {
        p.check(
            LORA_TARGETS.contains(&t.as_str()),
            format!(
                "lora.target_modules: {t:?} is not one of {}",
                LORA_TARGETS.join(", ")
            ),
        );
    }
}

/// `[ddpo]`: the loss hyper-parameters.
fn check_ddpo(d: &DdpoConfig, p: &mut Problems) {
    p.check(
        d.beta.is_finite() && d.beta > 0.0,
        format!("ddpo.beta = {}: must be > 0", d.beta),
    );
    p.check(
        d.gamma.is_finite() && d.gamma >= 1.0,
        format!(
            "ddpo.gamma = {}: must be >= 1 (changed tokens weigh at least as much as the rest)",
            d.gamma
        ),
    );
    p.check(
        d.sft_weight.is_finite() && d.sft_weight >= 0.0,
        format!("ddpo.sft_weight = {}: must be >= 0", d.sft_weight),
    );
    p.check(
        d.min_match >= 1,
        "ddpo.min_match = 0: must be >= 1".to_string(),
    );
}

/// `[train]` on its own (the batch arithmetic with the world size is in [`check_cluster`]).
fn check_train(t: &TrainConfig, p: &mut Problems) {
    p.check(t.epochs >= 1, "train.epochs = 0: must be >= 1".into());
    p.check(
        t.eval_generate == 0 || t.eval_generate_max_new_tokens >= 1,
        "train.eval_generate_max_new_tokens = 0: must be >= 1".into(),
    );
    p.check(
        t.batch_size >= 1,
        "train.batch_size = 0: must be >= 1".into(),
    );
    p.check(
        t.micro_batch_size >= 1,
        "train.micro_batch_size = 0: must be >= 1".into(),
    );
    p.check(
        t.zero_stage <= 2,
        format!("train.zero_stage = {}: must be 0, 1 or 2", t.zero_stage),
    );
    p.check(
        t.lr.is_finite() && t.lr > 0.0,
        format!("train.lr = {}: must be > 0", t.lr),
    );
    p.check(
        t.weight_decay.is_finite() && t.weight_decay >= 0.0,
        format!("train.weight_decay = {}: must be >= 0", t.weight_decay),
    );
    p.check(
        (0.0..1.0).contains(&t.warmup_ratio),
        format!("train.warmup_ratio = {}: must be in [0, 1)", t.warmup_ratio),
    );
    p.check(
        t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0,
        format!(
            "train.max_grad_norm = {}: must be >= 0 (0 turns clipping off)",
            t.max_grad_norm
        ),
    );
    p.check(t.log_every >= 1, "train.log_every = 0: must be >= 1".into());
    p.check(
        t.keep_last >= 1,
        "train.keep_last = 0: must be >= 1 (resume needs a checkpoint)".into(),
    );
}

/// `[cluster]`, and the batch size as a multiple of micro-batch x world size.
fn check_cluster(c: &ClusterConfig, t: &TrainConfig, p: &mut Problems) {
    p.check(
        c.world_size >= 1,
        "cluster.world_size = 0: must be >= 1".into(),
    );
    let per_step = t.micro_batch_size.checked_mul(c.world_size);
    p.check(
        per_step.is_some(),
        format!(
            "train.micro_batch_size ({}) x cluster.world_size ({}) is too large",
            t.micro_batch_size, c.world_size
        ),
    );
    if let Some(per_step) = per_step.filter(|&n| n >= 1 && t.batch_size >= 1) {
        p.check(
            t.batch_size % per_step == 0,
            format!(
                "train.batch_size = {} must be a multiple of train.micro_batch_size ({}) x cluster.world_size ({}) = {per_step}; \
                 e.g. batch_size = {} gives {} accumulation step(s)",
                t.batch_size,
                t.micro_batch_size,
                c.world_size,
                per_step * (t.batch_size / per_step).max(1),
                (t.batch_size / per_step).max(1)
            ),
        );
    }
    p.check(
        c.heartbeat_secs >= 1,
        "cluster.heartbeat_secs = 0: must be >= 1".into(),
    );
    p.check(
        c.heartbeat_timeout_secs > c.heartbeat_secs,
        format!(
            "cluster.heartbeat_timeout_secs = {} must exceed cluster.heartbeat_secs = {}",
            c.heartbeat_timeout_secs, c.heartbeat_secs
        ),
    );
    p.check(
        c.collective_timeout_secs >= 1,
        "cluster.collective_timeout_secs = 0: must be >= 1".into(),
    );
    p.check(
        c.listen.parse::<std::net::SocketAddr>().is_ok(),
        format!(
            "cluster.listen = {:?}: not a socket address like 0.0.0.0:50051",
            c.listen
        ),
    );
}

/// `[data]`.
/// `[generate]` of a generation job.
fn check_generate(g: &GenerateConfig, p: &mut Problems) {
    p.check(g.samples >= 1, "generate.samples = 0: must be >= 1".into());
    p.check(
        g.max_new_tokens >= 1,
        "generate.max_new_tokens = 0: must be >= 1".into(),
    );
    p.check(
        g.batch_size >= 1,
        "generate.batch_size = 0: must be >= 1".into(),
    );
    p.check(
        g.temperature.is_finite() && g.temperature >= 0.0,
        format!("generate.temperature = {}: must be >= 0", g.temperature),
    );
    p.check(
        g.top_p > 0.0 && g.top_p <= 1.0,
        format!("generate.top_p = {}: must be in (0, 1]", g.top_p),
    );
}

fn check_data(dc: &DataConfig, p: &mut Problems) {
    p.check(
        dc.max_length >= 8,
        format!("data.max_length = {}: must be >= 8", dc.max_length),
    );
    p.check(
        TEMPLATE_NAMES.contains(&dc.template.as_str()),
        format!(
            "data.template = {:?}: unknown; known: {}",
            dc.template,
            TEMPLATE_NAMES.join(", ")
        ),
    );
}

/// The full key tree, from a default config serialised (so new fields are known automatically).
fn known_keys() -> serde_json::Value {
    let example = Config {
        model: ModelConfig {
            path: PathBuf::new(),
            dtype: Dtype::Auto,
            freeze: vec![],
        },
        reference: ReferenceConfig::default(),
        data: DataConfig {
            train: vec![],
            eval: vec![],
            max_length: 0,
            template: String::new(),
            on_bad_row: OnBadRow::Skip,
            pad_to_square: true,
        },
        ddpo: DdpoConfig::default(),
        train: TrainConfig::default(),
        cluster: ClusterConfig::default(),
        lora: LoraConfig::default(),
        generate: GenerateConfig::default(),
    };
    serde_json::to_value(example).expect("config serialises")
}

fn unknown_keys(
    raw: &serde_json::Value,
    known: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    let (Some(raw), Some(known)) = (raw.as_object(), known.as_object()) else {
        return;
    };
    for (k, v) in raw {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match known.get(k) {
            Some(kv) if kv.is_object() => unknown_keys(v, kv, &full, out),
            Some(_) => {}
            None => {
                let hint = known
                    .keys()
                    .map(|c| (edit_distance(c, k), c))
                    .filter(|(d, _)| *d <= 3)
                    .min()
                    .map(|(_, c)| format!(" (did you mean `{c}`?)"))
                    .unwrap_or_default();
                let valid: Vec<&str> = known.keys().map(|s| s.as_str()).collect();
                out.push(format!(
                    "unknown key `{full}`{hint}; valid keys here: {}",
                    valid.join(", ")
                ));
            }
        }
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = ["d/*.parquet"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("job.toml"), &[])
    }

    fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml_str(text, Path::new("job.toml"), &env)
    }

    #[test]
    fn minimal_config_gets_paper_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.ddpo.beta, 0.5);
        assert_eq!(c.ddpo.gamma, 5.0);
        assert_eq!(c.ddpo.score, Score::Mean);
        assert_eq!(c.train.lr, 5e-7);
        assert_eq!(c.train.batch_size, 32);
        assert_eq!(c.train.warmup_ratio, 0.1);
        assert_eq!(c.ddpo.min_match, 3);
        assert_eq!(c.reference_path(), Path::new("m"));
        assert_eq!(c.accumulation_steps(), 32);
    }

    #[test]
    fn env_overrides_file_values_and_types() {
        let c = parse_env(
            MINIMAL,
            &[
                ("DDPO__TRAIN__LR", "1e-6"),
                ("DDPO__DDPO__SCORE", "sum"),
                ("DDPO__DATA__TRAIN", "a.parquet,b.parquet"),
                ("DDPO__CLUSTER__WORLD_SIZE", "4"),
                ("DDPO_VENV", "/not/a/config/key"),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 1e-6);
        assert_eq!(c.ddpo.score, Score::Sum);
        assert_eq!(c.data.train, vec!["a.parquet", "b.parquet"]);
        assert_eq!(c.cluster.world_size, 4);
    }

    #[test]
    fn lora_settings_are_checked() {
        let c = parse(&format!(
            "{MINIMAL}\n[lora]\nrank = 8\ntarget_modules = [\"q_proj\", \"down_proj\"]\n"
        ))
        .unwrap();
        assert_eq!((c.lora.rank, c.lora.alpha), (8, 16.0));
        assert_eq!(c.lora.target_modules, ["q_proj", "down_proj"]);
        let e = parse(&format!(
            "{MINIMAL}\n[lora]\nrank = 8\ndropout = 1.0\ntarget_modules = [\"qproj\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("lora.dropout = 1: must be in [0, 1)"), "{e}");
        assert!(e.contains("\"qproj\" is not one of q_proj"), "{e}");
        let c = parse_env(MINIMAL, &[("DDPO__LORA__TARGET_MODULES", "v_proj,o_proj")]).unwrap();
        assert_eq!(c.lora.target_modules, ["v_proj", "o_proj"]);
    }

    #[test]
    fn a_generation_job_needs_no_training_data_and_its_settings_are_checked() {
        let gen = "[model]\npath = \"m\"\n[data]\n[generate]\nprompts = [\"p/*.parquet\"]\n";
        let c = parse(gen).unwrap();
        assert!(c.is_generation_job() && c.data.train.is_empty());
        let e = parse(&format!(
            "{gen}samples = 0\ntop_p = 1.5\ntemperature = -1\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "generate.samples = 0",
            "generate.top_p = 1.5",
            "generate.temperature = -1",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = parse("[model]\npath = \"m\"\n[data]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.train is empty"), "{e}");
    }

    #[test]
    fn absurd_batch_sizes_are_refused_not_overflowed() {
        let e = parse(&format!(
            "{MINIMAL}\n[train]\nmicro_batch_size = 9223372036854775807\n[cluster]\nworld_size = 4\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("is too large"), "{e}");
    }

    #[test]
    fn typo_is_named_with_a_hint() {
        let e = parse(&format!("{MINIMAL}\n[train]\nlrr = 1e-6\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `train.lrr`"), "{e}");
        assert!(e.contains("did you mean `lr`"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[trian]\nlr = 1e-6\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `trian`"), "{e}");
        assert!(e.contains("did you mean `train`"), "{e}");
        let e = parse_env(MINIMAL, &[("DDPO__DDPO__BETTA", "0.3")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `ddpo.betta`"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse(&format!("{MINIMAL}\n[ddpo]\nbeta = \"high\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ddpo.beta"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[ddpo]\nscore = \"median\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("median") && e.contains("ddpo.score"), "{e}");
    }

    #[test]
    fn missing_required_section_is_named() {
        let e = parse("[model]\npath = \"m\"\n").unwrap_err().to_string();
        assert!(e.contains("data"), "{e}");
    }

    #[test]
    fn ranges_are_checked_all_at_once() {
        let e = parse(&format!(
            "{MINIMAL}\n[ddpo]\nbeta = 0.0\ngamma = 0.5\n[train]\nbatch_size = 10\nmicro_batch_size = 4\n"
        ))
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        let all = e.to_string();
        assert!(all.contains("ddpo.beta = 0: must be > 0"), "{all}");
        assert!(all.contains("ddpo.gamma = 0.5"), "{all}");
        assert!(
            all.contains("train.batch_size = 10 must be a multiple"),
            "{all}"
        );
    }

    #[test]
    fn unknown_template_and_bad_listen() {
        let e = parse(&format!("{MINIMAL}\n[cluster]\nlisten = \"nope\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.listen"), "{e}");
        let e = parse("[model]\npath = \"m\"\n[data]\ntrain = [\"x\"]\ntemplate = \"vicuna9\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.template") && e.contains("llava_v1"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Config::load_with_env(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected the demo, paper and released presets in configs/"
        );
        let paper = Config::load_with_env(&dir.join("paper.toml"), &[]).unwrap();
        assert_eq!(
            (paper.ddpo.beta, paper.ddpo.gamma, paper.ddpo.score),
            (0.5, 5.0, Score::Mean)
        );
        let rel = Config::load_with_env(&dir.join("rlhf-v-released.toml"), &[]).unwrap();
        assert_eq!(
            (rel.ddpo.beta, rel.ddpo.gamma, rel.ddpo.score),
            (0.1, 1.1, Score::Sum)
        );
    }

    #[test]
    fn devices_parse_and_missing_cuda_is_an_error() {
        assert_eq!(parse_device("cpu"), Ok(tch::Device::Cpu));
        let e = parse_device("tpu").unwrap_err();
        assert_eq!(e, DeviceError::Unknown("tpu".into()));
        assert!(
            e.to_string().contains("expected cpu, cuda, cuda:N or auto"),
            "{e}"
        );
        let e = parse_device("cuda:99").unwrap_err();
        assert!(matches!(e, DeviceError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("CUDA device(s)"), "{e}");
    }
}
