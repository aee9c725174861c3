#!/usr/bin/env bash
# A/B of two (or more) ladle binaries on one recipe, alternating them so both see the same
# machine state: ROUNDS rounds of `BIN merge RECIPE --out OUT --quiet` per binary under
# /usr/bin/time, output deleted and `sync` before each run. Prints per run:
#   binary  wall_s  user_s  sys_s  max_rss_KiB  sha256(tensor files, first 12 hex digits)
# so a refactor shows its speed and that its output bytes did not change, side by side.
#
#   bash benches/ab_binaries.sh RECIPE ROUNDS OLD_LADLE NEW_LADLE [MORE...]
#   OUT=/tmp/ab-out bash benches/ab_binaries.sh bench-data/vs-mergekit/ties.yml 3 /tmp/ladle-old target/release/ladle
set -euo pipefail
recipe=$1 rounds=$2
shift 2
out=${OUT:-$(dirname "$recipe")/ab-out}
t=$(mktemp)
trap 'rm -f "$t"' EXIT
for _ in $(seq 1 "$rounds"); do
  for bin in "$@"; do
    rm -rf "$out"
    sync
    /usr/bin/time -f "%e %U %S %M" -o "$t" "$bin" merge "$recipe" --out "$out" --quiet >/dev/null
    sha=$(cat "$out"/*.safetensors | sha256sum | cut -c1-12)
    echo "$(basename "$bin") $(cat "$t") $sha"
  done
done
rm -rf "$out"
