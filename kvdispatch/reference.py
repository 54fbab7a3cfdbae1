"""The reference backend: plain PyTorch on any device, the default wherever nothing else serves and the ground truth
of every test. Obviously correct rather than fast: caches are indexed through the caller's views (PyTorch applies the
real strides), fp8 goes through ``Tensor.to``, attention is a float32 softmax per sequence. NaN follows flash-attn:
a NaN in a row's inputs gives NaN in that row; a row that sees no key is 0."""

from __future__ import annotations

from typing import Optional

import torch

from .descriptor import KVCacheDescriptor
from .hookspecs import OPS, AttentionArgs, Backend, hookimpl

__all__ = ["ReferenceBackend", "quantize_fp8"]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` (broadcast) rounded to ``fp8_dtype``, saturating at its largest finite value: e4m3fn
    has no infinity, so an unclamped cast of 500.0 would be NaN."""
    fmax = torch.finfo(fp8_dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(fp8_dtype)


def _to_cache(x: torch.Tensor, cache_view: torch.Tensor, desc: KVCacheDescriptor, side: int) -> torch.Tensor:
    """Rows of key (side 0) / value (1) / latents (0) as the cache stores them, in its own dtype."""
    if desc.kv_cache_dtype != "auto" and x.dtype != desc.cache_dtype:
        scale = desc.v_scale if side else desc.k_scale
        shape = (1, -1, 1) if desc.scale_kinds[side] == "head" else (1,) * x.dim()
        x = quantize_fp8(x, scale.reshape(shape), desc.cache_dtype)
    return x.view(cache_view.dtype) if x.dtype != cache_view.dtype else x


def _cache_view(cache: torch.Tensor, desc: KVCacheDescriptor) -> torch.Tensor:
    return cache.view(desc.cache_dtype) if cache.dtype != desc.cache_dtype else cache  # a uint8 fp8 cache


def _valid_slots(slot_mapping: torch.Tensor, desc: KVCacheDescriptor):
    """(non-padding token indices, their block ids, their offsets in the block). A slot named twice
    keeps its LAST token, K and V alike (indexed stores with repeated indices pick any writer)."""
    slots = slot_mapping.long()
    tokens = torch.nonzero(slots >= 0).flatten()
    s = slots[tokens]
    if s.numel() > 1:
        uniq, inverse = torch.unique(s, return_inverse=True)
        if uniq.numel() != s.numel():
            last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=s.device)
            last.scatter_reduce_(0, inverse, torch.arange(s.numel(), device=s.device), reduce="amax")
            tokens, s = tokens[last], s[last]
    return tokens, s // desc.block_size, s % desc.block_size


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    platforms = ("*",)
    ops = OPS
    description = "pure PyTorch on any device; the ground truth of every test"
    always_check_values = True  # the public call checks slots, block ids and lengths first

    def versions(self) -> dict:
        return {"torch": torch.__version__}

    def available(self, platform) -> Optional[str]:
        if platform.name == "meta":
            return ("meta tensors hold no values to compute with (under torch.compile / FakeTensorMode the "
                    "custom ops' fake kernels run instead)")
        return None

    # inference ops: no autograd history reaches a cache or an output
    @torch.no_grad()
    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc) -> None:
        tokens, blk, off = _valid_slots(slot_mapping, desc)
        kc, vc = _cache_view(key_cache, desc), _cache_view(value_cache, desc)
        # convert everything before the first store: a failure leaves both caches untouched
        k, v = _to_cache(key[tokens], kc, desc, 0), _to_cache(value[tokens], vc, desc, 1)
        if desc.layout == "head-major":  # separated advanced indices put the token dim first
            kc[blk, :, :, off] = k.reshape(k.shape[0], desc.num_kv_heads, desc.head_size_k // desc.k.x, desc.k.x)
            vc[blk, :, :, off] = v
        else:
            kc[blk, off] = k
            vc[blk, off] = v

    @torch.no_grad()
    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc) -> None:
        tokens, blk, off = _valid_slots(slot_mapping, desc)
        cache = _cache_view(kv_cache, desc)
        cache[blk, off] = _to_cache(torch.cat([kv_c[tokens], k_pe[tokens]], dim=-1), cache, desc, 0)

    @torch.no_grad()
    def flash_attn_varlen_func(self, q, k, v, out, desc, args: AttentionArgs) -> None:
        cu_q = args.cu_seqlens_q.tolist()
        cu_k = None if args.paged else args.cu_seqlens_k.tolist()
        used = [float("inf")] * args.batch if args.seqused_k is None else args.seqused_k.tolist()  # inf: no cap
        hq, hkv, bs = q.shape[1], desc.num_kv_heads, desc.block_size
        group = hq // hkv
        for b in range(args.batch):
            q0, q1 = cu_q[b], cu_q[b + 1]
            lq = q1 - q0
            if lq == 0:
                continue
            if args.paged:
                lk, pos = used[b], torch.arange(used[b], device=q.device)
                blocks = args.block_table[b].long()[pos // bs]
                kb, vb = k[blocks, pos % bs], v[blocks, pos % bs]  # [lk, hkv, d]
            else:  # one block of total_k tokens: sequence b's keys start at cu_seqlens_k[b]
                k0, lk = cu_k[b], min(cu_k[b + 1] - cu_k[b], used[b])
                kb, vb = k[0, k0:k0 + lk], v[0, k0:k0 + lk]
            kf, vf = _descaled(kb, args.k_descale, b), _descaled(vb, args.v_descale, b)
            # query head h reads kv head h // group: view q as [lq, hkv, group, d]
            qf = _descaled(q[q0:q1].view(lq, hkv, group, -1), args.q_descale, b)
            s = torch.einsum("qhgd,khd->hgqk", qf, kf) * args.softmax_scale  # [hkv, group, lq, lk]
            if args.softcap > 0:
                s = args.softcap * torch.tanh(s / args.softcap)
            # rel[i, j] = j - p: query i sits at key position p = i + lk - lq (bottom-right aligned)
            rel = torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None] - (lk - lq)
            if args.alibi_slopes is not None:
                slopes = args.alibi_slopes if args.alibi_slopes.dim() == 1 else args.alibi_slopes[b]
                s = s - slopes.float().reshape(hkv, group, 1, 1) * rel.abs().float()
            wl, wr = args.window_left, args.window_right
            seen = ((rel <= wr) | (wr < 0)) & ((rel >= -wl) | (wl < 0))  # inside both windows (-1: unbounded)
            s = s.masked_fill(~seen, float("-inf"))
            if args.s_aux is not None:  # the sink: one more logit in each row's denominator, no value
                s = torch.cat([s, args.s_aux.float().reshape(hkv, group, 1, 1).expand(hkv, group, lq, 1)], dim=-1)
            lse = torch.logsumexp(s, dim=-1)  # [hkv, group, lq]; -inf for a row with nothing to see
            # softmax by hand so a row that sees nothing (all -inf) gives 0 weights while a NaN in
            # the inputs stays NaN (torch.softmax would give NaN for both)
            p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
            if args.softmax_lse is not None:
                args.softmax_lse[:, q0:q1] = lse.reshape(hq, lq)
            out[q0:q1] = _weighted_values(p[..., :lk], vf).reshape(lq, hq, -1).to(out.dtype)  # p without the sink


def _weighted_values(p: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
    """``sum_j p[h, g, q, j] * vf[j, h, d]`` as ``[q, h, g, d]``, where a key of weight 0 (masked, or underflowed)
    contributes nothing even if its value is NaN/inf (0 * NaN would be NaN): a row takes the non-finite values only of
    the keys it weighs, with IEEE's sums of them (any NaN, or +inf and -inf together: NaN; else the infinity)."""
    finite = torch.isfinite(vf)
    if bool(finite.all()):
        return torch.einsum("hgqk,khd->qhgd", p, vf)
    o = torch.einsum("hgqk,khd->qhgd", p, torch.where(finite, vf, 0.0))
    seen = (p > 0).to(vf.dtype)
    kinds = torch.stack([torch.isnan(vf), vf == float("inf"), vf == float("-inf")]).to(vf.dtype)
    nan, pos, neg = torch.einsum("hgqk,nkhd->nqhgd", seen, kinds) > 0  # does a row weigh a NaN / +inf / -inf?
    o = torch.where(neg, float("-inf"), torch.where(pos, float("inf"), o))
    return torch.where(nan | (pos & neg) | torch.isnan(p).any(-1).permute(2, 0, 1)[..., None], float("nan"), o)


def _descaled(x: torch.Tensor, descale: Optional[torch.Tensor], b: int) -> torch.Tensor:
    """``x`` ``[tokens, kv_heads, ...]`` in float32, times sequence ``b``'s descale (one element or ``[batch,
    kv_heads]``) if there is one."""
    if descale is None:
        return x.float()
    d = descale.reshape(1) if descale.numel() == 1 else descale[b]
    return x.float() * d.reshape(-1, *(1,) * (x.dim() - 2))


@hookimpl
def kvdispatch_backends():
    return [ReferenceBackend()]
