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
    let mut tried: Vec<(String, u64)> = Vec::new();
    tried.extend(smaller_micro_batch(input, available));
    tried.extend(zero_stages(input, available));
    tried.extend(switches(input));
    tried.extend(shorter_max_length(input, available));
    let mut out: Vec<Suggestion> = tried
        .into_iter()
        .map(|(setting, total)| Suggestion {
            setting,
            total,
            fits: total <= available,
        })
        .collect();
    if !out.iter().any(|s| s.fits) && !out.is_empty() {
        let total = total_of(all_together(input));
        out.push(Suggestion {
            setting: "all of the above together".into(),
            total,
            fits: total <= available,
        });
    }
    out
}

fn total_of(input: PlanInput) -> u64 {
    MemoryPlan::new(input).total
}

/// The largest smaller micro-batch that fits, else 1.
fn smaller_micro_batch(input: &PlanInput, available: u64) -> Option<(String, u64)> {
    (1..input.micro_batch_size)
        .rev()
        .map(|m| {
            let t = total_of(PlanInput {
                micro_batch_size: m,
                ..input.clone()
            });
            (m, t)
        })
        .find(|&(m, t)| t <= available || m == 1)
        .map(|(m, t)| (format!("train.micro_batch_size = {m}"), t))
}

/// Higher ZeRO stages with this world size; with one rank, the smallest world size at which stage 2 fits.
fn zero_stages(input: &PlanInput, available: u64) -> Vec<(String, u64)> {
    if input.world > 1 {
        return ((input.zero_stage + 1)..=2)
            .map(|stage| {
                let t = total_of(PlanInput {
                    zero_stage: stage,
                    ..input.clone()
                });
                let w = input.world;
                (
                    format!("train.zero_stage = {stage} (with the {w} ranks)"),
                    t,
                )
            })
            .collect();
    }
    if input.zero_stage >= 2 {
        return Vec::new();
    }
    [2usize, 4, 8, 16, 32, 64]
        .into_iter()
        .find_map(|w| {
            let t = total_of(PlanInput {
                zero_stage: 2,
                world: w,
                ..input.clone()
            });
            (t <= available).then_some((w, t))
        })
        .map(|(w, t)| {
            let s = format!(
                "train.zero_stage = 2 with cluster.world_size = {w} (ZeRO shards over ranks)"
            );
            vec![(s, t)]
        })
        .unwrap_or_default()
}

/// The on/off settings that only ever shrink a plan: bf16 weights, a frozen vision tower, a cached reference,
/// the shared-prefix layout (each one not already set).
fn switches(input: &PlanInput) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut try_one = |setting: &str, changed: PlanInput| {
        out.push((setting.to_owned(), total_of(changed)));
    };
    if input.dtype == WeightDtype::Fp32 {
        let i = PlanInput {
            dtype: WeightDtype::Bf16,
            ..input.clone()
        };
        try_one("model.dtype = \"bf16\"", i);
    }
    if !input.frozen(FreezeTarget::VisionTower) {
        let mut i = input.clone();
        i.freeze.push(FreezeTarget::VisionTower);
        try_one("model.freeze = [\"vision_tower\"] (add)", i);
    }
    if input.reference == ReferenceMode::Online {
        let i = PlanInput {
            reference: ReferenceMode::Cached,
            ..input.clone()
        };
        try_one("reference.mode = \"cached\"", i);
    }
    if !input.shared_prefix {
        let i = PlanInput {
            shared_prefix: true,
            ..input.clone()
        };
        try_one("train.shared_prefix = true", i);
    }
    out
}

/// The longest `data.max_length` (a multiple of 64 above the visual tokens) that fits, by binary search (the
/// plan grows with the length); only for plans bounded by `data.max_length`.
fn shorter_max_length(input: &PlanInput, available: u64) -> Option<(String, u64)> {
    let bound = input.lengths.max_length?;
    let at = |l: usize| {
        total_of(PlanInput {
            lengths: Lengths::bound(&input.model, l),
            ..input.clone()
        })
    };
    let lo = (input.lengths.prompt + 64).div_ceil(64);
    if lo * 64 >= bound || at(lo * 64) > available {
        return None;
    }
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
    (l < bound).then(|| {
        let s = format!(
            "data.max_length = {l} (if the data is that short: `ddpo validate` reports lengths)"
        );
        (s, at(l))
    })
}

/// Every setting above at once (for when none fits alone).
fn all_together(input: &PlanInput) -> PlanInput {
    let mut all = input.clone();
    all.micro_batch_size = 1;
    all.zero_stage = 2;
    all.dtype = WeightDtype::Bf16;
    if !all.frozen(FreezeTarget::VisionTower) {
        all.freeze.push(FreezeTarget::VisionTower);
    }
    all.reference = ReferenceMode::Cached;
    all.shared_prefix = true;
    all
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
