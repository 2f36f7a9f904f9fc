#!/usr/bin/env bash
# The main job on the built-in tiny model and synthetic data: a coordinator with two local CPU workers
# precomputes the reference cache and trains, while `ddpo status` shows the job. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
DEMO=target/demo
CONFIG=configs/tiny-cpu.toml

rm -rf "$DEMO"
mkdir -p "$DEMO"
"$BIN/ddpo" init-model --out "$DEMO/model" --preset tiny
"$BIN/ddpo" synth --out "$DEMO/data" --pairs 1024 --shards 2 --seed 1 --image-size 48 --difficulty easy
"$BIN/ddpo" synth --out "$DEMO/data" --pairs 128 --shards 1 --seed 2 --image-size 48 --difficulty easy --prefix eval
"$BIN/ddpo" validate --config "$CONFIG"

"$BIN/coordinator" --config "$CONFIG" --local-workers 2 --address-file "$DEMO/coordinator.addr" \
    --linger-secs 3 2> "$DEMO/job.log" &
coordinator=$!
trap 'kill "$coordinator" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [[ -s "$DEMO/coordinator.addr" ]] && break; sleep 0.1; done
url="http://$(cat "$DEMO/coordinator.addr")"
echo "coordinator at $url (logs: $DEMO/job.log)"

# The status table every few seconds while the job runs, and once more at the end.
last=""
while kill -0 "$coordinator" 2>/dev/null; do
    if table=$("$BIN/ddpo" status --coordinator "$url" 2>/dev/null); then
        last=$table
        echo "$table" | head -3
        echo
    fi
    sleep 3
done
trap - EXIT
status=0
wait "$coordinator" || status=$?
echo "final status:"
echo "$last"
echo "final metrics ($DEMO/run/metrics.jsonl):"
grep '"eval/loss"' "$DEMO/run/metrics.jsonl" | tail -n 1
grep '"grad_norm"' "$DEMO/run/metrics.jsonl" | tail -n 1
if [[ $status -ne 0 ]]; then
    echo "the job failed (exit $status); see $DEMO/job.log" >&2
    exit "$status"
fi
echo "demo done: model in $(ls -d "$DEMO"/run/checkpoint-* | tail -n 1)"
