//! Memory plan: what one rank of `ddpo train` holds at its peak, computed from the architecture before any
//! weight is loaded, so a job that cannot fit is refused at start — with the settings that would fit — instead
//! of running out of memory after loading for minutes (or after hours, at the first long batch).
//!
//! A plan is per rank, in bytes. Its terms, each computed by the function or field that documents it:
//!
//! | term | bytes | where |
//! |---|---|---|
//! | weights | every parameter × dtype size (fp32 4, bf16 2) | [`MemoryPlan::weights`] |
//! | gradients | parameters that receive a gradient × dtype size (full-size at every ZeRO stage: see the field) | [`MemoryPlan::gradients`] |
//! | fp32 master weights | bf16 only: trainable × 4; ZeRO ≥ 1: ÷ world | [`MemoryPlan::masters`] |
//! | AdamW moments | trainable × 2 × 4; ZeRO ≥ 1: ÷ world | [`MemoryPlan::moments`] |
//! | reference model | online reference only: a second copy of the weights | [`MemoryPlan::reference_weights`] |
//! | communication bucket | world > 1: one gradient bucket | [`MemoryPlan::comm_buffers`] |
//! | data feed | CPU only: the micro-batches prepared ahead | [`MemoryPlan::data_feed`] |
//! | runtime overhead | measured constant (CPU), estimate (CUDA) | [`CPU_RUNTIME_OVERHEAD`], [`CUDA_RUNTIME_OVERHEAD`] |
//! | activations | what autograd saves for backward, per micro-batch | [`Activations`] |
//! | backward transients | gradient buffers alive at the start of backward | [`MemoryPlan::backward_transient`] |
//! | update temporaries | AdamW's per-tensor temporaries | [`MemoryPlan::update_transient`] |
//!
//! How they combine ([`MemoryPlan::total`]): the fixed terms (weights … runtime overhead) always add. On CUDA the
//! caching allocator hands the blocks freed after backward to the optimizer update, so the peak is the fixed
//! terms plus the larger of (activations + backward transients) and the update temporaries. On CPU every term
//! adds: glibc's malloc keeps the pages of freed activations in its heaps (chunks under its dynamic mmap
//! threshold, at most 32 MiB) while the update's temporaries are scratch buffers AdamW keeps between steps,
//! so they land on top.
//!
//! Sequence lengths ([`Lengths`]): by default the `data.max_length` bound (the prompt is never truncated, so the
//! shortest prompt — the visual tokens alone — leaves the most room for responses); a measured length (e.g. the
//! longest pair of the data, [`measure_lengths`], or `ddpo validate`'s means) can be given instead.
//!
//! Not counted: evaluation passes (no_grad, smaller than a training step), checkpoint writing (host memory),
//! CUDA caching-allocator fragmentation, NCCL's own buffers (inside the CUDA estimate).
//!
//! LoRA ([`LoraPlan`]): the base counts as frozen; the adapters add their weights, gradients, masters and
//! moments, and per token the saved input of each B (rank wide) and, with dropout, each adapter's dropped
//! input and mask. The adapter counts are tested against `Llava::add_lora`; the LoRA activation term is
//! derived from libtorch's derivative formulas and, unlike the base terms, not yet checked against PyTorch's
//! saved tensors.
//!
//! Accuracy: on CPU the plan of the `small` preset is within 4 % of the measured peak resident memory of
//! `ddpo train` (BENCHMARKS.md, `benches/memplan.rs`; `tests/it/memplan.rs` asserts 10 %). The CUDA rule and its
//! overhead are not yet measured on a GPU.
//!
//! Device memory ([`device_memory`]): `DDPO_DEVICE_MEMORY_BYTES` when set; CPU: `MemAvailable` of
//! /proc/meminfo or the cgroup's remaining limit, whichever is lower, plus what this process already holds;
//! CUDA: the device's total memory from the driver API (cudarc, loaded at run time; `None` without a driver).
//! CPU ranks on one machine share it: each compares its own plan with what is available when it starts.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::{Config, FreezeTarget, ReferenceMode};
use crate::model::clip::Activation;
use crate::model::config::{LlavaConfig, TextConfig, VisionConfig};

/// Environment variable that overrides the detected device memory, in bytes (for tests and for users who know
/// better, e.g. to leave room for another process on the same GPU).
pub const DEVICE_MEMORY_ENV: &str = "DDPO_DEVICE_MEMORY_BYTES";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Everything a CPU training process holds that does not scale with the model: libtorch and the CUDA
/// libraries it links mapped and initialised (code pages touched, relocated data), the intra-op thread pool and
/// its scratch buffers, the tokenizer, the parquet reader and the data feed thread.
///
/// Measured, not fitted: the peak resident memory (the child's `ru_maxrss`, i.e. VmHWM) of
/// `ddpo train --max-steps 3 --device cpu` on the **tiny** preset — 0.2 M parameters, whose weights,
/// gradients, optimizer state, activations and transients come to 8.8 MiB by this plan — on 8 synthetic
/// 336 px pairs, fp32, cached reference (precomputed in another process), micro_batch_size 2,
/// OMP_NUM_THREADS=2, minus those 8.8 MiB: runs peaked at 518, 515, 515 MiB → 518 − 8.8 ≈ 510 MiB
/// (2026-11-28, libtorch 2.11.0 from the CPU + CUDA 13 wheel, whose CUDA libraries load too; glibc 2.36).
/// `cargo bench --bench memplan` repeats the measurement and prints the value it derives; the small preset
/// then tests the whole plan with it (BENCHMARKS.md, tests/it/memplan.rs).
pub const CPU_RUNTIME_OVERHEAD: u64 = 510 * MIB;

/// The CUDA counterpart of [`CPU_RUNTIME_OVERHEAD`], in device memory: the CUDA context (lazy module loading,
/// the default since CUDA 12.2), libtorch's kernels as they load, cuBLAS/cuBLASLt workspaces and NCCL's
/// buffers. An **estimate, not measured here** (no GPU was lent to the session that wrote this): commonly
/// reported contexts are 0.3–0.6 GiB on Hopper, NCCL a few hundred MiB per communicator.
pub const CUDA_RUNTIME_OVERHEAD: u64 = 3 * GIB / 2;

