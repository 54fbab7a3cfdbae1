"""``kvdispatch check``: each op on a device through the backend selection picks, against the
reference on CPU copies of the same inputs."""

from __future__ import annotations

import time

import torch

from .ops import concat_and_cache_mla, flash_attn_varlen_func, reshape_and_cache_flash
from .platform import platform_of
from .registry import registry
from .testing import force_backend, make_kv_cache, make_mla_cache, random_block_table, random_fill, random_slots


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu":
        torch.xpu.synchronize(dev)


def _base(t):
    return t if t._base is None else t._base


def _to(t, dev):
    """Copy a view to ``dev`` keeping its strides and its base's other contents."""
    if t is None:
        return None
    b = _base(t)
    nb = b.to(dev)
    return nb.as_strided(t.shape, t.stride(), t.storage_offset())


def _write_case(dev, layout, kv_cache_dtype, scale, heads=4, d=128, bs=16, nb=32, t=200, dtype=torch.bfloat16):
    storage = torch.uint8 if kv_cache_dtype != "auto" else dtype
    kc, vc = make_kv_cache(layout, nb, bs, heads, d, dtype=storage)
    key = random_fill(torch.empty(t, heads, d, dtype=dtype))
    value = random_fill(torch.empty(t, heads, d, dtype=dtype))
    slots = random_slots(t, nb, bs, pad_fraction=0.1)
    n = heads if scale == "head" else 1
    ks = vs = None
    if kv_cache_dtype != "auto":
        ks, vs = torch.rand(n) * 0.2 + 0.05, torch.rand(n) * 0.2 + 0.05
    rk_base = _base(kc).clone()
    rv_base = rk_base if _base(vc) is _base(kc) else _base(vc).clone()
    ref_k = rk_base.as_strided(kc.shape, kc.stride(), kc.storage_offset())
    ref_v = rv_base.as_strided(vc.shape, vc.stride(), vc.storage_offset())
    with force_backend("reference"):
        reshape_and_cache_flash(key, value, ref_k, ref_v, slots, kv_cache_dtype, ks, vs)
    dk_base = _base(kc).to(dev)
    dv_base = dk_base if _base(vc) is _base(kc) else _base(vc).to(dev)
    dk = dk_base.as_strided(kc.shape, kc.stride(), kc.storage_offset())
    dvv = dv_base.as_strided(vc.shape, vc.stride(), vc.storage_offset())
    args = (key.to(dev), value.to(dev), dk, dvv, slots.to(dev), kv_cache_dtype,
            None if ks is None else ks.to(dev), None if vs is None else vs.to(dev))
    backend = registry.select("reshape_and_cache_flash", platform_of(dev),
                              _desc(dk, dvv, kv_cache_dtype, args[6], args[7])).name
    t0 = time.perf_counter()
    reshape_and_cache_flash(*args)
    _sync(dev)
    sec = time.perf_counter() - t0
    fp8 = kv_cache_dtype != "auto"
    err = max(_cache_err(dk_base.cpu(), rk_base, fp8), _cache_err(dv_base.cpu(), rv_base, fp8))
    tol = 0.13 if fp8 else 0.0  # fp8: one rounding step is at most 1/8 relative (e4m3)
    return backend, err, err <= tol, sec


def _desc(k, v, kind, ks, vs):
    from .descriptor import KVCacheDescriptor
    return KVCacheDescriptor.from_tensors(k, v, kind, ks, vs)


def _cache_err(got, want, fp8):
    if fp8:
        g = got.view(torch.float8_e4m3fn).float()
        w = want.view(torch.float8_e4m3fn).float()
        return float(((g - w).abs() / w.abs().clamp_min(1e-2)).max()) if g.numel() else 0.0
    return float((got.float() - want.float()).abs().max()) if got.numel() else 0.0


def _mla_case(dev, kv_cache_dtype):
    nb, bs, t = 16, 16, 100
    cache = make_mla_cache(nb, bs, dtype=torch.uint8 if kv_cache_dtype != "auto" else torch.bfloat16)
    kv_c = random_fill(torch.empty(t, 512, dtype=torch.bfloat16))
    k_pe = random_fill(torch.empty(t, 64, dtype=torch.bfloat16))
    slots = random_slots(t, nb, bs)
    scale = torch.tensor([0.1]) if kv_cache_dtype != "auto" else None
    ref = cache.clone()
    with force_backend("reference"):
        concat_and_cache_mla(kv_c, k_pe, ref, slots, kv_cache_dtype, scale)
    dc = cache.to(dev)
    args = (kv_c.to(dev), k_pe.to(dev), dc, slots.to(dev), kv_cache_dtype, None if scale is None else scale.to(dev))
    backend = registry.select("concat_and_cache_mla", platform_of(dev), _desc(dc, None, kv_cache_dtype, args[5], None)).name
    t0 = time.perf_counter()
    concat_and_cache_mla(*args)
    _sync(dev)
    sec = time.perf_counter() - t0
    fp8 = kv_cache_dtype != "auto"
    err = _cache_err(dc.cpu(), ref, fp8)
    return backend, err, err <= (0.13 if fp8 else 0.0), sec


