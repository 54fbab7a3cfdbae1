"""The Triton backend object: availability, per-descriptor support, device guard, dispatch."""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Optional

import torch

from kvdispatch.descriptor import FP8_DTYPES, LAYOUTS_4D
from kvdispatch.platform import interpreting
from kvdispatch.registry import OPS, Backend

# the widest row the write kernel holds (elements); the attention kernel's widest head
MAX_ROW, MAX_HEAD = 1 << 14, 1024
ELEMENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32) + FP8_DTYPES


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e}); pip install 'kvdispatch[triton]'"
    return None


def _intel_triton_xpu() -> bool:
    try:
        import triton
        return hasattr(torch, "xpu") and torch.xpu.is_available() and \
            "xpu" in str(getattr(triton.runtime.driver.active, "get_current_target", lambda: "")())
    except Exception:
        return False


_NO_GUARD = contextlib.nullcontext()
_cuda_get_device = getattr(torch._C, "_cuda_getDevice", None)


def device_switch(t: torch.Tensor):
    """None when ``t``'s device is the current one (or a CPU tensor), else the context that makes it
    current: launches run under the tensors' device (tensors on cuda:1 while cuda:0 is current)."""
    index = t.get_device()  # -1: CPU
    if index < 0:
        return None
    if t.is_cuda:
        # a CUDA tensor exists, so CUDA is initialized: the raw getter skips current_device's lazy init
        if index != (_cuda_get_device() if _cuda_get_device is not None else torch.cuda.current_device()):
            return torch.cuda.device(index)
    elif t.device.type == "xpu" and index != torch.xpu.current_device():
        return torch.xpu.device(index)
    return None


def device_guard(t: torch.Tensor):
    """``device_switch`` as a context manager (a no-op one when no switch is needed)."""
    return device_switch(t) or _NO_GUARD


class TritonBackend(Backend):
    name = "triton"
    priority = 100
    platforms = ("nvidia", "rocm", "xpu")
    ops = OPS
    description = "Triton kernels; launch configs per compute capability / gfx arch"
    takes_plans = True
    dtypes = kv_cache_dtypes = ELEMENT_DTYPES
    head_sizes = {"flash_attn_varlen_func": range(1, MAX_HEAD + 1), "reshape_and_cache_flash": range(1, MAX_ROW + 1),
                  "concat_and_cache_mla": range(1, MAX_ROW + 1)}
    layouts = {"flash_attn_varlen_func": LAYOUTS_4D, "reshape_and_cache_flash": LAYOUTS_4D + ("head-major",),
               "concat_and_cache_mla": ("mla",)}

    def available(self, platform) -> Optional[str]:
        err = _triton_import_error()
        if err:
            return err
        if platform.name in ("nvidia", "rocm"):
            return None if torch.cuda.is_available() else "torch sees no CUDA/ROCm device"
        if platform.name == "xpu":
            return None if _intel_triton_xpu() else \
                "Intel's Triton XPU backend is not installed (needs torch XPU + intel triton)"
        if platform.name == "cpu":
            return None if interpreting() else \
                "runs on CPU tensors only under TRITON_INTERPRET=1 (the kernel test mode)"
        return f"no Triton target for platform {platform.name!r}"

    def supports(self, op, desc, platform) -> Optional[str]:
        if op in ("reshape_and_cache_flash", "concat_and_cache_mla"):
            from . import write
            return write.supports(op, desc, platform)
        from . import attention
        return attention.supports(op, desc, platform)

    def versions(self) -> dict:
        try:
            import triton
            return {"triton": triton.__version__}
        except Exception:
            return {}

    # the kernel modules import triton: loaded on the first call, then kept (no import per call);
    # without a device switch no context manager is entered (about 0.2 us per call)
    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc, plans=None):
        switch = device_switch(key_cache)
        if switch is None:
            return _kernels().write.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, desc, plans)
        with switch:
            _kernels().write.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, desc, plans)

    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc, plans=None):
        with device_guard(kv_cache):
            _kernels().write.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, desc, plans)

    def flash_attn_varlen_func(self, q, k, v, out, desc, args):
        switch = device_switch(q)
        if switch is None:
            return _kernels().attention.flash_attn_varlen_func(q, k, v, out, desc, args)
        with switch:
            _kernels().attention.flash_attn_varlen_func(q, k, v, out, desc, args)


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import attention, write
    return types.SimpleNamespace(attention=attention, write=write)
