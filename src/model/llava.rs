//! LLaVA: CLIP vision tower → 2-layer projector → LLaMA decoder, image features spliced into the token
//! embeddings at the image-token positions, as transformers' `LlavaForConditionalGeneration` does.
//!
//! Invariants:
//! - Variable names are exactly the llava-hf checkpoint keys (`language_model.model.…`,
//!   `language_model.lm_head.weight`, `vision_tower.vision_model.…`, `multi_modal_projector.linear_{1,2}.…`),
//!   so a checkpoint saved from the `VarStore` is loadable by transformers unchanged.
//! - Log-probs are computed in fp32 and only at response positions, in chunks, so the fp32 full-vocabulary
//!   logits of a long batch are never all in memory at once.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::clip::{Activation, ClipVision};
use super::config::LlavaConfig;
use super::llama::Llama;
use super::{ModelError, IGNORE};

#[derive(Debug)]
pub struct Llava {
    pub config: LlavaConfig,
    vision: ClipVision,
    proj1: nn::Linear,
    proj2: nn::Linear,
    proj_act: Activation,
    llama: Llama,
    lm_head: nn::Linear,
    /// hidden_states index the projector reads (resolved from `vision_feature_layer`).
    feature_layer: usize,
}

/// Positions of the response tokens whose log-probs are computed per chunk.
pub const LOGPROB_CHUNK: i64 = 1024;

impl Llava {
    /// Builds the model's variables under `root` (random init; load a checkpoint over them). A setting this
    /// implementation does not compute is refused, naming it.
    pub fn new(root: &nn::Path, config: &LlavaConfig) -> Result<Self, ModelError> {
        crate::util::numerics::warm_up();
        Self::build(root, config)
    }

