#!/usr/bin/env bash
# Install SMG (the Shepherd Model Gateway, PyPI package `smg`) into .cache/smg-venv, for
# `pdserve-router-overhead` to compare our router against (it finds .cache/smg-venv/bin/smg on its
# own). The package ships the gateway as a prebuilt Rust extension: no build step.
# Idempotent: does nothing when smg is already installed there. Prints the smg path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PDSERVE_SMG_VENV:-$root/.cache/smg-venv}"
# The version the benchmark was written against; SMG_VERSION overrides (empty: newest).
version="${SMG_VERSION-1.13.0}"

if [ -x "$venv/bin/smg" ] && "$venv/bin/smg" --help >/dev/null 2>&1; then
  echo "$venv/bin/smg"
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/pip" install -q "smg${version:+==$version}" >&2
"$venv/bin/smg" --help >/dev/null
echo "$venv/bin/smg"
