"""FlashInfer: ``append_paged_kv_cache`` for writes, ``BatchDecodeWithPagedKVCacheWrapper`` and
``BatchPrefillWithPagedKVCacheWrapper`` for attention, given the caches as (K, V) views in its
"NHD" or "HND" page layout (whichever the strides say). Planning (page lists, ``plan()``) happens
in ``prepare``, outside the timed call, as an engine does once per step for all layers.

A write of random slots is expressed in FlashInfer's terms as one single-page "request" per token
(page = slot // block_size, position = slot % block_size). fp8 attention: scalar descales only.
"""

from __future__ import annotations

import torch

from . import Unsupported, Vendor

from .common import nhd_or_hnd, paged_kv_indptr, require_4d, uniform_descale

_WORKSPACE: dict = {}


def _workspace(device):
    if device not in _WORKSPACE:
        _WORKSPACE[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return _WORKSPACE[device]


class FlashInfer(Vendor):
    name = "flashinfer"
    requires = ("flashinfer",)
    distribution = "flashinfer-python"
    ops = ("write", "decode", "prefill", "mixed")

    def _caches(self, w):
        require_4d(w)
        lk, k = nhd_or_hnd(w.key_cache)
        lv, v = nhd_or_hnd(w.value_cache)
        if lk != lv:
            raise Unsupported("K and V caches in different page layouts")
        return lk, k, v

    def prepare(self, op, w):
        import flashinfer

        layout, k, v = self._caches(w)
        bs = w.case.block_size
        if op == "write":
            if w.kv_cache_dtype != "auto":
                raise Unsupported("fp8 quantizing write")
            s = w.slot_mapping
            n = s.shape[0]
            batch_indices = torch.arange(n, dtype=torch.int32, device=w.device)
            positions = (s % bs).to(torch.int32)
            kv_indices = (s // bs).to(torch.int32)
            kv_indptr = torch.arange(n + 1, dtype=torch.int32, device=w.device)
            last = positions + 1
            return lambda: flashinfer.append_paged_kv_cache(w.key, w.value, batch_indices, positions, (k, v),
                                                            kv_indices, kv_indptr, last, kv_layout=layout)
        ks, vs = uniform_descale(w)
        indptr, indices, last = paged_kv_indptr(w)
        hq, hk, d = w.q.shape[1], k.shape[2] if layout == "NHD" else k.shape[1], w.q.shape[2]
        if op == "decode":
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(w.device), kv_layout=layout)
            wrapper.plan(indptr, indices, last, hq, hk, d, bs, q_data_type=w.q.dtype, kv_data_type=k.dtype,
                         sm_scale=w.softmax_scale)
        else:
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(w.device), kv_layout=layout)
            wrapper.plan(w.cu_seqlens_q, indptr, indices, last, hq, hk, d, bs, causal=w.causal,
                         sm_scale=w.softmax_scale, q_data_type=w.q.dtype, kv_data_type=k.dtype)
        kw = {} if ks is None else dict(k_scale=ks, v_scale=vs)
        return lambda: wrapper.run(w.q, (k, v), **kw)
