#!/usr/bin/env bash
# Regenerates the stand-in checkpoints with different tokenizers (inputs/) and mergekit
# 0.1.5's outputs on them (expected/), for tests/mergekit_tokenizer.rs. Uses the virtualenv at
# $MERGEKIT_VENV (default /work/venv-mergekit); if it does not exist, creates it with
# mergekit==0.1.5 from PyPI (which brings transformers and tokenizers). Works in this folder,
# the working directory mergekit runs in (recipes/*.yml name inputs/… relative to it).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MERGEKIT_VENV:-/work/venv-mergekit}
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet mergekit==0.1.5
fi
"$VENV/bin/python" make_inputs.py
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for yml in recipes/*.yml; do
    r=$(basename "$yml" .yml)
    # --no-write-model-card: offline, mergekit would ask the hub about `inputs/…`.
    "$VENV/bin/mergekit-yaml" "$yml" "$out/$r" --no-write-model-card --quiet --random-seed 42
    rm -rf "expected/$r"
    mkdir -p "expected/$r"
    cp "$out/$r"/* "expected/$r/"
done
"$VENV/bin/python" - > expected/VERSIONS.txt <<'PY'
import importlib.metadata as m, platform
for p in ("mergekit", "torch", "transformers", "tokenizers", "safetensors", "numpy"):
    print(p, m.version(p))
print("python", platform.python_version(), platform.machine())
PY
( cd inputs && sha256sum */* ) > inputs/SHA256SUMS
( cd expected && sha256sum */* ) > expected/SHA256SUMS
