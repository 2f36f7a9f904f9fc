//! Settings that would fit when a plan does not, and the refusal message that lists them.

use super::*;

/// A changed setting and the plan's total with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// The setting, as a config key and value (`train.micro_batch_size = 1`).
    pub setting: String,
    pub total: u64,
    pub fits: bool,
}

/// Settings that would make `input` fit in `available` bytes, each tried alone: a smaller
/// `train.micro_batch_size` (the largest that fits), ZeRO stage 1 and 2 with this world size (or the
/// smallest world size with which stage 2 would fit, when there is one rank), bf16 weights, a frozen vision
/// tower, a cached reference, the shared-prefix layout and a shorter `data.max_length`; then, if none fits
/// alone, all of them together. Returns only what changes something.
pub fn suggestions(input: &PlanInput, available: u64) -> Vec<Suggestion> {
    let plan = |i: PlanInput| MemoryPlan::new(i).total;
    let mut out = Vec::new();
    let mut push = |setting: String, total: u64| {
        out.push(Suggestion {
            setting,
            total,
            fits: total <= available,
        })
    };
    if input.micro_batch_size > 1 {
        // The largest smaller micro-batch that fits, else the smallest.
        let best = (1..input.micro_batch_size)
            .rev()
            .map(|m| {
                let t = plan(PlanInput {
                    micro_batch_size: m,
                    ..input.clone()
                });
                (m, t)
            })
            .find(|&(m, t)| t <= available || m == 1);
        if let Some((m, t)) = best {
            push(format!("train.micro_batch_size = {m}"), t);
        }
    }
    if input.world > 1 {
        for stage in (input.zero_stage + 1)..=2 {
            let t = plan(PlanInput {
                zero_stage: stage,
                ..input.clone()
            });
            push(
                format!(
                    "train.zero_stage = {stage} (with the {} ranks)",
                    input.world
                ),
                t,
            );
        }
    } else if input.zero_stage < 2 {
        let fit = [2usize, 4, 8, 16, 32, 64].into_iter().find_map(|w| {
            let t = plan(PlanInput {
                zero_stage: 2,
                world: w,
                ..input.clone()
            });
            (t <= available).then_some((w, t))
        });
        if let Some((w, t)) = fit {
            push(
                format!(
                    "train.zero_stage = 2 with cluster.world_size = {w} (ZeRO shards over ranks)"
                ),
                t,
            );
        }
    }
    if input.dtype == WeightDtype::Fp32 {
        let t = plan(PlanInput {
            dtype: WeightDtype::Bf16,
            ..input.clone()
        });
        push("model.dtype = \"bf16\"".into(), t);
    }
    if !input.frozen(FreezeTarget::VisionTower) {
        let mut freeze = input.freeze.clone();
        freeze.push(FreezeTarget::VisionTower);
        let t = plan(PlanInput {
            freeze,
            ..input.clone()
        });
        push("model.freeze = [\"vision_tower\"] (add)".into(), t);
    }
    if input.reference == ReferenceMode::Online {
        let t = plan(PlanInput {
            reference: ReferenceMode::Cached,
            ..input.clone()
        });
        push("reference.mode = \"cached\"".into(), t);
    }
    if !input.shared_prefix {
        let t = plan(PlanInput {
            shared_prefix: true,
            ..input.clone()
        });
        push("train.shared_prefix = true".into(), t);
    }
    if let Some(bound) = input.lengths.max_length {
        // The longest data.max_length (a multiple of 64 above the visual tokens) that fits: binary search,
        // the plan grows with the length.
        let at = |l: usize| {
            plan(PlanInput {
                lengths: Lengths::bound(&input.model, l),
                ..input.clone()
            })
        };
        let lo = (input.lengths.prompt + 64).div_ceil(64);
        if lo * 64 < bound && at(lo * 64) <= available {
            let (mut lo, mut hi) = (lo, bound.div_ceil(64));
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if at(mid * 64) <= available {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let l = lo * 64;
            if l < bound {
                push(
                    format!(
                        "data.max_length = {l} (if the data is that short: `ddpo validate` reports lengths)"
                    ),
                    at(l),
                );
            }
        }
    }
    if !out.iter().any(|s| s.fits) && !out.is_empty() {
        let mut all = input.clone();
        all.micro_batch_size = 1;
        all.zero_stage = 2;
        all.dtype = WeightDtype::Bf16;
        if !all.frozen(FreezeTarget::VisionTower) {
            all.freeze.push(FreezeTarget::VisionTower);
        }
        all.reference = ReferenceMode::Cached;
        all.shared_prefix = true;
        let t = plan(all);
        out.push(Suggestion {
            setting: "all of the above together".into(),
            total: t,
            fits: t <= available,
        });
    }
    out
}

/// The [`suggestions`] as text: what would fit, what would not on its own.
pub fn suggestions_text(input: &PlanInput, available: u64) -> String {
    let sugg = suggestions(input, available);
    let mut m = String::new();
    let (fit, nofit): (Vec<_>, Vec<_>) = sugg.iter().partition(|s| s.fits);
    if !fit.is_empty() {
        m += "settings that would fit (each alone):\n";
        for s in fit {
            let _ = writeln!(m, "  - {}: {}", s.setting, fmt_bytes(s.total));
        }
    }
    if !nofit.is_empty() {
        m += "not enough on their own:\n";
        for s in nofit {
            let _ = writeln!(m, "  - {}: {}", s.setting, fmt_bytes(s.total));
        }
    }
    if sugg.iter().all(|s| !s.fits) {
        m += "nothing tried here fits: more ranks with train.zero_stage = 2, or a larger device.\n";
    }
    m
}

/// Why a job was refused: the plan, the device's memory and what would fit.
pub fn refusal_message(plan: &MemoryPlan, memory: &DeviceMemory) -> String {
    format!(
        "memory plan: one rank needs {} but the device has {} ({}); training would run out of memory.\n{}{}\
         set train.memory_check = false (DDPO__TRAIN__MEMORY_CHECK=false) to start anyway.",
        fmt_bytes(plan.total),
        fmt_bytes(memory.bytes),
        memory.source,
        plan.table(Some(memory)),
        suggestions_text(&plan.input, memory.bytes)
    )
}
