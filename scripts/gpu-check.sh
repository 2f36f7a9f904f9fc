#!/usr/bin/env bash
# The GPU checks of issues 3, 5, 7 and 8, as one prepared run for a GPU machine lent to a session (see
# scripts/gpu-pack.sh). Everything goes through the project's own binaries, with the machine's PyTorch
# 2.11.0 libraries (LD_LIBRARY_PATH; the rpath baked at build time points at the build machine's).
#   1. the card (nvidia-smi);
#   2. `ddpo train` on cuda:0, small preset, bf16 (fp32 masters) and fp32, shared and split layouts, LoRA
#      (rank 16, dropout 0.05) in bf16, and the `1b` preset (~1.05 B parameters) in bf16:
#      samples/s, tokens/s (median of steps 3..) and peak GPU memory (nvidia-smi, polled), next to the
#      memory plan's total (`ddpo plan`);
#   3. reference log-probs bf16 on the GPU vs fp32 on the CPU (`ddpo precompute` both ways, compared with
#      pyarrow when the machine has it);
#   4. NCCL: two workers on the one GPU (world 2), which NCCL may refuse (one rank per device): the outcome
#      is recorded either way;
#   5. `make bench-step` on the GPU (the packed `ddpo_step` benchmark): ddpo's shared, split and unshared
#      layouts in bf16 side by side, and the Python baseline under bf16 autocast when the machine has
#      transformers; peak memory from nvidia-smi, model FLOPs utilisation against a bf16 matmul peak.
# Env: BIN (unpacked binaries; default: unpack .gpu/*.xz), OUT (results; default /tmp/gpu-check), DEVICE
# (default cuda:0; `cpu` runs the same steps on the CPU, to test this script), STEPS (12), T_TRAIN (300 s),
# T_BENCH (600 s), ONE_B (1 on a GPU,
# 0 on the CPU: the 1b preset's run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda:0}
STEPS=${STEPS:-12}
T_TRAIN=${T_TRAIN:-300}  # seconds each training run, precompute and the NCCL job may take
T_BENCH=${T_BENCH:-600}  # seconds bench-step may take
if [[ $DEVICE == cpu ]]; then ONE_B=${ONE_B:-0}; else ONE_B=${ONE_B:-1}; fi
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
exec > >(tee "$LOG") 2>&1
say() { echo "gpu-check: [$SECONDS s] $*"; }

