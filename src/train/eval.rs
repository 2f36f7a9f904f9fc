//! Held-out evaluation: the DDPO terms of every eval pair under no_grad, each rank its share, summed over ranks.

use super::data::RowRef;
use super::run::Run;
use super::step::terms;
use super::TrainError;
use crate::data::collate::{collate, Batch};
use crate::data::pipeline::Example;
use crate::ddpo::MetricSums;

impl Run<'_> {
    /// The eval split's metric sums over all ranks, or `None` without an eval split.
    pub fn evaluate(&mut self) -> Result<Option<MetricSums>, TrainError> {
        let Some(eval) = self.eval.as_ref() else {
            return Ok(None);
        };
        let all: Vec<RowRef> = eval.rows().to_vec();
        let rows = self.my_share(&all);
        let mut sums = MetricSums::default();
        for micro in rows.chunks(self.cfg.train.micro_batch_size.max(1)) {
            let exs = self.eval_examples(micro)?;
            let batch = self.eval_collate(&exs);
            let reference = self.reference.as_ref().map(|r| &r.1);
            let t = tch::no_grad(|| terms(&self.model, reference, &batch, &self.cfg.ddpo));
            sums.add(&t, batch.response_tokens);
        }
        let (sums, _) = self.reduce_sums(&sums, 0.0)?;
        Ok(Some(sums))
    }

    fn eval_examples(&mut self, rows: &[RowRef]) -> Result<Vec<Example>, TrainError> {
        let src = self.eval.as_mut().expect("eval split");
        rows.iter().map(|&r| src.example(r)).collect()
    }

    fn eval_collate(&self, exs: &[Example]) -> Batch {
        let pre = self.eval.as_ref().expect("eval split").preprocessor();
        collate(
            exs,
            pre.pad_id(),
            pre.image_hw(),
            self.cfg.train.shared_prefix,
        )
        .to_device(self.device)
    }
}
