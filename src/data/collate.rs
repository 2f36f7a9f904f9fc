//! Collation of examples into padded tensors, in the layout the RLHF-V code uses: one sequence per
//! response, `[chosen_0 … chosen_{B-1}; rejected_0 … rejected_{B-1}]`, each `prompt ++ response`, padded
//! on the right.
//!
//! Invariants (for a batch of B pairs, longest sequence T):
//! - `input_ids`, `attention_mask`, `labels`, `changed` are `[2B, T]`; `pixel_values` is `[B, 3, H, W]` and
//!   row i and row B+i share image i.
//! - `labels[r, t]` is the token id at t where t is a response position, else −100 (Hugging Face's ignore
//!   index); the log-prob of the token at t comes from the logits at t − 1, so position 0 is never a label.
//! - `changed[r, t]` is 1.0 exactly where t is a response token inside a changed segment; token weight is
//!   then `1 + (γ − 1)·changed` on label positions, so γ can change without re-collating.
//! - With `shared_prefix`, the batch also carries [`Packed`]: what the forward pass runs instead (one row per
//!   pair). Its log-probs land in the `[2B, T]` layout above, so weights, reference log-probs and the loss
//!   never see which layout ran.

use tch::{Kind, Tensor};

use super::pipeline::Example;

pub use crate::model::{IGNORE, SEG_CHOSEN, SEG_PAD, SEG_PROMPT, SEG_REJECTED};

#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    pub changed: Tensor,
    pub pixel_values: Tensor,
    /// `[2B]`: the image index of each row (row i and B+i share image i), so each image is encoded once.
    pub image_rows: Tensor,
    /// `[2B, T]` reference log-probs at label positions (0 elsewhere), when every example carries them.
    pub ref_logps: Option<Tensor>,
    /// Pairs in the batch (B).
    pub pairs: usize,
    /// Response tokens over the whole batch (both sides), for tokens/s.
    pub response_tokens: usize,
    /// The shared-prefix layout the forward pass runs, when collated with `shared_prefix`.
    pub packed: Option<Packed>,
}

/// One sequence per pair, `[prompt | chosen | rejected]`, right-padded to L: the image and the prompt are
/// encoded once instead of twice. Under the mask the model builds from `segments`, a response token sees
/// the prompt and its own earlier tokens, never the other response; rejected tokens are numbered (rotary
/// positions) as if they followed the prompt directly. So every log-prob equals the split layout's.
///
/// Invariants: `input_ids`, `segments`, `positions` are `[B, L]`; `pred_index`, `targets`, `out_index` are
/// `[N]` for the N label positions of the split layout: the log-prob of `targets[i]` comes from the hidden
/// state at flat index `pred_index[i]` of `[B·L]` and lands at flat index `out_index[i]` of `[2B·T]`. The
/// first rejected token is predicted from the prompt's last position, not from the last chosen token.
#[derive(Debug)]
pub struct Packed {
    pub input_ids: Tensor,
    pub segments: Tensor,
    pub positions: Tensor,
    pub pred_index: Tensor,
    pub targets: Tensor,
    pub out_index: Tensor,
}

impl Packed {
    fn build(examples: &[Example], pad_id: u32, split_t: usize) -> Packed {
        let b = examples.len();
        let l = examples
            .iter()
            .map(|e| e.prompt_ids.len() + e.chosen_ids.len() + e.rejected_ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![pad_id as i64; b * l];
        let mut seg = vec![SEG_PAD; b * l];
        let mut pos = vec![0i64; b * l];
        let (mut pred, mut targets, mut out) = (Vec::new(), Vec::new(), Vec::new());
        for (i, e) in examples.iter().enumerate() {
            let (p, c) = (e.prompt_ids.len(), e.chosen_ids.len());
            assert!(p > 0, "example {} has an empty prompt", e.id);
            let base = i * l;
            let parts = [
                (&e.prompt_ids, SEG_PROMPT, 0, 0),
                (&e.chosen_ids, SEG_CHOSEN, p, p),
                (&e.rejected_ids, SEG_REJECTED, p + c, p),
            ];
            for (toks, s, at, first_pos) in parts {
                for (k, &id) in toks.iter().enumerate() {
                    ids[base + at + k] = id as i64;
                    seg[base + at + k] = s;
                    pos[base + at + k] = (first_pos + k) as i64;
                }
            }
            // Split-layout rows: chosen i, rejected b + i; response token k sits at column p + k there.
            for (toks, row, at) in [(&e.chosen_ids, i, p), (&e.rejected_ids, b + i, p + c)] {
                for (k, &id) in toks.iter().enumerate() {
                    let from = if k == 0 { p - 1 } else { at + k - 1 };
                    pred.push((base + from) as i64);
                    targets.push(id as i64);
                    out.push((row * split_t + p + k) as i64);
                }
            }
        }
        let shape = [b as i64, l as i64];
        Packed {
            input_ids: Tensor::from_slice(&ids).view(shape),
            segments: Tensor::from_slice(&seg).view(shape),
            positions: Tensor::from_slice(&pos).view(shape),
            pred_index: Tensor::from_slice(&pred),
            targets: Tensor::from_slice(&targets),
            out_index: Tensor::from_slice(&out),
        }
    }

    fn to_device(&self, device: tch::Device) -> Packed {
        Packed {
            input_ids: self.input_ids.to_device(device),
            segments: self.segments.to_device(device),
            positions: self.positions.to_device(device),
            pred_index: self.pred_index.to_device(device),
            targets: self.targets.to_device(device),
            out_index: self.out_index.to_device(device),
        }
    }
}

/// Collates `examples` (all with the same image size `(h, w)`) padding with `pad_id`; with `shared_prefix`
/// Prompts for generation: each prompt's ids (image token expanded) as i64, and their images stacked
/// `[B, 3, H, W]` on the CPU.
pub fn prompt_batch<'a>(
    prompts: impl IntoIterator<Item = (&'a [u32], &'a [f32])>,
    (h, w): (usize, usize),
) -> (Vec<Vec<i64>>, Tensor) {
    let (ids, pixels): (Vec<Vec<i64>>, Vec<Tensor>) = prompts
        .into_iter()
        .map(|(ids, px)| {
            (
                ids.iter().map(|&t| i64::from(t)).collect(),
                Tensor::from_slice(px),
            )
        })
        .unzip();
    let b = ids.len() as i64;
    (
        ids,
        Tensor::stack(&pixels, 0).view([b, 3, h as i64, w as i64]),
    )
}