/// Gradient bucket bytes ([`crate::collective::BUCKET_BYTES`]).
pub const BUCKET_BYTES: u64 = crate::collective::BUCKET_BYTES as u64;

/// Steps of micro-batches the data feed prepares ahead ([`crate::data::FEED_DEPTH`]).
const FEED_DEPTH: u64 = crate::data::FEED_DEPTH as u64;

/// Where the plan's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanDevice {
    Cpu,
    Cuda,
}

impl PlanDevice {
    pub fn of(device: tch::Device) -> Self {
        if device.is_cuda() {
            Self::Cuda
        } else {
            Self::Cpu
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

/// Weight dtype, as `train::weight_kind` resolves `model.dtype` for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    Fp32,
    Bf16,
}

impl WeightDtype {
    pub fn of(kind: tch::Kind) -> Self {
        if kind == tch::Kind::Float {
            Self::Fp32
        } else {
            Self::Bf16
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Self::Fp32 => 4,
            Self::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Token counts of one pair as the forward pass sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lengths {
    /// Prompt tokens, the image's visual tokens included.
    pub prompt: usize,
    /// Tokens of one response (answer + EOS); for a pair of unequal responses, their mean rounded up.
    pub response: usize,
    /// Where the numbers come from, for the printed plan.
    pub source: String,
    /// `Some(data.max_length)` when the lengths are that bound.
    pub max_length: Option<usize>,
}

impl Lengths {
    /// The `data.max_length` bound: a prompt is at least the visual tokens and is never truncated; responses
    /// are cut to `max_length − prompt`. The shortest prompt leaves the most room, so it gives the longest
    /// shared-prefix sequence (`prompt + 2 × response`) and the most vocabulary positions.
    pub fn bound(model: &LlavaConfig, max_length: usize) -> Self {
        let prompt = model.num_image_tokens();
        Self {
            prompt,
            response: max_length.saturating_sub(prompt).max(1),
            source: format!("data.max_length = {max_length} bound"),
            max_length: Some(max_length),
        }
    }

    /// Lengths measured on data (or given by the user).
    pub fn measured(prompt: usize, response: usize, source: impl Into<String>) -> Self {
        Self {
            prompt,
            response,
            source: source.into(),
            max_length: None,
        }
    }
}

/// What the memory plan depends on.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The model's name for the printed plan (preset name or checkpoint folder).
    pub name: String,
    pub model: LlavaConfig,
    pub dtype: WeightDtype,
    /// `model.freeze`.
    pub freeze: Vec<FreezeTarget>,
    /// Data-parallel ranks.
    pub world: usize,
    /// `train.zero_stage`: 0 none; 1 and 2 shard AdamW moments and fp32 masters 1/world (2 reduce-scatters the
    /// gradients and keeps the owned slices after the exchange; they are whole during backward, the peak).
    pub zero_stage: u8,
    /// `train.micro_batch_size`: pairs per forward on one rank.
    pub micro_batch_size: usize,
    /// `train.batch_size` (global pairs per step): sets how many micro-batches the data feed holds.
    pub batch_size: usize,
    pub lengths: Lengths,
    /// `train.shared_prefix`: one sequence per pair (`prompt | chosen | rejected`) instead of two.
    pub shared_prefix: bool,
    /// `reference.mode`: online keeps a second, frozen model in memory.
    pub reference: ReferenceMode,
    pub device: PlanDevice,
    /// `lora.rank > 0`: adapters on the (then frozen) base; `freeze` lists every part.
    pub lora: Option<LoraPlan>,
}

/// LoRA adapters as the plan counts them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPlan {
    pub rank: u64,
    /// `lora.target_modules`: decoder projections.
    pub targets: Vec<String>,
    /// `lora.dropout > 0`.
    pub dropout: bool,
}

impl LoraPlan {
    pub fn of(cfg: &crate::config::LoraConfig) -> Option<Self> {
        (cfg.rank > 0).then(|| Self {
            rank: cfg.rank as u64,
            targets: cfg.target_modules.clone(),
            dropout: cfg.dropout > 0.0,
        })
    }

    /// (in, out) widths of each targeted projection of one decoder layer.
    fn widths(&self, t: &TextConfig) -> Vec<(u64, u64)> {
        let (d, i) = (t.hidden_size as u64, t.intermediate_size as u64);
        let kv = t.num_key_value_heads() as u64 * head_dim(t);
        self.targets
            .iter()
            .map(|name| match name.as_str() {
                "k_proj" | "v_proj" => (d, kv),
                "gate_proj" | "up_proj" => (d, i),
                "down_proj" => (i, d),
                _ => (d, d), // q_proj, o_proj
            })
            .collect()
    }

    /// Adapter parameters: rank × (in + out) per targeted projection and layer.
    pub fn params(&self, t: &TextConfig) -> u64 {
        let per_layer: u64 = self
            .widths(t)
            .iter()
            .map(|(i, o)| self.rank * (i + o))
            .sum();
        per_layer * t.num_hidden_layers as u64
    }

    /// The largest adapter tensor (the update goes tensor by tensor).
    fn largest(&self, t: &TextConfig) -> u64 {
        self.widths(t)
            .iter()
            .map(|(i, o)| self.rank * i.max(o))
            .max()
            .unwrap_or(0)
    }

    /// Bytes autograd saves per token for the adapters of all layers: B's input `x Aᵀ` (rank × s) per
    /// target; with dropout also the dropped input A saves (in × s) and the mask (in × s on CPU, where
    /// dropout multiplies by a scaled noise tensor; 1 byte on CUDA's fused kernel). Without dropout A saves
    /// the projection's own input, already counted in the decoder's activations.
    fn saved_per_token(&self, t: &TextConfig, s: u64, device: PlanDevice) -> u64 {
        let mask = match device {
            PlanDevice::Cpu => s,
            PlanDevice::Cuda => 1,
        };
        let per_layer: u64 = self
            .widths(t)
            .iter()
            .map(|(i, _)| self.rank * s + if self.dropout { i * (s + mask) } else { 0 })
            .sum();
        per_layer * t.num_hidden_layers as u64
    }
}

impl PlanInput {
    /// A named architecture with the defaults `ddpo plan --preset` starts from: one rank, no ZeRO, micro-batch
    /// 1, batch 32, sequences at a 2048-token bound, shared prefix, cached reference, full fine-tuning.
    pub fn for_architecture(
        name: &str,
        model: LlavaConfig,
        dtype: WeightDtype,
        device: PlanDevice,
    ) -> Self {
        Self {
            name: name.into(),
            lengths: Lengths::bound(&model, 2048),
            model,
            dtype,
            freeze: vec![],
            world: 1,
            zero_stage: 0,
            micro_batch_size: 1,
            batch_size: 32,
            shared_prefix: true,
            reference: ReferenceMode::Cached,
            device,
            lora: None,
        }
    }

    /// The plan input of a job config on `device` with `world` ranks; sequence lengths at the
    /// `data.max_length` bound.
    pub fn from_config(
        cfg: &Config,
        name: String,
        model: LlavaConfig,
        device: PlanDevice,
        dtype: WeightDtype,
        world: usize,
    ) -> Self {
        let lengths = Lengths::bound(&model, cfg.data.max_length);
        Self {
            name,
            model,
            dtype,
            // LoRA: the base model is frozen (its activations still counted in full); the adapters are
            // planned on top.
            freeze: if cfg.lora.rank > 0 {
                vec![
                    FreezeTarget::VisionTower,
                    FreezeTarget::Projector,
                    FreezeTarget::LanguageModel,
                ]
            } else {
                cfg.model.freeze.clone()
            },
            world: world.max(1),
            zero_stage: cfg.train.zero_stage,
            micro_batch_size: cfg.train.micro_batch_size.max(1),
            batch_size: cfg.train.batch_size.max(1),
            lengths,
            shared_prefix: cfg.train.shared_prefix,
            reference: cfg.reference.mode,
            device,
            lora: LoraPlan::of(&cfg.lora),
        }
    }

    fn frozen(&self, t: FreezeTarget) -> bool {
        self.freeze.contains(&t)
    }
}

/// Parameter counts by part, exactly the variables `model::llava::Llava::new` creates (tests compare them
/// with a real `VarStore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Class embedding, patch convolution (no bias), position embeddings, `pre_layrnorm`.
    pub vision_embeddings: u64,
    /// One CLIP encoder layer: two LayerNorms, q/k/v/out projections with biases, fc1/fc2 with biases.
    pub vision_layer: u64,
    pub vision_layers: u64,
    /// Layers the forward runs: LLaVA reads `vision_feature_layer` (−2: all but the last), so later layers
    /// and `post_layernorm` never receive a gradient.
    pub vision_layers_run: u64,
    pub vision_post_layernorm: u64,
    /// `linear_1` (vision → text width) and `linear_2`, with biases.
    pub projector: u64,
    pub lm_embed: u64,
    /// One decoder layer: two RMSNorm weights, q/k/v/o (no bias, k/v at the key-value heads' width),
    /// gate/up/down (no bias).
    pub lm_layer: u64,
    pub lm_layers: u64,
    pub lm_norm: u64,
    pub lm_head: u64,
    /// The largest single tensor of each part (the AdamW update's temporaries are per tensor).
    pub largest_vision: u64,
    pub largest_projector: u64,
    pub largest_lm: u64,
}

/// The vision-feature layer as `Llava::new` resolves it: the number of encoder layers the forward runs.
fn feature_layers(cfg: &LlavaConfig) -> u64 {
    let n = cfg.vision_config.num_hidden_layers as i64;
    let l = cfg.vision_feature_layer;
    (if l < 0 { n + 1 + l } else { l }).clamp(0, n) as u64
}

fn head_dim(t: &TextConfig) -> u64 {
    (t.hidden_size / t.num_attention_heads.max(1)) as u64
}

impl ParamCounts {
    pub fn of(cfg: &LlavaConfig) -> Self {
        let v: &VisionConfig = &cfg.vision_config;
        let t: &TextConfig = &cfg.text_config;
        let (dv, iv) = (v.hidden_size as u64, v.intermediate_size as u64);
        let patches = (v.image_size / v.patch_size.max(1)) as u64;
        let patch_w = v.num_channels as u64 * (v.patch_size as u64).pow(2) * dv;
        let pos = (patches * patches + 1) * dv;
        let vision_embeddings = dv + patch_w + pos + 2 * dv;
        let vision_layer = 2 * dv + 4 * (dv * dv + dv) + 2 * dv + (dv * iv + iv) + (iv * dv + dv);
        let (d, i, vocab) = (
            t.hidden_size as u64,
            t.intermediate_size as u64,
            t.vocab_size as u64,
        );
        let kv = t.num_key_value_heads() as u64 * head_dim(t);
        let lm_layer = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * i;
        Self {
            vision_embeddings,
            vision_layer,
            vision_layers: v.num_hidden_layers as u64,
            vision_layers_run: feature_layers(cfg),
            vision_post_layernorm: 2 * dv,
            projector: (dv * d + d) + (d * d + d),
            lm_embed: vocab * d,
            lm_layer,
            lm_layers: t.num_hidden_layers as u64,
            lm_norm: d,
            lm_head: vocab * d,
            largest_vision: [patch_w, pos, dv * iv, dv * dv]
                .into_iter()
                .max()
                .unwrap_or(0),
            largest_projector: (dv * d).max(d * d),
            largest_lm: [vocab * d, d * i, d * d].into_iter().max().unwrap_or(0),
        }
    }

    pub fn vision(&self) -> u64 {
        self.vision_embeddings + self.vision_layer * self.vision_layers + self.vision_post_layernorm
    }

    pub fn language_model(&self) -> u64 {
        self.lm_embed + self.lm_layer * self.lm_layers + self.lm_norm + self.lm_head
    }

    pub fn total(&self) -> u64 {
        self.vision() + self.projector + self.language_model()
    }

    /// Parameters not frozen by `model.freeze` (they get AdamW moments, and fp32 masters in bf16).
    pub fn trainable(&self, freeze: &[FreezeTarget]) -> u64 {
        let f = |t| freeze.contains(&t);
        (if f(FreezeTarget::VisionTower) {
            0
        } else {
            self.vision()
        }) + (if f(FreezeTarget::Projector) {
            0
        } else {
            self.projector
        }) + (if f(FreezeTarget::LanguageModel) {
            0
        } else {
            self.language_model()
        })
    }

    /// Trainable parameters that receive a gradient: the vision layers after the feature layer and
    /// `post_layernorm` take no part in the forward, so autograd never materialises their `.grad`.
    pub fn with_gradient(&self, freeze: &[FreezeTarget]) -> u64 {
        let unused = self.vision_layer * (self.vision_layers - self.vision_layers_run)
            + self.vision_post_layernorm;
        let vision_unused = if freeze.contains(&FreezeTarget::VisionTower) {
            0
        } else {
            unused
        };
        self.trainable(freeze) - vision_unused
    }

    /// The largest trainable tensor.
    pub fn largest_trainable(&self, freeze: &[FreezeTarget]) -> u64 {
        let f = |t| freeze.contains(&t);
        [
            (!f(FreezeTarget::VisionTower)).then_some(self.largest_vision),
            (!f(FreezeTarget::Projector)).then_some(self.largest_projector),
            (!f(FreezeTarget::LanguageModel)).then_some(self.largest_lm),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
    }
}

/// Shapes of one micro-batch as the forward pass runs it (`data::collate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Sequences: one per pair with the shared prefix, two (chosen; rejected) without.
    pub rows: u64,
    /// Tokens per sequence: prompt + 2 × response shared, prompt + response split.
    pub len: u64,
    /// Images encoded: one per pair in both layouts (`image_rows` lets chosen and rejected share it).
    pub images: u64,
    /// Positions projected onto the vocabulary: every response token of both responses.
    pub positions: u64,
}

impl BatchShape {
    pub fn of(input: &PlanInput) -> Self {
        let b = input.micro_batch_size as u64;
        let (p, r) = (input.lengths.prompt as u64, input.lengths.response as u64);
        let (rows, len) = if input.shared_prefix {
            (b, p + 2 * r)
        } else {
            (2 * b, p + r)
        };
        Self {
            rows,
            len,
            images: b,
            positions: 2 * b * r,
        }
    }
}

/// Saved-for-backward bytes of the activations of one micro-batch, by part: what autograd keeps from the
/// forward until the backward has used it, for the ops `model::{clip,llama,llava}` run (libtorch's
/// derivative formulas save only what the gradient of an input that requires grad needs; views share their
/// base's storage; SDPA is the fused kernel — flash on CPU, memory-efficient/flash on CUDA — which saves
/// q, k, v, its output and the fp32 log-sum-exp, never the T × T attention matrix, but a copy of the
/// boolean mask converted to the query's dtype per call).
///
/// Notation: s = dtype bytes, R rows × L tokens, D/I hidden/intermediate width, H heads, V vocabulary.
/// Every term equals the bytes PyTorch autograd saves for the same op sequence (`tests/it/memplan.rs` runs
/// `tests/oracles/saved_tensors.py`: exact in fp32; in bf16 CPU LayerNorm keeps its statistics in bf16, 0.1 %
/// less than counted here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activations {
    /// CLIP tower (only when it is trainable; a frozen tower with pixel inputs records no graph). Per encoder
    /// layer run: its input, `layer_norm1` output, q, k, v, the attention output (whose transpose back is
    /// already contiguous, so the out-projection saves the same storage), the residual sum and
    /// `layer_norm2` output — 8 × B·N·D_v·s —, fc1's output and the activation's saved tensors
    /// (quick_gelu `x·σ(1.702x)`: x and σ; then the product, saved by fc2; gelu: x and the output) —
    /// 3 (2) × B·N·I_v·s —, the log-sum-exp B·H_v·N·4 and both LayerNorms' fp32 mean and rstd (8 bytes a
    /// token each). Plus the pixels the patch convolution saves, `pre_layrnorm`'s input, mean and rstd, and
    /// the position ids.
    pub vision: u64,
    /// Projector (when it or the tower is trainable): the visual tokens of the feature layer's output (the
    /// class token dropped by a view; `linear_1` flattens it into a contiguous copy and saves that),
    /// `linear_1`'s output (saved by the activation) and the activation's output (saved by `linear_2`).
    pub projector: u64,
    /// Decoder (always: even a frozen decoder passes gradients to a trainable tower; counted in full, an
    /// upper bound then). Per layer: the residual input and the post-attention residual in fp32 (the tensors
    /// themselves in fp32; RMSNorm's fp32 copies in bf16) — 2 × R·L·D·4 —; both RMSNorms' normalised
    /// value and output, q and k after RoPE, v (repeated to all heads with GQA), the attention output — 8 ×
    /// R·L·D·s —; gate output, silu(gate), up output and their product — 4 × R·L·I·s —; the SDPA mask copy
    /// R·L²·s, log-sum-exp R·H·L·4 and both RMSNorms' fp32 rsqrt (4 bytes a token). Plus the final RMSNorm
    /// (input fp32, normalised value s, rsqrt), the token ids and image mask of the embedding splice (and the
    /// image-row index of the split layout), and the rotary tables.
    pub language_model: u64,
    /// Vocabulary projection, only at response positions (`Llava::logps_at`): per position the fp32
    /// log-softmax result (4·V, saved by log_softmax and, as the same storage, by gather) and the selected
    /// hidden row (D·s, saved by the LM head's matmul) and two int64 indices (row selection, gather); all
    /// chunks stay saved until backward.
    pub logits: u64,
    /// LoRA adapters ([`LoraPlan`]): per token of the micro-batch, B's rank-wide input per target and, with
    /// dropout, each adapter's dropped input and mask.
    pub lora: u64,
}

impl Activations {
    pub fn total(&self) -> u64 {
        self.vision + self.projector + self.language_model + self.logits + self.lora
    }

