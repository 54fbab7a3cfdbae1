"""FlagGems (``flag_gems``): its Triton ``reshape_and_cache_flash``, ``concat_and_cache_mla`` and
``flash_attn_varlen_func`` (paged, with ``block_table``), called with the caches as given."""

from __future__ import annotations

from kvdispatch.bench.vendors import Unsupported, Vendor

from .common import ones, require_4d, vllm_cache


class FlagGems(Vendor):
    name = "flag_gems"
    requires = ("flag_gems",)
    distribution = "flag_gems"
    platforms = ("nvidia", "rocm")
    ops = ("write", "mla-write", "decode", "prefill", "mixed")

    def prepare(self, op, w):
        import flag_gems

        if op == "write":
            require_4d(w)
            one = ones(w.device)
            a = (w.key, w.value, vllm_cache(w.key_cache), vllm_cache(w.value_cache), w.slot_mapping, w.kv_cache_dtype,
                 one if w.k_scale is None else w.k_scale, one if w.v_scale is None else w.v_scale)
            return lambda: flag_gems.reshape_and_cache_flash(*a)
        if op == "mla-write":
            a = (w.kv_c, w.k_pe, vllm_cache(w.kv_cache), w.slot_mapping, w.kv_cache_dtype,
                 ones(w.device) if w.scale is None else w.scale)
            return lambda: flag_gems.concat_and_cache_mla(*a)
        if w.key_cache.dim() != 4:
            raise Unsupported("attention needs 4-D caches")
        kw = dict(q=w.q, k=w.key_cache, v=w.value_cache, max_seqlen_q=w.max_seqlen_q, cu_seqlens_q=w.cu_seqlens_q,
                  max_seqlen_k=w.max_seqlen_k, seqused_k=w.seqused_k, softmax_scale=w.softmax_scale,
                  causal=w.causal, block_table=w.block_table, k_descale=w.k_descale, v_descale=w.v_descale)
        return lambda: flag_gems.flash_attn_varlen_func(**kw)
