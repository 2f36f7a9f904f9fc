//! Learning-rate schedules: linear warm-up, then cosine, linear or constant, as Hugging Face's
//! `get_{cosine,linear,constant}_schedule_with_warmup` compute them (so runs compare step for step).

use crate::config::Schedule;

/// Warm-up steps for a run: ⌈ratio × total⌉, as transformers' `get_warmup_steps`.
pub fn warmup_steps(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).ceil() as usize
}

/// Learning rate of optimizer step `step` (0-based) of `total`.
pub fn lr_at(base: f64, schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    if step < warmup {
        return base * s / (warmup.max(1) as f64);
    }
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            ((total - step.min(total)) as f64 / (total - warmup).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => {
            let progress = (s - warmup as f64) / ((total - warmup).max(1) as f64);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        // Values from transformers' lambdas for total 10, warm-up 2.
        let lr = |s, sch| lr_at(1.0, sch, s, 2, 10);
        assert_eq!(lr(0, Schedule::Cosine), 0.0);
        assert_eq!(lr(1, Schedule::Cosine), 0.5);
        assert_eq!(lr(2, Schedule::Cosine), 1.0);
        assert!((lr(6, Schedule::Cosine) - 0.5).abs() < 1e-12);
        assert!(
            (lr(9, Schedule::Cosine) - 0.5 * (1.0 + (std::f64::consts::PI * 7.0 / 8.0).cos()))
                .abs()
                < 1e-12
        );
        assert!((lr(6, Schedule::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(lr(9, Schedule::Constant), 1.0);
        assert_eq!(warmup_steps(0.1, 25), 3);
        assert_eq!(warmup_steps(0.0, 25), 0);
    }
}
