#!/usr/bin/env bash
# Tests deploy/local/run.sh, the single-machine launcher:
#   1. GPU discovery without GPUs to run on: a stand-in nvidia-smi listing 4 GPUs, then CUDA_VISIBLE_DEVICES
#      naming 2, then none; the dry run must start one worker per GPU with --device cuda:i, or CPU workers;
#   2. a real CPU job (2 workers) in which one worker is killed with SIGKILL mid-training: the launcher
#      restarts it, the world re-forms and the job completes from the last checkpoint;
#   3. the same with no restarts allowed: the launcher ends the job (exit 1) instead of waiting forever.
#   BIN=/path/to/binaries tests/deploy/local.sh     (default BIN: target/debug of this checkout)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${BIN:-target/debug}"
[[ "$BIN" = /* ]] || BIN="$root/$BIN"
launcher="$root/deploy/local/run.sh"
t0=$(date +%s)
fail() { echo "tests/deploy/local: FAIL: $*" >&2; exit 1; }
say() { echo "tests/deploy/local: [$(( $(date +%s) - t0 )) s] $*"; }
for exe in ddpo coordinator worker; do
    [[ -x "$BIN/$exe" ]] || fail "$BIN/$exe not found: build first or set BIN"
done

work="$(mktemp -d /tmp/ddpo-local-test.XXXXXX)"
launcher_pid=""
cleanup() {
    local rc=$?
    set +e
    if [[ -n "$launcher_pid" ]] && kill -0 "$launcher_pid" 2>/dev/null; then
        kill -TERM "$launcher_pid"
        wait "$launcher_pid"
    fi
    for f in "$work"/logs/worker-*.pid; do [[ -f "$f" ]] && kill -9 "$(cat "$f")" 2>/dev/null; done
    (( rc == 0 )) || tail -n 20 "$work"/logs/*.log >&2 2>/dev/null
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. GPU discovery (dry runs) ---------------------------------------------------------------------------
mkdir -p "$work/fakebin"
cat >"$work/fakebin/nvidia-smi" <<'EOF'
#!/bin/sh
# Stand-in for nvidia-smi -L on a 4-GPU machine.
for i in 0 1 2 3; do echo "GPU $i: NVIDIA Test GPU (UUID: GPU-0000000$i)"; done
EOF
chmod +x "$work/fakebin/nvidia-smi"
touch "$work/job.toml"
dry() { env "$@" DDPO_DRY_RUN=1 DDPO_BIN="$BIN" "$launcher" "$work/job.toml"; }

out="$(dry -u CUDA_VISIBLE_DEVICES PATH="$work/fakebin:$PATH")"
[[ "$(grep -c -- '/worker ' <<<"$out")" -eq 4 ]] || fail "4 GPUs from nvidia-smi -L should give 4 workers:"$'\n'"$out"
for i in 0 1 2 3; do
    grep -q -- "--device cuda:$i " <<<"$out" || fail "no worker on cuda:$i:"$'\n'"$out"
done
grep -q 'DDPO__CLUSTER__WORLD_SIZE=4 ' <<<"$out" || fail "world size should be 4:"$'\n'"$out"

out="$(dry CUDA_VISIBLE_DEVICES=5,7 PATH="$work/fakebin:$PATH")"
[[ "$(grep -c -- '/worker ' <<<"$out")" -eq 2 ]] || fail "CUDA_VISIBLE_DEVICES=5,7 should give 2 workers:"$'\n'"$out"
for i in 0 1; do
    grep -q -- "--device cuda:$i " <<<"$out" \
        || fail "CUDA_VISIBLE_DEVICES=5,7 should give cuda:0 and cuda:1 (as the processes number them):"$'\n'"$out"
done

out="$(dry CUDA_VISIBLE_DEVICES= DDPO_CPU_WORKERS=3)"
[[ "$(grep -c -- '--device cpu ' <<<"$out")" -eq 3 ]] || fail "no GPU and DDPO_CPU_WORKERS=3 should give 3 CPU workers:"$'\n'"$out"
if dry CUDA_VISIBLE_DEVICES= DDPO_DEVICE=cuda >/dev/null 2>&1; then fail "DDPO_DEVICE=cuda without GPUs should be refused"; fi
say "GPU discovery: nvidia-smi -L, CUDA_VISIBLE_DEVICES and the CPU fallback give the right workers"

# --- 2. a real CPU job with a worker killed mid-training ---------------------------------------------------
"$BIN/ddpo" init-model --out "$work/model" --preset tiny >/dev/null
"$BIN/ddpo" synth --out "$work/data" --pairs 1024 --shards 2 --seed 1 --image-size 48 --difficulty easy >/dev/null
"$BIN/ddpo" synth --out "$work/data" --pairs 128 --shards 1 --seed 2 --image-size 48 --difficulty easy \
    --prefix eval >/dev/null
export DDPO__MODEL__PATH="$work/model" DDPO__DATA__TRAIN="$work/data/train-*.parquet"
export DDPO__DATA__EVAL="$work/data/eval-*.parquet" DDPO__REFERENCE__CACHE_DIR="$work/cache"
export DDPO__TRAIN__OUTPUT_DIR="$work/out" DDPO__TRAIN__EPOCHS=2 DDPO__TRAIN__SAVE_EVERY=8
export DDPO__CLUSTER__HEARTBEAT_TIMEOUT_SECS=10 DDPO__CLUSTER__COLLECTIVE_TIMEOUT_SECS=30
DDPO_BIN="$BIN" DDPO_DEVICE=cpu DDPO_CPU_WORKERS=2 DDPO_THREADS=1 DDPO_RESTART_DELAY=1 DDPO_LOG_DIR="$work/logs" \
    timeout 180 "$launcher" "$root/configs/tiny-cpu.toml" >"$work/launcher.out" 2>&1 &
launcher_pid=$!
victim=""
for _ in $(seq 1200); do
    kill -0 "$launcher_pid" 2>/dev/null || break
    if compgen -G "$work/out/checkpoint-*/model.safetensors" >/dev/null && [[ -s "$work/logs/worker-1.pid" ]]; then
        victim="$(cat "$work/logs/worker-1.pid")"
        grep -q worker "/proc/$victim/cmdline" 2>/dev/null || fail "pid $victim is not a worker"
        kill -9 "$victim"
        say "killed worker 1 (pid $victim); checkpoints: $(cd "$work/out" && echo checkpoint-*)"
        break
    fi
    sleep 0.1
done
rc=0
wait "$launcher_pid" || rc=$?
launcher_pid=""
(( rc == 0 )) || { cat "$work/launcher.out" >&2; fail "the launcher exited $rc"; }
[[ -n "$victim" ]] || fail "the job ended before a worker could be killed"
last="$(grep '"grad_norm"' "$work/out/metrics.jsonl" | tail -n 1 | sed 's/.*"step":\([0-9]*\).*/\1/')"
[[ "$last" == 128 ]] || fail "the job should end at step 128 (2 epochs of 64), ended at ${last:-nothing}"
[[ -f "$work/out/checkpoint-128/model.safetensors" ]] || fail "no final checkpoint-128"
grep -q 'restarting' "$work/logs/worker-1.log" || fail "worker 1 was not restarted"
generation="$(sed -n 's/.*"generation": *\([0-9]*\).*/\1/p' "$work/out/coordinator-state.json")"
(( generation >= 2 )) || fail "generation $generation: the world did not re-form"
say "killed worker restarted, world re-formed (generation $generation), job completed at step $last"

# --- 3. no restarts left: the job ends instead of waiting for a world that cannot form ---------------------
rm -rf "$work/out" "$work/logs"
DDPO_BIN="$BIN" DDPO_DEVICE=cpu DDPO_CPU_WORKERS=2 DDPO_THREADS=1 DDPO_WORKER_RESTARTS=0 DDPO_LOG_DIR="$work/logs" \
    timeout 120 "$launcher" "$root/configs/tiny-cpu.toml" >"$work/launcher.out" 2>&1 &
launcher_pid=$!
victim=""
for _ in $(seq 1200); do
    kill -0 "$launcher_pid" 2>/dev/null || break
    if compgen -G "$work/out/checkpoint-*/model.safetensors" >/dev/null && [[ -s "$work/logs/worker-1.pid" ]]; then
        victim="$(cat "$work/logs/worker-1.pid")"
        kill -9 "$victim"
        break
    fi
    sleep 0.1
done
[[ -n "$victim" ]] || fail "job 3 ended before a worker could be killed"
rc=0
wait "$launcher_pid" || rc=$?
launcher_pid=""
(( rc != 124 )) || fail "the launcher kept waiting after its worker gave up"
(( rc == 1 )) || { cat "$work/launcher.out" >&2; fail "the launcher should exit 1 when a worker gives up, exited $rc"; }
grep -q 'gave up' "$work/launcher.out" || fail "the launcher did not say that a worker gave up"
say "a worker out of restarts ends the job (exit 1)"
