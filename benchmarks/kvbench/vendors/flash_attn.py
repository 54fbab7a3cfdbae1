"""flash-attn: FA2 (``flash_attn``) ``flash_attn_varlen_func`` with ``block_table`` (its paged KV
needs blocks of a multiple of 256 tokens) and ``flash_attn_with_kvcache`` for decode; FA3
(``flash_attn_interface``, Hopper) ``flash_attn_with_kvcache`` with ``page_table`` and
``cu_seqlens_q``. Neither has been installed on a GPU machine this project measured on: these adapters are unverified."""

from __future__ import annotations

from . import Unsupported, Vendor

from .common import cu_seqlens_k, require_4d


def _nhd_cache(w):
    require_4d(w)
    for c in (w.key_cache, w.value_cache):
        if c.stride(1) < c.stride(2):
            raise Unsupported("needs [blocks, block_size, heads, dim] pages (token-major)")


class FlashAttn2(Vendor):
    name = "flash-attn"
    requires = ("flash_attn",)
    distribution = "flash_attn"
    platforms = ("nvidia", "rocm")
    ops = ("decode", "prefill", "mixed")

    def prepare(self, op, w):
        import flash_attn

        _nhd_cache(w)
        if w.case.block_size % 256:
            raise Unsupported(f"FA2 paged KV needs block_size % 256 == 0, got {w.case.block_size}")
        if w.k_descale is not None:
            raise Unsupported("fp8 KV cache")
        cu_k = cu_seqlens_k(w)
        if op == "decode":
            B = len(w.q_lens)
            q = w.q.view(B, 1, w.q.shape[1], w.q.shape[2])
            return lambda: flash_attn.flash_attn_with_kvcache(
                q, w.key_cache, w.value_cache, cache_seqlens=w.seqused_k, block_table=w.block_table,
                softmax_scale=w.softmax_scale, causal=w.causal).view(w.q.shape[0], w.q.shape[1], -1)
        return lambda: flash_attn.flash_attn_varlen_func(
            w.q, w.key_cache, w.value_cache, w.cu_seqlens_q, cu_k, w.max_seqlen_q, w.max_seqlen_k,
            softmax_scale=w.softmax_scale, causal=w.causal, block_table=w.block_table)


class FlashAttn3(Vendor):
    name = "flash-attn3"
    requires = ("flash_attn_interface",)
    distribution = "flash_attn_3"
    platforms = ("nvidia",)
    ops = ("decode", "prefill", "mixed")

    def prepare(self, op, w):
        import flash_attn_interface as fa3

        _nhd_cache(w)
        kw = dict(cache_seqlens=w.seqused_k, page_table=w.block_table, cu_seqlens_q=w.cu_seqlens_q,
                  max_seqlen_q=w.max_seqlen_q, softmax_scale=w.softmax_scale, causal=w.causal)
        if w.k_descale is not None:
            kw.update(k_descale=w.k_descale, v_descale=w.v_descale)

        def run():
            o = fa3.flash_attn_with_kvcache(w.q, w.key_cache, w.value_cache, **kw)
            return o[0] if isinstance(o, tuple) else o
        return run