    pub fn of(input: &PlanInput) -> Self {
        let s = input.dtype.bytes();
        let sh = BatchShape::of(input);
        let cfg = &input.model;
        let v = &cfg.vision_config;
        let t = &cfg.text_config;
        let vision_trainable = !input.frozen(FreezeTarget::VisionTower);
        let projector_grad = vision_trainable || !input.frozen(FreezeTarget::Projector);
        let act_saved = |name: &str| -> u64 {
            match Activation::from_name(name) {
                Some(Activation::QuickGelu) => 3,
                _ => 2,
            }
        };

        // CLIP tower.
        let (dv, iv, hv) = (
            v.hidden_size as u64,
            v.intermediate_size as u64,
            v.num_attention_heads as u64,
        );
        let patches = (v.image_size / v.patch_size.max(1)) as u64;
        let n = patches * patches + 1;
        let bn = sh.images * n;
        let vision = if vision_trainable {
            // LayerNorm also saves its fp32 mean and rstd: 8 bytes per token.
            let layer = (8 * bn * dv + act_saved(&v.hidden_act) * bn * iv) * s
                + 4 * sh.images * hv * n
                + 2 * 8 * bn;
            let pixels = sh.images * v.num_channels as u64 * (v.image_size as u64).pow(2) * s;
            let embeddings = pixels + bn * dv * s + 8 * bn + 8 * n;
            feature_layers(cfg) * layer + embeddings
        } else {
            0
        };

        // Projector.
        let d = t.hidden_size as u64;
        let tokens = sh.images * cfg.num_image_tokens() as u64;
        let projector = if projector_grad {
            tokens * dv * s + act_saved(&cfg.projector_hidden_act) * tokens * d * s
        } else {
            0
        };

        // Decoder.
        let (i, h) = (t.intermediate_size as u64, t.num_attention_heads as u64);
        let rl = sh.rows * sh.len;
        // Each RMSNorm also saves its fp32 rsqrt: 4 bytes per token.
        let layer = rl * d * (8 * s + 2 * 4)
            + 4 * rl * i * s
            + sh.rows * sh.len * sh.len * s
            + 4 * sh.rows * h * sh.len
            + 2 * 4 * rl;
        let final_norm = rl * d * (4 + s) + 4 * rl;
        let image_rows = if input.shared_prefix { 0 } else { 8 * sh.rows };
        let embed = rl * (8 + 1) + image_rows;
        let rotary_rows = if input.shared_prefix { sh.rows } else { 1 };
        let rotary = 2 * rotary_rows * sh.len * head_dim(t) * s;
        let language_model = t.num_hidden_layers as u64 * layer + final_norm + embed + rotary;

        // Vocabulary projection.
        let logits = sh.positions * (4 * t.vocab_size as u64 + d * s + 16);
        let lora = input.lora.as_ref().map_or(0, |l| {
            sh.rows * sh.len * l.saved_per_token(t, s, input.device)
        });

        Self {
            vision,
            projector,
            language_model,
            logits,
            lora,
        }
    }
}

/// A memory plan: the terms of the module docs, per rank, in bytes.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub input: PlanInput,
    pub params: ParamCounts,
    pub shape: BatchShape,
    /// Every parameter in the weight dtype (frozen ones too: the forward needs them).
    pub weights: u64,
    /// The gradient of every parameter that receives one, in the weight dtype (autograd's gradients have the
    /// parameter's dtype). Full-size at every ZeRO stage: the trainer's gradients exist from backward to the
    /// update (none during the forward of a step's first micro-batch), and backward produces them whole
    /// before any exchange (tch offers no per-parameter hooks to reduce them per bucket); stage 2 cuts them
    /// to the owned slices after the exchange, which is past the peak. Counted beside the activations: an
    /// upper bound, as backward frees activations while it makes gradients.
    pub gradients: u64,
    /// bf16 only: the fp32 master copy `train::optim::AdamW` keeps of every trainable parameter (updates of
    /// lr ≈ 5e-7 round away in bf16); ZeRO ≥ 1 keeps 1/world.
    pub masters: u64,
    /// AdamW's first and second moments, fp32, for every trainable parameter; ZeRO ≥ 1 keeps 1/world.
    pub moments: u64,
    /// Online reference: a frozen second model in the weight dtype (no gradients, no optimizer state).
    pub reference_weights: u64,
    /// World > 1: the gradient bucket the all-reduce (or reduce-scatter) stages (`BUCKET_BYTES`).
    pub comm_buffers: u64,
    /// CPU only (on CUDA it is host memory): the micro-batches the background feed prepares `FEED_DEPTH`
    /// steps ahead — pixels in fp32 and about 64 bytes of ids, masks, labels and indices per token.
    pub data_feed: u64,
    /// [`CPU_RUNTIME_OVERHEAD`] or [`CUDA_RUNTIME_OVERHEAD`].
    pub overhead: u64,
    pub activations: Activations,
    /// Gradient buffers alive at the start of backward, on top of the saved activations: the first
    /// log-prob chunk's gradients (the gathered zeros and log_softmax's gradient, fp32, plus the cast to the
    /// weight dtype in bf16: chunk × V × (8 | 10)) and the LM head's weight gradient before it is added to
    /// `.grad` (V·D·s, when the decoder is trainable). With an online reference, its no_grad forward runs
    /// while the policy's activations are held; its working set (one decoder layer's tensors, the mask
    /// copy and a log-prob chunk's logits) counts when larger.
    pub backward_transient: u64,
    /// The AdamW update's temporaries for the largest trainable tensor (the update goes tensor by tensor):
    /// the second-moment square root and the scaled first moment, fp32, plus the fp32 copy of a bf16
    /// gradient — 2 (fp32) or 3 (bf16) × 4 bytes per element; ZeRO ≥ 1 updates 1/world of it.
    pub update_transient: u64,
    /// See the module docs: CUDA `fixed + max(activations + backward, update)`, CPU the sum of all terms.
    pub total: u64,
}

