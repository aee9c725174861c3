#!/usr/bin/env bash
# Benchmark: ladle's `method: lora` against peft 0.21.2's `add_weighted_adapter` on CPU, same
# machine, same inputs. Results: BENCHMARKS.md (LoRA section).
#
#   bash benches/lora_vs_peft.sh
#   HIDDEN=4096 LAYERS=32 RANKS=16,32 RUNS=3 COMBINATIONS="svd ties_svd cat" bash benches/lora_vs_peft.sh
#
# RANKS may repeat a rank (`32,32`): linear, ties, dare_linear, dare_ties and magnitude_prune
# need adapters of one rank (peft refuses others, so does ladle). The ladle binary is
# $LADLE (default: release/ladle under $CARGO_TARGET_DIR, else target/); SKIP_BUILD=1 skips
# the build.
#
# 1. A virtualenv with peft 0.21.2 and torch from PyPI at $PEFT_VENV (default
#    bench-data/.venv-peft/, ignored by git), created if missing (PyPI's Linux torch wheel brings CUDA libraries, unused).
# 2. cargo build --release --bin ladle; the inputs under $BENCH_DATA (default
#    bench-data/lora-<HIDDEN>x<LAYERS>-<RANKS>/): a bf16 base of LAYERS layers of q_proj and
#    v_proj (HIDDEN × HIDDEN) and one float32 adapter per rank in RANKS (benches/lora_vs_peft.py).
# 3. Per combination (COMBINATIONS, default "svd cat"; DENSITY for the pruning types), RUNS
#    (default 3) runs of each, under /usr/bin/time (wall clock, peak RSS), outputs deleted:
#      ladle merge recipe.json --out OUT --quiet           (equal weights 1/n)
#      python lora_vs_peft.py peft DIR COMBINATION OUT     (load + add_weighted_adapter + save)
#    peft's own timer of add_weighted_adapter alone is reported too (merge_s).
# 4. A table: each run's wall clock, medians (wall clock, peak RSS), the ratio peft/ladle on
#    the whole job and on peft's merge call alone, and the last run's outputs compared
#    (`lora_vs_peft.py compare`: per module max|P_ladle − P_peft| / max|P_peft| of the loaded
#    products, the worst module; "random" for DARE below density 1).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
HIDDEN=${HIDDEN:-4096}
LAYERS=${LAYERS:-32}
RANKS=${RANKS:-16,32}
RUNS=${RUNS:-3}
COMBINATIONS=${COMBINATIONS:-"svd cat"}
DENSITY=${DENSITY:-0.5}
VENV=$(realpath -m "${PEFT_VENV:-$ROOT/bench-data/.venv-peft}")
DATA=$(realpath -m "${BENCH_DATA:-$ROOT/bench-data}/lora-${HIDDEN}x${LAYERS}-${RANKS//,/-}")
LADLE=${LADLE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ladle}
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

ensure_gnu_time
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import peft' 2>/dev/null; then
  log "creating $VENV with peft 0.21.2 from PyPI"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch peft==0.21.2 safetensors numpy
fi
PY=$VENV/bin/python
log "$("$PY" -c 'import importlib.metadata as m; print("peft", m.version("peft"), "torch", m.version("torch"))')"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release --bin ladle"
  cargo build --release --bin ladle
fi
if [[ ! -f $DATA/adapters/a0/adapter_model.safetensors ]]; then
  log "generating inputs in $DATA"
  mkdir -p "$DATA"
  "$PY" benches/lora_vs_peft.py make "$DATA" "$HIDDEN" "$LAYERS" "$RANKS"
fi
n_adapters=$(find "$DATA/adapters" -mindepth 1 -maxdepth 1 -type d | wc -l)

recipe() {
  local comb=$1 out=$2 models="" w
  w=$(awk -v n="$n_adapters" 'BEGIN { printf "%.17g", 1 / n }')
  for a in $(find "$DATA/adapters" -mindepth 1 -maxdepth 1 -type d | sort); do
    models+="${models:+, }{\"uri\": \"file://$a/\", \"parameters\": {\"weight\": $w}}"
  done
  local params="\"combination\": \"$comb\""
  case $comb in
    ties* | dare* | magnitude_prune*) params+=", \"density\": $DENSITY" ;;
  esac
  printf '{"method": "lora", "base_model": "file://%s/base/", "models": [%s], "parameters": {%s}, "output": {"uri": "file://%s/"}}\n' \
    "$DATA" "$models" "$params" "$out"
}

timed() { # timed LOG CMD... → "wall_s rss_kib" of one run
  local log=$1
  shift
  /usr/bin/time -f '%e %M' -o "$log.time" "$@" > "$log" 2>&1 || { cat "$log" >&2; return 1; }
  cat "$log.time"
}

rows=()
for comb in $COMBINATIONS; do
  density=()
  case $comb in ties* | dare* | magnitude_prune*) density=("$DENSITY") ;; esac
  recipe "$comb" "$DATA/out-ladle" > "$DATA/recipe-$comb.json"
  lw=() lr=() pw=() pr=() pm=()
  for i in $(seq "$RUNS"); do
    rm -rf "$DATA/out-ladle" "$DATA/out-peft"
    read -r w r < <(timed "$DATA/ladle.log" "$LADLE" merge "$DATA/recipe-$comb.json" --out "$DATA/out-ladle" --quiet)
    lw+=("$w") lr+=("$r")
    read -r w r < <(timed "$DATA/peft.log" "$PY" benches/lora_vs_peft.py peft "$DATA" "$comb" "$DATA/out-peft" "${density[@]}")
    pw+=("$w") pr+=("$r")
    pm+=("$(sed -n 's/.*merge_s=\([0-9.]*\).*/\1/p' "$DATA/peft.log")")
    log "$comb run $i: ladle ${lw[-1]} s $(kib_to_mib "${lr[-1]}") MiB; peft ${pw[-1]} s (merge ${pm[-1]} s) $(kib_to_mib "${pr[-1]}") MiB"
  done
  # The last run's outputs: the products s·B@A per module against peft's (DARE below density 1
  # draws other masks than torch's: not comparable).
  diff=random
  if [[ $comb != dare* ]] || awk -v d="$DENSITY" 'BEGIN { exit !(d >= 1) }'; then
    diff=$("$PY" benches/lora_vs_peft.py compare "$DATA/out-ladle" "$DATA/out-peft" 2>&1 | sed -n 's/.*product_rel_diff=\([^ ]*\).*/\1/p')
  fi
  log "$comb: max |P_ladle - P_peft| / max |P_peft| over the modules: $diff"
  ml=$(median "${lw[@]}") mp=$(median "${pw[@]}") mm=$(median "${pm[@]}")
  rows+=("| \`$comb\` | ${lw[*]} | $ml | $(kib_to_mib "$(median "${lr[@]}")") | ${pw[*]} | $mp | $mm | $(kib_to_mib "$(median "${pr[@]}")") | $(ratio "$mp" "$ml") | $(ratio "$mm" "$ml") | $diff |")
done
echo
echo "HIDDEN=$HIDDEN LAYERS=$LAYERS RANKS=$RANKS RUNS=$RUNS ($n_adapters adapters, q_proj + v_proj), $(nproc) CPUs"
echo "| combination | ladle s (each) | ladle s | ladle MiB | peft s (job, each) | peft s (job) | peft s (add_weighted_adapter) | peft MiB | peft/ladle (job) | peft merge/ladle job | product diff |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
