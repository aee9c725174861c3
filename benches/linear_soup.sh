#!/usr/bin/env bash
# Benchmark: a 3-model linear soup of ~0.98 GB bf16 checkpoints on local files, against the
# I/O floor of the same machine. Results: BENCHMARKS.md.
#
#   bash benches/linear_soup.sh            # RUNS=5 by default
#   RUNS=9 BENCH_DATA=/mnt/fast/bench bash benches/linear_soup.sh
#   BASELINE=/path/to/older/ladle bash benches/linear_soup.sh   # and an older binary, same runs
#
# 1. Generates the inputs under bench-data/ (examples/gen_checkpoints.rs: deterministic
#    Llama-shaped bf16 models, 400 MB shards) unless they are already there.
# 2. cargo build --release.
# 3. Warms the page cache: every input shard is read once.
# 4. RUNS times, side by side:
#    floor: `cat` of all input shards to /dev/null, plus writing one checkpoint's worth of
#           bytes (dd from /dev/zero, 16 MiB blocks) to a file, i.e. the least I/O any merge
#           of these inputs must do, without any parsing, math or hashing;
#    merge: /usr/bin/time -v target/release/ladle merge bench-data/recipe.json
#           --out bench-data/soup-$i --quiet  (wall time, user/sys CPU, max RSS).
#    baseline (with BASELINE=binary): the same merge with that binary, right after; its soup
#           must be byte-identical to ladle's (SHA-256 of model.safetensors).
#    Outputs are deleted and `sync` runs between measurements (untimed), so every run starts
#    with no dirty pages.
# 5. Prints per-run numbers, medians and the merge/floor ratio, and spot-checks the soup's
#    values against the inputs (python3, standard library only).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$(realpath -m "${BENCH_DATA:-$ROOT/bench-data}")
RUNS=${RUNS:-5}
LADLE=$ROOT/target/release/ladle
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

ensure_gnu_time
log "cargo build --release"
cargo build --release
ensure_inputs   # also step 3: warms the page cache

# ---- recipe (relative model paths resolve against the recipe's folder; --out overrides)
MODELS_JSON=""
for m in $(seq 1 "$MODELS"); do MODELS_JSON+="${MODELS_JSON:+, }{\"uri\": \"ft-$m\"}"; done
cat > "$DATA/recipe.json" <<EOF
{"method": "linear", "models": [$MODELS_JSON], "output": {"uri": "file://$DATA/soup", "max_shard_size": "2GB"}}
EOF

# ---- what is measured, where
describe_run "$LADLE"

cat "${SHARDS[@]}" > /dev/null  # second warm pass: the first one may have evicted early shards
BASELINE=${BASELINE:-}
[[ -z $BASELINE ]] || echo "baseline: $BASELINE, binary $(sha256sum "$BASELINE" | cut -c1-12)"
FLOOR=() MERGE=() RATIO=() RSS=() BASE=() BASE_RSS=()
printf '%-4s %9s %9s %9s | %9s %8s %8s %10s | %6s%s\n' \
  run read_s write_s floor_s merge_s user_s sys_s maxrss_MiB ratio \
  "${BASELINE:+ | baseline_s user_s sys_s maxrss_MiB}"
for i in $(seq 1 "$RUNS"); do
  rm -rf "$DATA"/soup-*
  measure_floor
  read_s=$READ_S write_s=$WRITE_S floor_s=$FLOOR_S

  rm -rf "$DATA"/soup-*
  sync
  timed "$LADLE" merge "$DATA/recipe.json" --out "$DATA/soup-$i" --quiet > "$DATA/merge-$i.json"
  merge_s=$WALL_S rss_kb=$RSS_KB
  [[ -f $DATA/soup-$i/ladle-manifest.json ]] || { echo "run $i: no ladle-manifest.json in $DATA/soup-$i" >&2; exit 1; }
  rss_mib=$(kib_to_mib "$rss_kb")
  ratio=$(ratio "$merge_s" "$floor_s")
  line=$(printf '%-4s %9s %9s %9s | %9s %8s %8s %10s | %6s' \
    "$i" "$read_s" "$write_s" "$floor_s" "$merge_s" "$USER_S" "$SYS_S" "$rss_mib" "$ratio")
  FLOOR+=("$floor_s") MERGE+=("$merge_s") RATIO+=("$ratio") RSS+=("$rss_kb")
  if [[ -n $BASELINE ]]; then
    rm -rf "$DATA/soup-base"
    sync
    timed "$BASELINE" merge "$DATA/recipe.json" --out "$DATA/soup-base" --quiet > /dev/null
    line+=$(printf ' | %10s %8s %8s %10s' "$WALL_S" "$USER_S" "$SYS_S" "$(kib_to_mib "$RSS_KB")")
    BASE+=("$WALL_S") BASE_RSS+=("$RSS_KB")
    ours=$(sha256sum < "$DATA/soup-$i/model.safetensors")
    theirs=$(sha256sum < "$DATA/soup-base/model.safetensors")
    [[ $ours == "$theirs" ]] || { echo "run $i: the soup differs from the baseline's" >&2; exit 1; }
    rm -rf "$DATA/soup-base"
  fi
  echo "$line"
  if [[ $i -lt $RUNS ]]; then rm -rf "$DATA/soup-$i"; fi
