#!/usr/bin/env bash
# Regenerates the stand-in checkpoints (inputs/) and mergekit 0.1.5's outputs on them
# (expected/), for tests/mergekit_examples.rs. Uses the virtualenv at $MERGEKIT_VENV
# (default /work/venv-mergekit); if it does not exist, creates it with mergekit==0.1.5 from PyPI.
# Run from anywhere; it works in this folder. Paths in examples/*.yml are relative to this
# folder, which is the working directory mergekit runs in (mergekit resolves them from there).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MERGEKIT_VENV:-/work/venv-mergekit}
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet mergekit==0.1.5
fi
# `./make.sh CONFIG...` reruns only those configs (the inputs are regenerated, byte for byte).
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(examples/*.yml extra/*.yml)
"$VENV/bin/python" make_inputs.py
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for yml in "${configs[@]}"; do
    r=$(basename "$yml" .yml)
    # --no-write-model-card: offline, mergekit would ask the hub about `inputs/…` (one `/`).
    "$VENV/bin/mergekit-yaml" "$yml" "$out/$r" --no-copy-tokenizer --no-write-model-card \
        --quiet --random-seed 42
    mkdir -p "expected/$r"
    cp "$out/$r/model.safetensors" "$out/$r/config.json" "expected/$r/"
done
"$VENV/bin/python" - > expected/VERSIONS.txt <<'PY'
import importlib.metadata as m, platform
for p in ("mergekit", "torch", "transformers", "safetensors", "numpy"):
    print(p, m.version(p))
print("python", platform.python_version(), platform.machine())
PY
( cd inputs && sha256sum */config.json */model.safetensors ) > inputs/SHA256SUMS
( cd expected && sha256sum */config.json */model.safetensors ) > expected/SHA256SUMS
