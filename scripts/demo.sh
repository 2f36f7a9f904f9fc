#!/usr/bin/env bash
# The RLHF-V loop on the built-in tiny model and synthetic scenes, CPU only. Run by `make demo`:
#   1. supervised fine-tuning from random weights (`ddpo sft`), so the model can describe a picture;
#   2. how often it hallucinates on held-out scenes (`ddpo evaluate`);
#   3. the main job: DDPO from that model, a coordinator with two local CPU workers that precompute the
#      reference cache and train over the TCP ring, while `ddpo status` shows the job;
#   4. the hallucination rates again, before and after side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
DEMO=target/demo
CONFIG=configs/tiny-cpu.toml
HELD="$DEMO/held/held-00000-of-00001.parquet"

rm -rf "$DEMO"
mkdir -p "$DEMO"
"$BIN/ddpo" init-model --out "$DEMO/model" --preset tiny
"$BIN/ddpo" synth --out "$DEMO/data" --pairs 1024 --shards 2 --seed 1 --image-size 48 --difficulty easy
"$BIN/ddpo" synth --out "$DEMO/data" --pairs 128 --shards 1 --seed 2 --image-size 48 --difficulty easy --prefix eval
"$BIN/ddpo" synth --out "$DEMO/held" --pairs 256 --shards 1 --seed 3 --image-size 48 --difficulty easy --prefix held

echo "== 1. supervised fine-tuning (configs/tiny-sft.toml)"
"$BIN/ddpo" sft --config configs/tiny-sft.toml --device cpu 2> "$DEMO/sft.log" | sed -n 1p
sft=$(ls -d "$DEMO"/sft/checkpoint-* | tail -n 1)
echo "== 2. hallucination on 256 held-out scenes, SFT model ($sft)"
"$BIN/ddpo" evaluate --data "$HELD" --model "$sft" --out "$DEMO/eval-sft/report.json" --device cpu \
    --max-new-tokens 48 2>> "$DEMO/sft.log"

echo "== 3. DDPO from the SFT model ($CONFIG)"
export DDPO__MODEL__PATH="$sft"
"$BIN/ddpo" validate --config "$CONFIG" | tail -n 2

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
echo "false colour claims on 32 eval prompts during training (eval/hallucination/false_colour):"
awk 'match($0, /"eval\/hallucination\/false_colour":[0-9.e-]+/) {
        c = substr($0, RSTART + 34, RLENGTH - 34); match($0, /"step":[0-9]+/)
        printf "  step %s: %.3f\n", substr($0, RSTART + 7, RLENGTH - 7), c }' "$DEMO/run/metrics.jsonl"
if [[ $status -ne 0 ]]; then
    echo "the job failed (exit $status); see $DEMO/job.log" >&2
    exit "$status"
fi
ddpo_model=$(ls -d "$DEMO"/run/checkpoint-* | tail -n 1)
echo "== 4. hallucination on the same held-out scenes, DDPO model ($ddpo_model)"
"$BIN/ddpo" evaluate --data "$HELD" --model "$ddpo_model" --reference "$sft" --out "$DEMO/eval-ddpo/report.json" \
    --device cpu --max-new-tokens 48 2>> "$DEMO/job.log"
echo
echo "held-out hallucination before and after DDPO (the corrections in the data fix colours only):"
# The reports' numbers side by side: "key": value lines of the pretty-printed JSON.
awk -F'[":, ]+' 'FNR == 1 { f++ } NF >= 3 && $3 ~ /^[0-9.]+$/ { v[$2, f] = $3; if (f == 1) k[++n] = $2 }
    END { printf "%-13s %10s %10s\n", "", "SFT", "SFT+DDPO"
          for (i = 1; i <= n; i++) { a = v[k[i], 1]; b = v[k[i], 2]
              fmt = (a b ~ /\./) ? "%-13s %10.4f %10.4f\n" : "%-13s %10d %10d\n"; printf fmt, k[i], a, b } }' \
    "$DEMO/eval-sft/report.json" "$DEMO/eval-ddpo/report.json"
echo "demo done: model in $ddpo_model"