done

mf=$(median "${FLOOR[@]}")
mm=$(median "${MERGE[@]}")
mr=$(median "${RATIO[@]}")
mrss=$(median "${RSS[@]}")
echo
echo "median floor ${mf} s, median merge ${mm} s, median max RSS $(awk -v k="$mrss" 'BEGIN { printf "%.0f", k / 1024 }') MiB"
echo "ratio of medians (merge/floor): $(awk -v m="$mm" -v f="$mf" 'BEGIN { printf "%.2f", m / f }');" \
  "median of per-run ratios: $mr"
if [[ -n $BASELINE ]]; then
  mb=$(median "${BASE[@]}")
  echo "baseline: median ${mb} s, median max RSS $(kib_to_mib "$(median "${BASE_RSS[@]}")") MiB;" \
    "merge/baseline $(ratio "$mm" "$mb"), baseline/floor $(ratio "$mb" "$mf"); soups byte-identical in every run"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "merge throughput: $(awk -v b="$IN_BYTES" -v s="$mm" 'BEGIN { printf "%.2f", b / s / 1e9 }') GB/s read," \
  "$(awk -v b="$ONE_BYTES" -v s="$mm" 'BEGIN { printf "%.2f", b / s / 1e9 }') GB/s written"

# ---- spot check of the last soup: every sampled value within 1 bf16 ulp of the f32 mean
if command -v python3 > /dev/null; then
  python3 - "$DATA" "$MODELS" "$RUNS" <<'PY'
import json, os, struct, sys

data, models, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def open_folder(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    where = {}
    for f in files:
        with open(os.path.join(d, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            for k, v in json.loads(fh.read(n)).items():
                if k != "__metadata__":
                    where[k] = (os.path.join(d, f), 8 + n, v)
    return where

def read(entry, count):
    path, base, v = entry
    assert v["dtype"] == "BF16", v["dtype"]
    a, b = v["data_offsets"]
    n = (b - a) // 2
    count = min(count, n)
    with open(path, "rb") as fh:
        fh.seek(base + a + 2 * ((n - count) // 2))  # the middle `count` elements
        raw = fh.read(2 * count)
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack(f"<{len(raw) // 2}H", raw)]

def bf16(x):
    """x (as f32) rounded to bf16 with round-to-nearest-even, back as a float."""
    b = struct.unpack("<I", struct.pack("<f", x))[0]
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", b))[0]

def ulp(x):
    e = (struct.unpack("<I", struct.pack("<f", x))[0] >> 23) & 0xFF
    return 2.0 ** (max(e, 1) - 127 - 7)

ins = [open_folder(os.path.join(data, f"ft-{m}")) for m in range(1, models + 1)]
out = open_folder(os.path.join(data, f"soup-{run}"))
assert set(out) == set(ins[0]), "tensor names differ"
names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.input_layernorm.weight", "lm_head.weight", "model.norm.weight"]
checked = exact = 0
for name in names:
    assert out[name][2]["shape"] == ins[0][name][2]["shape"], name
    xs = [read(i[name], 2048) for i in ins]
    for j, y in enumerate(read(out[name], 2048)):
        mean = sum(x[j] for x in xs) / models
        assert abs(y - mean) <= ulp(mean), (name, j, y, mean)
        checked += 1
        exact += y == bf16(mean)
print(f"spot check: {checked} values of {len(names)} tensors within 1 bf16 ulp of the inputs' mean, "
      f"{exact} equal to it rounded to nearest even; {len(out)} tensors, same names and shapes")
PY
fi
rm -rf "$DATA/soup-$RUNS"
