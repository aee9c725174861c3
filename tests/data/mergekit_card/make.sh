#!/usr/bin/env bash
# Regenerates the expected model cards (*.README.md) with mergekit 0.1.5's own generate_card,
# for the recipes *.yml here, in a folder holding ./base, ./ft1, ./ft2 (so mergekit sees local
# paths, not hub ids), with the output folder named "soup".
#   bash tests/data/mergekit_card/make.sh     # creates target/venv-mergekit if missing
# mergekit lists the models in Python set order (it changes from run to run): the card is
# generated again until its list has the recipe order ladle uses (base, then models).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
V=$ROOT/target/venv-mergekit
[[ -x $V/bin/python ]] || { python3 -m venv "$V" && "$V/bin/pip" install -q mergekit==0.1.5; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/base" "$T/ft1" "$T/ft2"
cd "$T"
for case in "ties:./ft1 ./ft2" "slerp:./base ./ft1"; do
  name=${case%%:*}
  for try in $(seq 1 200); do
    HF_HUB_OFFLINE=1 "$V/bin/python" - "$ROOT/tests/data/mergekit_card/$name" "${case#*:}" <<'PY' && break
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.card import generate_card
src = open(sys.argv[1] + ".yml").read()
cfg = MergeConfiguration.model_validate(yaml.safe_load(src))
card = generate_card(cfg, src, name="soup")
if [l[2:] for l in card.splitlines() if l.startswith("* ")] != sys.argv[2].split():
    sys.exit(1)
open(sys.argv[1] + ".README.md", "w").write(card)
PY
  done
done
