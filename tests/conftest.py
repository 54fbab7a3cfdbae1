import os
import sys

import pytest

# tests/matrix.py is imported by every backend's tests as a plain module
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    import torch
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU (run benchmarks/gpu_check.sh on the GPU machine)")
        for item in items:
            if "gpu" in item.keywords or "rocm" in item.keywords:
                item.add_marker(skip)
