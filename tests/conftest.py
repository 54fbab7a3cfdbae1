import os
import sys

import pytest
import torch

# tests/matrix.py is imported by every backend's tests as a plain module
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels are tested through the interpreter on CPU tensors. The variable is
# read when kernels are defined, so it is set here, before any test module imports them; on a GPU
# machine it stays unset and the same tests (and the `gpu` ones) run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU (run benchmarks/gpu_check.sh on the GPU machine)")
        for item in items:
            if "gpu" in item.keywords or "rocm" in item.keywords:
                item.add_marker(skip)
