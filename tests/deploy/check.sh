#!/usr/bin/env bash
# Checks deploy/ without a cluster:
#   1. shellcheck on every shell script in deploy/, tests/slurm and tests/deploy (Debian's package is
#      installed when the command is missing);
#   2. the Kubernetes manifests: base and the GPU overlay (and the README's "more workers" overlay) rendered
#      with tests/deploy/kustomize.py and, where one exists, with kubectl kustomize / kustomize (the two must
#      agree), validated against the Kubernetes schemas (kubernetes-validate --strict, the oldest version with
#      gRPC probes and the newest it knows), then checked for consistency (tests/deploy/check_manifests.py)
#      and their job.toml by `ddpo validate` (keys and ranges) at their world size; a broken manifest must
#      fail validation (so the validator is known to be working);
#   3. nothing in deploy/ hard-codes a node name, a developer machine's path or a GPU count;
#   4. tests/deploy/local.sh: the single-machine launcher, for real.
# Needs the binaries: BIN (default target/debug of this checkout).
# Python (PyYAML, kubernetes-validate) comes from the project venv (scripts/setup.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
t0=$(date +%s)
fail() { echo "tests/deploy: FAIL: $*" >&2; exit 1; }
say() { echo "tests/deploy: [$(( $(date +%s) - t0 )) s] $*"; }
BIN="${BIN:-target/debug}"
[[ "$BIN" = /* ]] || BIN="$root/$BIN"
export BIN
[[ -x "$BIN/ddpo" ]] || fail "$BIN/ddpo not found: build first or set BIN"

venv="$(scripts/setup.sh | tail -n 1)"
py="$venv/bin/python"
validate="$venv/bin/kubernetes-validate"
[[ -x "$validate" ]] || fail "$validate missing: scripts/requirements.txt should install kubernetes-validate"

work="$(mktemp -d /tmp/ddpo-deploy-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# --- 1. shellcheck -----------------------------------------------------------------------------------------
if ! command -v shellcheck >/dev/null; then
    say "installing shellcheck with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; } >/dev/null \
        || fail "shellcheck is missing and apt-get could not install it"
fi
scripts=()
while IFS= read -r f; do
    # Shell scripts by content (the sbatch script has no .sh suffix).
    if [[ "$f" == *.sh || "$(head -c 100 "$f")" == '#!'*bash* || "$(head -c 100 "$f")" == '#!'*/sh* ]]; then
        scripts+=("$f")
    fi
done < <(find deploy tests/slurm tests/deploy -type f ! -name '*.py' ! -name '*.yaml' ! -name '*.toml' \
    ! -name '*.md' ! -name 'Dockerfile*' | sort)
