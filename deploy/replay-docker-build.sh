#!/usr/bin/env bash
# Replays the Dockerfile's builder stage without Docker (no container engine on CI): an empty
# folder receives only the paths the stage COPYs (from the repository, the build context),
# then its RUN commands run there in order, with `cargo build --release …` replayed as
# `cargo check …` (same flags otherwise, `--locked` included) against a shared target folder.
#
#   bash deploy/replay-docker-build.sh [DOCKERFILE]     # default: ./Dockerfile
#   CARGO_TARGET_DIR=… bash deploy/replay-docker-build.sh   # default: <repo>/target
#
# Why `cargo check` is enough for what this guards against (a stage that copies too little or
# a lock file out of date): cargo reads and validates the whole manifest, every declared
# target's file included, and resolves the lock file (`--locked`) before any command, check
# or build; check runs build.rs and expands every macro, so `sqlx::migrate!` and
# `include_str!`/`include_bytes!` of embedded files fail the same way on a missing path; and
# it type-checks the crate. What it leaves out (code generation, linking, `objcopy`, the
# built binary's `--version`, skipped and printed below) does not depend on which files were
# copied; the full build runs in CI anyway (`cargo test` builds the binary). A shared target
# folder keeps this to a check of ladle itself once the dependencies are checked.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DOCKERFILE=$(realpath "${1:-$ROOT/Dockerfile}")
# The replayed crate lives at another path, so its own artifacts get other hashes than the
# repository's: sharing the folder reuses the checked dependencies and clobbers nothing.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ladle-docker-replay.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
CONTEXT=$ROOT
cwd=$WORK/root
mkdir -p "$cwd"

say() { echo "replay: $*"; }
fail() { echo "replay: FAILED: $*" >&2; exit 1; }

# `COPY SRC… DEST` as Docker does it for the build context: a folder's contents go into DEST,
# a file goes into DEST/ (DEST ending in / or several sources) or becomes DEST.
copy() {
  local args=("$@") n=$#
  local dest=${args[$((n - 1))]}
  [[ "$dest" == /* ]] && dest="$WORK/root$dest" || dest="$cwd/$dest"
  local i src
  for ((i = 0; i < n - 1; i++)); do
    src=${args[$i]}
    [[ "$src" == --* ]] && fail "COPY option $src is not replayed (the builder stage copies from the context only)"
    [[ -e "$CONTEXT/$src" ]] || fail "COPY $src: no such file or folder in the build context (docker build fails the same way)"
    if [[ -d "$CONTEXT/$src" ]]; then
      mkdir -p "$dest"
      cp -a "$CONTEXT/$src/." "$dest/"
    elif [[ "$dest" == */ || $n -gt 2 ]]; then
      mkdir -p "$dest"
      cp -a "$CONTEXT/$src" "$dest"
    else
      mkdir -p "$(dirname "$dest")"
      cp -a "$CONTEXT/$src" "$dest"
    fi
  done
}

# One `RUN`: its `&&`-joined commands in order, in the current WORKDIR.
run() {
  local line=$1 part
  local -a parts
  # Split on `&&` (the stage's commands contain no quoted `&&`).
  mapfile -t parts < <(sed 's/[[:space:]]*&&[[:space:]]*/\n/g' <<<"$line")
  for part in "${parts[@]}"; do
    part=$(sed 's/^[[:space:]]*//; s/[[:space:]]*$//' <<<"$part")
    [[ -z "$part" ]] && continue
    if [[ "$part" =~ ^cargo[[:space:]]+build([[:space:]]|$) ]]; then
      local check
      check=$(sed -E 's/^cargo[[:space:]]+build/cargo check/; s/[[:space:]]--release([[:space:]]|$)/\1/' <<<"$part")
      say "$part  ->  $check"
      (cd "$cwd" && bash -c "$check") || fail "$check (replaying: $part)"
    elif [[ "$part" =~ ^objcopy || "$part" == */usr/local/bin/* ]]; then
      say "skipped (acts on the release binary, which a check does not produce): $part"
    else
      say "$part"
      (cd "$cwd" && bash -c "$part") || fail "$part"
    fi
  done
}

# The builder stage: from the first FROM to the next, continuation lines joined.
stage=0
logical=""
instructions=()
while IFS= read -r raw || [[ -n "$raw" ]]; do
  [[ "$raw" =~ ^[[:space:]]*# ]] && [[ -z "$logical" ]] && continue
  if [[ "$raw" =~ \\[[:space:]]*$ ]]; then
    logical+="${raw%\\*} "
    continue
  fi
  logical+="$raw"
  if [[ "$logical" =~ ^[[:space:]]*$ ]]; then logical=""; continue; fi
  if [[ "$logical" =~ ^[[:space:]]*FROM[[:space:]] ]]; then
    stage=$((stage + 1))
    [[ $stage -gt 1 ]] && break
  elif [[ $stage -eq 1 ]]; then
    instructions+=("$logical")
  fi
  logical=""
done < "$DOCKERFILE"
[[ $stage -ge 1 ]] || fail "no FROM in $DOCKERFILE"

# A `.dockerignore` pattern that names a path the stage copies would make Docker send less
# than this replay copies; ours only names build outputs and local data, and this says so if
# not. The paths are the stage's own COPY sources (Cargo.toml, benches, assets, src, …).
copied=()
for ins in "${instructions[@]}"; do
  read -r op rest <<<"$ins"
  if [[ "${op^^}" == COPY ]]; then
    read -r -a srcs <<<"$rest"
    for src in "${srcs[@]:0:${#srcs[@]}-1}"; do
      [[ "$src" == --* ]] || copied+=("${src%/}")
    done
  fi
done
if [[ -f "$CONTEXT/.dockerignore" ]]; then
  while read -r pat; do
    case "$pat" in ''|'#'*) continue ;; esac
    pat=${pat%/}
    for p in "${copied[@]}"; do
      # shellcheck disable=SC2053 # $pat is a glob on purpose
      [[ "$p" == $pat || "$p" == $pat/* ]] && fail ".dockerignore pattern '$pat' excludes $p (the Dockerfile copies it)"
      [[ "$pat" == "$p"/* ]] && fail ".dockerignore pattern '$pat' excludes part of $p (the Dockerfile copies it)"
    done
  done < "$CONTEXT/.dockerignore"
fi

say "Dockerfile $DOCKERFILE, context $CONTEXT, folder $WORK, CARGO_TARGET_DIR $CARGO_TARGET_DIR"
for ins in "${instructions[@]}"; do
  read -r op rest <<<"$ins"
  case "${op^^}" in
    WORKDIR)
      [[ "$rest" == /* ]] && cwd="$WORK/root$rest" || cwd="$cwd/$rest"
      mkdir -p "$cwd"
      say "WORKDIR $rest"
      ;;
    COPY)
      say "COPY $rest"
      # shellcheck disable=SC2086 # the stage's COPY arguments hold no spaces
      copy $rest
      ;;
    ENV)
      if [[ "${rest%% *}" == *=* ]]; then
        # shellcheck disable=SC2086 # ENV KEY=VALUE… (the stage's values hold no spaces)
        export $rest
      else
        export "${rest%% *}"="${rest#* }"
      fi
      ;;
    RUN) run "$rest" ;;
    ARG | LABEL) ;;
    *) fail "instruction $op is not replayed; teach deploy/replay-docker-build.sh about it" ;;
  esac
done
say "OK: the builder stage's cargo commands succeed with only the paths it copies"