if [[ -z ${BIN:-} ]]; then
    BIN=$(mktemp -d)
    for f in .gpu/*.xz; do xz -dc "$f" > "$BIN/$(basename "$f" .xz)"; done
    chmod +x "$BIN"/*
fi
if [[ -z ${TORCH_LIB:-} ]]; then
    TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
fi
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
say "binaries $BIN, libtorch $TORCH_LIB, device $DEVICE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | sed 's/^/  /'
python3 -c 'import torch; print("  torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())' 2>&1

W=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null; rm -rf "$W"' EXIT
"$BIN/ddpo" init-model --out "$W/model" --preset small > /dev/null || { say "init-model failed"; exit 1; }
"$BIN/ddpo" synth --out "$W/data" --pairs 64 --shards 2 --seed 1 --image-size 336 > /dev/null || exit 1

job() { # name dtype shared_prefix world cache [model folder] [extra lines]
    cat > "$W/$1.toml" <<TOML
[model]
path = "$W/${6:-model}"
dtype = "$2"
[reference]
cache_dir = "$W/$5"
[data]
train = ["$W/data/train-*.parquet"]
max_length = 2048
[train]
output_dir = "$W/$1"
batch_size = 8
micro_batch_size = 2
epochs = 1
lr = 1e-6
warmup_ratio = 0.0
log_every = 1
shared_prefix = $3
[cluster]
world_size = $4
backend = "auto"
listen = "127.0.0.1:0"
collective_timeout_secs = 120
${7:-}
TOML
}

# Peak of nvidia-smi's memory.used (MiB) while a command runs.
with_peak() {
    local peak_file="$W/peak" pid
    echo 0 > "$peak_file"
    (while true; do
        v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
        [[ -n $v && $v -gt $(cat "$peak_file") ]] && echo "$v" > "$peak_file"
        sleep 0.2
    done) &
    pid=$!
    "$@"
    local rc=$?
    kill "$pid" 2>/dev/null
    PEAK=$(cat "$peak_file")
    return $rc
}

summary() { # name -> "samples/s tokens/s" medians of steps 3..
    python3 - "$W/$1/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"grad_norm"' in l]
rows = rows[2:] or rows
print(f'{statistics.median(r["samples_per_sec"] for r in rows):.2f} {statistics.median(r["tokens_per_sec"] for r in rows):.0f} {rows[0]["loss"]:.6f}')
PY
}

runs=(bf16-shared:bf16:true:model fp32-shared:fp32:true:model bf16-split:bf16:false:model
    lora-bf16:bf16:true:model)
if [[ $ONE_B == 1 ]]; then
    say "init-model 1b"
    "$BIN/ddpo" init-model --out "$W/model1b" --preset 1b > /dev/null || say "init-model 1b failed"
    runs+=(1b-bf16-shared:bf16:true:model1b)
fi
echo "{" > "$OUT/gpu-check.json"
for run in "${runs[@]}"; do
    IFS=: read -r name dtype shared model <<< "$run"
    extra=""
    [[ $name == lora-* ]] && extra=$'[lora]\nrank = 16\nalpha = 32\ndropout = 0.05'
    job "$name" "$dtype" "$shared" 1 "cache-$dtype-$model" "$model" "$extra"
    plan=$("$BIN/ddpo" plan --config "$W/$name.toml" --device "${DEVICE%%:*}" 2>&1 | grep -E '^ +total' | head -n 1)
    say "$name plan:$plan"
    say "train $name on $DEVICE ($STEPS steps)"
    if with_peak timeout "$T_TRAIN" "$BIN/ddpo" train --config "$W/$name.toml" --device "$DEVICE" --max-steps "$STEPS" \
        > "$W/$name.log" 2>&1; then
        read -r sps tps loss <<< "$(summary "$name")"
        say "$name: $sps pairs/s, $tps tokens/s, first-measured-step loss $loss, peak GPU memory $PEAK MiB (whole card, polled)"
        echo "\"$name\": {\"pairs_per_s\": $sps, \"tokens_per_s\": $tps, \"peak_gpu_mib\": $PEAK}," >> "$OUT/gpu-check.json"
    else
        say "$name FAILED:"; tail -n 20 "$W/$name.log"
    fi
done

say "reference log-probs: fp32 on the CPU vs bf16 on $DEVICE"
job cpu-ref fp32 true 1 cache-cpu
if timeout "$T_TRAIN" "$BIN/ddpo" precompute --config "$W/cpu-ref.toml" --device cpu > "$W/cpu-ref.log" 2>&1; then
    python3 - "$W/cache-cpu" "$W/cache-bf16-model" <<'PY' || true
import glob, sys
try:
    import pyarrow.parquet as pq
except ImportError:
    print("  pyarrow missing on this machine: comparison skipped"); sys.exit(0)
import numpy as np
def load(d):
    out = {}
    for f in sorted(glob.glob(d + "/**/*.parquet", recursive=True)):
        t = pq.read_table(f).to_pydict()
        cols = [c for c in t if "logp" in c]
        for i in range(len(t[cols[0]])):
            out[(f.split("/")[-1], i)] = np.concatenate([np.asarray(t[c][i], dtype=np.float64) for c in cols])
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
common = sorted(set(a) & set(b))
d = np.concatenate([np.abs(a[k] - b[k]) for k in common]) if common else np.array([np.nan])
print(f"  {len(common)} pairs: |bf16 GPU - fp32 CPU| per-token log-prob: mean {d.mean():.4f}, max {d.max():.4f}")
PY
else
    say "CPU precompute FAILED:"; tail -n 20 "$W/cpu-ref.log"
fi

say "NCCL: 2 workers on one GPU (world 2)"
job nccl2 bf16 true 2 cache-bf16-model
timeout "$T_TRAIN" "$BIN/coordinator" --config "$W/nccl2.toml" --local-workers 2 --local-device "$DEVICE" \
    --linger-secs 0 > "$W/nccl2.log" 2>&1
rc=$?
if [[ $rc -eq 0 ]]; then
    read -r sps tps _ <<< "$(summary nccl2)"
    say "NCCL world 2 on one GPU: finished, $sps pairs/s, $tps tokens/s"
    echo "\"nccl2\": {\"pairs_per_s\": $sps, \"tokens_per_s\": $tps}," >> "$OUT/gpu-check.json"
else
    say "NCCL world 2 on one GPU: exit $rc; the log's last lines:"; tail -n 15 "$W/nccl2.log"
fi
if [[ -x $BIN/ddpo_step ]]; then
    pyb=0
    python3 -c 'import transformers' 2> /dev/null && pyb=1
    say "bench-step on $DEVICE (Python baseline: $([[ $pyb == 1 ]] && echo yes || echo 'no transformers here'))"
    if DEVICE=$DEVICE PYTHON_BASELINE=$pyb ROUNDS=${BENCH_ROUNDS:-1} ITERS=${BENCH_ITERS:-6} \
        timeout "$T_BENCH" "$BIN/ddpo_step" --bench > "$W/bench-step.log" 2>&1; then
        grep -v '^round' "$W/bench-step.log" | tail -n 22
        cp "$W/bench-step.log" "$OUT/bench-step.log"
    else
        say "bench-step FAILED:"; tail -n 20 "$W/bench-step.log"
    fi
fi
echo "\"seconds\": $SECONDS}" >> "$OUT/gpu-check.json"
say "done"
