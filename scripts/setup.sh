#!/usr/bin/env bash
# Everything the tests need besides the Rust toolchain, installed idempotently:
# the default model and a Python venv with the `openai` client.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh >/dev/null
if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check openai
fi
