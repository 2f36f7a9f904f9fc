#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine lent to a session (the `device` tool): the three
# release binaries and the `ddpo_step` benchmark (`make bench-step`), stripped and xz-compressed into .gpu/
# (ignored by git; the tool carries at most 64 MiB).
# Usage: scripts/gpu-pack.sh, then run on the device, carrying .gpu:
#   scripts/gpu-check.sh        (results in $OUT: gpu-check.log and gpu-check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/with-torch cargo build --release --bins >&2
scripts/with-torch cargo bench --bench ddpo_step --no-run >&2
bench=$(find target/release/deps -maxdepth 1 -type f -name 'ddpo_step-*' ! -name '*.d' -printf '%T@ %p\n' \
    | sort -rn | head -n 1 | cut -d' ' -f2)
rm -rf .gpu
mkdir -p .gpu
for b in ddpo coordinator worker; do
    strip -o ".gpu/$b" "target/release/$b"
    xz -T0 -6 ".gpu/$b"
done
strip -o .gpu/ddpo_step "$bench"
xz -T0 -6 .gpu/ddpo_step
du -ch .gpu/* | tail -n 1