(( ${#scripts[@]} >= 5 )) || fail "expected at least 5 shell scripts, found: ${scripts[*]}"
shellcheck --severity=info "${scripts[@]}" || fail "shellcheck found problems"
say "shellcheck: clean (${scripts[*]})"

# --- 2. Kubernetes manifests -------------------------------------------------------------------------------
# The README's overlay for your own job (image, number of workers in both places), taken from
# deploy/README.md itself so the documented text is what is tested; its path to the GPU overlay is made
# relative to the temporary folder (kustomize takes relative paths only).
mkdir -p "$work/more-workers"
"$py" - "$root/deploy/README.md" "$(realpath --relative-to="$work/more-workers" "$root/deploy/k8s/overlays/gpu")" \
    >"$work/more-workers/kustomization.yaml" <<'PY' || fail "deploy/README.md: no my-job/kustomization.yaml example"
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"```yaml\n# my-job/kustomization.yaml\n(.*?)```", text, re.S)
if not m:
    sys.exit(1)
body, n = re.subn(r"(?m)^(  - )\.\./ddpo/deploy/k8s/overlays/gpu.*$", r"\g<1>" + sys.argv[2], m.group(1))
if n != 1:
    sys.exit(1)
sys.stdout.write(body)
PY

real_kustomize=()
if command -v kustomize >/dev/null; then
    real_kustomize=(kustomize build)
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    real_kustomize=(kubectl kustomize)
fi
for flavour in base gpu more-workers; do
    case "$flavour" in
        base) dir=deploy/k8s/base; extra=() ;;
        gpu) dir=deploy/k8s/overlays/gpu; extra=(--gpu) ;;
        more-workers) dir="$work/more-workers"; extra=(--gpu) ;;
    esac
    out="$work/$flavour.yaml"
    "$py" tests/deploy/kustomize.py "$dir" >"$out" || fail "$dir: rendering failed"
    compare=()
    if (( ${#real_kustomize[@]} )); then
        "${real_kustomize[@]}" "$dir" >"$work/$flavour.kustomize.yaml" || fail "$dir: ${real_kustomize[*]} failed"
        compare=("$work/$flavour.kustomize.yaml")
    fi
    for version in 1.27.0 ""; do
        "$validate" --strict --quiet ${version:+-k "$version"} "$out" \
            || fail "$dir: kubernetes-validate ${version:-(newest)} rejected the rendered manifests"
    done
    "$py" tests/deploy/check_manifests.py "$out" "${compare[@]}" "${extra[@]}" || fail "$dir: inconsistent"
    # The job config in the ConfigMap must pass ddpo's own key and range checks at the manifests' world size
    # (its files live on the cluster's volume, so only those checks apply here).
    world="$("$py" -c 'import sys, yaml
docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
open(sys.argv[2], "w").write(docs[("ConfigMap", "ddpo-job")]["data"]["job.toml"])
c = docs[("Deployment", "ddpo-coordinator")]["spec"]["template"]["spec"]["containers"][0]
print(next(e["value"] for e in c["env"] if e["name"] == "DDPO__CLUSTER__WORLD_SIZE"))' "$out" "$work/$flavour.toml")"
    report="$(DDPO__CLUSTER__WORLD_SIZE="$world" "$BIN/ddpo" validate --config "$work/$flavour.toml" 2>&1 || true)"
    grep -q 'keys and ranges ok' <<<"$report" || fail "$dir: job.toml at world size $world:"$'\n'"$report"
done
if (( ${#real_kustomize[@]} )); then
    say "k8s: base, gpu and more-workers render identically with kustomize.py and ${real_kustomize[*]}; valid for 1.27 and newest"
else
    say "k8s: base, gpu and more-workers rendered with kustomize.py (no kustomize binary here); valid for 1.27 and newest"
fi
# The validator must reject what the API server would (a wrong enum value, an unknown field).
sed -e 's/restartPolicy: OnFailure/restartPolicy: Sometimes/' -e 's/completionMode: Indexed/completionMode: Indexed\n  replicas: 2/' \
    "$work/base.yaml" >"$work/broken.yaml"
if "$validate" --strict --quiet "$work/broken.yaml" >/dev/null 2>&1; then
    fail "kubernetes-validate accepted a broken manifest: it is not checking anything"
fi

# --- 3. nothing machine-specific in deploy/ ----------------------------------------------------------------
# scan DIR: prints what DIR hard-codes, one finding per line.
scan() {
    local dir="$1"
    # Developer machines' paths, anywhere (comments and docs too).
    grep -rnE '(^|[^A-Za-z0-9_.])/(work|root|home|Users)(/|$)' "$dir" | sed 's/^/developer path: /'
    # This machine's name, and node pinning of any kind.
    [[ "$(hostname -s)" == localhost ]] || grep -rnwF "$(hostname -s)" "$dir" | sed 's/^/this machine: /'
    grep -rnE 'nodeName:|kubernetes\.io/hostname|NodeName=|--nodelist|(^|[[:space:]])-w[[:space:]]+[A-Za-z]' "$dir" \
        | sed 's/^/node name: /'
    # GPU counts, outside comments (#SBATCH lines count) and the README's examples: a worker has exactly one
    # GPU (cuda:0 in its pod, nvidia.com/gpu: 1); how many a node or a job has is discovered or set by users.
    grep -rnE --exclude=README.md \
        'gpus(-per-node|-per-task)?[= ]+[0-9]|gres=gpu:[0-9]|nvidia\.com/gpu: *"?([02-9]|[1-9][0-9])|CUDA_VISIBLE_DEVICES=[0-9]|(^|[^/[:alnum:]])cuda:[1-9]' "$dir" \
        | grep -vE '^[^:]+:[0-9]+:[[:space:]]*#([^S]|$)' | sed 's/^/GPU count: /'
    return 0
}
hits="$(scan deploy)"
[[ -z "$hits" ]] || fail "deploy/ hard-codes machine specifics:"$'\n'"$hits"
# The scan itself must see each kind of problem.
mkdir -p "$work/planted"
printf '%s\n' 'export DDPO_BIN=/home/alice/ddpo/bin' "ssh $(hostname -s) true" 'srun --nodelist=gpu01 true' \
    '#SBATCH --gpus-per-node=8' '        nvidia.com/gpu: 8' 'worker --device cuda:3' >"$work/planted/job.sbatch"
planted="$(scan "$work/planted")"
for kind in 'developer path' 'this machine' 'node name' 'GPU count'; do
    grep -q "^$kind: " <<<"$planted" || fail "the hard-coding scan missed a planted $kind:"$'\n'"$planted"
done
(( $(grep -c '^GPU count: ' <<<"$planted") == 3 )) || fail "the scan should find 3 planted GPU counts:"$'\n'"$planted"
say "deploy/: no node names, developer paths or GPU counts (and the scan finds planted ones)"

# --- 4. the single-machine launcher, for real --------------------------------------------------------------
tests/deploy/local.sh
say "passed"
