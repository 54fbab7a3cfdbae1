"""The reference backend against deliberately simple loops.

The write loops address the cache's raw storage through the descriptor's one formula
(``CacheStrides.offset``), so these tests check the reference AND the descriptor's strides on every
layout. The attention loop is one query row at a time in float64.
"""

import math
import random

import pytest
import torch

import kvdispatch as kvd
from kvbench.layouts import LAYOUTS, make_kv_cache, make_mla_cache, random_block_table, random_fill, random_slots

from matrix import FP8, force_backend


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the storage starting at ``t``'s first element."""
    n = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return t.as_strided((n,), (1,), t.storage_offset())


def _loop_write(key, value, kc, vc, slots, desc, ks, vs):
    """Per token and head: write the row at the addresses the formula gives."""
    fk, fv = _flat(kc), _flat(vc)
    d_k = torch.arange(desc.head_size_k)
    d_v = torch.arange(desc.head_size_v)
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        blk, off = divmod(s, desc.block_size)
        for h in range(desc.num_kv_heads):
            for f, row, strides, d, sc in ((fk, key[i, h], desc.k, d_k, ks), (fv, value[i, h], desc.v, d_v, vs)):
                addr = blk * strides.block + off * strides.token + h * strides.head \
                    + (d // strides.x) * strides.chunk + d % strides.x
                if desc.kv_cache_dtype != "auto" and row.dtype != desc.cache_dtype:
                    scale = sc.reshape(-1)[h if sc.numel() > 1 else 0]
                    fmax = torch.finfo(desc.cache_dtype).max
                    row = (row.float() / scale).clamp(-fmax, fmax).to(desc.cache_dtype)
                f[addr] = row.view(f.dtype)


WRITE_SHAPES = [(64, 16), (80, 1), (128, 32), (256, 16), (96, 16), (128, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_size,block_size", WRITE_SHAPES)
def test_write_matches_loop(layout, head_size, block_size):
    rng = random.Random(hash((layout, head_size, block_size)) & 0xFFFF)
    heads = rng.choice([1, 2, 4])
    nblocks = max(3, 40 // block_size)
    dv = head_size // 2 if layout == "diffkv" else None
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    kc, vc = make_kv_cache(layout, nblocks, block_size, heads, head_size, dv, dtype=dtype)
    t = rng.randint(0, min(30, nblocks * block_size))
    key = random_fill(torch.empty(t, heads, head_size, dtype=dtype))
    value = random_fill(torch.empty(t, heads, dv or head_size, dtype=dtype))
    slots = random_slots(t, nblocks, block_size, pad_fraction=0.25, dtype=rng.choice([torch.int32, torch.int64]))
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    want_k, want_v = (torch.empty_strided(kc.shape, kc.stride(), dtype=dtype).copy_(kc),
                      torch.empty_strided(vc.shape, vc.stride(), dtype=dtype).copy_(vc))
    _loop_write(key, value, want_k, want_v, slots, kvd.KVCacheDescriptor.from_tensors(want_k, want_v), None, None)
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert desc.num_blocks == nblocks and desc.block_size == block_size


@pytest.mark.parametrize("kind,storage,scale", [
    ("fp8", "e4m3", "tensor"), ("fp8_e4m3", "uint8", "head"), ("fp8_e5m2", "e5m2", "head"),
    ("fp8_e5m2", "uint8", "tensor"), ("fp8", "e4m3fnuz", "tensor")])
@pytest.mark.parametrize("layout", ["NHD", "HND", "head-major"])
def test_fp8_write_matches_loop(kind, storage, scale, layout):
    heads, d, bs, nb, t = 2, 64, 16, 4, 20
    cache_dtype = torch.uint8 if storage == "uint8" else FP8[storage]
    kc, vc = make_kv_cache(layout, nb, bs, heads, d, dtype=cache_dtype)
    key = random_fill(torch.empty(t, heads, d)) * 40  # beyond e4m3's max after scaling: saturates
    value = random_fill(torch.empty(t, heads, d))
    n = heads if scale == "head" else 1
    ks, vs = torch.rand(n) * 0.5 + 0.1, torch.rand(n) * 0.5 + 0.1
    slots = random_slots(t, nb, bs, pad_fraction=0.2)
    want_k = torch.empty_strided(kc.shape, kc.stride(), dtype=cache_dtype).copy_(kc)
    want_v = torch.empty_strided(vc.shape, vc.stride(), dtype=cache_dtype).copy_(vc)
    desc = kvd.KVCacheDescriptor.from_tensors(want_k, want_v, kind, ks, vs)
    _loop_write(key, value, want_k, want_v, slots, desc, ks, vs)
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots, kind, ks, vs)
    assert torch.equal(kc.view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), want_v.view(torch.uint8))
    decoded = kc.view(desc.cache_dtype).float()
    assert torch.isfinite(decoded).all(), "saturating quantization never produces NaN/inf"


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fp8", [None, "fp8"])
def test_mla_write_matches_loop(padded, fp8):
    nb, bs, r, p, t = 5, 16, 64, 16, 30
    cache = make_mla_cache(nb, bs, r, p, dtype=torch.uint8 if fp8 else torch.bfloat16, padded=padded)
    kv_c, k_pe = random_fill(torch.empty(t, r)).bfloat16(), random_fill(torch.empty(t, p)).bfloat16()
    scale = torch.tensor([0.3]) if fp8 else None
    slots = random_slots(t, nb, bs, pad_fraction=0.2)
    want = cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            row = torch.cat([kv_c[i], k_pe[i]])
            if fp8:
                row = (row.float() / 0.3).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
            want[s // bs, s % bs] = row
    with force_backend("reference"):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, slots, fp8 or "auto", scale)
    assert torch.equal(cache, want)


# -- attention ---------------------------------------------------------------------------------
def _loop_attention(q, kseq, vseq, scale, causal, window, softcap, kdesc=None, vdesc=None):
    """One sequence: q [lq, hq, d], k/v [lk, hkv, d] -> [lq, hq, dv], float64, row by row."""
    lq, hq, _ = q.shape
    lk, hkv, dv = vseq.shape
    out = torch.zeros(lq, hq, dv, dtype=torch.float64)
    left, right = window
    if causal:
        right = 0
    for i in range(lq):
        p = i + lk - lq
        for h in range(hq):
            kh = h // (hq // hkv)
            scores, rows = [], []
            for j in range(lk):
                if (right >= 0 and j > p + right) or (left >= 0 and j < p - left):
                    continue
                kf = kseq[j, kh].double() * (1.0 if kdesc is None else kdesc[kh])
                s = float(q[i, h].double() @ kf) * scale
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                scores.append(s)
                rows.append(vseq[j, kh].double() * (1.0 if vdesc is None else vdesc[kh]))
            if scores:
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                tot = sum(w)
                out[i, h] = sum(wi * r for wi, r in zip(w, rows)) / tot
    return out


ATTN_SHAPES = [
    # (q_lens, k_lens, hq, hkv, d, dv, bs)
    ((1, 1, 1, 1), (17, 1, 64, 5), 4, 2, 64, 64, 16),       # decode, GQA
    ((5, 0, 3), (5, 7, 30), 2, 2, 80, 80, 1),                 # prefill + empty + chunked
    ((4, 1), (9, 40), 8, 1, 128, 128, 32),                    # MQA, kv shorter/longer than a block
    ((2, 3), (2, 19), 4, 1, 72, 64, 16),                      # Dv != Dk (MLA-like)
    ((3,), (3,), 2, 1, 256, 256, 16),
]


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("opts", [
    dict(causal=True), dict(causal=False), dict(causal=True, window=(3, 0)), dict(causal=False, window=(2, 1)),
    dict(causal=True, softcap=4.0, scale=0.2), dict(causal=True, layout="HND"), dict(causal=True, fp8="e4m3"),
    dict(causal=False, fp8="e5m2", per_head=True), dict(causal=True, paged=False)])
def test_attention_matches_loop(shape, opts):
    q_lens, k_lens, hq, hkv, d, dv, bs = shape
    layout = "diffkv" if dv != d else opts.get("layout", "NHD")
    fp8 = opts.get("fp8")
    dtype = torch.float32
    cache_dtype = FP8[fp8] if fp8 else dtype
    b = len(q_lens)
    q = random_fill(torch.empty(sum(q_lens), hq, d))
    cu_q = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(b)], dtype=torch.int32)
    scale = opts.get("scale", 1 / math.sqrt(d))
    kdesc = vdesc = None
    kw = {}
    if fp8:
        shp = (b, hkv) if opts.get("per_head") else (1,)
        kw["k_descale"], kw["v_descale"] = torch.rand(shp) + 0.1, torch.rand(shp) + 0.1
    paged = opts.get("paged", True)
    if paged:
        nb = sum((k + bs - 1) // bs for k in k_lens) + 2
        kc, vc = make_kv_cache(layout, nb, bs, hkv, d, dv, dtype=cache_dtype)
        bt = random_block_table(k_lens, nb, bs)
        kw.update(k=kc, v=vc, block_table=bt, seqused_k=torch.tensor(k_lens, dtype=torch.int32))
        seqs = []
        for i, lk in enumerate(k_lens):
            pos = torch.arange(lk)
            blocks = bt[i].long()[pos // bs]
            seqs.append((kc[blocks, pos % bs], vc[blocks, pos % bs]))
    else:
        k = random_fill(torch.empty(sum(k_lens), hkv, d, dtype=cache_dtype))
        v = random_fill(torch.empty(sum(k_lens), hkv, dv, dtype=cache_dtype))
        cu_k = [0] + [sum(k_lens[:i + 1]) for i in range(b)]
        kw.update(k=k, v=v, cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32))
        seqs = [(k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]) for i in range(b)]
    out = torch.full((sum(q_lens), hq, dv), float("nan"))
    with force_backend("reference"):
        got = kvd.flash_attn_varlen_func(q, max_seqlen_q=max(q_lens), cu_seqlens_q=cu_q, max_seqlen_k=max(k_lens),
                                         softmax_scale=opts.get("scale"), causal=opts["causal"],
                                         window_size=opts.get("window", (-1, -1)), softcap=opts.get("softcap", 0.0),
                                         out=out, **kw)
    assert got is out
    for i in range(b):
        q0, q1 = int(cu_q[i]), int(cu_q[i + 1])
        if fp8:
            kd = kw["k_descale"].reshape(-1) if kw["k_descale"].numel() == 1 else kw["k_descale"][i]
            vd = kw["v_descale"].reshape(-1) if kw["v_descale"].numel() == 1 else kw["v_descale"][i]
            kdesc = [float(kd[h if kd.numel() > 1 else 0]) for h in range(hkv)]
            vdesc = [float(vd[h if vd.numel() > 1 else 0]) for h in range(hkv)]
        want = _loop_attention(q[q0:q1], *seqs[i], scale, opts["causal"], opts.get("window", (-1, -1)),
                               opts.get("softcap", 0.0), kdesc, vdesc)
        torch.testing.assert_close(got[q0:q1].double(), want, atol=2e-5, rtol=2e-5)
    assert not torch.isnan(got).any()
