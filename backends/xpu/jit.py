"""First-use compilation of the SYCL kernels on XPU (opt-in with ``KVDISPATCH_XPU_JIT=1``).

``csrc/jit_ops.cpp`` is built on first use by ``torch.utils.cpp_extension.load`` with the host
C++ compiler against the SYCL headers and ``libsycl`` of the ``intel-sycl-rt`` wheel (which torch's
XPU builds already depend on), so no oneAPI install is needed. Each kernel instantiation is then
compiled by DPC++'s run-time compiler for torch's XPU context the first time a launch needs it
(~1.5 s per instantiation measured on the CPU lane, plus the GPU finalizer), and cached for the
process. README.md says why this is a fallback next to the AOT build and not a replacement.

Not run here (no Intel GPU, no torch XPU build): the Python side is tested with the module
replaced by the CPU lane, the C++ side is compiled host-side by g++ (tests/xpu/test_xpu_build.py).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from kvdispatch.platform import getenv

from . import kernels

ENV = "KVDISPATCH_XPU_JIT"
_KINDS = {"ptr": 0, "i64": 1, "i32": 2, "f32": 3}


def enabled() -> bool:
    return getenv(ENV.encode()) not in (None, "", "0")


def sycl_prefix() -> Path:
    from .cpu_lane.runtime import sycl_root
    return sycl_root()


def unavailable() -> Optional[str]:
    """None when first-use compilation can run here, else why not (cheap checks)."""
    if not enabled():
        return f"first-use compilation is off (set {ENV}=1 to compile kernels on XPU at first use)"
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "torch sees no XPU device"
    root = sycl_prefix()
    for rel in ("include/sycl/sycl.hpp", "lib/libsycl.so", "lib/libsycl-jit.so"):
        if not (root / rel).exists():
            return f"{root / rel} not found (intel-sycl-rt wheel; or set KVDISPATCH_SYCL_ROOT)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no host C++ compiler to build the first-use compilation module"
    return None


@functools.lru_cache(maxsize=None)
def module():
    from torch.utils.cpp_extension import load
    root = sycl_prefix()
    lib = (root / "lib").resolve()
    return load(
        name="kvdispatch_xpu_jit",
        sources=[str(kernels.CSRC / "jit_ops.cpp")],
        extra_include_paths=[str(root / "include")],
        extra_cflags=["-O2", "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING"],
        extra_ldflags=[f"-L{lib}", "-lsycl", f"-Wl,-rpath,{lib}", "-lc10_xpu"],
        verbose=False,
    )


_built: set = set()


def device_index(t: torch.Tensor) -> int:
    """The XPU index to compile for and launch on (``xpu`` without an index: the current one)."""
    return t.device.index if t.device.index is not None else torch.xpu.current_device()


def launch(launch: kernels.Launch) -> None:
    """Compile ``launch.spec`` for the tensors' XPU device if needed, then launch it."""
    tensors = [v for k, v, _ in launch.args if k == "ptr"]
    device = device_index(next(t for t in tensors if t is not None))
    mod = module()
    key = (device, launch.spec.name)
    if key not in _built:
        mod.build(device, launch.spec.free_function_source(), [f"-I{kernels.CSRC}"], launch.spec.name)
        _built.add(key)
    kinds = [_KINDS[k] for k, _v, _o in launch.args]
    _, ints, floats = kernels.split_args(launch)
    mod.launch(device, launch.spec.name, tensors, kinds, ints, floats, launch.groups, launch.local)
