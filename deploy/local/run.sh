#!/usr/bin/env bash
# A ddpo job on one machine: a coordinator and one worker per visible GPU (worker i on cuda:i), or
# DDPO_CPU_WORKERS CPU workers where there is no GPU. A worker that dies is restarted (DDPO_WORKER_RESTARTS
# times) and registers again; the job re-forms and resumes from the last checkpoint. Ctrl-C or SIGTERM stops
# everything with a checkpoint. Exits with the coordinator's status (0 when the job finished).
#
#   deploy/local/run.sh job.toml
#   CUDA_VISIBLE_DEVICES=2,3 deploy/local/run.sh job.toml      # two workers, on physical GPUs 2 and 3
#   DDPO_DEVICE=cpu DDPO_CPU_WORKERS=4 deploy/local/run.sh job.toml
#
# Variables (see deploy/README.md):
#   DDPO_CONFIG           job config (or the first argument)
#   DDPO_BIN              directory holding coordinator and worker (default: where `coordinator` is on PATH,
#                         else this checkout's target/release, then target/debug)
#   DDPO_DEVICE           auto (default: GPUs if any are visible, else CPU), cuda or cpu
#   DDPO_CPU_WORKERS      number of workers when running on CPU (default 2)
#   DDPO_THREADS          libtorch CPU threads per worker (default: the machine's cores split between workers)
#   DDPO_LISTEN_HOST      coordinator listen address (default 127.0.0.1; 0.0.0.0 to watch status from elsewhere)
#   DDPO_PORT             coordinator port (default 0: a free port)
#   DDPO_WORKER_RESTARTS  restarts per worker before it gives up and the job ends (default 3)
#   DDPO_RESTART_DELAY    seconds before a restart (default 5)
#   DDPO_LOG_DIR          coordinator.log, worker-<i>.log, worker-<i>.pid, coordinator.url
#                         (default: ddpo-logs/local-<date>-<time> in the working directory)
#   DDPO_DRY_RUN=1        print what would run and stop
# GPUs are those in CUDA_VISIBLE_DEVICES when it is set (the processes see them as cuda:0..n-1), otherwise
# those `nvidia-smi -L` lists. The config's cluster.world_size is set to the number of workers
# (DDPO__CLUSTER__WORLD_SIZE); any other key can be overridden with DDPO__SECTION__KEY.
set -euo pipefail

die() { echo "deploy/local/run.sh: $*" >&2; exit 2; }
log() { echo "deploy/local/run.sh: $(date +%T) $*" >&2; }

config="${DDPO_CONFIG:-${1:-}}"
[[ -n "$config" ]] || die "usage: $0 job.toml (or set DDPO_CONFIG)"
[[ -f "$config" ]] || die "job config $config not found"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${DDPO_BIN:-}"
if [[ -z "$bin" ]]; then
    if command -v coordinator >/dev/null; then
        bin="$(dirname "$(command -v coordinator)")"
    else
        for b in "$here/../../target/release" "$here/../../target/debug"; do
            [[ -x "$b/coordinator" ]] && { bin="$(cd "$b" && pwd)"; break; }
        done
    fi
fi
[[ -n "$bin" && -x "$bin/coordinator" && -x "$bin/worker" ]] \
    || die "no coordinator and worker binaries found: set DDPO_BIN"

# The GPUs this process sees, as CUDA numbers them for it (cuda:0..n-1).
visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local v="$CUDA_VISIBLE_DEVICES" ids=()
        if [[ -z "$v" || "$v" == -1 || "$v" == NoDevFiles ]]; then echo 0; return; fi
        IFS=, read -r -a ids <<<"$v"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

gpus="$(visible_gpus)"
case "${DDPO_DEVICE:-auto}" in
    auto) if (( gpus > 0 )); then kind=cuda; else kind=cpu; fi ;;
    cuda) (( gpus > 0 )) || die "DDPO_DEVICE=cuda but no GPU is visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES)"; kind=cuda ;;
    cpu) kind=cpu ;;
    *) die "DDPO_DEVICE must be auto, cuda or cpu, not ${DDPO_DEVICE}" ;;
esac
if [[ "$kind" == cuda ]]; then n="$gpus"; else n="${DDPO_CPU_WORKERS:-2}"; fi
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "number of workers must be a positive number, not '$n'"
threads="${DDPO_THREADS:-$(( $(nproc) / n ))}"
(( threads >= 1 )) || threads=1
if [[ -n "${DDPO__CLUSTER__WORLD_SIZE:-}" && "$DDPO__CLUSTER__WORLD_SIZE" != "$n" ]]; then
    die "DDPO__CLUSTER__WORLD_SIZE=$DDPO__CLUSTER__WORLD_SIZE but $n worker(s) will run"
fi
export DDPO__CLUSTER__WORLD_SIZE="$n"
restarts="${DDPO_WORKER_RESTARTS:-3}"
delay="${DDPO_RESTART_DELAY:-5}"
host="${DDPO_LISTEN_HOST:-127.0.0.1}"
log_dir="${DDPO_LOG_DIR:-ddpo-logs/local-$(date +%Y%m%d-%H%M%S)}"

