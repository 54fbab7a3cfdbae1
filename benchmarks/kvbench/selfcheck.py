"""``kvdispatch check``: each op on a device through the backend selection picks, against the
reference on CPU copies of the same inputs, compared the one way every check compares
(``compare.py``: whole cache buffers, fp8 within one rounding step; attention by relative error)."""

from __future__ import annotations

import time

import torch

from kvdispatch import KVCacheDescriptor, concat_and_cache_mla, flash_attn_varlen_func, reshape_and_cache_flash
from kvdispatch.platform import platform_of
from kvdispatch.registry import registry

from .compare import attention_mismatch, bases, caches_mismatch, clone_views, force_backend, max_abs_error
from .layouts import make_kv_cache, make_mla_cache, random_block_table, random_fill, random_slots
from .timing import sync

# the fp8 caches here are uint8 views written with kv_cache_dtype "fp8": e4m3 codes
FP8_CODES = torch.float8_e4m3fn


def _to(t, dev):
    return None if t is None else t.to(dev)


def _selected(op, dev, *desc_args) -> str:
    return registry.select(op, platform_of(dev), KVCacheDescriptor.from_tensors(*desc_args)).name


def _timed(dev, fn) -> float:
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def _cache_result(got_views, want_views, fp8):
    """(why not, max |err|) of the op's caches on the device against the reference's on the CPU."""
    why = caches_mismatch(got_views, want_views, fp8, FP8_CODES)
    err = max(max_abs_error(g.cpu(), w, FP8_CODES) for g, w in zip(bases(*got_views), bases(*want_views)))
    return why, err


def _write_case(dev, layout, kv_cache_dtype, scale, heads=4, d=128, bs=16, nb=32, t=200, dtype=torch.bfloat16):
    fp8 = kv_cache_dtype != "auto"
    kc, vc = make_kv_cache(layout, nb, bs, heads, d, dtype=torch.uint8 if fp8 else dtype)
    key = random_fill(torch.empty(t, heads, d, dtype=dtype))
    value = random_fill(torch.empty(t, heads, d, dtype=dtype))
    slots = random_slots(t, nb, bs, pad_fraction=0.1)
    n = heads if scale == "head" else 1
    ks = vs = None
    if fp8:
        ks, vs = torch.rand(n) * 0.2 + 0.05, torch.rand(n) * 0.2 + 0.05
    ref_k, ref_v = clone_views(kc, vc)
    with force_backend("reference"):
        reshape_and_cache_flash(key, value, ref_k, ref_v, slots, kv_cache_dtype, ks, vs)
    dk, dv = clone_views(kc, vc, device=dev)
    args = (key.to(dev), value.to(dev), dk, dv, slots.to(dev), kv_cache_dtype, _to(ks, dev), _to(vs, dev))
    backend = _selected("reshape_and_cache_flash", dev, dk, dv, kv_cache_dtype, args[6], args[7])
    sec = _timed(dev, lambda: reshape_and_cache_flash(*args))
    return (backend, *_cache_result([dk, dv], [ref_k, ref_v], fp8), sec)


def _mla_case(dev, kv_cache_dtype):
    nb, bs, t = 16, 16, 100
    fp8 = kv_cache_dtype != "auto"
    cache = make_mla_cache(nb, bs, dtype=torch.uint8 if fp8 else torch.bfloat16)
    kv_c = random_fill(torch.empty(t, 512, dtype=torch.bfloat16))
    k_pe = random_fill(torch.empty(t, 64, dtype=torch.bfloat16))
    slots = random_slots(t, nb, bs)
    scale = torch.tensor([0.1]) if fp8 else None
    (ref,) = clone_views(cache)
    with force_backend("reference"):
        concat_and_cache_mla(kv_c, k_pe, ref, slots, kv_cache_dtype, scale)
    (dc,) = clone_views(cache, device=dev)
    args = (kv_c.to(dev), k_pe.to(dev), dc, slots.to(dev), kv_cache_dtype, _to(scale, dev))
    backend = _selected("concat_and_cache_mla", dev, dc, None, kv_cache_dtype, args[5], None)
    sec = _timed(dev, lambda: concat_and_cache_mla(*args))
    return (backend, *_cache_result([dc], [ref], fp8), sec)


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
    dk, dv = clone_views(kc, vc, device=dev)
    out = torch.full((q.shape[0], hq, d), float("nan"), dtype=torch.bfloat16, device=dev)
    backend = _selected("flash_attn_varlen_func", dev, dk, dv)
    sec = _timed(dev, lambda: flash_attn_varlen_func(
        q.to(dev), dk, dv, cu_seqlens_q=cu_q.to(dev), seqused_k=used.to(dev), block_table=bt.to(dev),
        k_descale=_to(kd, dev), v_descale=_to(vd, dev), out=out, **kw))
    got = out.float().cpu()
    why, _ = attention_mismatch(got, want, 2e-2)
    return backend, why, max_abs_error(got, want), sec


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
            backend, why, err, sec = fn()
            results.append(dict(op=op, case=name, backend=backend, ok=why is None, max_err=err, seconds=sec,
                                error=why or ""))
        except Exception as e:  # report, don't stop: the table shows every op
            results.append(dict(op=op, case=name, backend="?", ok=False, max_err=None, seconds=0.0,
                                error=f"{type(e).__name__}: {e}"))
    return results


def main(args) -> int:
    """Print the check's table; exit status 1 when any op failed."""
    from .info import table

    from .suite import default_device

    dev = torch.device(args.device) if args.device else default_device()
    print(f"checking every op on {dev} ({platform_of(dev)}) against the reference on cpu")
    rows, failed = [], 0
    for r in run_checks(dev, quick=args.quick):
        failed += not r["ok"]
        rows.append((r["op"], r["case"], r["backend"], "pass" if r["ok"] else f"FAIL {r['error']}",
                     f"{r['max_err']:.3g}" if r["max_err"] is not None else "-", f"{r['seconds'] * 1e3:.1f} ms"))
    print(table(None, ("op", "case", "backend", "result", "max |err|", "time"), rows))
    print("all passed" if not failed else f"{failed} failed")
    return 1 if failed else 0
