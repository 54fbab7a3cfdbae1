#!/usr/bin/env bash
# Intel XPU lane (Data Center GPU Max / PVC, Arc B580 / BMG): builds the SYCL/ESIMD extension
# ahead of time, runs the tests marked `xpu`, then the benchmark on the xpu device (kvdispatch's
# SYCL backend, Triton if Intel's XPU Triton is installed, IPEX if installed).
#   bash ci/lanes/xpu.sh [--quick]        # needs torch with XPU and oneAPI's icpx on PATH
set -euo pipefail
cd "$(dirname "$0")/../.."
ARTIFACTS=${ARTIFACTS:-ci-artifacts}
mkdir -p "$ARTIFACTS"
python3 -c "import torch; assert torch.xpu.is_available(), 'needs an Intel XPU'; print(torch.xpu.get_device_name(0))"
python3 -m pip install -q pytest pluggy rich numpy matplotlib
python3 -m pip install -q --no-deps --no-build-isolation -e .
if [ -f backends/xpu/setup_xpu.py ]; then
  # the lane's GPU generation (workflow matrix: pvc or bmg); fewer targets build faster
  TORCH_XPU_ARCH_LIST=${TORCH_XPU_ARCH_LIST:-pvc,bmg} python3 backends/xpu/setup_xpu.py build_ext --inplace 2>&1 | tee "$ARTIFACTS/xpu-build.log"
fi
python3 -m kvdispatch.cli info | tee "$ARTIFACTS/info.txt"
python3 -m pytest -q -m xpu -p no:cacheprovider tests | tee "$ARTIFACTS/pytest-xpu.log"
python3 -m kvdispatch.cli bench --device xpu "$@" --json "$ARTIFACTS/bench-xpu.json" \
  --markdown "$ARTIFACTS/bench-xpu.md" --plot "$ARTIFACTS/bench-xpu.png"
