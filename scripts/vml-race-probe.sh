#!/usr/bin/env bash
# Looks for MKL VML's first-call dispatch race (PyTorch issue 188792; README "Same numbers in every process") on
# this machine, two ways, each beside two busy loops:
#   1. N fresh `ddpo precompute` processes of one tiny job, each into its own cache: prints how many distinct
#      sets of cached log-probs they wrote (1 = all identical);
#   2. N fresh PyTorch processes (2 threads) computing cos of a million fp32 values: prints how many had any
#      value off the correctly rounded one by more than 1e-6.
# Usage: scripts/vml-race-probe.sh [DDPO_BINARY] [N]   (default target/debug/ddpo, 30; through scripts/with-torch
# for the venv's python, or set PYTHON)
set -uo pipefail
BIN=${1:-target/debug/ddpo}
N=${2:-30}
PY=${PYTHON:-${DDPO_PYTHON:-python3}}
W=$(mktemp -d)
busy() { while :; do :; done; }
busy & b1=$!
busy & b2=$!
trap 'kill $b1 $b2 2>/dev/null; rm -rf "$W"' EXIT
"$BIN" init-model --out "$W/model" --preset tiny --seed 5 > /dev/null 2>&1 || exit 1
"$BIN" synth --out "$W/data" --pairs 4 --shards 1 --seed 2 > /dev/null 2>&1 || exit 1
printf '[model]\npath = "%s"\n[data]\ntrain = ["%s"]\n[train]\noutput_dir = "%s"\nbatch_size = 4\nmicro_batch_size = 2\n' \
    "$W/model" "$W/data/train-*.parquet" "$W/run" > "$W/job.toml"
for i in $(seq 1 "$N"); do
    DDPO__REFERENCE__CACHE_DIR="$W/cache-$i" "$BIN" precompute --config "$W/job.toml" --device cpu \
        > /dev/null 2>&1 || echo "precompute $i failed"
done
"$PY" - "$W" "$N" <<'PY'
import glob, hashlib, sys
import pyarrow.parquet as pq
w, n = sys.argv[1], int(sys.argv[2])
digests = set()
for i in range(1, n + 1):
    h = hashlib.sha1()
    for f in sorted(glob.glob(f"{w}/cache-{i}/*/*.parquet")):
        t = pq.read_table(f, columns=["chosen_logps", "rejected_logps"])
        for c in t.columns:
            h.update(str(c.to_pylist()).encode())
    digests.add(h.hexdigest())
print(f"ddpo precompute: {n} fresh processes wrote {len(digests)} distinct set(s) of reference log-probs")
PY
bad=0
for i in $(seq 1 "$N"); do
    "$PY" -c '
import numpy as np, torch
torch.set_num_threads(2)
x = torch.linspace(0.001, 3000.0, 1 << 20)
ref = np.cos(x.numpy().astype(np.float64)).astype(np.float32)
print(int((np.abs(torch.cos(x).numpy() - ref) > 1e-6).sum()))' | grep -qx 0 || bad=$((bad + 1))
done
echo "torch.cos: $bad of $N fresh processes had values off by more than 1e-6"