impl MemoryPlan {
    pub fn new(input: PlanInput) -> Self {
        let params = ParamCounts::of(&input.model);
        let shape = BatchShape::of(&input);
        let s = input.dtype.bytes();
        let world = input.world.max(1) as u64;
        let shard = |bytes: u64, stage: u8| {
            if input.zero_stage >= stage && world > 1 {
                bytes.div_ceil(world)
            } else {
                bytes
            }
        };
        let t = &input.model.text_config;
        let adapters = input.lora.as_ref().map_or(0, |l| l.params(t));
        let trainable = params.trainable(&input.freeze) + adapters;
        let weights = (params.total() + adapters) * s;
        let gradients = (params.with_gradient(&input.freeze) + adapters) * s;
        let masters = match input.dtype {
            WeightDtype::Bf16 => shard(trainable * 4, 1),
            WeightDtype::Fp32 => 0,
        };
        let moments = shard(trainable * 8, 1);
        let reference_weights = match input.reference {
            ReferenceMode::Online => weights,
            ReferenceMode::Cached => 0,
        };
        let comm_buffers = if world > 1 { BUCKET_BYTES } else { 0 };
        let activations = Activations::of(&input);

        let (vocab, d) = (t.vocab_size as u64, t.hidden_size as u64);
        let chunk = shape
            .positions
            .min(crate::model::llava::LOGPROB_CHUNK as u64);
        let cast = if s == 2 { 2 } else { 0 };
        let head_grad = if input.frozen(FreezeTarget::LanguageModel) {
            0
        } else {
            vocab * d * s
        };
        let mut backward_transient = chunk * vocab * (8 + cast) + head_grad;
        if input.reference == ReferenceMode::Online {
            let rl = shape.rows * shape.len;
            let layer = rl * d * (2 * 4 + 6 * s)
                + 3 * rl * t.intermediate_size as u64 * s
                + shape.rows * shape.len * shape.len * s;
            backward_transient = backward_transient.max(layer + chunk * vocab * 8);
        }
        let largest_adapter = input.lora.as_ref().map_or(0, |l| l.largest(t));
        let unit = shard(
            params.largest_trainable(&input.freeze).max(largest_adapter),
            1,
        );
        let update_transient = unit * 4 * if s == 2 { 3 } else { 2 };

        let (overhead, data_feed) = match input.device {
            PlanDevice::Cuda => (CUDA_RUNTIME_OVERHEAD, 0),
            PlanDevice::Cpu => {
                let v = &input.model.vision_config;
                let per_micro =
                    shape.images * v.num_channels as u64 * (v.image_size as u64).pow(2) * 4
                        + 64 * shape.rows * shape.len;
                let micro_per_step =
                    (input.batch_size as u64 / (input.micro_batch_size as u64 * world)).max(1);
                (
                    CPU_RUNTIME_OVERHEAD,
                    FEED_DEPTH * micro_per_step * per_micro,
                )
            }
        };
        let fixed = weights
            + gradients
            + masters
            + moments
            + reference_weights
            + comm_buffers
            + data_feed
            + overhead;
        let total = match input.device {
            PlanDevice::Cuda => {
                fixed + (activations.total() + backward_transient).max(update_transient)
            }
            PlanDevice::Cpu => fixed + activations.total() + backward_transient + update_transient,
        };
        Self {
            input,
            params,
            shape,
            weights,
            gradients,
            masters,
            moments,
            reference_weights,
            comm_buffers,
            data_feed,
            overhead,
            activations,
            backward_transient,
            update_transient,
            total,
        }
    }

