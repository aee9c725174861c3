#!/usr/bin/env bash
# Benchmark: ladle and mergekit 0.1.5 side by side on the same mergekit YAML recipes and the
# same ~0.98 GB bf16 checkpoints (the benches/linear_soup.sh inputs), with the I/O floor
# measured in the same run. Results: BENCHMARKS.md.
#
#   bash benches/vs_mergekit.sh
#   RUNS=5 MK_RUNS=1 METHODS="linear ties" BENCH_DATA=/mnt/fast/bench bash benches/vs_mergekit.sh
#   SKIP_BUILD=1 LADLE=/path/to/ladle bash benches/vs_mergekit.sh   # a binary built before
#
# 1. A virtualenv with mergekit 0.1.5 from PyPI at $MERGEKIT_VENV (default .venv-mergekit/),
#    created if missing. PyPI's Linux torch wheel brings CUDA libraries (a few GB to download);
#    they stay unused: mergekit runs with --no-cuda.
# 2. cargo build --release; the inputs ft-1, ft-2, ft-3 under $BENCH_DATA (default bench-data/),
#    generated unless present (benches/lib.sh, examples/gen_checkpoints.rs).
# 3. Per method (METHODS, default all eleven below), one YAML recipe (absolute paths; ft-1 is
#    the base model of the methods that take one, ft-2 and ft-3 the fine-tunes):
#    the I/O floor once (`cat` of the inputs + writing one checkpoint's bytes, as
#    benches/linear_soup.sh), then RUNS (default 3) runs of
#      ladle merge recipe.yml --out OUT --quiet
#    and MK_RUNS (default 1) runs of
#      mergekit-yaml recipe.yml OUT --no-cuda --no-copy-tokenizer --no-write-model-card --quiet --random-seed 42
#    each under /usr/bin/time (wall clock, peak RSS), outputs deleted and `sync` between runs.
# 4. With COMPARE=1 (default), how many elements of ladle's output differ from mergekit's
#    (numpy in the mergekit venv); dare_ties and della draw random masks, so their outputs
#    differ by design (ladle's masks are a function of its own seed).
# 5. A table: medians, ratios mergekit/ladle, ladle/linear and ladle/floor.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$(realpath -m "${BENCH_DATA:-$ROOT/bench-data}")
VENV=$(realpath -m "${MERGEKIT_VENV:-$ROOT/.venv-mergekit}")
RUNS=${RUNS:-3}
MK_RUNS=${MK_RUNS:-1}
COMPARE=${COMPARE:-1}
METHODS=${METHODS:-"linear ties dare_ties della breadcrumbs task_arithmetic sce slerp nuslerp model_stock karcher"}
LADLE=${LADLE:-$ROOT/target/release/ladle}
WORK=$DATA/vs-mergekit
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ---- tools
ensure_gnu_time
if [[ ! -x $VENV/bin/mergekit-yaml ]]; then
  log "creating $VENV with mergekit 0.1.5 from PyPI"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q mergekit==0.1.5
fi
log "mergekit $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"), "torch", m.version("torch"))')"
if [[ ${SKIP_BUILD:-} != 1 ]]; then
  log "cargo build --release"
  cargo build --release
fi
MODELS=3
ensure_inputs
B=$DATA/ft-1 F2=$DATA/ft-2 F3=$DATA/ft-3

# ---- recipes (mergekit YAML; ladle reads the same files)
mkdir -p "$WORK"
recipe() {
  local m=$1
  case $m in
    linear) printf 'merge_method: linear\nmodels:\n  - model: %s\n    parameters: {weight: 1.0}\n  - model: %s\n    parameters: {weight: 1.0}\n  - model: %s\n    parameters: {weight: 1.0}\n' "$B" "$F2" "$F3" ;;
    karcher) printf 'merge_method: karcher\nmodels:\n  - model: %s\n  - model: %s\n  - model: %s\n' "$B" "$F2" "$F3" ;;
    slerp) printf 'merge_method: slerp\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\nparameters: {t: 0.3}\n' "$B" "$B" "$F2" ;;
    nuslerp) printf 'merge_method: nuslerp\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 0.7}\n  - model: %s\n    parameters: {weight: 0.3}\n' "$B" "$F2" "$F3" ;;
    model_stock) printf 'merge_method: model_stock\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\n' "$B" "$F2" "$F3" ;;
    sce) printf 'merge_method: sce\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\nparameters: {select_topk: 0.5}\n' "$B" "$F2" "$F3" ;;
    task_arithmetic) printf 'merge_method: task_arithmetic\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 0.5}\n  - model: %s\n    parameters: {weight: 0.3}\n' "$B" "$F2" "$F3" ;;
    ties | dare_ties) printf 'merge_method: %s\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 0.5, density: 0.5}\n  - model: %s\n    parameters: {weight: 0.3, density: 0.5}\n' "$m" "$B" "$F2" "$F3" ;;
    della) printf 'merge_method: della\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}\n  - model: %s\n    parameters: {weight: 0.3, density: 0.5, epsilon: 0.1}\n' "$B" "$F2" "$F3" ;;
    breadcrumbs) printf 'merge_method: breadcrumbs\nbase_model: %s\nmodels:\n  - model: %s\n    parameters: {weight: 0.5, density: 0.9, gamma: 0.01}\n  - model: %s\n    parameters: {weight: 0.3, density: 0.9, gamma: 0.01}\n' "$B" "$F2" "$F3" ;;
    *) echo "unknown method $m" >&2; return 1 ;;
  esac
  echo "dtype: bfloat16"
}

