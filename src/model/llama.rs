//! LLaMA decoder (RMSNorm, rotary embeddings, grouped-query attention through libtorch's
//! scaled-dot-product attention, SwiGLU), as transformers' `LlamaModel` computes it.
//!
//! Variables live under the path given (`language_model.model.…`, llava-hf layout); the LM head is separate
//! (`language_model.lm_head`) so log-probs can project only the positions that need them.
//! Invariants: RMSNorm is computed in fp32 and cast back (as transformers does); rotary tables are built in
//! fp32; training pads on the right, so positions are 0..T-1 for every row; generation pads prompts on the left
//! and passes positions and a mask to [`Llama::forward_cached`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::TextConfig;

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(p: nn::Path, d: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[d], nn::Init::Const(1.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// A LoRA adapter: `x ↦ scale · (dropout(x) Aᵀ) Bᵀ`, A `[r, in]`, B `[out, r]` (PEFT's layout and init: A
/// Kaiming-uniform, B zero, so a new adapter changes nothing). Dropout acts on the adapter's input only and
/// only while the decoder's training flag is set, drawing from libtorch's default generator as PEFT's
/// `nn.Dropout` does, so a seeded forward masks exactly as PEFT's does.
#[derive(Debug)]
pub struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
}

/// A bias-free projection, optionally with a LoRA adapter added to its output.
#[derive(Debug)]
struct Proj {
    base: nn::Linear,
    lora: Option<Lora>,
}

impl Proj {
    fn new(p: nn::Path, i: i64, o: i64) -> Self {
        Self {
            base: linear_nobias(p, i, o),
            lora: None,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base.forward(x);
        match &self.lora {
            Some(l) => {
                let x = if l.dropout > 0.0 && l.training.load(Ordering::Relaxed) {
                    x.dropout(l.dropout, true)
                } else {
                    x.shallow_clone()
                };
                y + x.matmul(&l.a.tr()).matmul(&l.b.tr()) * l.scale
            }
            None => y,
        }
    }

    /// Adds an adapter with its variables under `p` (`lora_A.weight`, `lora_B.weight`).
    fn add_lora(
        &mut self,
        p: nn::Path,
        rank: i64,
        scale: f64,
        dropout: f64,
        training: &Arc<AtomicBool>,
    ) {
        let (out, inp) = self.base.ws.size2().expect("[out, in] weight");
        // kaiming_uniform_(a = √5) on [r, in]: bound 1/√in, as PEFT initialises lora_A.
        let bound = 1.0 / (inp as f64).sqrt();
        let a = (&p / "lora_A").var(
            "weight",
            &[rank, inp],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = (&p / "lora_B").var("weight", &[out, rank], nn::Init::Const(0.0));
        self.lora = Some(Lora {
            a,
            b,
            scale,
            dropout,
            training: training.clone(),
        });
    }
}

#[derive(Debug)]
struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

fn linear_nobias(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

/// Rotates half the dimensions: (x1, x2) → (−x2, x1).
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("rank ≥ 1") / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[x2.neg(), x1], -1)
}

impl Attention {
    fn new(p: nn::Path, c: &TextConfig) -> Self {
        let d = c.hidden_size as i64;
        let heads = c.num_attention_heads as i64;
        let kv_heads = c.num_key_value_heads() as i64;
        let head_dim = d / heads;
        Self {
            q: Proj::new(&p / "q_proj", d, heads * head_dim),
            k: Proj::new(&p / "k_proj", d, kv_heads * head_dim),
            v: Proj::new(&p / "v_proj", d, kv_heads * head_dim),
            o: Proj::new(&p / "o_proj", heads * head_dim, d),
            heads,
            kv_heads,
            head_dim,
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Tensor {
        let (q, k, v) = self.project(x, cos, sin);
        self.attend(&q, k, v, mask)
    }

    /// As [`Attention::forward`] for new tokens after those in `cache`: their keys and values are appended to
    /// it and the queries attend to all of them (`mask` is `[B, 1, T, cached + T]`).
    fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Tensor {
        let (q, k, v) = self.project(x, cos, sin);
        let (k, v) = match cache.take() {
            Some((ck, cv)) => (Tensor::cat(&[ck, k], 2), Tensor::cat(&[cv, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.shallow_clone(), v.shallow_clone()));
        self.attend(&q, k, v, mask)
    }

    /// Queries, keys and values `[B, heads, T, head_dim]` with the rotary embedding applied (keys and values
    /// with the key-value heads only).
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("[batch, seq, hidden]");
        let q = self
            .q
            .forward(x)
            .view([b, t, self.heads, self.head_dim])
            .transpose(1, 2);
        let k = self
            .k
            .forward(x)
            .view([b, t, self.kv_heads, self.head_dim])
            .transpose(1, 2);
        let v = self
            .v
            .forward(x)
            .view([b, t, self.kv_heads, self.head_dim])
            .transpose(1, 2);
        let q = &q * cos + rotate_half(&q) * sin;
        let k = &k * cos + rotate_half(&k) * sin;
        (q, k, v)
    }

    fn attend(&self, q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Tensor {
        let (b, _, t, _) = q.size4().expect("[batch, heads, seq, head_dim]");
        let (k, v) = if self.kv_heads != self.heads {
            let rep = self.heads / self.kv_heads;
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k, v)
        };
        let y =
            Tensor::scaled_dot_product_attention(q, &k, &v, Some(mask), 0.0, false, None, false);
        self.o.forward(
            &y.transpose(1, 2)
                .contiguous()
                .view([b, t, self.heads * self.head_dim]),
        )
    }
}

#[derive(Debug)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    gate: Proj,
    up: Proj,
    down: Proj,
}

impl Layer {
    fn new(p: nn::Path, c: &TextConfig) -> Self {
        let d = c.hidden_size as i64;
        let i = c.intermediate_size as i64;
        Self {
            input_norm: RmsNorm::new(&p / "input_layernorm", d, c.rms_norm_eps),
            attn: Attention::new(&p / "self_attn", c),
            post_norm: RmsNorm::new(&p / "post_attention_layernorm", d, c.rms_norm_eps),
            gate: Proj::new(&p / "mlp" / "gate_proj", d, i),
            up: Proj::new(&p / "mlp" / "up_proj", d, i),
            down: Proj::new(&p / "mlp" / "down_proj", i, d),
        }
    }

    /// One layer; with `cache`, the new tokens' keys and values are appended to it and attention sees all.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let h = self.input_norm.forward(x);
        let a = match cache {
            Some(c) => self.attn.forward_cached(&h, cos, sin, mask, c),
            None => self.attn.forward(&h, cos, sin, mask),
        };
        self.mlp(x + a)
    }

    /// The residual MLP half of a layer.
    fn mlp(&self, x: Tensor) -> Tensor {
        let h = self.post_norm.forward(&x);
        let m = self
            .down
            .forward(&(self.gate.forward(&h).silu() * self.up.forward(&h)));
        x + m
    }
}

/// The decoder stack without the LM head.
#[derive(Debug)]
pub struct Llama {
    pub embed_tokens: nn::Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head_dim: i64,
    rope_theta: f64,
    /// Whether LoRA dropout is active (PyTorch's `module.training`, for the adapters only): off unless the
    /// trainer turns it on around the policy's forward, so evaluation and reference log-probs never drop.
    lora_training: Arc<AtomicBool>,
}

impl Llama {
    /// `p` is the `model` path (e.g. `language_model.model`).
    pub fn new(p: nn::Path, c: &TextConfig) -> Self {
        let d = c.hidden_size as i64;
        let layers = &p / "layers";
        Self {
            embed_tokens: nn::embedding(
                &p / "embed_tokens",
                c.vocab_size as i64,
                d,
                Default::default(),
            ),
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(&layers / i, c))
                .collect(),
            norm: RmsNorm::new(&p / "norm", d, c.rms_norm_eps),
            head_dim: d / c.num_attention_heads as i64,
            rope_theta: c.rope_theta(),
            lora_training: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Turns LoRA dropout on or off (it is off after construction).
    pub fn set_lora_training(&self, on: bool) {
        self.lora_training.store(on, Ordering::Relaxed);
    }

    /// Adds LoRA adapters of `rank` (update scaled by `alpha / rank`, input dropout `dropout` while training)
    /// to the `targets` projections of every
    /// layer, their variables under `root` at PEFT's names for transformers' LLaVA
    /// (`base_model.model.model.language_model.layers.<i>.<self_attn|mlp>.<proj>.lora_{A,B}.weight`), so a
    /// `VarStore` of adapters saves as a PEFT `adapter_model.safetensors` unchanged.
    pub fn add_lora(
        &mut self,
        root: &nn::Path,
        rank: usize,
        alpha: f64,
        dropout: f64,
        targets: &[String],
    ) {
        let scale = alpha / rank as f64;
        let layers = root / "base_model" / "model" / "model" / "language_model" / "layers";
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = &layers / i;
            let attn = &p / "self_attn";
            let mlp = &p / "mlp";
            for t in targets {
                let (proj, path) = match t.as_str() {
                    "q_proj" => (&mut layer.attn.q, &attn / "q_proj"),
                    "k_proj" => (&mut layer.attn.k, &attn / "k_proj"),
                    "v_proj" => (&mut layer.attn.v, &attn / "v_proj"),
                    "o_proj" => (&mut layer.attn.o, &attn / "o_proj"),
                    "gate_proj" => (&mut layer.gate, &mlp / "gate_proj"),
                    "up_proj" => (&mut layer.up, &mlp / "up_proj"),
                    "down_proj" => (&mut layer.down, &mlp / "down_proj"),
                    other => panic!("lora target {other:?}: validated by the config"),
                };
                proj.add_lora(path, rank as i64, scale, dropout, &self.lora_training);
            }
        }
    }

    /// cos/sin tables `[1, 1, T, head_dim]` for positions 0..T-1, computed in fp32 as transformers does.
    fn rotary(&self, t: i64, device: tch::Device, kind: Kind) -> (Tensor, Tensor) {
        let half = self.head_dim / 2;
        let exponents = Tensor::arange_start_step(0, self.head_dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / self.head_dim as f64;
        let inv_freq = Tensor::from(self.rope_theta as f32)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let pos = Tensor::arange(t, (Kind::Int64, device)).to_kind(Kind::Float);
        let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // [T, half]
        debug_assert_eq!(freqs.size()[1], half);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (
            emb.cos().to_kind(kind).view([1, 1, t, self.head_dim]),
            emb.sin().to_kind(kind).view([1, 1, t, self.head_dim]),
        )
    }

    /// cos/sin `[B, 1, T, head_dim]` at rotary `positions` `[B, T]` (each below `rows`): rows of the table
    /// for 0..rows-1, so every layout gets the very values the plain causal forward computes.
    fn rotary_at(&self, positions: &Tensor, rows: i64, kind: Kind) -> (Tensor, Tensor) {
        let (b, t) = positions.size2().expect("[batch, seq]");
        let (cos, sin) = self.rotary(rows, positions.device(), kind);
        let at = |table: &Tensor| {
            table
                .view([rows, self.head_dim])
                .index_select(0, &positions.reshape([-1]))
                .view([b, 1, t, self.head_dim])
        };
        (at(&cos), at(&sin))
    }

    /// Final hidden states `[B, T, D]` of new tokens after those in `cache` (empty for the first call):
    /// `positions` `[B, T]` are their rotary positions, `mask` `[B, 1, T, cached + T]` says which keys each
    /// query sees (generation: left padding masked, causal). Appends the new keys and values to `cache`.
    pub fn forward_cached(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        cache: &mut KvCache,
    ) -> Tensor {
        let rows = i64::try_from(positions.max()).expect("positions") + 1;
        let (cos, sin) = self.rotary_at(positions, rows, embeds.kind());
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut x = embeds.shallow_clone();
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &cos, &sin, mask, Some(c));
        }
        self.norm.forward(&x)
    }

    /// Final hidden states `[B, L, D]` of shared-prefix rows (see `data::collate::Packed`): `segments`
    /// `[B, L]` (prompt 0, chosen 1, rejected 2, padding 3) and rotary `positions` `[B, L]`. A token sees
    /// earlier tokens of the prompt and of its own segment; padding is never a key.
    pub fn forward_segmented(
        &self,
        embeds: &Tensor,
        segments: &Tensor,
        positions: &Tensor,
    ) -> Tensor {
        use super::{SEG_PAD, SEG_PROMPT};
        let (b, l, _) = embeds.size3().expect("[batch, seq, hidden]");
        let device = embeds.device();
        // Positions never exceed L − 1 (a response is numbered from the prompt's end), so a table of L
        // rows covers them; gathering rows gives the very values the split layout computes.
        let (cos, sin) = self.rotary_at(positions, l, embeds.kind());
        let causal = Tensor::ones([l, l], (Kind::Bool, device))
            .tril(0)
            .view([1, 1, l, l]);
        let q = segments.view([b, 1, l, 1]);
        let k = segments.view([b, 1, 1, l]);
        let visible = k.eq(SEG_PROMPT).logical_or(&k.eq_tensor(&q));
        let mask = causal.logical_and(&visible).logical_and(&k.ne(SEG_PAD));
        // A padded query row sees the prompt; its output is never used.
        let mut x = embeds.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &mask, None);
        }
        self.norm.forward(&x)
    }

    /// Final hidden states `[B, T, D]` for input embeddings `[B, T, D]` and an attention mask `[B, T]`
    /// (1 = token, 0 = padding). Causal attention; padded keys are masked out.
    pub fn forward_embeds(&self, embeds: &Tensor, attention_mask: &Tensor) -> Tensor {
        let (b, t, _) = embeds.size3().expect("[batch, seq, hidden]");
        let device = embeds.device();
        let (cos, sin) = self.rotary(t, device, embeds.kind());
        let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
        let keys = attention_mask.to_kind(Kind::Bool).view([b, 1, 1, t]);
        let mask = causal.view([1, 1, t, t]).logical_and(&keys);
        // A padded query row would see no key at all (NaN); let it see itself. Its output is never used.
        let eye = Tensor::eye(t, (Kind::Bool, device)).view([1, 1, t, t]);
        let mask = mask.logical_or(&eye);
        let mut x = embeds.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, &mask, None);
        }
        self.norm.forward(&x)
    }
}

/// Keys and values of the tokens seen so far, per layer (`[B, kv_heads, T, head_dim]` each): what incremental
/// decoding reuses instead of recomputing the prefix.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Keeps (and repeats) the rows `rows` `[N]` of the batch: K samples of one prompt share its prefill.
    pub fn select_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}
