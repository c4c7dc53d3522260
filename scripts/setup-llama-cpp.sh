#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench and llama-server into .cache/llama.cpp/bin, for
# `pdserve-bench` and `pdserve-embed-bench` to compare against. The source is the copy vendored
# inside the llama-cpp-python sdist (the only llama.cpp source reachable through an ordinary
# package client here), of the version that made tests/data/golden/.
# Idempotent: does nothing when the three binaries are there, built as below. ≈ 6 min on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PDSERVE_LLAMA_CPP_DIR:-$root/.cache/llama.cpp}"
bins=(llama-bench llama-batched-bench llama-server)
version=0.3.36
# Built for this CPU (-march=native) but without ggml's AMX path: on Intel Xeons with AMX its
# matrix multiply (ggml_backend_amx_mul_mat) crashes with SIGSEGV in every tool. GCC keeps an
# explicit -mno-* over what -march=native enables, so ggml compiles its AMX code out.
cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
stamp="llama-cpp-python $version; CFLAGS $cflags"

have_all() {
  for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || return 1; done
  [ "$(cat "$dest/bin/.build" 2>/dev/null)" = "$stamp" ]
}
if have_all; then
  echo "$dest/bin"
  exit 0
fi

# Build tools, when missing.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
"$root/scripts/apt-install.sh" "${missing[@]}"

work="$dest/src"
mkdir -p "$work"
if [ "$(cat "$work/.version" 2>/dev/null)" != "$version" ]; then
  rm -rf "${work:?}"/* "$work/.version"
  # --no-binary names the one package: for all, pip would build cmake and ninja from source too.
  "$root/scripts/pip" download --quiet --disable-pip-version-check --no-binary llama-cpp-python --no-deps \
    "llama-cpp-python==$version" -d "$work/sdist" >&2
  sdist="$(ls "$work"/sdist/llama_cpp_python-*.tar.gz | head -n1)"
  tar -xzf "$sdist" -C "$work" --strip-components=1
  echo "$version" >"$work/.version"
fi

jobs="$(nproc 2>/dev/null || echo 2)"
# The UI and OpenSSL/curl options are off: their defaults download web assets or need dev headers.
cmake -S "$work/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --config Release -j "$jobs" --target "${bins[@]}" >&2

mkdir -p "$dest/bin"
for b in "${bins[@]}"; do
  cp "$work/build/bin/$b" "$dest/bin/$b.part"
  mv "$dest/bin/$b.part" "$dest/bin/$b"
done
echo "$stamp" >"$dest/bin/.build"
echo "$dest/bin"
