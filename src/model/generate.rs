//! Incremental decoding for [`Llava`]: a batch of prompts of different lengths (padded on the left, as
//! transformers' `generate` wants), one prefill that fills a [`KvCache`], then one token per step reusing it.
//!
//! Invariants:
//! - Greedy decoding picks the arg-max of the fp32 logits, as `generate(do_sample=False)` does; a finished row
//!   (it produced EOS) gets no more tokens.
//! - Each prompt's image and prompt are encoded once: its K samples copy the prefill's cache rows.
//! - Sampling draws from the project's own generator on the host, seeded per (seed, prompt index in the run,
//!   sample), so a seed gives the same answers whatever the batching (up to the logits' own rounding).

use tch::nn::Module;
use tch::{Kind, Tensor};

use super::llama::KvCache;
use super::llava::Llava;
use crate::util::prng::SplitMix;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// Softmax of logits / `temperature`, limited to the `top_k` most likely tokens (0: all) and to the
    /// smallest set whose probability reaches `top_p` (1: all), as transformers' warpers do, in that order.
    Sample {
        temperature: f64,
        top_k: usize,
        top_p: f64,
    },
}

impl Sampling {
    /// Greedy at temperature 0 (as the command-line and config settings say), sampling above.
    pub fn from_settings(temperature: f64, top_k: usize, top_p: f64) -> Self {
        if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Answers per prompt (their prefill is shared).
    pub samples: usize,
    pub seed: u64,
    pub eos_id: i64,
    /// The id of left padding (never seen: padding is masked out).
    pub pad_id: i64,
    /// The index of the first prompt of this call in the whole run: sampling is seeded per (seed, prompt index,
    /// sample), so a run's answers do not depend on how its prompts are batched or split between workers.
    pub first_index: u64,
}

/// One answer: its token ids, ending with EOS unless `max_new_tokens` cut it.
pub type Answer = Vec<i64>;

impl Llava {
    /// Answers `[prompt][sample]` for `prompts` (token ids with the image token expanded, one image each) and
    /// their images `pixel_values` `[B, 3, H, W]`.
    pub fn generate(
        &self,
        prompts: &[Vec<i64>],
        pixel_values: &Tensor,
        opts: &GenerateOptions,
    ) -> Vec<Vec<Answer>> {
        let _no_grad = tch::no_grad_guard();
        let device = pixel_values.device();
        let b = prompts.len() as i64;
        let k = opts.samples.max(1) as i64;
        let mut cache = KvCache::default();
        let (mut keys, mut next_pos, logits) =
            self.prefill(prompts, pixel_values, opts, &mut cache);
        // Row r of the decoding batch is sample r % k of prompt r / k.
        let rows = Tensor::arange(b, (Kind::Int64, device)).repeat_interleave_self_int(k, 0, None);
        cache.select_rows(&rows);
        keys = keys.index_select(0, &rows);
        next_pos = next_pos.index_select(0, &rows);
        let mut logits = logits.index_select(0, &rows);
        let n = (b * k) as usize;
        let mut rngs: Vec<SplitMix> = (0..n as u64)
            .map(|r| {
                let (prompt, sample) = (opts.first_index + r / k as u64, r % k as u64);
                let stream = SplitMix::new(prompt.wrapping_mul(1 << 16) ^ sample).next_u64();
                SplitMix::new(opts.seed ^ stream)
            })
            .collect();
        let mut answers: Vec<Answer> = vec![Vec::new(); n];
        let mut done = vec![false; n];
        for step in 0..opts.max_new_tokens {
            let next = choose(&logits, opts.sampling, &mut rngs);
            for (r, &t) in next.iter().enumerate() {
                if !done[r] {
                    answers[r].push(t);
                    done[r] = t == opts.eos_id;
                }
            }
            if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
                break;
            }
            // Finished rows decode padding (as transformers feeds `pad_token_id`); their output is dropped.
            let fed: Vec<i64> = next
                .iter()
                .zip(&done)
                .map(|(&t, &d)| if d { opts.pad_id } else { t })
                .collect();
            let ids = Tensor::from_slice(&fed)
                .to_device(device)
                .view([n as i64, 1]);
            keys = Tensor::cat(
                &[&keys, &Tensor::ones([n as i64, 1], (Kind::Bool, device))],
                1,
            );
            let mask = keys.view([n as i64, 1, 1, -1]);
            let embeds = self.llama().embed_tokens.forward(&ids);
            let h =
                self.llama()
                    .forward_cached(&embeds, &next_pos.view([-1, 1]), &mask, &mut cache);
            next_pos += 1;
            logits = self.last_logits(&h);
        }
        let mut out = vec![Vec::new(); b as usize];
        for (r, a) in answers.into_iter().enumerate() {
            out[r / k as usize].push(a);
        }
        out
    }