/// the batch also carries the [`Packed`] layout the forward pass then runs.
pub fn collate(
    examples: &[Example],
    pad_id: u32,
    image_hw: (usize, usize),
    shared_prefix: bool,
) -> Batch {
    let b = examples.len();
    let seqs: Vec<(&[u32], &[u32], &[bool])> = examples
        .iter()
        .map(|e| (&e.prompt_ids[..], &e.chosen_ids[..], &e.chosen_changed[..]))
        .chain(examples.iter().map(|e| {
            (
                &e.prompt_ids[..],
                &e.rejected_ids[..],
                &e.rejected_changed[..],
            )
        }))
        .collect();
    let t = seqs
        .iter()
        .map(|(p, r, _)| p.len() + r.len())
        .max()
        .unwrap_or(0);
    let rows = seqs.len();
    let mut ids = vec![pad_id as i64; rows * t];
    let mut mask = vec![0i64; rows * t];
    let mut labels = vec![IGNORE; rows * t];
    let mut changed = vec![0f32; rows * t];
    let has_ref = !examples.is_empty() && examples.iter().all(|e| e.reference.is_some());
    let mut refs = vec![0f32; if has_ref { rows * t } else { 0 }];
    let ref_rows: Vec<&[f32]> = if has_ref {
        fn r(e: &Example) -> &super::pipeline::RefLogps {
            e.reference.as_ref().expect("checked")
        }
        examples
            .iter()
            .map(|e| &r(e).chosen[..])
            .chain(examples.iter().map(|e| &r(e).rejected[..]))
            .collect()
    } else {
        Vec::new()
    };
    let mut response_tokens = 0;
    for (r, (prompt, resp, ch)) in seqs.iter().enumerate() {
        let base = r * t;
        for (i, &id) in prompt.iter().chain(resp.iter()).enumerate() {
            ids[base + i] = id as i64;
            mask[base + i] = 1;
        }
        let start = base + prompt.len();
        for (i, (&id, &c)) in resp.iter().zip(ch.iter()).enumerate() {
            labels[start + i] = id as i64;
            changed[start + i] = if c { 1.0 } else { 0.0 };
        }
        if has_ref {
            let lp = ref_rows[r];
            assert_eq!(
                lp.len(),
                resp.len(),
                "reference log-probs must align with response ids"
            );
            refs[start..start + lp.len()].copy_from_slice(lp);
        }
        response_tokens += resp.len();
    }
    let (h, w) = image_hw;
    let mut pixels = Vec::with_capacity(b * 3 * h * w);
    for e in examples {
        assert_eq!(
            e.pixel_values.len(),
            3 * h * w,
            "example {} has a differently sized image",
            e.id
        );
        pixels.extend_from_slice(&e.pixel_values);
    }
    let shape = [rows as i64, t as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape),
        attention_mask: Tensor::from_slice(&mask).view(shape),
        labels: Tensor::from_slice(&labels).view(shape),
        changed: Tensor::from_slice(&changed).view(shape),
        pixel_values: Tensor::from_slice(&pixels).view([b as i64, 3, h as i64, w as i64]),
        image_rows: Tensor::arange(b as i64, (Kind::Int64, tch::Device::Cpu)).repeat([2]),
        ref_logps: has_ref.then(|| Tensor::from_slice(&refs).view(shape)),
        pairs: b,
        response_tokens,
        packed: shared_prefix.then(|| Packed::build(examples, pad_id, t)),
    }
}

