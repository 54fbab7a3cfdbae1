"""Intel Extension for PyTorch on XPU: ``ipex.llm.modules.PagedAttention``'s
``reshape_and_cache_flash`` and ``flash_attn_varlen_func`` on packed NHD bf16/fp16 caches, the
same kernels the low-priority kvdispatch backend ``ipex`` (``kvdispatch/backends/xpu/ipex.py``)
calls. Unverified: no XPU or IPEX was available where this was written."""

from __future__ import annotations

from kvdispatch.backends.xpu.ipex import paged_attention_module

from . import Unsupported, Vendor
from .common import cu_seqlens_k


class IpexVendor(Vendor):
    name = "ipex"
    requires = ("intel_extension_for_pytorch",)
    distribution = "intel_extension_for_pytorch"
    platforms = ("xpu",)
    ops = ("write", "decode", "prefill", "mixed")

    def prepare(self, op, w):
        PagedAttention, why = paged_attention_module()
        if why:
            raise Unsupported(why)
        if w.case.layout != "NHD" or w.case.kv_cache_dtype != "auto":
            raise Unsupported("packed NHD bf16/fp16 caches only")
        if op == "write":
            a = (w.key, w.value, w.key_cache, w.value_cache, w.slot_mapping)
            return lambda: PagedAttention.reshape_and_cache_flash(*a)
        out = w.new_out()
        cu_k = cu_seqlens_k(w)

        def run():
            PagedAttention.flash_attn_varlen_func(out, w.q, w.key_cache, w.value_cache, w.cu_seqlens_q, cu_k,
                                                  w.max_seqlen_q, w.max_seqlen_k, w.softmax_scale, w.causal,
                                                  w.block_table)
            return out
        return run
