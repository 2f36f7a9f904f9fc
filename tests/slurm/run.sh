#!/usr/bin/env bash
# Runs deploy/slurm/ddpo.sbatch for real on a one-node Slurm cluster started here (munged, slurmctld, slurmd
# from Debian's slurm-wlm and munge, installed if missing; needs root):
#   1. a tiny CPU job (2 workers, 1 thread each) runs to completion: job COMPLETED, metrics, final checkpoint;
#   2. a longer job in which one worker is killed with SIGKILL mid-training still completes: the sbatch
#      script's restart loop brings it back, the world re-forms (generation 2) and resumes from a checkpoint;
#   3. with no restarts allowed, a killed worker ends the job (FAILED, promptly, checkpoints kept) instead
#      of leaving it waiting for a world that cannot form until the time limit;
#   4. SIGTERM to the job's steps (what --signal=TERM@N does before the time limit): the workers checkpoint
#      and the job ends promptly; 5. resubmitted, it continues from that checkpoint and completes.
# Where Slurm cannot be installed or started it fails with the reason; it never passes by skipping.
#   BIN=/path/to/binaries tests/slurm/run.sh     (default BIN: target/debug of this checkout)
# The daemons run from a temporary folder on free ports and loopback addresses; they are stopped (by their
# pid files) and the folder removed on exit (KEEP_WORK=1 keeps it for a look at the logs).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${BIN:-target/debug}"
[[ "$BIN" = /* ]] || BIN="$root/$BIN"
sbatch_script="$root/deploy/slurm/ddpo.sbatch"
config="$root/configs/tiny-cpu.toml"
t0=$(date +%s)

fail() {
    echo "tests/slurm: FAIL: $*" >&2
    exit 1
}
say() { echo "tests/slurm: [$(( $(date +%s) - t0 )) s] $*"; }

[[ "$(id -u)" -eq 0 ]] || fail "must run as root (it starts Slurm daemons with SlurmUser=root and may apt-get install)"
for exe in ddpo coordinator worker; do
    [[ -x "$BIN/$exe" ]] || fail "$BIN/$exe not found: build first or set BIN"
done

# Debian's packages, installed once per machine.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge with apt-get"
    command -v apt-get >/dev/null || fail "Slurm is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge >/dev/null || fail "apt-get install slurm-wlm munge failed"
fi
id munge >/dev/null 2>&1 || fail "the munge user does not exist (the munge package creates it)"
command -v python3 >/dev/null || fail "python3 is needed to pick free ports"

work="$(mktemp -d /tmp/ddpo-slurm-test.XXXXXX)"
# munged insists that every folder on its socket's path is searchable by all.
chmod 755 "$work"
export SLURM_CONF="$work/etc/slurm.conf"

cleanup() {
    local rc=$?
    set +e
    if [[ -f "$work/run/slurmctld.pid" ]]; then
        scancel --quiet --user=root >/dev/null 2>&1
        for _ in $(seq 30); do
            [[ -z "$(squeue -h 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    # Anything a cancelled job left behind (the pid files name exactly our processes).
    for f in "$work"/job*/logs/worker-*.pid; do
        [[ -f "$f" ]] && kill -9 "$(cat "$f")" 2>/dev/null
    done
    for f in slurmd.pid slurmctld.pid munged.pid; do
        [[ -f "$work/run/$f" ]] || continue
        pid="$(cat "$work/run/$f")"
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null
    done
    if (( rc != 0 )); then
        echo "--- daemon logs (last lines) ---" >&2
        tail -n 15 "$work"/log/*.log >&2 2>/dev/null
    fi
    if [[ -n "${KEEP_WORK:-}" ]]; then echo "tests/slurm: kept $work" >&2; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- the cluster -------------------------------------------------------------------------------------------
mkdir -p "$work"/{etc,run,log,state,spool,munge}
# A private munge key and socket: a machine's own munged (if any) is left alone.
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$work/munge"
chmod 755 "$work/munge"
chmod 400 "$work/munge/munge.key"
runuser -u munge -- munged --key-file="$work/munge/munge.key" --socket="$work/munge/munge.socket" \
    --pid-file="$work/munge/munged.pid" --log-file="$work/munge/munged.log" --seed-file="$work/munge/munged.seed" \
    || { cat "$work/munge/munged.log" >&2; fail "munged did not start"; }
cp "$work/munge/munged.pid" "$work/run/munged.pid"

# This machine as one node (CPUs, sockets, memory as slurmd itself detects them), reached over loopback.
node_line="$(slurmd -C | head -n 1)"
[[ "$node_line" == NodeName=* ]] || fail "slurmd -C did not describe this machine: $node_line"
node="${node_line#NodeName=}"
node="${node%% *}"
ctld_port="$(free_port)"
slurmd_port="$(free_port)"
cat >"$SLURM_CONF" <<EOF
ClusterName=ddpotest
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge/munge.socket
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool/slurmd
SlurmctldPidFile=$work/run/slurmctld.pid
SlurmdPidFile=$work/run/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
# No cgroups (containers rarely allow them): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
# sbatch --wait polls at most every MinJobAge/3 s (2 s here, instead of up to 32 s); finished jobs are kept
# on record in the job-completion log, which outlives the short MinJobAge.
MinJobAge=6
JobCompType=jobcomp/filetxt
JobCompLoc=$work/log/jobcomp.txt
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ddpo Nodes=ALL Default=YES MaxTime=10 State=UP
EOF
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see its log)"
slurmd -f "$SLURM_CONF" -N "$node" || fail "slurmd did not start (see its log)"
for _ in $(seq 60); do
    state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 0.5
done
[[ "${state:-}" == idle ]] || fail "node $node is '${state:-unknown}', not idle, 30 s after starting slurmd"
say "Slurm is up: $node_line, slurmctld port $ctld_port"

# --- model and data (shared by both jobs; the reference cache too) ------------------------------------------
data="$work/data"
"$BIN/ddpo" init-model --out "$data/model" --preset tiny >/dev/null
"$BIN/ddpo" synth --out "$data/shards" --pairs 1024 --shards 2 --seed 1 --image-size 48 --difficulty easy >/dev/null
"$BIN/ddpo" synth --out "$data/shards" --pairs 128 --shards 1 --seed 2 --image-size 48 --difficulty easy \
    --prefix eval >/dev/null

# The repository's CPU config, pointed at this data through environment overrides (as users would).
export DDPO__MODEL__PATH="$data/model"
export DDPO__DATA__TRAIN="$data/shards/train-*.parquet"
export DDPO__DATA__EVAL="$data/shards/eval-*.parquet"
export DDPO__REFERENCE__CACHE_DIR="$data/cache"
export DDPO__CLUSTER__HEARTBEAT_TIMEOUT_SECS=10
export DDPO__CLUSTER__COLLECTIVE_TIMEOUT_SECS=30
# The sbatch script's variables: CPU workers (2 per node, 1 thread: from --ntasks-per-node and
# --cpus-per-task in job 1, set explicitly in job 2). Workers reach the coordinator at the node's NodeAddr
# (127.0.0.1 here) and each other on loopback.
export DDPO_BIN="$BIN" DDPO_CONFIG="$config" DDPO_DEVICE=cpu DDPO_RING_HOST=127.0.0.1
export DDPO_RESTART_DELAY=1 DDPO_WORKER_RESTARTS=2

# submit NAME EXTRA_SBATCH_ARGS...: submits the job in the background; sets job_pid, job_dir.
submit() {
    local name="$1"
    shift
    job_dir="$work/$name"
    mkdir -p "$job_dir/logs"
    DDPO__TRAIN__OUTPUT_DIR="$job_dir/out" DDPO_LOG_DIR="$job_dir/logs" \
        timeout 240 sbatch --wait --parsable --job-name="ddpo-$name" --chdir="$job_dir" --output="$job_dir/slurm.out" \
        --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=4 "$@" "$sbatch_script" \
        >"$job_dir/sbatch.stdout" 2>"$job_dir/sbatch.stderr" &
    job_pid=$!
}

# finish NAME: waits for sbatch --wait, then checks the job's state and outputs; prints the final step.
finish() {
    local name="$1" rc=0 id state last
    wait "$job_pid" || rc=$?
    id="$(head -n 1 "$job_dir/sbatch.stdout" 2>/dev/null || true)"
    if (( rc != 0 )); then
        echo "--- $name: sbatch stderr, job output, coordinator and worker logs ---" >&2
        tail -n 20 "$job_dir/sbatch.stderr" "$job_dir/slurm.out" "$job_dir"/logs/*.log >&2 2>/dev/null || true
        fail "$name: sbatch --wait exited $rc (job ${id:-?})"
    fi
    [[ -n "$id" ]] || fail "$name: sbatch printed no job id"
    state="$(grep "^JobId=$id " "$work/log/jobcomp.txt" | tr ' ' '\n' | sed -n 's/^JobState=//p')"
    [[ "$state" == COMPLETED ]] || fail "$name: job $id ended $state, not COMPLETED"
    [[ -s "$job_dir/out/metrics.jsonl" ]] || fail "$name: no metrics.jsonl"
    last="$(grep '"grad_norm"' "$job_dir/out/metrics.jsonl" | tail -n 1 | sed 's/.*"step":\([0-9]*\).*/\1/')"
    [[ "$last" =~ ^[0-9]+$ ]] || fail "$name: no training step in metrics.jsonl"
    [[ -f "$job_dir/out/checkpoint-$last/model.safetensors" ]] || fail "$name: no final checkpoint-$last"
    grep -q '"done": *true' "$job_dir/out/coordinator-state.json" || fail "$name: the coordinator state is not done"
    grep -q '1 node(s) x 2 cpu worker(s), 1 thread(s) each, world size 2' "$job_dir/slurm.out" \
        || fail "$name: the job did not run 2 CPU workers of 1 thread (see $job_dir/slurm.out)"
    say "$name: job $id COMPLETED at step $last (checkpoint-$last)"
}

# --- 1. a job runs to completion ---------------------------------------------------------------------------
say "job 1: 2 CPU workers, 1 epoch"
DDPO__TRAIN__EPOCHS=1 submit plain
finish plain

# --- 2. a worker killed mid-training comes back and the job completes --------------------------------------
say "job 2: 3 epochs, checkpoint every 8 steps, one worker killed with SIGKILL mid-training"
DDPO_WORKERS_PER_NODE=2 DDPO_THREADS=1 DDPO__TRAIN__EPOCHS=3 DDPO__TRAIN__SAVE_EVERY=8 DDPO__TRAIN__KEEP_LAST=3 \
    submit killed
victim=""
for _ in $(seq 1200); do
    kill -0 "$job_pid" 2>/dev/null || break
    # Kill once a checkpoint exists to resume from and training is well under way.
    if compgen -G "$job_dir/out/checkpoint-*/model.safetensors" >/dev/null \
        && [[ -s "$job_dir/logs/worker-1.pid" ]]; then
        victim="$(cat "$job_dir/logs/worker-1.pid")"
        grep -q worker "/proc/$victim/cmdline" 2>/dev/null || fail "pid $victim is not a worker"
        kill -9 "$victim"
        say "job 2: killed worker task 1 (pid $victim); checkpoints: $(cd "$job_dir/out" && echo checkpoint-*)"
        break
    fi
    sleep 0.1
done
[[ -n "$victim" ]] || { finish killed; fail "job 2 ended before a worker could be killed (no checkpoint seen)"; }
finish killed
grep -q 'restarting' "$job_dir/logs/worker-1.log" || fail "job 2: worker task 1 was not restarted (logs/worker-1.log)"
[[ "$(cat "$job_dir/logs/worker-1.pid")" != "$victim" ]] || fail "job 2: worker task 1 still has the killed pid"
generation="$(sed -n 's/.*"generation": *\([0-9]*\).*/\1/p' "$job_dir/out/coordinator-state.json")"
(( generation >= 2 )) || fail "job 2: generation $generation: the training world did not re-form"
grep -q 'resuming' "$job_dir"/logs/worker-*.log || fail "job 2: no worker resumed from a checkpoint"
say "job 2: worker restarted, world re-formed (generation $generation), resumed from a checkpoint"

# --- 3. a worker out of restarts ends the job (FAILED, promptly, with a checkpoint to resume from) --------
say "job 3: no restarts allowed, one worker killed: the job must end, not wait for it"
DDPO_WORKER_RESTARTS=0 DDPO__TRAIN__EPOCHS=3 DDPO__TRAIN__SAVE_EVERY=8 submit gave-up
victim=""
for _ in $(seq 1200); do
    kill -0 "$job_pid" 2>/dev/null || break
    if compgen -G "$job_dir/out/checkpoint-*/model.safetensors" >/dev/null \
        && [[ -s "$job_dir/logs/worker-1.pid" ]]; then
        victim="$(cat "$job_dir/logs/worker-1.pid")"
        kill -9 "$victim"
        break
    fi
    sleep 0.1
done
[[ -n "$victim" ]] || fail "job 3 ended before a worker could be killed"
killed_at=$(date +%s)
rc=0
wait "$job_pid" || rc=$?
id="$(head -n 1 "$job_dir/sbatch.stdout" 2>/dev/null || true)"
(( rc != 124 )) || fail "job 3 did not end within sbatch's time-out after its worker gave up"
(( rc != 0 )) || fail "job 3: sbatch --wait exited 0 although a worker gave up"
state="$(grep "^JobId=$id " "$work/log/jobcomp.txt" | tr ' ' '\n' | sed -n 's/^JobState=//p')"
[[ "$state" == FAILED ]] || fail "job 3: job $id ended ${state:-?}, not FAILED"
[[ -f "$job_dir/logs/worker-1.gave-up" ]] || fail "job 3: worker task 1 did not report giving up"
grep -q 'gave up: ending the job' "$job_dir/slurm.out" || fail "job 3: the batch script did not end the job"
compgen -G "$job_dir/out/checkpoint-*/model.safetensors" >/dev/null || fail "job 3: no checkpoint to resume from"
say "job 3: job $id FAILED $(( $(date +%s) - killed_at )) s after the kill (sbatch exit $rc); checkpoints kept: $(cd "$job_dir/out" && echo checkpoint-*)"

# --- 4. the time-limit warning (--signal=TERM@N signals the steps only), then a resubmission ---------------
say "job 4: SIGTERM to the job's steps mid-training (as --signal=TERM@N does before the time limit)"
DDPO__TRAIN__EPOCHS=3 DDPO__TRAIN__SAVE_EVERY=100 submit signalled
for _ in $(seq 1200); do
    grep -qE '"step":20[,}]' "$job_dir/out/metrics.jsonl" 2>/dev/null && break
    kill -0 "$job_pid" 2>/dev/null || break
    sleep 0.1
done
id="$(head -n 1 "$job_dir/sbatch.stdout")"
scancel --signal=TERM "$id"
signalled_at=$(date +%s)
rc=0
wait "$job_pid" || rc=$?
(( rc != 124 )) || fail "job 4 did not end after its workers were stopped"
stop_ckpt="$(cd "$job_dir/out" && echo checkpoint-*)"
[[ "$stop_ckpt" =~ ^checkpoint-[0-9]+$ && "$stop_ckpt" != checkpoint-100 ]] \
    || fail "job 4: the stopped workers should have written one checkpoint before step 100, found: $stop_ckpt"
grep -q 'coordinator is still running: stopping it' "$job_dir/slurm.out" \
    || fail "job 4: the batch script did not stop the coordinator once the workers had left"
say "job 4: ended $(( $(date +%s) - signalled_at )) s after the signal (sbatch exit $rc) with $stop_ckpt"
# Resubmitted on the same output folder, the job continues from that checkpoint and completes.
rm -rf "$job_dir/logs"
DDPO__TRAIN__EPOCHS=3 DDPO__TRAIN__SAVE_EVERY=100 submit signalled
finish signalled
grep -q 'recovered the job from its state file' "$job_dir/logs/coordinator.log" \
    || fail "job 5: the coordinator did not recover the job from its state file"
grep -q "resuming.*${stop_ckpt#checkpoint-}" "$job_dir"/logs/worker-*.log || fail "job 5: training did not resume from $stop_ckpt"
say "job 5: the resubmitted job resumed from $stop_ckpt and completed"

say "passed in $(( $(date +%s) - t0 )) s"
