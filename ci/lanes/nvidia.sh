#!/usr/bin/env bash
# NVIDIA lanes (sm90 H100/H200, sm80 A100): the GPU tests and the benchmark, through THE GPU script
# benchmarks/gpu_check.sh (the same one used on the lent H100). The runner provides torch with CUDA
# and triton; vendor packages (flag_gems, vllm, flashinfer, flash-attn) are benchmarked if installed.
#   bash ci/lanes/nvidia.sh [--quick]     # artifacts in ${ARTIFACTS:-ci-artifacts}
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${ARTIFACTS:-ci-artifacts}
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available() and torch.version.cuda, 'needs a CUDA GPU'; \
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
python3 -m pip install -q pytest pluggy rich numpy matplotlib
bash benchmarks/gpu_check.sh "$@"
