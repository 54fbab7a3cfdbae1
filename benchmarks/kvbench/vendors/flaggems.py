"""FlagGems (``flag_gems``): its Triton ``reshape_and_cache_flash``, ``concat_and_cache_mla`` and
``flash_attn_varlen_func`` (paged, with ``block_table``), called with the caches as given."""

from __future__ import annotations

from . import Unsupported, Vendor

from .common import vllm_mla_args, vllm_write_args


class FlagGems(Vendor):
    name = "flag_gems"
    requires = ("flag_gems",)
    distribution = "flag_gems"
    platforms = ("nvidia", "rocm")
    ops = ("write", "mla-write", "decode", "prefill", "mixed")

    def prepare(self, op, w):
        import flag_gems

        if op == "write":
            a = vllm_write_args(w)
            return lambda: flag_gems.reshape_and_cache_flash(*a)
        if op == "mla-write":
            a = vllm_mla_args(w)
            return lambda: flag_gems.concat_and_cache_mla(*a)
        if w.key_cache.dim() != 4:
            raise Unsupported("attention needs 4-D caches")
        kw = dict(q=w.q, k=w.key_cache, v=w.value_cache, max_seqlen_q=w.max_seqlen_q, cu_seqlens_q=w.cu_seqlens_q,
                  max_seqlen_k=w.max_seqlen_k, seqused_k=w.seqused_k, softmax_scale=w.softmax_scale,
                  causal=w.causal, block_table=w.block_table, k_descale=w.k_descale, v_descale=w.v_descale)
        return lambda: flag_gems.flash_attn_varlen_func(**kw)
