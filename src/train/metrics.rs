//! What a run reports: metrics.jsonl rows (named as other DPO trainers name them), the progress bar on a
//! terminal and the periodic log line.

use std::path::Path;

use super::TrainError;

/// One metrics.jsonl row: step, epoch, the named metrics, then the extra ones.
pub(super) fn metrics_row(
    step: usize,
    epoch: f64,
    named: &[(String, f64)],
    extra: &[(&str, f64)],
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), step.into());
    m.insert("epoch".into(), epoch.into());
    for (k, v) in named {
        m.insert(k.clone(), json_num(*v));
    }
    for (k, v) in extra {
        m.insert(k.to_string(), json_num(*v));
    }
    serde_json::Value::Object(m)
}

/// JSON has no NaN/inf: write them as strings so a skipped step's row stays valid JSON.
fn json_num(v: f64) -> serde_json::Value {
    if v.is_finite() {
        v.into()
    } else {
        v.to_string().into()
    }
}

/// Keeps only the metrics rows of steps ≤ `step` (a resumed run rewrites what came after its checkpoint).
pub(super) fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })
}

/// One-line progress bar with ETA, redrawn in place.
pub(super) fn draw_bar(done: usize, total: usize, loss: f64, acc: f64, eta: f64) {
    let width = 30;
    let filled = (width * done) / total.max(1);
    let bar: String = (0..width)
        .map(|i| {
            if i < filled {
                '='
            } else if i == filled {
                '>'
            } else {
                ' '
            }
        })
        .collect();
    let eta = eta.max(0.0) as u64;
    eprint!(
        "\r[{bar}] {done}/{total} loss {loss:.4} acc {acc:.2} ETA {:02}:{:02}:{:02}  ",
        eta / 3600,
        (eta / 60) % 60,
        eta % 60
    );
    if done == total {
        eprintln!();
    }
}

/// The value of metric `key` in a named list (NaN when absent).
pub(super) fn get(named: &[(String, f64)], key: &str) -> f64 {
    named
        .iter()
        .find(|(n, _)| n == key)
        .map(|x| x.1)
        .unwrap_or(f64::NAN)
}
