"""vLLM's kernels, where vLLM is installed (not yet run on a GPU machine: vLLM has not been installed on one this project measured on).

* ``vllm-C``: the CUDA/HIP ``_C`` cache ops ``reshape_and_cache_flash`` / ``concat_and_cache_mla``.
* ``vllm-triton``: ``triton_reshape_and_cache_flash`` and ``unified_attention`` (its Triton paged
  attention), looked up under ``vllm.v1.attention.ops`` and the older ``vllm.attention.ops``.
* ``vllm-flash-attn``: its flash-attn build, ``vllm.vllm_flash_attn.flash_attn_varlen_func`` with
  ``block_table`` and ``seqused_k``.
Known from an H100 measurement: vLLM's Triton write writes to the wrong places on an
HND cache; the harness reports that as WRONG rather than timing it.
"""

from __future__ import annotations

import importlib

from . import Unsupported, Vendor

from .common import require_4d, vllm_mla_args, vllm_write_args


def _first(*paths):
    errs = []
    for mod, attr in paths:
        try:
            return getattr(importlib.import_module(mod), attr)
        except Exception as e:
            errs.append(f"{mod}.{attr}: {type(e).__name__}")
    raise Unsupported("not found: " + "; ".join(errs))


class VllmC(Vendor):
    name = "vllm-C"
    requires = ("vllm._custom_ops",)
    distribution = "vllm"
    ops = ("write", "mla-write")

    def prepare(self, op, w):
        from vllm import _custom_ops as ops

        if op == "write":
            a = vllm_write_args(w)
            return lambda: ops.reshape_and_cache_flash(*a)
        a = vllm_mla_args(w)
        return lambda: ops.concat_and_cache_mla(*a)


class VllmTriton(Vendor):
    name = "vllm-triton"
    requires = ("vllm",)
    distribution = "vllm"
    ops = ("write", "decode", "prefill", "mixed")

    def prepare(self, op, w):
        require_4d(w)
        if op == "write":
            fn = _first(("vllm.v1.attention.ops.triton_reshape_and_cache_flash", "triton_reshape_and_cache_flash"),
                        ("vllm.attention.ops.triton_reshape_and_cache_flash", "triton_reshape_and_cache_flash"))
            a = vllm_write_args(w)
            return lambda: fn(*a)
        fn = _first(("vllm.v1.attention.ops.triton_unified_attention", "unified_attention"),
                    ("vllm.attention.ops.triton_unified_attention", "unified_attention"))
        out = w.new_out()
        kd = w.k_descale if w.k_descale is not None else None
        vd = w.v_descale if w.v_descale is not None else None
        a = dict(q=w.q, k=w.key_cache, v=w.value_cache, out=out, cu_seqlens_q=w.cu_seqlens_q,
                 max_seqlen_q=w.max_seqlen_q, seqused_k=w.seqused_k, max_seqlen_k=w.max_seqlen_k,
                 softmax_scale=w.softmax_scale, causal=w.causal, window_size=(-1, -1), block_table=w.block_table,
                 softcap=0, q_descale=None, k_descale=kd, v_descale=vd)

        def run():
            fn(**a)
            return out
        return run


class VllmFlashAttn(Vendor):
    name = "vllm-flash-attn"
    requires = ("vllm.vllm_flash_attn",)
    distribution = "vllm"
    platforms = ("nvidia",)
    ops = ("decode", "prefill", "mixed")

    def prepare(self, op, w):
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        require_4d(w)
        out = w.new_out()
        kw = dict(q=w.q, k=w.key_cache, v=w.value_cache, max_seqlen_q=w.max_seqlen_q, cu_seqlens_q=w.cu_seqlens_q,
                  max_seqlen_k=w.max_seqlen_k, seqused_k=w.seqused_k, softmax_scale=w.softmax_scale,
                  causal=w.causal, block_table=w.block_table, out=out)
        if w.k_descale is not None:
            kw.update(k_descale=w.k_descale, v_descale=w.v_descale)

        def run():
            flash_attn_varlen_func(**kw)
            return out
        return run
