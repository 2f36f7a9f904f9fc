//! The plan of a job config: logged and checked before training starts, and lengths measured on its data.

use super::*;

/// The plan of a job on `device` with `world` ranks, the model read from `model.path`'s config.json.
pub fn plan_for_config(
    cfg: &Config,
    device: tch::Device,
    kind: tch::Kind,
    world: usize,
) -> Result<MemoryPlan, PlanError> {
    let model = LlavaConfig::from_dir(&cfg.model.path)?;
    let name = cfg.model.path.display().to_string();
    Ok(MemoryPlan::new(PlanInput::from_config(
        cfg,
        name,
        model,
        PlanDevice::of(device),
        WeightDtype::of(kind),
        world,
    )))
}

/// Called by `train::train_distributed` before anything is loaded: rank 0 logs the plan; every rank compares
/// its plan with its device's memory and, when it does not fit, returns the refusal (or, with
/// `train.memory_check = false`, logs it as a warning and goes on). Unknown device memory or an unreadable
/// model config skip the check (the model load reports the latter).
pub fn check_before_training(
    cfg: &Config,
    device: tch::Device,
    kind: tch::Kind,
    rank: usize,
    world: usize,
) -> Result<(), PlanError> {
    let plan = match plan_for_config(cfg, device, kind, world) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("memory plan skipped: {e}");
            return Ok(());
        }
    };
    let memory = device_memory(device);
    let fits = memory.as_ref().is_none_or(|m| plan.total <= m.bytes);
    if fits {
        if rank == 0 {
            tracing::info!("{}", plan.table(memory.as_ref()).trim_end());
        }
        return Ok(());
    }
    // The refusal (or warning) carries the table itself.
    let msg = refusal_message(&plan, memory.as_ref().expect("checked above"));
    if cfg.train.memory_check {
        Err(PlanError::DoesNotFit(msg))
    } else {
        tracing::warn!("train.memory_check = false: starting anyway. {msg}");
        Ok(())
    }
}

/// Prompt and response lengths of the training data: the longest pair (`prompt + chosen + rejected`, the
/// shared-prefix row) and the means. Streams every row (as `ddpo validate` does).
pub fn measure_lengths(cfg: &Config) -> Result<(Lengths, Lengths), PlanError> {
    use crate::data::pipeline::{ExampleStream, Preprocessor};
    let pre = Preprocessor::from_config(cfg)?;
    let files = crate::data::shards::discover(&cfg.data.train)?;
    let mut n = 0usize;
    let (mut sum_p, mut sum_r) = (0usize, 0usize);
    let mut longest = (0usize, 0usize);
    for ex in ExampleStream::new(&pre, files, crate::config::OnBadRow::Skip).flatten() {
        let (p, c, r) = (
            ex.prompt_ids.len(),
            ex.chosen_ids.len(),
            ex.rejected_ids.len(),
        );
        n += 1;
        sum_p += p;
        sum_r += c + r;
        if p + c + r > longest.0 + 2 * longest.1 {
            longest = (p, (c + r).div_ceil(2));
        }
    }
    if n == 0 {
        return Err(PlanError::NoUsablePair);
    }
    Ok((
        Lengths::measured(longest.0, longest.1, format!("longest of {n} pairs")),
        Lengths::measured(
            sum_p.div_ceil(n),
            sum_r.div_ceil(2 * n),
            format!("mean of {n} pairs"),
        ),
    ))
}

/// Runs `cmd` to completion and returns whether it succeeded and its peak resident memory in bytes (the
/// kernel's `ru_maxrss` of that child, from `wait4`: its VmHWM, exactly, without polling). Linux/Unix only;
/// for measuring plans (benches, tests).
pub fn run_measuring_peak_rss(cmd: &mut std::process::Command) -> std::io::Result<(bool, u64)> {
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // Safety: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // Safety: `pid` is our child; status and usage point to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // The child is reaped: dropping `child` neither waits nor kills.
    drop(child);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, usage.ru_maxrss as u64 * 1024))
}
