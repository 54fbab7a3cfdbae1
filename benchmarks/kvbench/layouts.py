"""Builders for every cache layout kvdispatch claims, shared by the tests of every backend,
``kvdispatch check`` and the benchmarks (so a layout means the same thing everywhere).

All builders return VIEWS with the real strides an engine would hand us, filled with random
data (never zeros), so a kernel that writes to the wrong place or skips elements shows.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvdispatch.descriptor import FP8_DTYPES

__all__ = [
    "LAYOUTS", "ATTENTION_LAYOUTS", "make_kv_cache", "make_mla_cache", "random_fill", "device_fill",
    "random_slots", "block_slots", "random_block_table", "fp8_max",
]

# Layouts of a K/V cache pair (4-D views indexed [block, token, head, dim], or head-major).
LAYOUTS = ("NHD", "HND", "combined", "combined-HND", "cross-layer", "diffkv", "head-major")
# Layouts attention accepts (4-D only). "mla-slices": K = buf[..., :Dk], V = buf[..., :Dv] of one buffer.
ATTENTION_LAYOUTS = ("NHD", "HND", "combined", "combined-HND", "cross-layer", "diffkv", "mla-slices")

CROSS_LAYERS = 3  # layers in the cross-layer buffer; the views are of the middle one


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def random_fill(t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fill ``t`` (any dtype, any strides) with random finite values; returns ``t``."""
    if t.numel() == 0:
        return t
    if t.dtype in FP8_DTYPES:
        src = torch.randn(t.shape, generator=generator, device="cpu", dtype=torch.float32) * 4
        t.copy_(src.clamp(-fp8_max(t.dtype), fp8_max(t.dtype)).to(t.dtype).to(t.device))
    elif t.dtype == torch.uint8:
        # random fp8 bit patterns that are finite as e4m3 AND e5m2 (e5m2: 0x7c.. is inf/NaN)
        src = torch.randint(0, 0x7C, t.shape, generator=generator, device="cpu", dtype=torch.int16)
        sign = torch.randint(0, 2, t.shape, generator=generator, device="cpu", dtype=torch.int16) << 7
        t.copy_((src | sign).to(torch.uint8).to(t.device))
    elif t.dtype.is_floating_point:
        t.copy_(torch.randn(t.shape, generator=generator, device="cpu", dtype=torch.float32).to(t.device))
    else:
        t.copy_(torch.randint(-100, 100, t.shape, generator=generator, device="cpu").to(t.device))
    return t


