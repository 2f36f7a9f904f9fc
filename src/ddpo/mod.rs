//! The DDPO objective (docs/algorithm.md): per-token weights from the changed segments, weighted scores, the
//! preference loss and its variants, and the metrics users of other DPO trainers know.
//!
//! Invariants:
//! - Scores are computed in fp32 from per-token log-probs; the same weights apply to policy and reference.
//! - A batch's loss is the mean over its pairs; with gradient accumulation each micro-batch's contribution is
//!   scaled by its share of the global batch (`pairs / global_pairs`), so accumulated gradients equal the
//!   gradient of the global mean.
//! - At policy = reference every margin is 0 and the sigmoid loss is exactly ln 2.

use tch::{Kind, Tensor};

use crate::config::{DdpoConfig, LossKind, Score};
use crate::data::collate::{Batch, IGNORE};

/// Per-row scores `[2B]`: S = Σ w·ℓ / Σ w (mean) or Σ w·ℓ (sum), w = γ on changed tokens, 1 elsewhere,
/// 0 off labels.
pub fn scores(logps: &Tensor, weights: &Tensor, score: Score) -> Tensor {
    let num = (logps * weights).sum_dim_intlist(-1, false, Kind::Float);
    match score {
        Score::Sum => num,
        Score::Mean => {
            num / weights
                .sum_dim_intlist(-1, false, Kind::Float)
                .clamp_min(1e-12)
        }
    }
}

/// The per-pair quantities of one (micro-)batch, all `[B]` fp32 tensors.
#[derive(Debug)]
pub struct PairTerms {
    /// Per-pair loss (already including the SFT term).
    pub loss: Tensor,
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    /// β·(S_π(y_w) − S_ref(y_w)) and the same for y_l.
    pub reward_chosen: Tensor,
    pub reward_rejected: Tensor,
}

/// DDPO terms from policy and reference per-token log-probs `[2B, T]` and the batch's weights.
pub fn pair_terms(
    policy: &Tensor,
    reference: &Tensor,
    batch: &Batch,
    cfg: &DdpoConfig,
) -> PairTerms {
    if cfg.loss == LossKind::Sft {
        return sft_terms(policy, batch);
    }
    let w = batch.weights(cfg.gamma);
    let sp = scores(policy, &w, cfg.score);
    let sr = scores(reference, &w, cfg.score);
    let b = batch.pairs as i64;
    let (pc, pr) = (sp.narrow(0, 0, b), sp.narrow(0, b, b));
    let (rc, rr) = (sr.narrow(0, 0, b), sr.narrow(0, b, b));
    let margin = (&pc - &rc) - (&pr - &rr);
    let beta = cfg.beta;
    let mut loss = match cfg.loss {
        // −log σ(β·Δ), computed stably.
        LossKind::Sigmoid => -(&margin * beta).log_sigmoid(),
        // IPO: (Δ − 1/(2β))².
        LossKind::Ipo => (&margin - 1.0 / (2.0 * beta)).square(),
        // Hinge (SLiC): max(0, 1 − β·Δ).
        LossKind::Hinge => (-(&margin * beta) + 1.0).relu(),
        LossKind::Sft => unreachable!("handled above"),
    };
    if cfg.sft_weight > 0.0 {
        loss -= &pc * cfg.sft_weight;
    }
    PairTerms {
        reward_chosen: (&pc - &rc).detach() * beta,
        reward_rejected: (&pr - &rr).detach() * beta,
        loss,
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: rc,
        ref_rejected: rr,
    }
}

/// SFT: the loss is each pair's mean token NLL of the chosen response (all response tokens weigh 1); the
/// "reference" is the policy itself, detached, so rewards and margins are 0 and the log-prob metrics are the
/// policy's.
fn sft_terms(policy: &Tensor, batch: &Batch) -> PairTerms {
    let s = scores(policy, &batch.weights(1.0), Score::Mean);
    let b = batch.pairs as i64;
    let (pc, pr) = (s.narrow(0, 0, b), s.narrow(0, b, b));
    let (rc, rr) = (pc.detach(), pr.detach());
    PairTerms {
        loss: -&pc,
        reward_chosen: rc.zeros_like(),
        reward_rejected: rr.zeros_like(),
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: rc,
        ref_rejected: rr,
    }
}

/// Running sums of per-pair metrics over the micro-batches of one step (or an evaluation), for averaging.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricSums {
    pub pairs: f64,
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub accuracy: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub tokens: f64,
}

fn total(t: &Tensor) -> f64 {
    t.detach()
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[])
}

