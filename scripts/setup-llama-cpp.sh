#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench and llama-server into .cache/llama.cpp/bin, for
# `pdserve-bench` to compare against. The source is the copy vendored inside the llama-cpp-python
# sdist (the only llama.cpp source reachable through an ordinary package client here).
# Idempotent: does nothing when the three binaries are already there. ≈ 5 min on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PDSERVE_LLAMA_CPP_DIR:-$root/.cache/llama.cpp}"
bins=(llama-bench llama-batched-bench llama-server)

have_all() {
  for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || return 1; done
}
if have_all; then
  echo "$dest/bin"
  exit 0
fi

# Build tools, installed like the other scripts do when missing.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi

work="$dest/src"
mkdir -p "$work"
if [ ! -f "$work/vendor/llama.cpp/CMakeLists.txt" ]; then
  rm -rf "$work"/*
  python3 -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
    llama-cpp-python -d "$work/sdist" >&2
  sdist="$(ls "$work"/sdist/llama_cpp_python-*.tar.gz | head -n1)"
  tar -xzf "$sdist" -C "$work" --strip-components=1
fi

jobs="$(nproc 2>/dev/null || echo 2)"
# The UI and OpenSSL/curl options are off: their defaults download web assets or need dev headers.
cmake -S "$work/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --config Release -j "$jobs" --target "${bins[@]}" >&2

mkdir -p "$dest/bin"
for b in "${bins[@]}"; do
  cp "$work/build/bin/$b" "$dest/bin/$b.part"
  mv "$dest/bin/$b.part" "$dest/bin/$b"
done
echo "$dest/bin"
