//! Device memory: what a plan is compared with (`DDPO_DEVICE_MEMORY_BYTES`, the CUDA driver, /proc/meminfo and
//! the cgroup limit).

use super::*;

/// A device's memory as the plan compares it, and where the number comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub bytes: u64,
    pub source: String,
}

/// The memory a rank on `device` may use: `DDPO_DEVICE_MEMORY_BYTES` when set (bytes); on CPU the lower of
/// `MemAvailable` and the cgroup's remaining limit (v2 `memory.max − memory.current + inactive_file`, or v1's
/// counterparts), plus this process's current resident memory (which the plan's runtime overhead already
/// counts); on CUDA the device's total memory from the driver API (cudarc, loaded at run time). `None` when
/// unknown (no driver, no /proc).
pub fn device_memory(device: tch::Device) -> Option<DeviceMemory> {
    if let Ok(v) = std::env::var(DEVICE_MEMORY_ENV) {
        if let Ok(bytes) = v.trim().parse::<u64>() {
            return Some(DeviceMemory {
                bytes,
                source: DEVICE_MEMORY_ENV.to_string(),
            });
        }
        tracing::warn!("{DEVICE_MEMORY_ENV}={v:?} is not a number of bytes; ignored");
    }
    match device {
        tch::Device::Cuda(i) => cuda_total_memory(i).map(|bytes| DeviceMemory {
            bytes,
            source: format!("cuda:{i} total"),
        }),
        tch::Device::Cpu => cpu_available_memory(),
        _ => None,
    }
}

fn cuda_total_memory(ordinal: usize) -> Option<u64> {
    use cudarc::driver::{result, sys};
    // Safety: probing for the library loads nothing else; the calls below run only when it is present.
    if !unsafe { sys::is_culib_present() } {
        return None;
    }
    result::init().ok()?;
    let dev = result::device::get(i32::try_from(ordinal).ok()?).ok()?;
    // Safety: `dev` was returned by `device::get`.
    unsafe { result::device::total_mem(dev) }
        .ok()
        .map(|b| b as u64)
}

/// A `key:   N kB` line of a /proc file, in bytes.
pub(super) fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `name value` line of a cgroup `memory.stat`.
pub(super) fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What the cgroup this process is in still allows: limit − usage + reclaimable page cache.
fn cgroup_available() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: a `0::/path` line.
    if let Some(rel) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
        let limit: u64 = max.trim().parse().ok()?; // "max": no limit
        let current = read_u64(&dir.join("memory.current"))?;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let inactive = stat_value(&stat, "inactive_file").unwrap_or(0);
        return Some(limit.saturating_sub(current.saturating_sub(inactive)));
    }
    // cgroup v1.
    let dir = Path::new("/sys/fs/cgroup/memory");
    let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let inactive = stat_value(&stat, "total_inactive_file").unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(inactive)))
}

fn cpu_available_memory() -> Option<DeviceMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = proc_kib(&meminfo, "MemAvailable")?;
    let own = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_kib(&s, "VmRSS"))
        .unwrap_or(0);
    let (bytes, what) = match cgroup_available() {
        Some(cg) if cg < avail => (cg, "cgroup limit"),
        _ => (avail, "MemAvailable"),
    };
    Some(DeviceMemory {
        bytes: bytes + own,
        source: format!("{what} + this process"),
    })
}
