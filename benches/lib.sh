# Shared by the shell benchmarks (benches/linear_soup.sh, benches/vs_mergekit.sh); sourced, not run.
# Expects ROOT (the repository) and DATA (the benchmark data folder) to be set.

log() { printf '== %s\n' "$*" >&2; }
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

# GNU time (/usr/bin/time) for peak RSS.
ensure_gnu_time() {
  if [[ ! -x /usr/bin/time ]]; then
    log "installing GNU time (/usr/bin/time)"
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq time >/dev/null
  fi
}

# The inputs: $MODELS Llama-shaped bf16 checkpoints ft-1 … ft-N of ~$SIZE_GB GB under $DATA
# (examples/gen_checkpoints.rs), generated unless a stamp says the same ones are there.
# Sets SHARDS (every input shard), IN_BYTES (their bytes) and ONE_BYTES (one checkpoint's).
ensure_inputs() {
  MODELS=${MODELS:-3}
  SIZE_GB=${SIZE_GB:-0.98}
  SHARD_MB=${SHARD_MB:-400}
  mkdir -p "$DATA"
  local stamp="$DATA/inputs.stamp"
  local want="models=$MODELS size_gb=$SIZE_GB shard_mb=$SHARD_MB generator=$(sha256sum "$ROOT/examples/gen_checkpoints.rs" | cut -c1-16)"
  local complete=yes m
  for m in $(seq 1 "$MODELS"); do [[ -f $DATA/ft-$m/model.safetensors.index.json ]] || complete=no; done
  if [[ $complete != yes || ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    log "generating $MODELS inputs of ~$SIZE_GB GB under $DATA"
    (cd "$ROOT" && cargo build --release --example gen_checkpoints)
    rm -f "$stamp"
    for m in $(seq 1 "$MODELS"); do rm -rf "${DATA:?}/ft-$m"; done
    "$ROOT/target/release/examples/gen_checkpoints" "$DATA" \
      --models "$MODELS" --size-gb "$SIZE_GB" --shard-mb "$SHARD_MB"
    echo "$want" > "$stamp"
  else
    log "inputs present ($want)"
  fi
  SHARDS=()
  for m in $(seq 1 "$MODELS"); do SHARDS+=("$DATA"/ft-"$m"/*.safetensors); done
  IN_BYTES=$(cat "${SHARDS[@]}" | wc -c)        # also warms the page cache
  ONE_BYTES=$(cat "$DATA"/ft-1/*.safetensors | wc -c)
  log "inputs: ${#SHARDS[@]} shards, $IN_BYTES bytes; one checkpoint: $ONE_BYTES bytes"
}

# The I/O floor: `cat` of every input shard to /dev/null, then writing one checkpoint's worth
# of bytes (dd from /dev/zero, 16 MiB blocks) to a file. Sets READ_S, WRITE_S, FLOOR_S.
measure_floor() {
  rm -f "$DATA/floor.bin"
  sync
  local t0 t1 t2
  t0=$(now)
  cat "${SHARDS[@]}" > /dev/null
  t1=$(now)
  dd if=/dev/zero of="$DATA/floor.bin" bs=16M count="$ONE_BYTES" iflag=count_bytes status=none
  t2=$(now)
  READ_S=$(elapsed "$t0" "$t1")
  WRITE_S=$(elapsed "$t1" "$t2")
  FLOOR_S=$(elapsed "$t0" "$t2")
  rm -f "$DATA/floor.bin"
}

# Run a command under GNU time: sets WALL_S (bash clock around it), RSS_KB, USER_S, SYS_S.
# Fails (returns non-zero) when the command does.
timed() {
  local tf t0 t1 rc=0
  tf=$(mktemp)
  t0=$(now)
  /usr/bin/time -v -o "$tf" "$@" || rc=$?
  t1=$(now)
  WALL_S=$(elapsed "$t0" "$t1")
  RSS_KB=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$tf")
  USER_S=$(awk -F': ' '/User time/ { print $2 }' "$tf")
  SYS_S=$(awk -F': ' '/System time/ { print $2 }' "$tf")
  rm -f "$tf"
  return "$rc"
}

# One line: what is measured, where.
describe_run() {
  local bin=$1
  echo "ladle: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes in src/ or Cargo.*')," \
    "binary $(sha256sum "$bin" | cut -c1-12), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))," \
    "$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $DATA on $(df -P "$DATA" | awk 'NR == 2 { print $1 }')," \
    "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}
