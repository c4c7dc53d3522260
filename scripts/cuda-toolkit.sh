#!/usr/bin/env bash
# A CUDA 13 toolkit assembled from PyPI wheels: enough to build the `cuda` feature (candle's CUDA
# backend, cudarc's NCCL) on a machine with no GPU and no system CUDA. Installs once into
# $PDSERVE_CUDA_TOOLKIT (default ~/.cache/pdserve/cuda-toolkit) and prints the environment to
# build with, as `export` lines:
#
#   eval "$(scripts/cuda-toolkit.sh)" && cargo build --features cuda -p decode-worker
#
# The wheels carry no driver; a stub libcuda.so (empty functions named after the driver calls
# cudarc binds) satisfies the linker. A binary built so runs anywhere the real driver is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PDSERVE_CUDA_TOOLKIT:-$HOME/.cache/pdserve/cuda-toolkit}"
pins=(
  nvidia-cuda-nvcc==13.5.37
  nvidia-nvvm==13.5.37
  nvidia-cuda-crt==13.5.37
  nvidia-cuda-runtime==13.5.37
  nvidia-cuda-cccl==13.3.5.0.6
  nvidia-cuda-nvrtc==13.5.37
  nvidia-curand==10.4.5.25
  nvidia-cublas==13.10.0.20
  nvidia-nccl-cu13==2.32.3
)
cuda="$dest/site/nvidia/cu13"

# The driver calls cudarc may bind, from the cudarc sources cargo fetched.
driver_symbols() {
  local manifest
  manifest="$(cd "$root" && cargo metadata --format-version 1 --features engine/cuda 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
  grep -oE 'fn cu[A-Za-z0-9_]+\(' "$(dirname "$manifest")/src/driver/sys/mod.rs" | sed -E 's/fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u
}

if [ "$(cat "$dest/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
  echo "cuda-toolkit: installing ${#pins[@]} wheels into $dest (about 1 GB)" >&2
  rm -rf "$dest"
  mkdir -p "$dest"
  "$root/scripts/pip" install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest/site" "${pins[@]}" >&2
  for lib in cudart cublas cublasLt curand nvrtc; do
    so="$(cd "$cuda/lib" && ls "lib$lib.so."* | sort | head -1)"
    ln -sf "$so" "$cuda/lib/lib$lib.so"
  done
  ln -sf "$dest/site/nvidia/nccl/lib/libnccl.so.2" "$cuda/lib/libnccl.so"
  ln -sf "$dest/site/nvidia/nccl/include/nccl.h" "$cuda/include/nccl.h" 2>/dev/null || true
  mkdir -p "$cuda/lib/stubs"
  driver_symbols | sed -E 's/(.*)/void \1(void) {}/' >"$dest/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$dest/libcuda-stub.c"
  ln -sf libcuda.so "$cuda/lib/stubs/libcuda.so.1"
  echo "${pins[*]}" >"$dest/.pins"
fi

cat <<EOF
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export NVCC="$cuda/bin/nvcc" PATH="$cuda/bin:\$PATH" CUDA_COMPUTE_CAP=90
export LD_LIBRARY_PATH="$cuda/lib:$dest/site/nvidia/nccl/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