    fn build(root: &nn::Path, config: &LlavaConfig) -> Result<Self, ModelError> {
        let v = &config.vision_config;
        let t = &config.text_config;
        if !matches!(
            config.vision_feature_select_strategy.as_str(),
            "default" | "full"
        ) {
            return Err(ModelError::Unsupported(format!(
                "vision_feature_select_strategy {:?} is not supported (default, full)",
                config.vision_feature_select_strategy
            )));
        }
        let n = v.num_hidden_layers as i64;
        let l = config.vision_feature_layer;
        let feature_layer = if l < 0 { n + 1 + l } else { l };
        if !(0..=n).contains(&feature_layer) {
            return Err(ModelError::Unsupported(format!(
                "vision_feature_layer {l} is outside the vision tower's {n} layers"
            )));
        }
        if t.hidden_size % t.num_attention_heads != 0
            || t.num_attention_heads % t.num_key_value_heads() != 0
        {
            return Err(ModelError::Unsupported(format!(
                "text_config: hidden_size {} / num_attention_heads {} / num_key_value_heads {} do not divide",
                t.hidden_size,
                t.num_attention_heads,
                t.num_key_value_heads()
            )));
        }
        if v.hidden_size % v.num_attention_heads != 0 || v.image_size % v.patch_size != 0 {
            return Err(ModelError::Unsupported(
                "vision_config: hidden_size/heads or image_size/patch_size do not divide".into(),
            ));
        }
        let proj_act = Activation::from_name(&config.projector_hidden_act).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "projector_hidden_act {:?} is not supported",
                config.projector_hidden_act
            ))
        })?;
        let unsupported = t.unsupported();
        if !unsupported.is_empty() {
            return Err(ModelError::Unsupported(unsupported.join("; ")));
        }
        if t.model_type != "llama" {
            return Err(ModelError::Unsupported(format!(
                "text_config.model_type {:?} is not supported (llama)",
                t.model_type
            )));
        }
        if v.model_type != "clip_vision_model" {
            return Err(ModelError::Unsupported(format!(
                "vision_config.model_type {:?} is not supported (clip_vision_model)",
                v.model_type
            )));
        }
        let vision = ClipVision::new(root / "vision_tower" / "vision_model", v)?;
        let mm = root / "multi_modal_projector";
        let (vd, td) = (v.hidden_size as i64, t.hidden_size as i64);
        let lm = root / "language_model";
        Ok(Self {
            config: config.clone(),
            vision,
            proj1: nn::linear(&mm / "linear_1", vd, td, Default::default()),
            proj2: nn::linear(&mm / "linear_2", td, td, Default::default()),
            proj_act,
            llama: Llama::new(&lm / "model", t),
            lm_head: nn::linear(
                &lm / "lm_head",
                td,
                t.vocab_size as i64,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            ),
            feature_layer: feature_layer as usize,
        })
    }

    /// Builds the model on `device` and loads `dir`'s checkpoint; `kind` is the weight dtype (bf16 on CUDA,
    /// fp32 on CPU). Log-probs are fp32 whatever the weights.
    pub fn load(
        dir: &std::path::Path,
        device: tch::Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self), ModelError> {
        let config = LlavaConfig::from_dir(dir)?;
        let mut vs = nn::VarStore::new(device);
        // Variables are made in the target dtype straight away (a bf16 7B model never exists in fp32 on the
        // device); their random initial values are overwritten by the checkpoint's.
        vs.set_kind(kind);
        let model = {
            let _rng = super::global_rng_lock();
            Self::new(&vs.root(), &config)?
        };
        super::weights::load(&vs, dir)?;
        Ok((vs, model))
    }

    pub(super) fn llama(&self) -> &Llama {
        &self.llama
    }

    pub(super) fn lm_head(&self) -> &nn::Linear {
        &self.lm_head
    }

    /// Projected image features `[B·N, D]` for pixel values `[B, 3, H, W]` (N visual tokens per image).
    pub fn image_features(&self, pixel_values: &Tensor) -> Tensor {
        let states = self
            .vision
            .hidden_states(pixel_values, Some(self.feature_layer));
        let mut f = states[self.feature_layer].shallow_clone();
        if self.config.vision_feature_select_strategy == "default" {
            let n = f.size()[1];
            f = f.narrow(1, 1, n - 1);
        }
        let h = self
            .proj2
            .forward(&self.proj_act.apply(&self.proj1.forward(&f)));
        h.flatten(0, 1)
    }

    /// Token embeddings with image features placed at image-token positions (in order).
    pub fn embed(
        &self,
        input_ids: &Tensor,
        pixel_values: &Tensor,
        image_rows: Option<&Tensor>,
    ) -> Tensor {
        let embeds = self.llama.embed_tokens.forward(input_ids);
        let feats = self.image_features(pixel_values).to_kind(embeds.kind());
        // Rows may share images ([chosen; rejected] layout): `image_rows[r]` is row r's image index.
        let feats = match image_rows {
            Some(idx) => {
                let n = self.config.num_image_tokens() as i64;
                let d = feats.size()[1];
                feats.view([-1, n, d]).index_select(0, idx).flatten(0, 1)
            }
            None => feats,
        };
        let is_image = input_ids.eq(self.config.image_token_index() as i64);
        let slots = i64::try_from(is_image.sum(Kind::Int64)).unwrap_or(-1);
        assert_eq!(
            slots,
            feats.size()[0],
            "the batch has {slots} image-token positions but its images give {} visual tokens",
            feats.size()[0]
        );
        let mask = is_image.unsqueeze(-1).expand_as(&embeds);
        embeds.masked_scatter(&mask, &feats)
    }

    /// Final hidden states `[B, T, D]`.
    pub fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pixel_values: &Tensor,
        image_rows: Option<&Tensor>,
    ) -> Tensor {
        let e = self.embed(input_ids, pixel_values, image_rows);
        self.llama.forward_embeds(&e, attention_mask)
    }

    /// LoRA adapters of `rank` (update scaled by `alpha / rank`, `dropout` on their input while training) on
    /// the decoder projections named in `targets`, their variables created under `root` (a separate
    /// `VarStore`, so the base model's loading and saving never see them). See [`Llama::add_lora`].
    pub fn add_lora(
        &mut self,
        root: &nn::Path,
        rank: usize,
        alpha: f64,
        dropout: f64,
        targets: &[String],
    ) {
        self.llama.add_lora(root, rank, alpha, dropout, targets);
    }

    /// Turns LoRA dropout on (the policy's training forward) or off (evaluation, reference; the default).
    pub fn set_lora_training(&self, on: bool) {
        self.llama.set_lora_training(on);
    }

    /// Final hidden states `[B, L, D]` of the shared-prefix layout (one image per row): `input_ids`,
    /// `segments` (`SEG_*`) and rotary `positions`, all `[B, L]`.
    pub fn hidden_packed(
        &self,
        input_ids: &Tensor,
        segments: &Tensor,
        positions: &Tensor,
        pixel_values: &Tensor,
    ) -> Tensor {
        let e = self.embed(input_ids, pixel_values, None);
        self.llama.forward_segmented(&e, segments, positions)
    }

    /// Full logits `[B, T, V]` (for tests and small inputs; training uses [`Llava::response_logps`]).
    pub fn logits(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pixel_values: &Tensor,
    ) -> Tensor {
        self.lm_head
            .forward(&self.hidden(input_ids, attention_mask, pixel_values, None))
    }

    /// Per-token log-probs of the label tokens: `out[r, t] = log p(labels[r, t] | tokens < t)` in fp32 at
    /// positions where `labels != −100`, 0 elsewhere. Shape `[B, T]`. Only label positions are projected onto
    /// the vocabulary, `LOGPROB_CHUNK` positions at a time.
    pub fn response_logps(&self, hidden: &Tensor, labels: &Tensor) -> Tensor {
        self.response_logps_chunked(hidden, labels, LOGPROB_CHUNK)
    }

    /// [`Llava::response_logps`] with an explicit chunk size (positions per vocabulary projection).
    pub fn response_logps_chunked(&self, hidden: &Tensor, labels: &Tensor, chunk: i64) -> Tensor {
        let (b, t, d) = hidden.size3().expect("[batch, seq, hidden]");
        // The token at t is predicted by the hidden state at t − 1 (position 0 is never a label).
        let y = labels.reshape([-1]);
        let first_column = Tensor::arange(b * t, (Kind::Int64, hidden.device()))
            .remainder(t)
            .eq(0);
        let out = y
            .ne(IGNORE)
            .logical_and(&first_column.logical_not())
            .nonzero()
            .squeeze_dim(1);
        let lp = self.logps_at(
            &hidden.reshape([-1, d]),
            &(&out - 1),
            &y.index_select(0, &out),
            chunk,
        );
        Tensor::zeros([b * t], (Kind::Float, hidden.device()))
            .index_put(&[Some(out)], &lp, false)
            .view([b, t])
    }

    /// fp32 log-probs `[N]` of `targets[i]` given the hidden state at row `pred_index[i]` of `hidden`
    /// `[M, D]`: only those rows are projected onto the vocabulary, `chunk` at a time.
    pub fn logps_at(
        &self,
        hidden: &Tensor,
        pred_index: &Tensor,
        targets: &Tensor,
        chunk: i64,
    ) -> Tensor {
        let chunk = chunk.max(1);
        let n = pred_index.size()[0];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let logits = self
                .lm_head
                .forward(&hidden.index_select(0, &pred_index.narrow(0, start, len)))
                .to_kind(Kind::Float);
            let lp = logits.log_softmax(-1, Kind::Float);
            let tok = targets.narrow(0, start, len).unsqueeze(1);
            parts.push(lp.gather(1, &tok, false).squeeze_dim(1));
            start += len;
        }
        if parts.is_empty() {
            Tensor::zeros([0], (Kind::Float, hidden.device()))
        } else {
            Tensor::cat(&parts, 0)
        }
    }
}
