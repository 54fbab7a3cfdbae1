"""flash-attn's own signatures over kvdispatch, so a flash-attn user switches by import::

    # from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    from kvdispatch.integrations.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

and vLLM's ``_custom_ops`` cache-write names (``reshape_and_cache`` for the head-major pair,
``reshape_and_cache_flash``, ``concat_and_cache_mla``).

flash-attn's conventions are kept where they differ from kvdispatch's own call:

* ``flash_attn_varlen_func`` takes ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
  deterministic, return_attn_probs, block_table)`` in that order. With a ``block_table`` the kv
  length of each sequence comes from ``cu_seqlens_k`` (flash-attn 2's paged convention) unless
  ``seqused_k`` is given. ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the
  probabilities exist only with dropout, which inference never uses.
* ``window_size`` may be a tuple, a list or a tensor of two ints.
* ``flash_attn_with_kvcache`` takes q ``(batch, seqlen_q, nheads, d)``, a paged cache with
  ``block_table`` or a dense ``(batch_cache, seqlen_cache, nheads_k, d)`` cache, ``cache_seqlens``
  (int or int32 ``(batch,)``) and optional new ``k`` / ``v`` ``(batch, seqlen_new, nheads_k, d)``
  written at positions ``cache_seqlens[b] + i`` before attending; returns ``out`` (and
  ``softmax_lse`` ``(batch, nheads, seqlen_q)`` with ``return_softmax_lse``). ``cache_seqlens``
  is not updated in place (as in flash-attn). Rotary embedding and ``cache_leftpad`` are refused.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops import concat_and_cache_mla, flash_attn_varlen_func as _varlen, reshape_and_cache_flash

__all__ = ["flash_attn_varlen_func", "flash_attn_with_kvcache", "reshape_and_cache",
           "reshape_and_cache_flash", "concat_and_cache_mla"]


def _window(window_size) -> tuple:
    if window_size is None:
        return (-1, -1)
    if isinstance(window_size, torch.Tensor):
        window_size = window_size.tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}")
    return (int(window_size[0]), int(window_size[1]))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None, *, seqused_k=None, out=None, q_descale=None, k_descale=None,
                           v_descale=None, s_aux=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2's ``flash_attn_varlen_func`` (argument order and paged convention), on kvdispatch.

    q ``(total_q, nheads, d)``; k, v ``(total_k, nheads_k, d)``, or paged caches
    ``(num_blocks, page_block_size, nheads_k, d)`` with ``block_table`` ``(batch, max_blocks)``.
    Returns ``out``; ``(out, softmax_lse, None)`` with ``return_attn_probs``; ``(out, softmax_lse)``
    with ``return_softmax_lse`` (vLLM's spelling).
    """
    if dropout_p:
        raise ValueError(f"dropout_p: expected 0.0 (kvdispatch's attention is for inference), got {dropout_p}")
    if block_table is not None and seqused_k is None:
        if not isinstance(cu_seqlens_k, torch.Tensor):
            raise TypeError("cu_seqlens_k: expected an int32 tensor [batch + 1] (the paged kv lengths)")
        seqused_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        cu_seqlens_k = None
    want_lse = bool(return_attn_probs or return_softmax_lse)
    res = _varlen(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=cu_seqlens_k,
                  seqused_k=seqused_k, softmax_scale=softmax_scale, causal=causal,
                  window_size=_window(window_size), softcap=softcap, block_table=block_table, out=out,
                  q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, alibi_slopes=alibi_slopes,
                  s_aux=s_aux, return_softmax_lse=want_lse, num_splits=num_splits, deterministic=deterministic)
    if return_attn_probs:
        return res[0], res[1], None
    return res


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False, *, out=None, k_descale=None,
                            v_descale=None, s_aux=None):
    """flash-attn's ``flash_attn_with_kvcache``: append ``k``/``v`` (optional) to the cache at
    ``cache_seqlens``, then attend ``q`` over the ``cache_seqlens (+ seqlen_new)`` keys.

    q ``(batch, seqlen_q, nheads, d)``; k_cache / v_cache ``(num_blocks, page_block_size, nheads_k,
    d)`` with ``block_table`` ``(batch, max_blocks)`` int32, or ``(batch_cache, seqlen_cache, nheads_k,
    d)`` (row ``cache_batch_idx[b]``, default b). Returns ``out`` ``(batch, seqlen_q, nheads, d_v)``,
    plus ``softmax_lse`` ``(batch, nheads, seqlen_q)`` float32 with ``return_softmax_lse``.
    """
    if rotary_cos is not None or rotary_sin is not None:
        raise ValueError("rotary_cos/rotary_sin: rotary embedding inside the attention call is not "
                         "supported; apply it to q and k before the call")
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad: not supported (left-padded caches); pass cache_seqlens per sequence")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected (batch, seqlen_q, nheads, headdim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    batch, lq, hq, d = q.shape
    dev = q.device
    if block_table is None:
        # a dense cache [batch_cache, seqlen_cache, H, D] is a paged cache of one block per row
        if cache_batch_idx is not None:
            rows = cache_batch_idx.to(device=dev, dtype=torch.int32)
        else:
            rows = torch.arange(batch, dtype=torch.int32, device=dev)
        block_table = rows.reshape(batch, 1)
    elif cache_batch_idx is not None:
        raise ValueError("cache_batch_idx: not supported with block_table (flash-attn refuses it too)")
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page
    if cache_seqlens is None:
        lens = torch.zeros(batch, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=dev)
    else:
        lens = cache_seqlens.to(device=dev, dtype=torch.int32)
    if (k is None) != (v is None):
        raise ValueError("k/v: pass both new keys and new values, or neither")
    if k is not None:
        if k.dim() != 4 or k.shape[0] != batch:
            raise ValueError(f"k: expected (batch={batch}, seqlen_new, nheads_k, headdim), got {tuple(k.shape)}")
        new = k.shape[1]
        pos = lens[:, None].long() + torch.arange(new, device=dev)[None, :]  # [batch, new]
        blk = torch.gather(block_table.long(), 1, (pos // page).clamp_max(block_table.shape[1] - 1))
        slots = torch.where(pos < capacity, blk * page + pos % page, -1).reshape(-1)
        reshape_and_cache_flash(k.reshape(batch * new, k.shape[2], k.shape[3]),
                                v.reshape(batch * new, v.shape[2], v.shape[3]), k_cache, v_cache, slots)
        lens = lens + new
    cu_q = torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32, device=dev)
    if out is not None:
        out = out.reshape(batch * lq, hq, out.shape[-1])
    res = _varlen(q.reshape(batch * lq, hq, d), k_cache, v_cache, lq, cu_q, capacity, seqused_k=lens,
                  softmax_scale=softmax_scale, causal=causal, window_size=_window(window_size), softcap=softcap,
                  block_table=block_table, out=out, k_descale=k_descale, v_descale=v_descale,
                  alibi_slopes=alibi_slopes, s_aux=s_aux, return_softmax_lse=return_softmax_lse,
                  num_splits=num_splits)
    o = res[0] if return_softmax_lse else res
    o = o.view(batch, lq, hq, o.shape[-1])
    if return_softmax_lse:
        return o, res[1].view(hq, batch, lq).permute(1, 0, 2)
    return o


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto",
                      k_scale=None, v_scale=None) -> None:
    """vLLM's ``reshape_and_cache``: the head-major pair, key ``(num_blocks, H, D // x, block_size, x)``
    and value ``(num_blocks, H, D, block_size)``. Other layouts: ``reshape_and_cache_flash``."""
    if not isinstance(key_cache, torch.Tensor) or key_cache.dim() != 5:
        raise ValueError("key_cache: reshape_and_cache takes the 5-D head-major key cache "
                         "[num_blocks, num_kv_heads, head_size // x, block_size, x]; use reshape_and_cache_flash "
                         f"for 4-D caches, got shape {tuple(getattr(key_cache, 'shape', ()))}")
    reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
