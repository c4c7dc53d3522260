#!/usr/bin/env bash
# Fuzzes the router's request parsing and validation (fuzz/fuzz_targets/request.rs) for SECONDS
# (default 60; scripts/test.sh runs it briefly, run it longer by hand). Installs cargo-fuzz if
# missing. A crash leaves its input in fuzz/artifacts/request/ and fails the run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz@0.13.2
cd "$root/fuzz"
# The corpus grows in a scratch copy of the seeds, so a run never dirties the checkout.
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
cp corpus/request/* "$corpus/"
# cargo-fuzz passes nightly-only flags (the address sanitizer); RUSTC_BOOTSTRAP lets the
# stable toolchain, the only one a fresh machine has, accept them.
RUSTC_BOOTSTRAP=1 cargo fuzz run request "$corpus" -- \
  -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1