impl MetricSums {
    pub fn add(&mut self, t: &PairTerms, tokens: usize) {
        self.pairs += t.loss.size()[0] as f64;
        self.loss += total(&t.loss);
        self.reward_chosen += total(&t.reward_chosen);
        self.reward_rejected += total(&t.reward_rejected);
        self.accuracy += total(
            &t.reward_chosen
                .gt_tensor(&t.reward_rejected)
                .to_kind(Kind::Float),
        );
        self.logps_chosen += total(&t.policy_chosen);
        self.logps_rejected += total(&t.policy_rejected);
        self.ref_chosen += total(&t.ref_chosen);
        self.ref_rejected += total(&t.ref_rejected);
        self.tokens += tokens as f64;
    }

    /// The sums as a flat vector (for all-reduce across ranks); [`MetricSums::from_slice`] inverts it.
    pub fn to_vec(&self) -> Vec<f64> {
        vec![
            self.pairs,
            self.loss,
            self.reward_chosen,
            self.reward_rejected,
            self.accuracy,
            self.logps_chosen,
            self.logps_rejected,
            self.ref_chosen,
            self.ref_rejected,
            self.tokens,
        ]
    }

    pub fn from_slice(v: &[f64]) -> Self {
        Self {
            pairs: v[0],
            loss: v[1],
            reward_chosen: v[2],
            reward_rejected: v[3],
            accuracy: v[4],
            logps_chosen: v[5],
            logps_rejected: v[6],
            ref_chosen: v[7],
            ref_rejected: v[8],
            tokens: v[9],
        }
    }

    /// Adds another rank's sums (for reductions across ranks).
    pub fn merge(&mut self, o: &MetricSums) {
        self.pairs += o.pairs;
        self.loss += o.loss;
        self.reward_chosen += o.reward_chosen;
        self.reward_rejected += o.reward_rejected;
        self.accuracy += o.accuracy;
        self.logps_chosen += o.logps_chosen;
        self.logps_rejected += o.logps_rejected;
        self.ref_chosen += o.ref_chosen;
        self.ref_rejected += o.ref_rejected;
        self.tokens += o.tokens;
    }

