#!/usr/bin/env bash
# Regenerate the typed Python client (clients/python/ladle_client/) from the OpenAPI document
# snapshot (tests/snapshots/openapi.json, which `cargo test --test openapi` checks against the
# server's document). `--check`: regenerate into a temporary folder and fail if the committed
# client differs (CI). Needs openapi-python-client (pinned in .ci/requirements.txt; .ci/run
# installs it into .ci/.venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="$(cd "${LADLE_PYTHON_VENV:-.ci/.venv}" && pwd)"
gen="$venv/bin/openapi-python-client"
export PATH="$venv/bin:$PATH" RUFF_NO_CACHE=true # its post-hooks run ruff from there
out=clients/python/ladle_client
if [ "${1:-}" = "--check" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$gen" generate --path tests/snapshots/openapi.json --config clients/python/config.yml \
    --meta none --output-path "$tmp/ladle_client" >/dev/null
  if ! diff -r "$tmp/ladle_client" "$out"; then
    echo "clients/python/ladle_client is stale: run clients/python/regenerate.sh and commit it" >&2
    exit 1
  fi
  echo "clients/python/ladle_client is up to date"
else
  "$gen" generate --path tests/snapshots/openapi.json --config clients/python/config.yml \
    --meta none --output-path "$out" --overwrite
fi
