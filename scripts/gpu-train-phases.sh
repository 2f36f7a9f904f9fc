#!/usr/bin/env bash
# Per-phase timings of `ddpo train` (forward and backward, optimizer update, data wait: the DEBUG lines) on the
# `small` preset at 336 px, one run per dtype, on DEVICE (default cuda:0). The probe behind BENCHMARKS.md's
# "bf16 was 3-6x slower than fp32" finding; run it from packed binaries like scripts/gpu-check.sh, e.g.
#   scripts/gpu-train-phases.sh                                   (as the binaries run it now)
#   TORCH_CUDNN_SDPA_DEPRIORITIZED=0 scripts/gpu-train-phases.sh  (cuDNN attention preferred, as before the fix)
# Env: BIN (binaries; default: unpack .gpu/ddpo.xz), DEVICE, DTYPES ("bf16 fp32"), STEPS (8).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DEVICE=${DEVICE:-cuda:0}
STEPS=${STEPS:-8}
if [[ -z ${BIN:-} ]]; then
    BIN=$(mktemp -d)
    xz -dc .gpu/ddpo.xz > "$BIN/ddpo" && chmod +x "$BIN/ddpo"
fi
if [[ $DEVICE != cpu ]]; then
    TORCH_LIB=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
    export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$BIN/ddpo" init-model --out "$W/model" --preset small > /dev/null 2>&1 || exit 1
"$BIN/ddpo" synth --out "$W/data" --pairs 64 --shards 2 --seed 1 --image-size 336 > /dev/null 2>&1 || exit 1
for dtype in ${DTYPES:-bf16 fp32}; do
    cat > "$W/$dtype.toml" <<TOML
[model]
path = "$W/model"
dtype = "$dtype"
[reference]
cache_dir = "$W/cache-$dtype"
[data]
train = ["$W/data/train-*.parquet"]
max_length = 2048
[train]
output_dir = "$W/run-$dtype"
batch_size = 8
micro_batch_size = 2
epochs = 1
lr = 1e-6
warmup_ratio = 0.0
log_every = 1
TOML
    start=$SECONDS
    NO_COLOR=1 RUST_LOG=info,ddpo=debug "$BIN/ddpo" train --config "$W/$dtype.toml" --device "$DEVICE" \
        --max-steps "$STEPS" > "$W/$dtype.log" 2>&1
    echo "== $dtype: exit $?, $((SECONDS - start)) s"
    grep -E "forward and backward|optimizer update|waiting for data|step [0-9]+/" "$W/$dtype.log" | tail -n 12
done