device_of() { if [[ "$kind" == cuda ]]; then echo "cuda:$1"; else echo cpu; fi; }

if [[ -n "${DDPO_DRY_RUN:-}" ]]; then
    echo "DDPO__CLUSTER__WORLD_SIZE=$n $bin/coordinator --config $config --listen $host:${DDPO_PORT:-0}"
    for (( i = 0; i < n; i++ )); do
        echo "$bin/worker --coordinator http://$host:PORT --device $(device_of "$i") --ring-bind 127.0.0.1:0 --threads $threads"
    done
    exit 0
fi

mkdir -p "$log_dir"
address_file="$log_dir/coordinator.addr"
rm -f "$address_file"
"$bin/coordinator" --config "$config" --listen "$host:${DDPO_PORT:-0}" --address-file "$address_file" \
    >>"$log_dir/coordinator.log" 2>&1 &
coordinator_pid=$!
worker_pids=()
stopping=0
# shellcheck disable=SC2317  # a trap handler: called indirectly
on_signal() {
    stopping=1
    log "stopping: the workers checkpoint, the coordinator saves its state"
    kill -TERM "$coordinator_pid" "${worker_pids[@]}" 2>/dev/null || true
}
trap on_signal INT TERM

for _ in $(seq 600); do
    [[ -s "$address_file" ]] && break
    kill -0 "$coordinator_pid" 2>/dev/null || { tail -n 20 "$log_dir/coordinator.log" >&2; die "the coordinator exited at start"; }
    sleep 0.1
done
[[ -s "$address_file" ]] || die "the coordinator did not start listening within 60 s"
addr="$(cat "$address_file")"
# A wildcard listen address is reached through loopback by the local workers.
url="http://${addr/#0.0.0.0:/127.0.0.1:}"
echo "$url" >"$log_dir/coordinator.url"
log "coordinator $url; $n $kind worker(s), $threads thread(s) each; logs in $log_dir"
log "status: $bin/ddpo status --coordinator $url --watch"

# Worker i, restarted when it dies (not when it finished, failed the job for good, or was told to stop).
# shellcheck disable=SC2317  # runs in a background subshell
worker_loop() {
    local i="$1" dev child="" stop=0 tries=0 rc
    dev="$(device_of "$i")"
    trap 'stop=1; [[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null' TERM INT
    while :; do
        "$bin/worker" --coordinator "$url" --device "$dev" --ring-bind 127.0.0.1:0 --threads "$threads" &
        child=$!
        echo "$child" >"$log_dir/worker-$i.pid"
        # `wait` returns early when a trapped signal arrives: wait again until the worker is gone.
        while :; do
            rc=0
            wait "$child" || rc=$?
            kill -0 "$child" 2>/dev/null || break
        done
        child=""
        (( rc == 0 || stop )) && return "$rc"
        if (( tries >= restarts )); then
            echo "worker $i: exit $rc, no restarts left" >&2
            return "$rc"
        fi
        tries=$(( tries + 1 ))
        echo "worker $i: exit $rc; restarting in $delay s ($tries of $restarts)" >&2
        sleep "$delay" &
        wait $! || true
        (( stop )) && return "$rc"
    done
}
for (( i = 0; i < n; i++ )); do
    worker_loop "$i" >>"$log_dir/worker-$i.log" 2>&1 &
    worker_pids+=("$!")
done

# The job ends when the coordinator ends. A worker that gave up (out of restarts) ends the job: the world
# can no longer be complete, so the others checkpoint and the coordinator saves its state. Workers that
# finished leave first; the coordinator follows within seconds (else it is stopped after 30 s).
workers_gone=0
while kill -0 "$coordinator_pid" 2>/dev/null; do
    alive=0
    for idx in "${!worker_pids[@]}"; do
        p="${worker_pids[idx]}"
        if kill -0 "$p" 2>/dev/null; then alive=1; continue; fi
        rc=0
        wait "$p" || rc=$?
        unset "worker_pids[idx]"
        if (( rc != 0 && !stopping )); then
            stopping=1
            log "worker $idx gave up (exit $rc): ending the job"
            kill -TERM "$coordinator_pid" "${worker_pids[@]}" 2>/dev/null || true
        fi
    done
    if (( alive )); then workers_gone=0; else workers_gone=$(( workers_gone + 1 )); fi
    if (( workers_gone > 30 && !stopping )); then
        log "every worker has ended but the coordinator is still running: stopping it"
        kill -TERM "$coordinator_pid" 2>/dev/null || true
        break
    fi
    sleep 1 &
    wait $! || true
done
status=0
wait "$coordinator_pid" || status=$?
for (( s = 0; s < 30; s++ )); do
    alive=0
    for p in "${worker_pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 1
done
if (( ${#worker_pids[@]} )); then
    kill -TERM "${worker_pids[@]}" 2>/dev/null || true
    wait "${worker_pids[@]}" 2>/dev/null || true
fi
log "the job ended with exit $status (logs in $log_dir)"
exit "$status"
