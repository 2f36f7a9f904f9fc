#!/usr/bin/env bash
# Data-parallel scaling on one machine: 1 worker × 1 thread vs 2 workers × 1 thread on the same global batch
# (small preset, cached reference, release binaries), the 2 workers without and with ZeRO-2 (`zero_stage = 2`:
# each rank updates half the parameters). Prints the median samples/s of steps 2.. of each run and,
# from the workers' debug timings, the share of the 2-worker step spent in the gradient all-reduce.
# Usage: scripts/bench-scaling.sh   (builds release binaries first; a few minutes). Not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/with-torch cargo build --release --bins >&2
B=$PWD/target/release
W=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; [[ -n ${KEEP:-} ]] && cp "$W"/*.log "$KEEP"/; rm -rf "$W"' EXIT
cd "$W"
"$B/ddpo" init-model --out m --preset small >/dev/null
"$B/ddpo" synth --out d --pairs 32 --shards 2 --seed 1 --image-size 336 >/dev/null
for run in 1 2 2z; do
    w=${run%z}
    stage=0
    [[ $run == *z ]] && stage=2
    cat > "job$run.toml" <<TOML
[model]
path = "m"
[reference]
cache_dir = "cache"
[data]
train = ["d/train-*.parquet"]
max_length = 1024
[train]
batch_size = 4
micro_batch_size = 2
epochs = 1
lr = 1e-5
warmup_ratio = 0.0
output_dir = "run$run"
zero_stage = $stage
[cluster]
world_size = $w
backend = "ring"
listen = "127.0.0.1:0"
heartbeat_secs = 2
heartbeat_timeout_secs = 60
collective_timeout_secs = 300
TOML
done
"$B/ddpo" precompute --config job1.toml --device cpu >/dev/null 2>&1
for run in 1 2 2z; do
    w=${run%z}
    "$B/coordinator" --config "job$run.toml" --address-file "a$run" --linger-secs 0 2>"c$run.log" &
    c=$!
    for _ in $(seq 100); do [[ -s "a$run" ]] && break; sleep 0.1; done
    for _ in $(seq "$w"); do
        RUST_LOG=ddpo=debug "$B/worker" --coordinator "http://$(cat "a$run")" --device cpu \
            --ring-bind 127.0.0.1:0 --threads 1 2>>"w$run.log" &
    done
    wait "$c"
done
python3 - <<'PY'
import json, re, statistics
base = None
for run, label in (("1", "1 worker x 1 thread"), ("2", "2 workers x 1 thread"), ("2z", "2 workers x 1 thread, ZeRO-2")):
    rows = [json.loads(l) for l in open(f"run{run}/metrics.jsonl") if "grad_norm" in l]
    sps = statistics.median(r["samples_per_sec"] for r in rows[1:])
    base = base or sps
    print(f"{label}: {sps:.3f} pairs/s  {sps / base:.2f}x  losses {[round(r['loss'], 5) for r in rows]}")
    if run == "1":
        continue
    # Phase timings (seconds, both ranks, steps 2..) from the workers' debug logs.
    phases = {}
    for line in open(f"w{run}.log"):
        m = re.search(r"DEBUG (.+?) secs=([0-9.eE+-]+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            phases.setdefault(m.group(1), []).append(float(m.group(2)))
    step = statistics.median(4 / r["samples_per_sec"] for r in rows[1:])
    for name, v in phases.items():
        med = statistics.median(v[2:])
        print(f"  {name}: median {med:.3f} s = {100 * med / step:.1f} % of the {step:.2f} s step")
PY
