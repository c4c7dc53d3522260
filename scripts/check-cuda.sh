#!/usr/bin/env bash
# Compiles and lints the `cuda` feature without a GPU, so GPU code never rots unbuilt: the engine
# (the NCCL communicator and its GPU-only tests), both workers and the benchmarks, against the toolkit
# scripts/cuda-toolkit.sh assembles from PyPI wheels (about 9 minutes cold on 2 cores, then
# incremental). `--link` also links the worker binaries, as a GPU machine would run them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
eval "$(scripts/cuda-toolkit.sh)"
cargo clippy -p engine -p worker -p prefill-worker -p decode-worker -p bench --features cuda --all-targets --locked -- -D warnings
if [ "${1:-}" = "--link" ]; then
  cargo build -p prefill-worker -p decode-worker --features cuda --bins --locked
fi
