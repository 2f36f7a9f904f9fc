//! CLIP vision tower (pre-LN ViT with a class token), as transformers' `CLIPVisionModel` computes it.
//!
//! Variable names follow the llava-hf checkpoint layout under the path it is given
//! (`vision_tower.vision_model.…`), so loading and saving are name-for-name.
//! Invariant: `hidden_states(x)` returns the embeddings after `pre_layrnorm` followed by every layer's output
//! (num_layers + 1 entries), indexed like transformers' `output_hidden_states`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::config::VisionConfig;
use super::ModelError;

#[derive(Debug)]
struct Attention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &VisionConfig) -> Self {
        let d = c.hidden_size as i64;
        Self {
            q: nn::linear(&p / "q_proj", d, d, Default::default()),
            k: nn::linear(&p / "k_proj", d, d, Default::default()),
            v: nn::linear(&p / "v_proj", d, d, Default::default()),
            out: nn::linear(&p / "out_proj", d, d, Default::default()),
            heads: c.num_attention_heads as i64,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().expect("[batch, tokens, hidden]");
        let hd = d / self.heads;
        let split = |y: Tensor| y.view([b, t, self.heads, hd]).transpose(1, 2);
        let q = split(self.q.forward(x));
        let k = split(self.k.forward(x));
        let v = split(self.v.forward(x));
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.out
            .forward(&y.transpose(1, 2).contiguous().view([b, t, d]))
    }
}

#[derive(Debug)]
struct Layer {
    ln1: nn::LayerNorm,
    attn: Attention,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    act: Activation,
}

/// Activations CLIP checkpoints use.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
        }
    }
}

impl Layer {
    fn new(p: nn::Path, c: &VisionConfig, act: Activation) -> Self {
        let d = c.hidden_size as i64;
        let i = c.intermediate_size as i64;
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        Self {
            ln1: nn::layer_norm(&p / "layer_norm1", vec![d], ln),
            attn: Attention::new(&p / "self_attn", c),
            ln2: nn::layer_norm(&p / "layer_norm2", vec![d], ln),
            fc1: nn::linear(&p / "mlp" / "fc1", d, i, Default::default()),
            fc2: nn::linear(&p / "mlp" / "fc2", i, d, Default::default()),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attn.forward(&self.ln1.forward(x));
        let h = self
            .fc2
            .forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&x))));
        x + h
    }
}

/// The vision tower.
#[derive(Debug)]
pub struct ClipVision {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<Layer>,
    /// Loaded and saved for checkpoint fidelity; LLaVA uses hidden states, not the pooled output.
    _post_layernorm: nn::LayerNorm,
    patch: i64,
}

impl ClipVision {
    /// `p` is the `vision_model` path (e.g. `vision_tower.vision_model`).
    pub fn new(p: nn::Path, c: &VisionConfig) -> Result<Self, ModelError> {
        let act = Activation::from_name(&c.hidden_act).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "vision_config.hidden_act {:?} is not supported",
                c.hidden_act
            ))
        })?;
        let d = c.hidden_size as i64;
        let patch = c.patch_size as i64;
        let n_pos = (c.image_size / c.patch_size).pow(2) as i64 + 1;
        let emb = &p / "embeddings";
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let enc = &p / "encoder" / "layers";
        Ok(Self {
            class_embedding: emb.var(
                "class_embedding",
                &[d],
                nn::Init::Randn {
                    mean: 0.,
                    stdev: 0.02,
                },
            ),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                c.num_channels as i64,
                d,
                patch,
                nn::ConvConfig {
                    stride: patch,
                    bias: false,
                    ..Default::default()
                },
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                n_pos,
                d,
                Default::default(),
            ),
            pre_layrnorm: nn::layer_norm(&p / "pre_layrnorm", vec![d], ln),
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(&enc / i, c, act))
                .collect(),
            _post_layernorm: nn::layer_norm(&p / "post_layernorm", vec![d], ln),
            patch,
        })
    }

    /// Hidden states after the embeddings and after each of the first `upto` layers (all when None).
    pub fn hidden_states(&self, pixel_values: &Tensor, upto: Option<usize>) -> Vec<Tensor> {
        let b = pixel_values.size()[0];
        // Pixels arrive in fp32 from the processor; the tower may hold bf16 weights.
        let pixel_values = pixel_values.to_kind(self.class_embedding.kind());
        let x = self
            .patch_embedding
            .forward(&pixel_values)
            .flatten(2, -1)
            .transpose(1, 2); // [b, patches, d]
        let cls = self
            .class_embedding
            .view([1, 1, -1])
            .expand([b, 1, -1], false)
            .to_kind(x.kind());
        let x = Tensor::cat(&[cls, x], 1);
        let n = x.size()[1];
        let pos = self
            .position_embedding
            .forward(&Tensor::arange(n, (tch::Kind::Int64, x.device())));
        let x = self.pre_layrnorm.forward(&(x + pos.unsqueeze(0)));
        let n_layers = upto.unwrap_or(self.layers.len()).min(self.layers.len());
        let mut states = Vec::with_capacity(n_layers + 1);
        states.push(x);
        for layer in &self.layers[..n_layers] {
            let next = layer.forward(states.last().expect("non-empty"));
            states.push(next);
        }
        states
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn patch_size(&self) -> i64 {
        self.patch
    }
}
