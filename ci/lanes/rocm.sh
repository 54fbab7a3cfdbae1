#!/usr/bin/env bash
# ROCm lane (gfx942 MI300X/MI325X): the same Triton kernels with the ROCm launch-config tables and
# float8_e4m3fnuz caches; tests marked `gpu` and `rocm`, then the benchmark, through
# benchmarks/gpu_check.sh (torch.cuda is HIP there; rocm-smi replaces nvidia-smi in info.txt).
#   bash ci/lanes/rocm.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${ARTIFACTS:-ci-artifacts}
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available() and torch.version.hip, 'needs a ROCm GPU'; \
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).gcnArchName)"
python3 -m pip install -q pytest pluggy rich numpy matplotlib
# the rocm-only tests first (they are also `gpu`, so gpu_check.sh runs them again with the rest)
python3 -m pytest -q -m rocm -p no:cacheprovider tests | tee "$OUT/pytest-rocm.log" || [ "${PIPESTATUS[0]}" = 5 ]
bash benchmarks/gpu_check.sh "$@"