def _attn_case(dev, q_lens, k_lens, causal=True, window=(-1, -1), softcap=0.0, fp8=False, layout="NHD",
               hq=8, hkv=2, d=128, bs=16):
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    nb = sum((k + bs - 1) // bs for k in k_lens) + 4
    kc, vc = make_kv_cache(layout, nb, bs, hkv, d, dtype=cache_dtype)
    q = random_fill(torch.empty(sum(q_lens), hq, d, dtype=torch.bfloat16))
    cu_q = torch.tensor([0] + [sum(q_lens[:i + 1]) for i in range(len(q_lens))], dtype=torch.int32)
    bt = random_block_table(k_lens, nb, bs)
    used = torch.tensor(k_lens, dtype=torch.int32)
    kd = vd = None
    if fp8:
        kd, vd = torch.rand(len(k_lens), hkv) * 0.1 + 0.05, torch.rand(len(k_lens), hkv) * 0.1 + 0.05
    kw = dict(max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens), causal=causal, window_size=window, softcap=softcap)
    with force_backend("reference"):
        want = flash_attn_varlen_func(q.float() if not fp8 else q, kc.float() if not fp8 else kc,
                                      vc.float() if not fp8 else vc, cu_seqlens_q=cu_q, seqused_k=used,
                                      block_table=bt, k_descale=kd, v_descale=vd,
                                      out=torch.empty(q.shape[0], hq, d), **kw)
    dq, dk, dv = q.to(dev), _to(kc, dev), _to(vc, dev)
    out = torch.full((q.shape[0], hq, d), float("nan"), dtype=torch.bfloat16, device=dev)
    backend = registry.select("flash_attn_varlen_func", platform_of(dev), _desc(dk, dv, "auto", None, None)).name
    t0 = time.perf_counter()
    flash_attn_varlen_func(dq, dk, dv, cu_seqlens_q=cu_q.to(dev), seqused_k=used.to(dev), block_table=bt.to(dev),
                           k_descale=None if kd is None else kd.to(dev), v_descale=None if vd is None else vd.to(dev),
                           out=out, **kw)
    _sync(dev)
    sec = time.perf_counter() - t0
    got = out.float().cpu()
    if torch.isnan(got).any():
        return backend, float("nan"), False, sec
    rel = float((got - want).norm() / want.norm().clamp_min(1e-6))
    return backend, float((got - want).abs().max()), rel < 2e-2, sec


def run_checks(dev: torch.device, quick: bool = False) -> list:
    torch.manual_seed(0)
    cases = [
        ("reshape_and_cache_flash", "NHD bf16", lambda: _write_case(dev, "NHD", "auto", None)),
        ("reshape_and_cache_flash", "HND bf16", lambda: _write_case(dev, "HND", "auto", None)),
        ("reshape_and_cache_flash", "combined fp8 per-head", lambda: _write_case(dev, "combined", "fp8", "head")),
        ("reshape_and_cache_flash", "head-major bf16", lambda: _write_case(dev, "head-major", "auto", None)),
        ("concat_and_cache_mla", "512+64 bf16", lambda: _mla_case(dev, "auto")),
        ("concat_and_cache_mla", "512+64 fp8", lambda: _mla_case(dev, "fp8")),
        ("flash_attn_varlen_func", "decode GQA 8/2", lambda: _attn_case(dev, (1,) * 4, (40, 300, 17, 129))),
        ("flash_attn_varlen_func", "prefill causal", lambda: _attn_case(dev, (60, 33), (60, 33))),
        ("flash_attn_varlen_func", "chunked window+softcap HND",
         lambda: _attn_case(dev, (1, 20, 7), (50, 90, 7), window=(32, 0), softcap=30.0, layout="HND")),
        ("flash_attn_varlen_func", "decode fp8", lambda: _attn_case(dev, (1,) * 3, (100, 31, 260), fp8=True)),
    ]
    if quick:
        cases = cases[::2]
    results = []
    for op, name, fn in cases:
        try:
            backend, err, ok, sec = fn()
            results.append(dict(op=op, case=name, backend=backend, ok=ok, max_err=err, seconds=sec,
                                error="" if ok else "mismatch"))
        except Exception as e:  # report, don't stop: the table shows every op
            results.append(dict(op=op, case=name, backend="?", ok=False, max_err=None, seconds=0.0,
                                error=f"{type(e).__name__}: {e}"))
    return results