impl Batch {
    /// Moves the tensors to `device` (pixel values stay fp32; the model casts them).
    pub fn to_device(&self, device: tch::Device) -> Batch {
        Batch {
            input_ids: self.input_ids.to_device(device),
            attention_mask: self.attention_mask.to_device(device),
            labels: self.labels.to_device(device),
            changed: self.changed.to_device(device),
            pixel_values: self.pixel_values.to_device(device),
            image_rows: self.image_rows.to_device(device),
            ref_logps: self.ref_logps.as_ref().map(|t| t.to_device(device)),
            pairs: self.pairs,
            response_tokens: self.response_tokens,
            packed: self.packed.as_ref().map(|p| p.to_device(device)),
        }
    }

    /// Per-token DDPO weights on label positions (0 elsewhere): 1 outside changed segments, γ inside.
    pub fn weights(&self, gamma: f64) -> Tensor {
        let on_label = self.labels.ne(IGNORE).to_kind(Kind::Float);
        (&self.changed * (gamma - 1.0) + 1.0) * on_label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, prompt: &[u32], c: &[u32], r: &[u32], cc: &[bool], rc: &[bool]) -> Example {
        Example {
            shard: 0,
            row: 0,
            id: id.into(),
            pixel_values: vec![id.len() as f32; 3 * 2 * 2],
            prompt_ids: prompt.to_vec(),
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
            chosen_changed: cc.to_vec(),
            rejected_changed: rc.to_vec(),
            truncated: false,
            reference: None,
        }
    }

    #[test]
    fn layout_labels_and_weights() {
        let a = ex(
            "a",
            &[1, 9],
            &[5, 6, 2],
            &[5, 7, 2],
            &[false, true, false],
            &[false, true, false],
        );
        let b = ex(
            "bb",
            &[1, 9, 9],
            &[4, 2],
            &[4, 4, 4, 2],
            &[false, false],
            &[false, false, false, false],
        );
        let batch = collate(&[a, b], 0, (2, 2), true);
        assert_eq!(batch.input_ids.size(), [4, 7]);
        let row = |t: &Tensor, r: i64| Vec::<i64>::try_from(t.get(r)).unwrap();
        assert_eq!(row(&batch.input_ids, 0), [1, 9, 5, 6, 2, 0, 0]); // chosen a
        assert_eq!(row(&batch.input_ids, 1), [1, 9, 9, 4, 2, 0, 0]); // chosen b
        assert_eq!(row(&batch.input_ids, 3), [1, 9, 9, 4, 4, 4, 2]); // rejected b
        assert_eq!(row(&batch.labels, 2), [-100, -100, 5, 7, 2, -100, -100]);
        assert_eq!(row(&batch.attention_mask, 1), [1, 1, 1, 1, 1, 0, 0]);
        let w = Vec::<f32>::try_from(batch.weights(5.0).get(2)).unwrap();
        assert_eq!(w, [0.0, 0.0, 1.0, 5.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.pixel_values.size(), [2, 3, 2, 2]);
        assert_eq!(batch.response_tokens, 3 + 2 + 3 + 4);

        // The packed layout: [prompt | chosen | rejected], rejected numbered from the prompt's end.
        let p = batch.packed.as_ref().unwrap();
        assert_eq!(p.input_ids.size(), [2, 9]);
        assert_eq!(row(&p.input_ids, 0), [1, 9, 5, 6, 2, 5, 7, 2, 0]);
        assert_eq!(row(&p.segments, 0), [0, 0, 1, 1, 1, 2, 2, 2, 3]);
        assert_eq!(row(&p.positions, 0), [0, 1, 2, 3, 4, 2, 3, 4, 0]);
        assert_eq!(row(&p.input_ids, 1), [1, 9, 9, 4, 2, 4, 4, 4, 2]);
        assert_eq!(row(&p.positions, 1), [0, 1, 2, 3, 4, 3, 4, 5, 6]);
        let v = |t: &Tensor| Vec::<i64>::try_from(t).unwrap();
        // Pair a: chosen from positions 1,2,3; rejected's first token from the prompt's end (1), then 5, 6.
        // Pair b (base 9): chosen from 9+2, 9+3; rejected from 9+2, then 9+5, 9+6, 9+7.
        assert_eq!(v(&p.pred_index), [1, 2, 3, 1, 5, 6, 11, 12, 11, 14, 15, 16]);
        assert_eq!(v(&p.targets), [5, 6, 2, 5, 7, 2, 4, 2, 4, 4, 4, 2]);
        // Split rows of T = 7: chosen a row 0 col 2.., rejected a row 2, chosen b row 1 col 3.., rejected b row 3.
        assert_eq!(
            v(&p.out_index),
            [2, 3, 4, 16, 17, 18, 10, 11, 24, 25, 26, 27]
        );
        // Every target is the split layout's label at out_index.
        let labels = v(&batch.labels.view([-1]));
        for (o, t) in v(&p.out_index).iter().zip(v(&p.targets)) {
            assert_eq!(labels[*o as usize], t);
        }
        assert!(collate(
            &[ex("c", &[1], &[2], &[3], &[false], &[false])],
            0,
            (2, 2),
            false
        )
        .packed
        .is_none());
    }
}