def device_fill(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with random finite values generated on its device (a 2 GB cache filled through
    the CPU is slow); returns ``t``. fp8 types from bf16 normals (finite by construction), uint8
    with codes finite as e4m3 and e5m2."""
    if t.dtype.is_floating_point and t.element_size() >= 2:
        t.normal_()
    elif t.dtype.is_floating_point:
        t.copy_(torch.randn(t.shape, device=t.device, dtype=torch.bfloat16).mul_(4)
                .clamp_(-fp8_max(t.dtype), fp8_max(t.dtype)).to(t.dtype))
    else:
        t.view(torch.uint8).random_(0, 0x7C)
    return t


def make_kv_cache(
    layout: str,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    head_size_v: Optional[int] = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    fill: bool = True,
):
    """Return ``(key_cache, value_cache)`` views in ``layout`` (see LAYOUTS / ATTENTION_LAYOUTS).

    ``head_size_v`` differs from ``head_size`` only for "diffkv" and "mla-slices" (default: equal).
    """
    nb, bs, h, dk = num_blocks, block_size, num_kv_heads, head_size
    dv = dk if head_size_v is None else head_size_v
    kw = dict(dtype=dtype, device=device)
    if dv != dk and layout not in ("diffkv", "mla-slices"):
        raise ValueError(f"layout {layout!r} has head_size_v == head_size")
    if layout == "NHD":
        k = torch.empty(nb, bs, h, dk, **kw)
        v = torch.empty(nb, bs, h, dv, **kw)
        bufs = (k, v)
    elif layout == "HND":
        kb = torch.empty(nb, h, bs, dk, **kw)
        vb = torch.empty(nb, h, bs, dv, **kw)
        k, v, bufs = kb.permute(0, 2, 1, 3), vb.permute(0, 2, 1, 3), (kb, vb)
    elif layout == "combined":
        buf = torch.empty(nb, 2, bs, h, dk, **kw)
        k, v, bufs = buf[:, 0], buf[:, 1], (buf,)
    elif layout == "combined-HND":  # FlashInfer-style [blocks, 2, H, bs, D]
        buf = torch.empty(nb, 2, h, bs, dk, **kw)
        k, v, bufs = buf[:, 0].permute(0, 2, 1, 3), buf[:, 1].permute(0, 2, 1, 3), (buf,)
    elif layout == "cross-layer":
        buf = torch.empty(nb, CROSS_LAYERS, 2, bs, h, dk, **kw)
        k, v, bufs = buf[:, 1, 0], buf[:, 1, 1], (buf,)
    elif layout == "diffkv":
        buf = torch.empty(nb, bs, h, dk + dv, **kw)
        k, v, bufs = buf[..., :dk], buf[..., dk:], (buf,)
    elif layout == "mla-slices":
        if dv > dk:
            raise ValueError("mla-slices needs head_size_v <= head_size")
        buf = torch.empty(nb, bs, h, dk, **kw)
        k, v, bufs = buf, buf[..., :dv], (buf,)
    elif layout == "head-major":
        itemsize = torch.empty((), dtype=dtype).element_size()
        x = 16 // itemsize
        if dk % x:
            raise ValueError(f"head-major needs head_size % {x} == 0, got {dk}")
        k = torch.empty(nb, h, dk // x, bs, x, **kw)
        v = torch.empty(nb, h, dv, bs, **kw)
        bufs = (k, v)
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS + ('mla-slices',)}")
    if fill:
        for b in bufs:
            random_fill(b)
    return k, v


def make_mla_cache(num_blocks: int, block_size: int, kv_lora_rank: int = 512, rope_dim: int = 64,
                   dtype: torch.dtype = torch.bfloat16, device="cpu", padded: bool = False,
                   fill: bool = True) -> torch.Tensor:
    """MLA latent cache ``[num_blocks, block_size, kv_lora_rank + rope_dim]``; ``padded`` gives
    a non-contiguous view (extra room at the end of every token row and block)."""
    d = kv_lora_rank + rope_dim
    if padded:
        buf = torch.empty(num_blocks, block_size + 1, d + 32, dtype=dtype, device=device)
        t = buf[:, :block_size, :d]
    else:
        buf = t = torch.empty(num_blocks, block_size, d, dtype=dtype, device=device)
    if fill:
        random_fill(buf)
    return t


def random_slots(num_tokens: int, num_blocks: int, block_size: int, dtype=torch.int64, device="cpu",
                 pad_fraction: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Distinct random slots (as an engine assigns them), some set to -1 (padding) if asked."""
    total = num_blocks * block_size
    if num_tokens > total:
        raise ValueError(f"{num_tokens} tokens do not fit in {total} slots")
    slots = torch.randperm(total, generator=generator)[:num_tokens]
    if pad_fraction > 0 and num_tokens:
        pad = torch.rand(num_tokens, generator=generator) < pad_fraction
        slots[pad] = -1
    return slots.to(dtype=dtype, device=device)


def block_slots(num_tokens: int, num_blocks: int, block_size: int, dtype=torch.int64, device="cpu",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Slots of a prefill as an engine assigns them: distinct random blocks, filled by consecutive
    tokens from their first slot on."""
    blocks = -(-num_tokens // block_size)
    if blocks > num_blocks:
        raise ValueError(f"{num_tokens} tokens need {blocks} blocks, the cache has {num_blocks}")
    order = torch.randperm(num_blocks, generator=generator)[:blocks]
    slots = (order[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]
    return slots.to(dtype=dtype, device=device)


def random_block_table(seq_lens_k, num_blocks: int, block_size: int, device="cpu",
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """int32 ``[batch, max_blocks]`` of distinct random block ids; unused entries hold random
    valid ids too (kernels must not depend on them)."""
    seq_lens_k = [int(s) for s in seq_lens_k]
    max_blocks = max([1] + [(s + block_size - 1) // block_size for s in seq_lens_k])
    need = sum((s + block_size - 1) // block_size for s in seq_lens_k)
    if need > num_blocks:
        raise ValueError(f"{need} blocks needed, cache has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=generator)
    table = torch.randint(0, num_blocks, (len(seq_lens_k), max_blocks), generator=generator)
    pos = 0
    for i, s in enumerate(seq_lens_k):
        n = (s + block_size - 1) // block_size
        table[i, :n] = perm[pos:pos + n]
        pos += n
    return table.to(dtype=torch.int32, device=device)