    /// Runs the left-padded prompts once. Returns the key mask `[B, T]` (false at padding), each row's next
    /// position `[B]` and the logits of each prompt's last token `[B, V]` (fp32).
    fn prefill(
        &self,
        prompts: &[Vec<i64>],
        pixel_values: &Tensor,
        opts: &GenerateOptions,
        cache: &mut KvCache,
    ) -> (Tensor, Tensor, Tensor) {
        let device = pixel_values.device();
        let b = prompts.len() as i64;
        let t = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
        let mut ids = Vec::with_capacity((b * t) as usize);
        let mut valid = Vec::with_capacity((b * t) as usize);
        for p in prompts {
            let pad = t as usize - p.len();
            ids.extend(std::iter::repeat_n(opts.pad_id, pad).chain(p.iter().copied()));
            valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
        }
        let ids = Tensor::from_slice(&ids).to_device(device).view([b, t]);
        let keys = Tensor::from_slice(&valid).to_device(device).view([b, t]);
        // transformers: position_ids = cumsum(attention_mask) - 1, padding at 1 (never used).
        let pos = keys.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let pos = pos.clamp_min(0);
        let causal = Tensor::ones([t, t], (Kind::Bool, device))
            .tril(0)
            .view([1, 1, t, t]);
        let mask = causal.logical_and(&keys.view([b, 1, 1, t]));
        // A padding query would see no key (NaN that would reach real rows through the values); let it see
        // itself. Its output is never used.
        let mask = mask.logical_or(&Tensor::eye(t, (Kind::Bool, device)).view([1, 1, t, t]));
        let embeds = self.embed(&ids, pixel_values, None);
        let h = self.llama().forward_cached(&embeds, &pos, &mask, cache);
        let next_pos = pos.narrow(1, t - 1, 1).squeeze_dim(1) + 1;
        (keys, next_pos, self.last_logits(&h))
    }

    /// fp32 logits `[B, V]` of the last position of hidden states `[B, T, D]`.
    fn last_logits(&self, hidden: &Tensor) -> Tensor {
        let t = hidden.size()[1];
        self.lm_head()
            .forward(&hidden.narrow(1, t - 1, 1).squeeze_dim(1))
            .to_kind(Kind::Float)
    }
}

/// The next token of every row of `logits` `[N, V]`.
fn choose(logits: &Tensor, sampling: Sampling, rngs: &mut [SplitMix]) -> Vec<i64> {
    match sampling {
        Sampling::Greedy => Vec::<i64>::try_from(logits.argmax(-1, false)).expect("argmax ids"),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
        } => {
            let rows =
                Vec::<Vec<f32>>::try_from(logits.to_device(tch::Device::Cpu)).expect("fp32 logits");
            rows.iter()
                .zip(rngs.iter_mut())
                .map(|(row, rng)| sample_row(row, temperature, top_k, top_p, rng))
                .collect()
        }
    }
}

/// One draw from a row's warped distribution (temperature, then top-k, then top-p).
pub fn sample_row(
    logits: &[f32],
    temperature: f64,
    top_k: usize,
    top_p: f64,
    rng: &mut SplitMix,
) -> i64 {
    let t = temperature.max(1e-6);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Most likely first; ties by id, so the order is fully determined.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k.min(order.len()));
    }
    let top = f64::from(logits[order[0]]) / t;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (f64::from(logits[i]) / t - top).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // top-p: keep the smallest prefix whose probability reaches top_p (at least one token).
    let mut keep = 0;
    let mut mass = 0.0;
    while keep < weights.len() {
        mass += weights[keep] / total;
        keep += 1;
        if mass >= top_p {
            break;
        }
    }
    let kept: f64 = weights[..keep].iter().sum();
    // A uniform draw in [0, kept) from 53 random bits.
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept;
    let mut acc = 0.0;
    for (j, w) in weights[..keep].iter().enumerate() {
        acc += w;
        if u < acc {
            return order[j] as i64;
        }
    }
    order[keep - 1] as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_top_k_and_top_p_and_repeats_with_a_seed() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 1.0];
        let draw = |k, p, seed| {
            let mut rng = SplitMix::new(seed);
            (0..400)
                .map(|_| sample_row(&logits, 1.0, k, p, &mut rng))
                .collect::<Vec<_>>()
        };
        // top-k 2: only the two most likely ids (1 and 2), both drawn.
        let d = draw(2, 1.0, 7);
        assert!(d.iter().all(|&t| t == 1 || t == 2));
        assert!(d.contains(&1) && d.contains(&2));
        // top-p 0.3: id 1 alone holds more than 0.3 of the mass.
        assert!(draw(0, 0.3, 7).iter().all(|&t| t == 1));
        // With everything allowed each id appears, and the same seed repeats the same draws.
        let all = draw(0, 1.0, 9);
        assert!((0..5).all(|i| all.contains(&i)), "{all:?}");
        assert_eq!(all, draw(0, 1.0, 9));
        assert_ne!(all, draw(0, 1.0, 10));
    }

    #[test]
    fn a_low_temperature_is_greedy() {
        let logits = [0.0f32, 3.0, 2.9];
        let mut rng = SplitMix::new(1);
        assert!((0..100).all(|_| sample_row(&logits, 1e-4, 0, 1.0, &mut rng) == 1));
    }
}
