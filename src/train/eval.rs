//! Held-out evaluation: the DDPO terms of every eval pair under no_grad, each rank its share, summed over ranks;
//! with `train.eval_generate`, also the model's own greedy answers to eval prompts scored against their scenes.

use super::data::RowRef;
use super::run::Run;
use super::step::terms;
use super::TrainError;
use crate::data::collate::{collate, Batch};
use crate::data::pipeline::Example;
use crate::data::synth::truth::{self, Totals};
use crate::ddpo::MetricSums;
use crate::model::generate::{GenerateOptions, Sampling};

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

    /// `eval/hallucination/*`: the first `train.eval_generate` eval prompts answered greedily (each rank its
    /// share), each answer scored against its scene, the totals summed over ranks. `None` when off.
    pub fn hallucination(&mut self) -> Result<Option<Vec<(String, f64)>>, TrainError> {
        let (Some(eval), true) = (self.eval.as_ref(), self.scenes.is_some()) else {
            return Ok(None);
        };
        let n = self.cfg.train.eval_generate.min(eval.rows().len());
        let all: Vec<RowRef> = eval.rows()[..n].to_vec();
        let mut totals = Totals::default();
        for micro in self
            .my_share(&all)
            .chunks(self.cfg.train.micro_batch_size.max(1))
        {
            let exs = self.eval_examples(micro)?;
            for (ex, answer) in exs.iter().zip(self.answer(&exs)) {
                let scene = self.scenes.as_ref().and_then(|s| s.get(&ex.id));
                let scene = scene.ok_or_else(|| {
                    TrainError::Setup(format!("eval row id {:?} has no scene", ex.id))
                })?;
                totals.add(&truth::score(&answer, scene));
            }
        }
        let mut v = totals.to_vec();
        self.comm.all_reduce_sum_f64(&mut v)?;
        Ok(Some(
            Totals::from_slice(&v).rates().named("eval/hallucination/"),
        ))
    }

    /// Greedy answers (text) of examples' prompts.
    fn answer(&self, exs: &[Example]) -> Vec<String> {
        let pre = self.eval.as_ref().expect("eval split").preprocessor();
        let prompts = exs
            .iter()
            .map(|e| (e.prompt_ids.as_slice(), e.pixel_values.as_slice()));
        let (ids, pixels) = crate::data::collate::prompt_batch(prompts, pre.image_hw());
        let pixels = pixels.to_device(self.device);
        let opts = GenerateOptions {
            max_new_tokens: self.cfg.train.eval_generate_max_new_tokens,
            sampling: Sampling::Greedy,
            samples: 1,
            seed: 0,
            eos_id: i64::from(pre.text.eos_id()),
            pad_id: i64::from(pre.pad_id()),
            first_index: 0,
        };
        self.model
            .generate(&ids, &pixels, &opts)
            .into_iter()
            // An answer that cannot be decoded scores as saying nothing.
            .map(|mut samples| {
                pre.text
                    .decode_answer(&samples.remove(0))
                    .unwrap_or_default()
            })
            .collect()
    }
}
