#!/usr/bin/env bash
# Everything the tests need besides the Rust toolchain, installed idempotently:
# Debian packages (etcd for the discovery tests, protoc for the etcd client's
# build with its well-known types, promtool to check every /metrics), the default model, and a Python
# venv with the `openai` client.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd's protos
# import: only a recommendation of protobuf-compiler, so named here.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  # The packages' services are not wanted: tests start their own etcd.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
scripts/fetch-model.sh >/dev/null
if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check openai
fi
# Schemathesis fuzzes the router's /openapi.json (tests/tests/schemathesis.rs).
if [ "$(.venv/bin/st --version 2>/dev/null)" != "st, version 4.32.5" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