    /// The total without the runtime overhead: what the model, its state and its batch need.
    pub fn model_terms(&self) -> u64 {
        self.total - self.overhead
    }

    /// A readable table of the terms (the text `ddpo plan` prints and training logs).
    pub fn table(&self, memory: Option<&DeviceMemory>) -> String {
        let mut out = self.header();
        for (name, bytes, note) in self.rows() {
            let _ = writeln!(out, "  {name:<22} {:>11}  {note}", fmt_bytes(bytes));
        }
        match memory {
            Some(m) => {
                let _ = writeln!(
                    out,
                    "  {:<22} {:>11}  {}",
                    "device memory",
                    fmt_bytes(m.bytes),
                    m.source
                );
                let verdict = if self.total <= m.bytes {
                    "fits"
                } else {
                    "DOES NOT FIT"
                };
                let share = 100.0 * self.total as f64 / m.bytes.max(1) as f64;
                let _ = writeln!(out, "  {verdict}: {share:.0} % of the device");
            }
            None => {
                let _ = writeln!(out, "  device memory unknown: fit not checked");
            }
        }
        out
    }

    /// Adapter parameters (0 without LoRA).
    fn adapter_params(&self) -> u64 {
        let i = &self.input;
        i.lora
            .as_ref()
            .map_or(0, |l| l.params(&i.model.text_config))
    }

