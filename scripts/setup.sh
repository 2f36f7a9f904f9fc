#!/usr/bin/env bash
# Installs the Python environment that provides libtorch (from the PyTorch 2.11.0 wheel) and the test oracles,
# into a per-user cache folder OUTSIDE the checkout so every clone on this machine (CI included) reuses it.
#   DDPO_VENV        the virtual environment to use/create (default: $DDPO_CACHE_DIR/venv-torch-2.11.0)
#   DDPO_CACHE_DIR   the per-user cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ddpo)
# Idempotent: when the environment already matches scripts/requirements.txt it returns in well under a second.
# Prints the venv path on stdout (last line) so callers can capture it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements.txt"
cache="${DDPO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpo}"
venv="${DDPO_VENV:-$cache/venv-torch-2.11.0}"
stamp="$venv/.ddpo-requirements"

python="${PYTHON:-python3}"

if [[ -f "$stamp" ]] && cmp -s "$stamp" "$req" && [[ -x "$venv/bin/python" ]]; then
    echo "$venv"
    exit 0
fi

mkdir -p "$cache"
# One set-up at a time per cache folder (two clones running `make test` at once must not both install).
exec 9>"$cache/.setup.lock"
if command -v flock >/dev/null; then flock 9; fi
if [[ -f "$stamp" ]] && cmp -s "$stamp" "$req" && [[ -x "$venv/bin/python" ]]; then
    echo "$venv"
    exit 0
fi

start=$(date +%s)
echo "ddpo setup: creating $venv (PyTorch 2.11.0 wheel, ~4.6 GB with its CUDA libraries; a few minutes)" >&2
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
"$venv/bin/python" - <<'PY' >&2
import torch, os
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert os.path.exists(os.path.join(lib, "libtorch_cpu.so")), lib
print(f"ddpo setup: torch {torch.__version__} libtorch at {lib}")
PY
cp "$req" "$stamp"
echo "ddpo setup: done in $(( $(date +%s) - start )) s" >&2
echo "$venv"