    /// The metrics by their DPO-trainer names (`prefix` is "" or "eval/").
    pub fn named(&self, prefix: &str) -> Vec<(String, f64)> {
        let n = self.pairs.max(1.0);
        let (rc, rr) = (self.reward_chosen / n, self.reward_rejected / n);
        [
            ("loss", self.loss / n),
            ("rewards/chosen", rc),
            ("rewards/rejected", rr),
            ("rewards/margins", rc - rr),
            ("rewards/accuracies", self.accuracy / n),
            ("logps/chosen", self.logps_chosen / n),
            ("logps/rejected", self.logps_rejected / n),
            ("logps/ref_chosen", self.ref_chosen / n),
            ("logps/ref_rejected", self.ref_rejected / n),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
    }
}

/// Whether a label position exists in every row (a row with no response tokens cannot be scored).
pub fn every_row_has_labels(batch: &Batch) -> bool {
    let per_row = batch
        .labels
        .ne(IGNORE)
        .sum_dim_intlist(-1, false, Kind::Int64);
    i64::try_from(per_row.min()).unwrap_or(0) > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::collate::collate;
    use crate::data::pipeline::{Example, RefLogps};

    fn ex(c: &[u32], r: &[u32], cc: &[bool], rc: &[bool], refs: (Vec<f32>, Vec<f32>)) -> Example {
        Example {
            shard: 0,
            row: 0,
            id: "x".into(),
            pixel_values: vec![0.0; 3 * 2 * 2],
            prompt_ids: vec![1, 9],
            chosen_ids: c.to_vec(),
            rejected_ids: r.to_vec(),
            chosen_changed: cc.to_vec(),
            rejected_changed: rc.to_vec(),
            truncated: false,
            reference: Some(RefLogps {
                chosen: refs.0,
                rejected: refs.1,
            }),
        }
    }

    fn cfg(score: Score, loss: LossKind) -> DdpoConfig {
        DdpoConfig {
            beta: 0.5,
            gamma: 5.0,
            score,
            loss,
            sft_weight: 0.0,
            min_match: 3,
        }
    }

    /// Hand-computed DDPO numbers for one pair, against the formula of docs/algorithm.md.
    #[test]
    fn scores_and_losses_follow_the_formula() {
        let e = ex(
            &[5, 6, 2],
            &[5, 7, 2],
            &[false, true, false],
            &[false, true, false],
            (vec![-1.0, -2.0, -0.5], vec![-1.0, -1.0, -0.5]),
        );
        let b = collate(&[e], 0, (2, 2), false);
        let reference = b.ref_logps.as_ref().unwrap().shallow_clone();
        // Policy: chosen tokens more likely than the reference, rejected less.
        let policy = reference.shallow_clone() + b.labels.ne(IGNORE).to_kind(Kind::Float) * 0.1;
        let policy = policy.copy();
        let _ = policy.get(1).narrow(0, 2, 3).g_add_scalar_(-0.3); // rejected: +0.1 − 0.3 = −0.2
                                                                   // Weights 1, 5, 1 (Σ = 7).
        let sc = |lp: &[f64]| (lp[0] + 5.0 * lp[1] + lp[2]) / 7.0;
        let (pc, rc) = (sc(&[-0.9, -1.9, -0.4]), sc(&[-1.0, -2.0, -0.5]));
        let (pr, rr) = (sc(&[-1.2, -1.2, -0.7]), sc(&[-1.0, -1.0, -0.5]));
        let margin = (pc - rc) - (pr - rr); // 0.1 + 0.2 = 0.3
        assert!((margin - 0.3).abs() < 1e-12);
        let t = pair_terms(
            &policy,
            &reference,
            &b,
            &cfg(Score::Mean, LossKind::Sigmoid),
        );
        let want = -(1.0 / (1.0 + (-0.5 * margin).exp())).ln();
        assert!((t.loss.double_value(&[0]) - want).abs() < 1e-6);
        assert!((t.reward_chosen.double_value(&[0]) - 0.5 * (pc - rc)).abs() < 1e-6);
        let ipo = pair_terms(&policy, &reference, &b, &cfg(Score::Mean, LossKind::Ipo));
        assert!((ipo.loss.double_value(&[0]) - (margin - 1.0).powi(2)).abs() < 1e-6);
        let hinge = pair_terms(&policy, &reference, &b, &cfg(Score::Mean, LossKind::Hinge));
        assert!((hinge.loss.double_value(&[0]) - (1.0 - 0.5 * margin)).abs() < 1e-6);
        let sum = pair_terms(&policy, &reference, &b, &cfg(Score::Sum, LossKind::Sigmoid));
        let margin_sum = 7.0 * margin;
        let want = -(1.0 / (1.0 + (-0.5 * margin_sum).exp())).ln();
        assert!((sum.loss.double_value(&[0]) - want).abs() < 1e-6);
        let mut sft = cfg(Score::Mean, LossKind::Sigmoid);
        sft.sft_weight = 0.25;
        let with_sft = pair_terms(&policy, &reference, &b, &sft);
        let want = -(1.0 / (1.0 + (-0.5 * margin).exp())).ln() - 0.25 * pc;
        assert!((with_sft.loss.double_value(&[0]) - want).abs() < 1e-6);
    }

    /// SFT: the loss is the chosen response's plain mean token NLL (γ does not weigh changed tokens), and the
    /// reference given is ignored.
    #[test]
    fn sft_loss_is_the_chosen_mean_token_nll() {
        let e = ex(
            &[5, 6, 2],
            &[5, 7, 2],
            &[false, true, false],
            &[false, true, false],
            (vec![-1.0, -2.0, -0.5], vec![-1.0, -1.0, -0.5]),
        );
        let b = collate(&[e], 0, (2, 2), false);
        let policy = b.ref_logps.as_ref().unwrap().shallow_clone();
        let garbage = policy.ones_like() * 100.0;
        let t = pair_terms(&policy, &garbage, &b, &cfg(Score::Sum, LossKind::Sft));
        let want = (1.0 + 2.0 + 0.5) / 3.0;
        assert!((t.loss.double_value(&[0]) - want).abs() < 1e-6);
        assert_eq!(t.reward_chosen.double_value(&[0]), 0.0);
        assert_eq!(
            t.ref_chosen.double_value(&[0]),
            t.policy_chosen.double_value(&[0])
        );
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2() {
        let e = ex(
            &[5, 6, 2],
            &[5, 7, 7, 2],
            &[false, true, false],
            &[false, true, true, false],
            (vec![-1.0, -2.0, -0.5], vec![-1.0, -1.0, -3.0, -0.5]),
        );
        let b = collate(&[e.clone(), e], 0, (2, 2), false);
        let r = b.ref_logps.as_ref().unwrap();
        let t = pair_terms(r, r, &b, &cfg(Score::Mean, LossKind::Sigmoid));
        let mut m = MetricSums::default();
        m.add(&t, b.response_tokens);
        let named: std::collections::HashMap<_, _> = m.named("").into_iter().collect();
        assert!((named["loss"] - std::f64::consts::LN_2).abs() < 1e-7);
        assert_eq!(named["rewards/margins"], 0.0);
        assert_eq!(named["rewards/accuracies"], 0.0);
    }
}
