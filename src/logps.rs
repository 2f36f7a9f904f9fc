//! A model's per-token log-probs of a collated batch, in either layout: the one place where the data side's
//! tensors meet the model. The reference precompute and the trainer both go through it, so cached and online
//! reference log-probs are the same computation; the DDPO objective (`ddpo`) only ever sees its output.

use tch::{Kind, Tensor};

use crate::data::collate::Batch;
use crate::model::llava::{Llava, LOGPROB_CHUNK};

/// `[2B, T]` fp32 log-probs of the label tokens under `model` (0 off labels); rows `[chosen; rejected]`.
/// Each pair's image is encoded once; with the batch's shared-prefix layout its prompt too.
pub fn batch_logps(model: &Llava, batch: &Batch) -> Tensor {
    if let Some(p) = &batch.packed {
        let h = model.hidden_packed(&p.input_ids, &p.segments, &p.positions, &batch.pixel_values);
        let d = h.size()[2];
        let lp = model.logps_at(&h.view([-1, d]), &p.pred_index, &p.targets, LOGPROB_CHUNK);
        let (rows, t) = batch.labels.size2().expect("[2B, T] labels");
        return Tensor::zeros([rows * t], (Kind::Float, lp.device()))
            .index_put(&[Some(p.out_index.shallow_clone())], &lp, false)
            .view([rows, t]);
    }
    let h = model.hidden(
        &batch.input_ids,
        &batch.attention_mask,
        &batch.pixel_values,
        Some(&batch.image_rows),
    );
    model.response_logps(&h, &batch.labels)
}
