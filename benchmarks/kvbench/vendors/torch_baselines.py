"""Plain-PyTorch reference points (kind "baseline": shown, never counted as the best vendor).

* ``torch naive write``: what a framework does without a kernel. A cache whose [blocks, tokens]
  dims flatten to one view gets one ``index_copy_`` per cache; any other 4-D layout gets
  ``cache[slot // bs, slot % bs] = x`` (advanced-index assignment, same strides as given). fp8:
  ``(x / scale).clamp(±max).to(fp8)`` first, as the reference does.
* ``torch SDPA (pre-gathered K/V)``: ``scaled_dot_product_attention`` on K/V that ``prepare``
  already gathered out of the pages into contiguous ``[B, Hkv, L, D]`` (fp8: dequantized to the
  query dtype). No paging, no gather, no dequantization inside the timed call: the "no paging"
  ceiling. Equal-length batches only (decode, prefill).
* ``torch FlexAttention (pre-gathered K/V)``: ``flex_attention`` on the same gathered K/V with a
  bottom-right causal block mask, compiled on GPUs (eager on CPU: there it is only checked).
"""

from __future__ import annotations

import torch

from . import Unsupported, Vendor

from .common import require_4d


def _quantize(x, scale, dtype):
    """``x`` as the cache stores it (fp8: ``x / scale`` saturated, like the reference)."""
    if scale is None:
        return x.to(dtype)
    s = scale.reshape(1, -1, 1) if x.dim() == 3 and scale.numel() > 1 else scale
    fmax = torch.finfo(dtype).max
    return (x.float() / s).clamp(-fmax, fmax).to(dtype)


class TorchNaiveWrite(Vendor):
    name = "torch naive write"
    kind = "baseline"
    platforms = ("*",)
    ops = ("write", "mla-write")

    def version(self):
        return torch.__version__

    def prepare(self, op, w):
        bs = w.case.block_size
        if op == "mla-write":
            cache, scale = w.kv_cache, w.scale

            def mla():
                x = _quantize(torch.cat([w.kv_c, w.k_pe], dim=-1), scale, cache.dtype)
                s = w.slot_mapping
                cache[s // bs, s % bs] = x
            return mla
        require_4d(w)
        kc, vc = w.key_cache, w.value_cache
        pairs = [(kc, w.key, w.k_scale), (vc, w.value, w.v_scale)]
        flat = []
        for cache, _, _ in pairs:
            try:
                flat.append(cache.view(-1, cache.shape[2], cache.shape[3]))
            except RuntimeError:
                flat.append(None)
        if all(f is not None for f in flat):
            # index_copy_ has no fp8 kernels: move fp8 codes as bytes
            as_bytes = kc.element_size() == 1
            flat = [f.view(torch.uint8) if as_bytes else f for f in flat]

            def write_flat():
                for f, (cache, x, scale) in zip(flat, pairs):
                    x = _quantize(x, scale, cache.dtype)
                    f.index_copy_(0, w.slot_mapping, x.view(torch.uint8) if as_bytes else x)
            return write_flat

        def write_indexed():
            s = w.slot_mapping
            blk, off = s // bs, s % bs
            for cache, x, scale in pairs:
                cache[blk, off] = _quantize(x, scale, cache.dtype)
        return write_indexed


def _layout_independent(w):
    # K/V are gathered out of the pages before timing, so the cache layout cannot change the
    # timed call: measure it once, on the NHD case
    if w.case.layout != "NHD":
        raise Unsupported("pre-gathered K/V: layout-independent, see the NHD row")


def _gathered(w):
    """(batch, q_len, kv_len, K, V) with K/V ``[B, Hkv, L, D]`` gathered out of the pages, for an
    equal-length batch on the NHD case."""
    _layout_independent(w)
    if len(set(w.q_lens)) != 1 or len(set(w.kv_lens)) != 1:
        raise Unsupported("unequal sequence lengths (needs padding and masks)")
    require_4d(w)
    ks, vs = w.gathered_kv()
    return len(w.q_lens), w.q_lens[0], w.kv_lens[0], torch.stack(ks), torch.stack(vs)


class SdpaGathered(Vendor):
    name = "torch SDPA (pre-gathered K/V)"
    kind = "baseline"
    platforms = ("*",)
    ops = ("decode", "prefill", "mixed")

    def version(self):
        return torch.__version__

    def prepare(self, op, w):
        B, lq, lk, k, v = _gathered(w)
        q = w.q.view(B, lq, w.q.shape[1], w.q.shape[2]).transpose(1, 2)  # [B, Hq, lq, D]
        causal = w.causal and lq > 1
        if causal and lq != lk:
            raise Unsupported("causal with q_len != kv_len (SDPA aligns the mask top-left)")
        gqa = q.shape[1] != k.shape[1]
        hq = w.q.shape[1]
        dv = v.shape[-1]

        def sdpa():
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=w.softmax_scale,
                                                                 enable_gqa=gqa)
            return o.transpose(1, 2).reshape(B * lq, hq, dv)
        return sdpa


class FlexAttentionGathered(Vendor):
    name = "torch FlexAttention (pre-gathered K/V)"
    kind = "baseline"
    platforms = ("*",)
    # prefill only: every new shape costs a compile of tens of seconds, and for memory-bound
    # decode the SDPA row is already the no-paging ceiling
    ops = ("prefill",)
    requires = ("torch.nn.attention.flex_attention",)

    def version(self):
        return torch.__version__

    def prepare(self, op, w):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        B, lq, lk, k, v = _gathered(w)
        if k.shape[-1] != v.shape[-1]:
            raise Unsupported("head_size_v != head_size")
        q = w.q.view(B, lq, w.q.shape[1], w.q.shape[2]).transpose(1, 2).contiguous()
        hq, dv = w.q.shape[1], v.shape[-1]
        shift = lk - lq
        block_mask = None
        if w.causal and lq > 1:
            def causal(b, h, qi, ki):
                return ki <= qi + shift
            block_mask = create_block_mask(causal, None, None, lq, lk, device=w.device)
        fn = flex_attention
        if w.device.type == "cuda":
            fn = torch.compile(flex_attention, dynamic=False)
        gqa = hq != k.shape[1]

        def flex():
            o = fn(q, k, v, block_mask=block_mask, scale=w.softmax_scale, enable_gqa=gqa)
            return o.transpose(1, 2).reshape(B * lq, hq, dv)
        return flex
