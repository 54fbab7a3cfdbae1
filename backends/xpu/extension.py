"""Loads the ahead-of-time SyclExtension (``kvdispatch.backends.xpu._C``, built by
``setup_xpu.py``) lazily, and launches kernels on XPU through it.

The extension registers ``torch.ops.kvdispatch_xpu.launch(name, tensors, ints, floats, groups,
local)`` for the XPU dispatch key: ``name`` is a ``kernels.Spec.name`` from the build's table, the
other arguments are a ``kernels.Launch``'s, split by kind in the kernel's parameter order; and
``torch.ops.kvdispatch_xpu.kernels()``, the names it was built with.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from . import kernels

BUILD_HINT = ("build it with `python backends/xpu/setup_xpu.py build_ext --inplace` (torch with XPU "
              ">= 2.8 and oneAPI's icpx; see backends/xpu/README.md)")


@functools.lru_cache(maxsize=None)
def _load() -> tuple:
    """(None, kernel names) when the extension is usable, else (reason, ())."""
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "torch sees no XPU device (torch.xpu.is_available() is False)", ()
    try:
        importlib.import_module("kvdispatch.backends.xpu._C")
    except ImportError as e:
        return f"the SYCL extension is not built ({e}); {BUILD_HINT}", ()
    try:
        names = frozenset(torch.ops.kvdispatch_xpu.kernels())
    except Exception as e:  # a stale build without the op table
        return f"the SYCL extension is broken ({type(e).__name__}: {e}); rebuild: {BUILD_HINT}", ()
    return None, names


def load_error() -> Optional[str]:
    return _load()[0]


def aot_support(op: str, desc) -> Optional[str]:
    """Attention kernels are specialized on (head_size_k, head_size_v): say so when the build has
    none for this cache (the write kernels exist for every layout and dtype)."""
    if op != "flash_attn_varlen_func":
        return None
    names = _load()[1]
    tag = f"_d{desc.head_size_k}x{desc.head_size_v}_"
    if not any(tag in n for n in names):
        return (f"the SYCL build has no attention kernel for head sizes {desc.head_size_k}/{desc.head_size_v} "
                "(add them to KVDISPATCH_XPU_HEAD_SIZES and rebuild)")
    return None


def has_kernel(name: str) -> bool:
    return name in _load()[1]


def versions() -> dict:
    out = {}
    if hasattr(torch, "xpu") and hasattr(torch.version, "xpu"):
        out["torch.xpu"] = str(torch.version.xpu)
    return out


def launch(launch: kernels.Launch) -> None:
    names = _load()[1]
    if launch.spec.name not in names:
        raise NotImplementedError(
            f"the SYCL build has no kernel {launch.spec.name} ({launch.spec.family}<"
            f"{', '.join(launch.spec.template_args)}>); rebuild with it in the AOT list (setup_xpu.py)"
        )
    tensors, ints, floats = kernels.split_args(launch)
    torch.ops.kvdispatch_xpu.launch(launch.spec.name, tensors, ints, floats, launch.groups, launch.local)