    /// The table's first lines: the model and run, the micro-batch's shape, the adapters.
    fn header(&self) -> String {
        let i = &self.input;
        let adapters = self.adapter_params();
        let trainable = self.params.trainable(&i.freeze) + adapters;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "memory plan per rank: {} ({} parameters, {} trainable), {} weights on {}, world {}, ZeRO-{}",
            i.name,
            count(self.params.total() + adapters),
            count(trainable),
            i.dtype.name(),
            i.device.name(),
            i.world.max(1),
            i.zero_stage
        );
        let responses = if i.shared_prefix { "2 x " } else { "" };
        let rows = if i.shared_prefix {
            "sequence(s)"
        } else {
            "sequences"
        };
        let _ = writeln!(
            out,
            "  micro-batch {} pair(s): {} {rows} of {} tokens (prompt {} + {responses}{} response), {} vocabulary \
             positions; {}; reference {}",
            i.micro_batch_size,
            self.shape.rows,
            self.shape.len,
            i.lengths.prompt,
            i.lengths.response,
            self.shape.positions,
            i.lengths.source,
            i.reference.name()
        );
        if let Some(l) = &i.lora {
            let dropout = if l.dropout { ", dropout" } else { "" };
            let _ = writeln!(
                out,
                "  LoRA rank {} on {} ({} adapter parameters; base frozen){dropout}",
                l.rank,
                l.targets.join(", "),
                count(adapters)
            );
        }
        out
    }

    /// One (name, bytes, how it is counted) row per term, the total last; terms that are zero for this run
    /// (reference model, communication bucket, data feed) are left out.
    fn rows(&self) -> Vec<(&'static str, u64, String)> {
        let i = &self.input;
        let world = i.world.max(1);
        let sharded = |stage: u8| match i.zero_stage >= stage && world > 1 {
            true => format!(", 1/{world} (ZeRO-{})", i.zero_stage),
            false => String::new(),
        };
        let adapters = self.adapter_params();
        let a = &self.activations;
        let lora_acts = match a.lora > 0 {
            true => format!(", LoRA {}", fmt_bytes(a.lora)),
            false => String::new(),
        };
        let (overhead, total) = match i.device {
            PlanDevice::Cpu => (
                "libtorch, threads, tokenizer, reader (measured)",
                "every term adds (CPU)",
            ),
            PlanDevice::Cuda => (
                "CUDA context, libtorch kernels, NCCL (estimate)",
                "fixed + max(activations + backward, update) (CUDA)",
            ),
        };
        let masters = match i.dtype == WeightDtype::Bf16 {
            true => format!("bf16 weights{}", sharded(1)),
            false => "none: fp32 weights".into(),
        };
        let with_gradient = count(self.params.with_gradient(&i.freeze) + adapters);
        let rows = [
            ("weights", self.weights, format!("{} x {} B", count(self.params.total() + adapters), i.dtype.bytes())),
            ("gradients", self.gradients, format!("{with_gradient} with a gradient{}", sharded(2))),
            ("fp32 master weights", self.masters, masters),
            ("AdamW moments", self.moments, format!("2 x fp32{}", sharded(1))),
            ("reference model", self.reference_weights, "online reference".into()),
            ("communication bucket", self.comm_buffers, "gradient bucket".into()),
            ("data feed", self.data_feed, format!("{FEED_DEPTH} steps of micro-batches ahead")),
            ("runtime overhead", self.overhead, overhead.into()),
            (
                "activations",
                a.total(),
                format!(
                    "saved for backward: vision {}, projector {}, decoder {}, log-probs {}{lora_acts}",
                    fmt_bytes(a.vision),
                    fmt_bytes(a.projector),
                    fmt_bytes(a.language_model),
                    fmt_bytes(a.logits)
                ),
            ),
            (
                "backward transients",
                self.backward_transient,
                "log-prob chunk gradients, LM-head weight gradient".into(),
            ),
            ("update temporaries", self.update_transient, format!("AdamW, largest tensor{}", sharded(1))),
            ("total", self.total, total.into()),
        ];
        let optional = ["reference model", "communication bucket", "data feed"];
        rows.into_iter()
            .filter(|(name, bytes, _)| *bytes > 0 || !optional.contains(name))
            .collect()
    }
}

