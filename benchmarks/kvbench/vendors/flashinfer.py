"""FlashInfer: ``append_paged_kv_cache`` for writes, ``BatchDecodeWithPagedKVCacheWrapper`` and
``BatchPrefillWithPagedKVCacheWrapper`` for attention, given the caches as (K, V) views in its
"NHD" or "HND" page layout (whichever the strides say). Planning (page lists, ``plan()``) happens
in ``prepare``, outside the timed call, as an engine does once per step for all layers.

A write of random slots is expressed in FlashInfer's terms as one single-page "request" per token
(page = slot // block_size, position = slot % block_size). fp8 attention: scalar descales only.

Two adapters: ``flashinfer`` (decode on CUDA cores, vLLM's choice up to a GQA group of 4; a mixed
batch as one prefill-wrapper call, as SGLang runs it) and ``flashinfer-tc`` (decode on tensor cores,
``use_tensor_cores=True``; a mixed batch split as vLLM splits it: the prefills through the prefill
wrapper, the decodes through the tensor-core decode wrapper, each into its rows of one output).
"""

from __future__ import annotations

import torch

from . import Unsupported, Vendor

from .common import decode_prefill_split, nhd_or_hnd, paged_kv_indptr, require_4d, uniform_descale

_WORKSPACE: dict = {}


def _workspace(device, use="prefill"):
    """One workspace per device and wrapper kind: a wrapper keeps its plan in its workspace, so the two
    wrappers of a split batch need two."""
    if (device, use) not in _WORKSPACE:
        _WORKSPACE[device, use] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return _WORKSPACE[device, use]


class FlashInfer(Vendor):
    name = "flashinfer"
    requires = ("flashinfer",)
    distribution = "flashinfer-python"
    ops = ("write", "decode", "prefill", "mixed")
    tensor_cores = False  # the decode wrapper's use_tensor_cores
    split_mixed = False  # a mixed batch through the prefill and the decode wrapper

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
        kw = {} if ks is None else dict(k_scale=ks, v_scale=vs)
        hq, hk, d = w.q.shape[1], k.shape[2] if layout == "NHD" else k.shape[1], w.q.shape[2]

        def decode(seqs=None):
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(w.device, "decode"), kv_layout=layout,
                                                                    use_tensor_cores=self.tensor_cores)
            wrapper.plan(*paged_kv_indptr(w, seqs), hq, hk, d, bs, q_data_type=w.q.dtype, kv_data_type=k.dtype,
                         sm_scale=w.softmax_scale)
            return wrapper

        def prefill(qo_indptr, seqs=None):
            wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(w.device), kv_layout=layout)
            wrapper.plan(qo_indptr, *paged_kv_indptr(w, seqs), hq, hk, d, bs, causal=w.causal,
                         sm_scale=w.softmax_scale, q_data_type=w.q.dtype, kv_data_type=k.dtype)
            return wrapper

        if op == "decode":
            wrapper = decode()
        elif op == "mixed" and self.split_mixed:
            split = decode_prefill_split(w)
            if split is None:
                raise Unsupported("decodes and prefills interleaved in the batch (no split into two runs)")
            pre, dec = split
            pw, dw = prefill(pre.qo_indptr, pre.seqs), decode(dec.seqs)
            out = torch.empty(w.q.shape[0], hq, w.head_size_v, dtype=w.q.dtype, device=w.device)
            q_pre, q_dec, o_pre, o_dec = w.q[pre.rows], w.q[dec.rows], out[pre.rows], out[dec.rows]

            def run():
                pw.run(q_pre, (k, v), out=o_pre, **kw)
                dw.run(q_dec, (k, v), out=o_dec, **kw)
                return out
            return run
        else:
            wrapper = prefill(w.cu_seqlens_q)
        return lambda: wrapper.run(w.q, (k, v), **kw)


class FlashInferTC(FlashInfer):
    name = "flashinfer-tc"
    ops = ("decode", "mixed")
    tensor_cores = True
    split_mixed = True
