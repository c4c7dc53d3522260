#!/usr/bin/env bash
# The test command: set-up, lint, build the binaries the cluster tests start, run every test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
# The Helm chart: rendered, linted and schema-checked offline (Python, a few seconds).
scripts/test-chart.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# No two modules of a crate depend on each other, directly or in a circle.
python3 scripts/module-cycles.py */src
cargo build --workspace --bins --locked
cargo test --workspace --locked
# The request fuzz target, briefly (scripts/fuzz.sh SECONDS runs it longer by hand).
scripts/fuzz.sh "${PDSERVE_FUZZ_SECS:-60}"
# The `cuda` feature, compiled and linted without a GPU (scripts/cuda-toolkit.sh installs the toolkit).
scripts/check-cuda.sh