# Elements of two outputs that differ (bit patterns), over all tensors.
compare() {
  "$VENV/bin/python" - "$1" "$2" <<'PY'
import json, os, sys
import numpy as np
from safetensors import safe_open

def tensors(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(os.path.join(d, f), "numpy") as st:
            for k in st.keys():
                out[k] = (os.path.join(d, f), k)
    return out

def raw(entry):
    # bf16 is not a numpy dtype: read the bits through the header offsets.
    path, name = entry
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        h = json.loads(fh.read(n))[name]
        a, b = h["data_offsets"]
        fh.seek(8 + n + a)
        return h["dtype"], np.frombuffer(fh.read(b - a), dtype=np.uint8)

ours, theirs = tensors(sys.argv[1]), tensors(sys.argv[2])
if set(ours) != set(theirs):
    print(f"different tensors: {sorted(set(ours) ^ set(theirs))[:5]}")
    sys.exit(0)
total = differ = 0
for k in ours:
    (da, a), (db, b) = raw(ours[k]), raw(theirs[k])
    if da != db or a.size != b.size:
        print(f"{k}: {da} vs {db}")
        sys.exit(0)
    w = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}.get(da, np.uint8)
    x, y = a.view(w), b.view(w)
    total += x.size
    differ += int(np.count_nonzero(x != y))
print(f"{differ} of {total} elements differ")
PY
}

# ---- measurements
describe_run "$LADLE"
echo "mergekit: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mergekit"), "torch", m.version("torch"))'), RUNS=$RUNS ladle runs and MK_RUNS=$MK_RUNS mergekit runs per method"
cat "${SHARDS[@]}" > /dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
declare -A L_S L_RSS M_S M_RSS F_S DIFF
for m in $METHODS; do
  recipe "$m" > "$WORK/$m.yml"
  rm -rf "$WORK/out-ladle" "$WORK/out-mergekit"
  measure_floor
  F_S[$m]=$FLOOR_S
  walls=() rsss=()
  for i in $(seq 1 "$RUNS"); do
    rm -rf "$WORK/out-ladle"
    sync
    timed "$LADLE" merge "$WORK/$m.yml" --out "$WORK/out-ladle" --quiet > /dev/null
    walls+=("$WALL_S") rsss+=("$RSS_KB")
    printf '%-16s ladle    run %d: %8.3f s %6s MiB\n' "$m" "$i" "$WALL_S" "$(kib_to_mib "$RSS_KB")"
  done
  L_S[$m]=$(median "${walls[@]}") L_RSS[$m]=$(median "${rsss[@]}")
  walls=() rsss=()
  for i in $(seq 1 "$MK_RUNS"); do
    rm -rf "$WORK/out-mergekit"
    sync
    timed "$VENV/bin/mergekit-yaml" "$WORK/$m.yml" "$WORK/out-mergekit" \
      --no-cuda --no-copy-tokenizer --no-write-model-card --quiet --random-seed 42 > "$WORK/mergekit-$m.log" 2>&1 \
      || { echo "mergekit failed on $m (see $WORK/mergekit-$m.log)" >&2; tail -5 "$WORK/mergekit-$m.log" >&2; WALL_S=nan RSS_KB=0; }
    walls+=("$WALL_S") rsss+=("$RSS_KB")
    printf '%-16s mergekit run %d: %8s s %6s MiB\n' "$m" "$i" "$WALL_S" "$(kib_to_mib "$RSS_KB")"
  done
  M_S[$m]=$(median "${walls[@]}") M_RSS[$m]=$(median "${rsss[@]}")
  DIFF[$m]="-"
  if [[ $COMPARE == 1 && -d $WORK/out-mergekit && -d $WORK/out-ladle ]]; then
    DIFF[$m]=$(compare "$WORK/out-ladle" "$WORK/out-mergekit")
  fi
  rm -rf "$WORK/out-ladle" "$WORK/out-mergekit"
done

echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
lin=${L_S[linear]:-}
printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' method "ladle s" "ladle MiB" "mergekit s" "mergekit MiB" "mergekit/ladle" "ladle/linear" "floor s" "ladle/floor" "vs mergekit"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
for m in $METHODS; do
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$m" "${L_S[$m]}" "$(kib_to_mib "${L_RSS[$m]}")" \
    "${M_S[$m]}" "$(kib_to_mib "${M_RSS[$m]}")" "$(ratio "${M_S[$m]}" "${L_S[$m]}")" \
    "$(if [[ -n $lin ]]; then ratio "${L_S[$m]}" "$lin"; else echo -; fi)" "${F_S[$m]}" \
    "$(ratio "${L_S[$m]}" "${F_S[$m]}")" "${DIFF[$m]}"
done
