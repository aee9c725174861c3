#!/usr/bin/env bash
# Byte-identity check: runs two `ladle` binaries on the same recipes and compares the SHA-256 of
# every output file (refactors of the engine or a method must not change a byte).
#
#   bash benches/compare_outputs.sh OLD_LADLE [NEW_LADLE]     # NEW defaults to target/release/ladle
#   e.g. bash benches/compare_outputs.sh /work/bin/ladle-b459e28
#
# Recipes:
#  1. every `*/recipe.yml` of the conformance pack ($LADLE_CONFORMANCE_DIR, default
#     /work/shared/conformance; mergekit YAML on tiny checkpoints);
#  2. one JSON recipe per method (and variants) on larger generated inputs
#     (benches/compare_inputs.py: 4 bf16 checkpoints of ~55 MB, tensors up to 2.9 M elements,
#     beyond one 2 Mi-element chunk), generated once under $COMPARE_DIR/inputs.
# Each recipe runs once per binary (`ladle merge RECIPE --out DIR --quiet`). Outputs must be
# identical file by file; `ladle-manifest.json` is compared with `elapsed_s` (a wall time)
# removed, so its recipe, recipe_sha256, inputs, file list and counts must match too. A recipe
# both binaries refuse counts as identical when both fail with the same error line.
#
# One exception, by design: when OLD predates the mergekit output folder (its soup has no
# `mergekit_config.yml`, NEW's has), the files NEW writes anew (`README.md`, the model card,
# instead of a copy of the donor's; `mergekit_config.yml`; `config.json` with the output dtype;
# `ladle-manifest.json`, whose recipe now names the method and holds the recipe text) and the
# donor files OLD copied that NEW no longer does are listed, not compared; the tensor files and
# every other file both wrote must still be identical. Such a recipe is "tensors-identical".
# Exit status: 0 when every recipe matches, 1 otherwise.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OLD=$(realpath "${1:?usage: benches/compare_outputs.sh OLD_LADLE [NEW_LADLE]}")
NEW=$(realpath "${2:-$ROOT/target/release/ladle}")
PACK=${LADLE_CONFORMANCE_DIR:-/work/shared/conformance}
WORK=$(realpath -m "${COMPARE_DIR:-$ROOT/target/compare-outputs}")
mkdir -p "$WORK/old" "$WORK/new" "$WORK/out"

log() { printf '== %s\n' "$*" >&2; }

if [[ ! -f $WORK/inputs/recipe-linear.json || ! -f $WORK/inputs/ft3/model.safetensors ]]; then
  log "generating inputs under $WORK/inputs"
  rm -rf "$WORK/inputs"
  python3 "$ROOT/benches/compare_inputs.py" "$WORK/inputs"
fi

recipes=()
if [[ -d $PACK ]]; then
  for r in "$PACK"/*/recipe.yml; do recipes+=("$r"); done
else
  log "no conformance pack at $PACK: only the generated recipes"
fi
for r in "$WORK"/inputs/recipe-*.json; do recipes+=("$r"); done

# The manifest without its wall time, keys sorted.
manifest() {
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); m.pop("elapsed_s",None); print(json.dumps(m,sort_keys=True))' "$1"
}

# Run binary $1 on recipe $2 into $WORK/out/NAME (one output URL for both binaries: the manifest
# records it), then move the output to $3; prints "ok" or "failed: <its error line>".
run() {
  local out="$WORK/out/$(basename "$3")"
  rm -rf "$out" "$3"
  if "$1" merge "$2" --out "$out" --quiet >"$3.out" 2>"$3.err"; then
    mv "$out" "$3"
    echo ok
  else
    rm -rf "$out"
    echo "failed: $(tail -1 "$3.err" | cut -c1-90)"
  fi
}

pass=0
fail=0
for r in "${recipes[@]}"; do
  case $r in
    "$PACK"/*) name="pack-$(basename "$(dirname "$r")")" ;;
    *) name="gen-$(basename "$r" .json | sed 's/^recipe-//')" ;;
  esac
  a=$(run "$OLD" "$r" "$WORK/old/$name")
  b=$(run "$NEW" "$r" "$WORK/new/$name")
  verdict=identical
  detail=""
  if [[ $a != "$b" ]]; then
    verdict=DIFFERENT
    detail="old: $a, new: $b"
  elif [[ $a == ok && ! -f $WORK/old/$name/mergekit_config.yml && -f $WORK/new/$name/mergekit_config.yml ]]; then
    verdict=tensors-identical
    generated="./README.md ./mergekit_config.yml ./config.json ./ladle-manifest.json"
    old_files=$(cd "$WORK/old/$name" && find . -type f | sort)
    new_files=$(cd "$WORK/new/$name" && find . -type f | sort)
    n=0
    differ=""
    by_design=""
    for f in $(printf '%s\n%s\n' "$old_files" "$new_files" | sort -u); do
      n=$((n + 1))
      if [[ " $generated " == *" $f "* ]]; then
        if [[ ! -f $WORK/old/$name/$f || ! -f $WORK/new/$name/$f ]] ||
          [[ $(sha256sum <"$WORK/old/$name/$f") != "$(sha256sum <"$WORK/new/$name/$f")" ]]; then
          by_design+=" ${f#./}"
        fi
      elif [[ ! -f $WORK/new/$name/$f && $f != *.safetensors && $f != *.index.json ]]; then
        by_design+=" ${f#./}(no-longer-copied)"
      elif [[ ! -f $WORK/old/$name/$f || ! -f $WORK/new/$name/$f ]] ||
        [[ $(sha256sum <"$WORK/old/$name/$f") != "$(sha256sum <"$WORK/new/$name/$f")" ]]; then
        differ+=" $f"
      fi
    done
    detail="$n files; by design:${by_design:- none}"
    if [[ -n $differ ]]; then
      verdict=DIFFERENT
      detail="differ:$differ; by design:${by_design:- none}"
    fi
  elif [[ $a == ok ]]; then
    files=$(cd "$WORK/old/$name" && find . -type f | sort)
    if [[ $files != "$(cd "$WORK/new/$name" && find . -type f | sort)" ]]; then
      verdict=DIFFERENT
      detail="file lists differ"
    else
      n=0
      differ=""
      for f in $files; do
        n=$((n + 1))
        if [[ $f == ./ladle-manifest.json ]]; then
          [[ $(manifest "$WORK/old/$name/$f") == "$(manifest "$WORK/new/$name/$f")" ]] ||
            differ+=" $f"
        elif [[ $(sha256sum <"$WORK/old/$name/$f") != "$(sha256sum <"$WORK/new/$name/$f")" ]]; then
          differ+=" $f"
        fi
      done
      detail="$n files"
      if [[ -n $differ ]]; then
        verdict=DIFFERENT
        detail="differ:$differ"
      fi
    fi
  else
    detail="both $a"
  fi
  if [[ $verdict == identical || $verdict == tensors-identical ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
  printf '%-28s %-10s %s\n' "$name" "$verdict" "$detail"
done
printf '\n%d recipes identical (tensors-identical included), %d different (old: %s, new: %s)\n' "$pass" "$fail" "$OLD" "$NEW"
[[ $fail -eq 0 ]]
