"""Intel Extension for PyTorch on XPU as a low-priority kvdispatch backend ("ipex").

IPEX's ``ipex.llm.modules.PagedAttention`` offers ``reshape_and_cache_flash`` and
``flash_attn_varlen_func`` for packed NHD caches ``[blocks, block_size, heads, dim]``. As a
kvdispatch backend (priority 50: below our SYCL kernels at 200 and Triton at 100) it serves
what it can when those are not built, and declines everything else with a reason. Registered
through the ``kvdispatch`` entry-point group (``ipex = "kvdispatch.backends.xpu.ipex"``); the
benchmark harness times the same kernels as its ``ipex`` vendor (``kvbench/vendors/ipex.py``).
Unverified: no XPU or IPEX was available where this was written; the CPU lane tests only the
declining logic.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from kvdispatch.hookspecs import hookimpl
from kvdispatch.registry import Backend


@functools.lru_cache(maxsize=None)
def paged_attention_module():
    """IPEX's PagedAttention module, or the reason it cannot be imported."""
    try:
        import intel_extension_for_pytorch as ipex  # noqa: F401
        from intel_extension_for_pytorch.llm.modules import PagedAttention
        return PagedAttention, None
    except Exception as e:
        return None, f"intel_extension_for_pytorch not importable ({type(e).__name__}: {str(e)[:100]})"


class IpexBackend(Backend):
    name = "ipex"
    priority = 50
    platforms = ("xpu",)
    ops = ("reshape_and_cache_flash", "flash_attn_varlen_func")
    description = "Intel Extension for PyTorch PagedAttention (packed NHD caches, no fp8)"

    def available(self, platform) -> Optional[str]:
        if platform.name != "xpu":
            return "IPEX's paged kernels run on Intel XPU only"
        return paged_attention_module()[1]

    def supports(self, op, desc, platform) -> Optional[str]:
        if desc is None:
            return None
        if not desc.packed:
            return f"needs packed NHD caches, got {desc.layout}"
        if desc.kv_cache_dtype != "auto":
            return "fp8 caches are not supported through IPEX here"
        if desc.head_size_k != desc.head_size_v:
            return "head_size_v != head_size"
        return None

    def versions(self) -> dict:
        try:
            import intel_extension_for_pytorch as ipex
            return {"ipex": ipex.__version__}
        except Exception:
            return {}

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc):
        PagedAttention = paged_attention_module()[0]
        PagedAttention.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping)

    def flash_attn_varlen_func(self, q, k, v, out, desc, args):
        if args.softcap or args.q_descale is not None or args.k_descale is not None or args.block_table is None:
            # reached only if selection picked IPEX for something it does not do: refuse loudly
            raise NotImplementedError("ipex backend: softcap, descales and non-paged attention are not supported")
        PagedAttention = paged_attention_module()[0]
        cu_k = torch.nn.functional.pad(torch.cumsum(args.seqused_k, 0, dtype=torch.int32), (1, 0))
        PagedAttention.flash_attn_varlen_func(out, q, k, v, args.cu_seqlens_q, cu_k, args.max_seqlen_q,
                                              args.max_seqlen_k, args.softmax_scale, args.window_right == 0,
                                              args.block_table, None, args.window_left, args.window_right)



@hookimpl
def kvdispatch_backends():
    return [IpexBackend()]