mod architectures;
mod command;
mod device;
mod job;
mod suggest;

pub use architectures::*;
pub use command::{run_plan_command, PlanArgs, PlanError};
pub use device::*;
#[cfg(test)]
use device::{proc_kib, stat_value};
pub use job::*;
pub use suggest::*;

/// Bytes as MiB below 1 GiB, else GiB.
pub fn fmt_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

/// A parameter count as 7.06 B / 49.3 M / 8.1 K.
pub fn count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} M", f / 1e6)
    } else {
        format!("{:.1} K", f / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llava::Llava;

    fn input(name: &str, device: PlanDevice, dtype: WeightDtype) -> PlanInput {
        PlanInput::for_architecture(name, architecture(name).unwrap(), dtype, device)
    }

    /// (total, vision, projector, language model, largest) numel of a real VarStore.
    fn varstore_counts(cfg: &LlavaConfig) -> [u64; 5] {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        Llava::new(&vs.root(), cfg).unwrap();
        let mut c = [0u64; 5];
        for (name, t) in vs.variables() {
            let n = t.numel() as u64;
            c[0] += n;
            let part = if name.starts_with("vision_tower.") {
                1
            } else if name.starts_with("multi_modal_projector.") {
                2
            } else {
                assert!(name.starts_with("language_model."), "{name}");
                3
            };
            c[part] += n;
            c[4] = c[4].max(n);
        }
        c
    }

    /// The planned adapter parameters equal those `Llava::add_lora` makes, for every target (grouped-query
    /// attention in tiny: k/v narrower than q).
    #[test]
    fn lora_adapter_counts_equal_the_varstore() {
        let cfg = architecture("tiny").unwrap();
        let targets = crate::config::LORA_TARGETS
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>();
        for (rank, targets) in [(4, targets.clone()), (8, targets[..2].to_vec())] {
            let lora = crate::config::LoraConfig {
                rank,
                target_modules: targets,
                ..Default::default()
            };
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let lvs = tch::nn::VarStore::new(tch::Device::Cpu);
            let mut model = Llava::new(&vs.root(), &cfg).unwrap();
            model.add_lora(
                &lvs.root(),
                lora.rank,
                lora.alpha,
                lora.dropout,
                &lora.target_modules,
            );
            let real: u64 = lvs.variables().values().map(|t| t.numel() as u64).sum();
            let plan = LoraPlan::of(&lora).unwrap();
            assert_eq!(plan.params(&cfg.text_config), real);
            let largest = lvs
                .variables()
                .values()
                .map(|t| t.numel() as u64)
                .max()
                .unwrap();
            assert_eq!(plan.largest(&cfg.text_config), largest);
        }
    }

    #[test]
    fn parameter_counts_equal_the_varstore() {
        for name in ["tiny", "small"] {
            let cfg = architecture(name).unwrap();
            let p = ParamCounts::of(&cfg);
            let real = varstore_counts(&cfg);
            assert_eq!(
                [
                    p.total(),
                    p.vision(),
                    p.projector,
                    p.language_model(),
                    p.largest_trainable(&[])
                ],
                real,
                "{name}"
            );
        }
    }

    #[test]
    fn llava15_parameter_counts() {
        let p7 = ParamCounts::of(&architecture("llava-1.5-7b").unwrap());
        // Vicuna-7B 6.738 B + CLIP ViT-L/14-336 303.5 M + projector 21.0 M.
        assert_eq!(p7.language_model(), 6_738_415_616);
        assert_eq!(p7.vision(), 303_507_456);
        assert_eq!(p7.projector, 20_979_712);
        assert!(
            (p7.total() as f64 / 1e9 - 7.06).abs() < 0.005,
            "{}",
            p7.total()
        );
        let p13 = ParamCounts::of(&architecture("llava-1.5-13b").unwrap());
        assert_eq!(p13.language_model(), 13_015_864_320);
        assert!(
            (p13.total() as f64 / 1e9 - 13.35).abs() < 0.005,
            "{}",
            p13.total()
        );
        // The vision layer after the feature layer and post_layernorm get no gradient.
        assert_eq!(
            p7.total() - p7.with_gradient(&[]),
            p7.vision_layer + 2 * 1024
        );
    }

    #[test]
    fn sharding_divides_optimizer_state_by_world() {
        let base = input("llava-1.5-7b", PlanDevice::Cuda, WeightDtype::Bf16);
        let p0 = MemoryPlan::new(PlanInput {
            world: 8,
            ..base.clone()
        });
        let p1 = MemoryPlan::new(PlanInput {
            world: 8,
            zero_stage: 1,
            ..base.clone()
        });
        let p2 = MemoryPlan::new(PlanInput {
            world: 8,
            zero_stage: 2,
            ..base.clone()
        });
        assert_eq!(p1.moments, p0.moments.div_ceil(8));
        assert_eq!(p1.masters, p0.masters.div_ceil(8));
        assert_eq!(p1.gradients, p0.gradients);
        // Stage 2 reduce-scatters, but autograd's full-size gradients are all alive first.
        assert_eq!(p2.gradients, p0.gradients);
        assert_eq!(p2.moments, p1.moments);
        assert_eq!(p0.weights, p2.weights);
        // Unsharded: moments are 2 x fp32 per trainable parameter.
        assert_eq!(p0.moments, 8 * p0.params.total());
        // ZeRO with one rank shards nothing.
        let w1 = MemoryPlan::new(PlanInput {
            zero_stage: 2,
            ..base
        });
        assert_eq!(w1.moments, p0.moments);
    }

    #[test]
    fn bf16_adds_fp32_masters_and_halves_weights() {
        let f = MemoryPlan::new(input("small", PlanDevice::Cpu, WeightDtype::Fp32));
        let b = MemoryPlan::new(input("small", PlanDevice::Cpu, WeightDtype::Bf16));
        assert_eq!(f.masters, 0);
        assert_eq!(b.masters, 4 * b.params.total());
        assert_eq!(b.weights * 2, f.weights);
        assert_eq!(b.gradients * 2, f.gradients);
        assert_eq!(b.moments, f.moments);
    }

    #[test]
    fn freezing_and_reference_mode() {
        let base = input("llava-1.5-7b", PlanDevice::Cuda, WeightDtype::Bf16);
        let full = MemoryPlan::new(base.clone());
        let frozen = MemoryPlan::new(PlanInput {
            freeze: vec![FreezeTarget::VisionTower],
            ..base.clone()
        });
        assert_eq!(frozen.weights, full.weights);
        assert_eq!(
            full.moments - frozen.moments,
            8 * full.params.vision(),
            "a frozen tower has no optimizer state"
        );
        assert_eq!(frozen.activations.vision, 0);
        assert!(full.activations.vision > 0);
        let online = MemoryPlan::new(PlanInput {
            reference: ReferenceMode::Online,
            ..base
        });
        assert_eq!(online.reference_weights, full.weights);
        assert!(online.total > full.total + full.weights);
    }

    #[test]
    fn shared_prefix_plans_fewer_activations() {
        let base = input("small", PlanDevice::Cpu, WeightDtype::Fp32);
        let shared = MemoryPlan::new(base.clone());
        let split = MemoryPlan::new(PlanInput {
            shared_prefix: false,
            ..base
        });
        assert_eq!(shared.shape.positions, split.shape.positions);
        assert!(split.activations.language_model > shared.activations.language_model);
    }

    /// LLaVA-1.5-7B, full fine-tuning, bf16, micro_batch_size 1, data.max_length 2048 (bound), shared
    /// prefix, cached reference, 8 ranks of 80 GiB: ZeRO-2 fits, no sharding is refused with ZeRO named.
    #[test]
    fn llava15_7b_on_8_gpus_fits_with_zero2_only() {
        let gpu = 80 * GIB;
        let base = PlanInput {
            world: 8,
            ..input("llava-1.5-7b", PlanDevice::Cuda, WeightDtype::Bf16)
        };
        let z2 = MemoryPlan::new(PlanInput {
            zero_stage: 2,
            ..base.clone()
        });
        assert!(z2.total <= gpu, "{}", z2.table(None));
        let z0 = MemoryPlan::new(base.clone());
        assert!(z0.total > gpu, "{}", z0.table(None));
        let s = suggestions(&base, gpu);
        let z = s
            .iter()
            .find(|s| s.setting.starts_with("train.zero_stage = 2"))
            .unwrap();
        assert!(z.fits && z.total == z2.total, "{s:?}");
        let msg = refusal_message(
            &z0,
            &DeviceMemory {
                bytes: gpu,
                source: "test".into(),
            },
        );
        assert!(msg.contains("settings that would fit"), "{msg}");
        assert!(msg.contains("train.zero_stage = 2"), "{msg}");
        assert!(msg.contains("train.memory_check = false"), "{msg}");
    }

    #[test]
    fn one_rank_is_told_how_many_ranks_zero_needs() {
        let base = input("llava-1.5-7b", PlanDevice::Cuda, WeightDtype::Bf16);
        let s = suggestions(&base, 80 * GIB);
        assert!(
            s.iter()
                .any(|s| s.fits && s.setting.contains("cluster.world_size = ")),
            "{s:?}"
        );
    }

    #[test]
    fn cuda_takes_the_larger_phase_cpu_adds_them() {
        let cuda = MemoryPlan::new(input("small", PlanDevice::Cuda, WeightDtype::Bf16));
        let fixed = cuda.weights + cuda.gradients + cuda.masters + cuda.moments + cuda.overhead;
        assert_eq!(
            cuda.total,
            fixed + (cuda.activations.total() + cuda.backward_transient).max(cuda.update_transient)
        );
        let cpu = MemoryPlan::new(input("small", PlanDevice::Cpu, WeightDtype::Fp32));
        assert_eq!(
            cpu.total,
            cpu.weights
                + cpu.gradients
                + cpu.moments
                + cpu.overhead
                + cpu.data_feed
                + cpu.activations.total()
                + cpu.backward_transient
                + cpu.update_transient
        );
    }

    #[test]
    fn proc_and_cgroup_parsing() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(proc_kib(meminfo, "MemAvailable"), Some(12_000_000 * 1024));
        assert_eq!(proc_kib(meminfo, "MemFree"), None);
        let stat = "anon 10\ninactive_file 4096\nactive_file 5\n";
        assert_eq!(stat_value(stat, "inactive_file"), Some(4096));
        assert!(device_memory(tch::Device::Cpu).is_some_and(|m| m.bytes > 0));
    }

    #[test]
    fn bound_lengths_leave_the_prompt_whole() {
        let m = architecture("small").unwrap();
        let l = Lengths::bound(&m, 2048);
        assert_eq!((l.prompt, l.response), (576, 1472));
        let s = BatchShape::of(&PlanInput {
            micro_batch_size: 2,
            ..input("small", PlanDevice::Cpu, WeightDtype::Fp32)
        });
        assert_eq!((s.rows, s.len, s.positions), (2, 576 + 2 * 1472, 4 * 1472));
    }
}
