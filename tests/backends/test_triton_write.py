"""The Triton write kernels against the reference, through ``TRITON_INTERPRET=1`` on CPU tensors
(on a GPU machine the same tests run the compiled kernels on CUDA tensors).

The shared matrix (tests/matrix.py) covers every layout x dtype x fp8 option; the cases here add
what is specific to this backend: head sizes and block sizes across the claimed range on the
strided layouts, the merged-row and per-head-row variants, the int64-offset path, mixed scale
kinds, and an exhaustive check that the integer fp8 encoder rounds exactly like torch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvbench.layouts import make_kv_cache, random_slots
from kvdispatch.backends.triton import write
from kvdispatch.backends.triton.write_configs import INTERPRETER

from matrix import (FP8, MLACase, WriteCase, assert_cache_equal, force_backend, mla_cases,
                    run_mla_case, run_write_case, write_cases)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpret if DEVICE == "cpu" else pytest.mark.gpu


@pytest.mark.parametrize("case", write_cases(), ids=lambda c: c.id)
def test_matrix_write(case):
    run_write_case(case, "triton", device=DEVICE)


@pytest.mark.parametrize("case", mla_cases(), ids=lambda c: c.id)
def test_matrix_mla(case):
    run_mla_case(case, "triton", device=DEVICE)


_B = WriteCase(num_tokens=12, num_blocks=4)
EXTRA = [
    # head sizes 64..256 (non powers of two too) on the non-contiguous layouts
    replace(_B, layout="HND", head_size=80, dtype=torch.float16),
    replace(_B, layout="combined-HND", head_size=112),
    replace(_B, layout="cross-layer", head_size=96, slot_dtype=torch.int32),
    replace(_B, layout="HND", head_size=192, num_heads=3),
    replace(_B, layout="combined", head_size=256, num_heads=1),
    replace(_B, layout="head-major", head_size=80, dtype=torch.float16),
    replace(_B, layout="head-major", head_size=96, dtype=torch.float32, block_size=8),
    replace(_B, layout="diffkv", head_size=192, head_size_v=128),
    replace(_B, layout="diffkv", head_size=80, head_size_v=112, extra_rows=3),
    # block sizes 1..256, including a non-power-of-two one
    replace(_B, layout="NHD", block_size=1, num_blocks=20),
    replace(_B, layout="HND", block_size=3, num_blocks=6),
    replace(_B, layout="head-major", block_size=1, num_blocks=20),
    replace(_B, layout="combined", block_size=256, num_blocks=1, num_tokens=40),
    replace(_B, layout="HND", block_size=256, num_blocks=1, num_tokens=40, slot_dtype=torch.int32),
    # fp8 on more layouts / types: e5m2 and fnuz per head, uint8 views of HND and head-major
    replace(_B, layout="HND", kv_cache_dtype="fp8_e5m2", fp8_storage="e5m2", scale="head"),
    replace(_B, layout="head-major", kv_cache_dtype="fp8", fp8_storage="uint8", head_size=128),
    replace(_B, layout="combined-HND", kv_cache_dtype="fp8", fp8_storage="e4m3fnuz", scale="head",
            dtype=torch.float32),
    replace(_B, layout="diffkv", kv_cache_dtype="fp8", head_size=96, head_size_v=64, scale="head"),
    replace(_B, layout="cross-layer", kv_cache_dtype="fp8_e5m2", fp8_storage="e5m2", input_fp8=True),
    replace(_B, layout="HND", kv_cache_dtype="auto", dtype=torch.float8_e5m2),
]


@pytest.mark.parametrize("case", EXTRA, ids=lambda c: c.id)
def test_extra_write(case):
    run_write_case(case, "triton", device=DEVICE, seed=1)


@pytest.mark.parametrize("case", [replace(MLACase(), kv_lora_rank=96, rope_dim=32, block_size=3, num_blocks=9),
                                  replace(MLACase(), kv_cache_dtype="fp8", fp8_storage="e4m3fnuz"),
                                  replace(MLACase(), dtype=torch.float32, kv_cache_dtype="fp8_e5m2",
                                          fp8_storage="e5m2", padded=True)],
                         ids=lambda c: c.id)
def test_extra_mla(case):
    run_mla_case(case, "triton", device=DEVICE, seed=2)


def _write_both(layout, h=4, d=64, bs=16, nb=6, t=30, dtype=torch.bfloat16, config=None, **over):
    """Run write.reshape_and_cache_flash directly with ``config`` (or the platform's entry) and the
    WriteConfig fields ``over`` as the table's answer; compare with the reference."""
    gen = torch.Generator().manual_seed(3)
    kc, vc = make_kv_cache(layout, nb, bs, h, d, dtype=dtype, device=DEVICE)
    key = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(t, h, d, generator=gen).to(dtype).to(DEVICE)
    slots = random_slots(t, nb, bs, device=DEVICE, pad_fraction=0.25, generator=gen)
    rk, rv = kc.clone(), vc.clone()
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, rk, rv, slots)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    with pytest.MonkeyPatch.context() as mp:
        if config is not None or over:
            cfg = (config or write.config_for(desc.platform, write._interpreting())).with_(**over)
            mp.setattr(write, "config_for", lambda *a, **k: cfg)
        write.reshape_and_cache_flash(key, value, kc, vc, slots, desc)
        assert_cache_equal(kc.cpu(), rk.cpu(), False, f"{layout} key")
        assert_cache_equal(vc.cpu(), rv.cpu(), False, f"{layout} value")
        return write.plan_for(key, value, kc, vc, slots, desc)


@pytest.mark.parametrize("layout,mergeable", [("NHD", True), ("combined", True), ("cross-layer", True),
                                              ("HND", False), ("diffkv", False), ("head-major", False)])
def test_merged_rows_where_heads_are_contiguous(layout, mergeable):
    plan = _write_both(layout)
    assert plan.constexprs["MERGED"] is mergeable, plan
    if mergeable:  # the per-head-row variant is correct too
        plan = _write_both(layout, merge=False)
        assert plan.constexprs["MERGED"] is False


@pytest.mark.parametrize("layout", ["NHD", "HND", "head-major"])
def test_int64_offsets_path(layout):
    plan = _write_both(layout, offsets64=True)
    assert plan.constexprs["OFF64"] is True
    assert _write_both(layout).constexprs["OFF64"] is False


@pytest.mark.parametrize("kv_cache_dtype,bs,slot_dtype", [("auto", 16, torch.int64), ("fp8", 16, torch.int64),
                                                          ("auto", 32, torch.int32)])
@pytest.mark.parametrize("slots_kind", ["aligned", "unaligned", "padded", "two_sequences", "blocks"])
def test_head_major_prefill_slots(slots_kind, kv_cache_dtype, bs, slot_dtype):
    """Head-major caches with prefill-like slot mappings (consecutive slots aligned to blocks,
    starting mid-block, with padding, two sequences, runs in shuffled blocks: the kernel's tile path
    and its row path) against the reference, fp8 quantizing included."""
    gen = torch.Generator().manual_seed(7)
    h, d, nb = 4, 64, 192 // bs
    dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.bfloat16
    kc, vc = make_kv_cache("head-major", nb, bs, h, d, dtype=dtype, device=DEVICE)
    slots = {"aligned": torch.arange(16, 16 + 80), "unaligned": torch.arange(5, 5 + 77),
             "padded": torch.cat([torch.arange(32, 60), torch.tensor([-1, -1]), torch.arange(60, 90)]),
             "two_sequences": torch.cat([torch.arange(3, 40), torch.arange(96, 140)]),
             "blocks": (torch.randperm(nb, generator=gen)[:5, None] * bs + torch.arange(bs)).flatten()[:-3]}[slots_kind]
    slots = slots.to(slot_dtype).to(DEVICE)
    t = slots.shape[0]
    key = (torch.randn(t, h, d, generator=gen) * 2).bfloat16().to(DEVICE)
    value = (torch.randn(t, h, d, generator=gen) * 2).bfloat16().to(DEVICE)
    scale = torch.tensor([0.5], device=DEVICE) if kv_cache_dtype == "fp8" else None
    rk, rv = kc.clone(), vc.clone()
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, rk, rv, slots, kv_cache_dtype, scale, scale)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc, kv_cache_dtype, scale, scale)
    write.reshape_and_cache_flash(key, value, kc, vc, slots, desc)
    exact = kv_cache_dtype == "auto"
    assert_cache_equal(kc.cpu(), rk.cpu(), not exact, "head-major key")
    assert_cache_equal(vc.cpu(), rv.cpu(), not exact, "head-major value")


def test_streaming_variant_and_small_tiles():
    cfg = INTERPRETER.with_(streaming=True, tile_bytes=128)
    plan = _write_both("HND", config=cfg)
    assert plan.constexprs["STREAMING"] is True and plan.rows == 1


def test_mixed_scale_kinds():
    """k_scale per head with v_scale per tensor (and the reverse) on a merged-row cache."""
    gen = torch.Generator().manual_seed(4)
    h, d = 4, 64
    for ks_n, vs_n in ((h, 1), (1, h)):
        kc, vc = make_kv_cache("NHD", 4, 16, h, d, dtype=torch.float8_e4m3fn, device=DEVICE)
        key = (torch.randn(20, h, d, generator=gen) * 3).bfloat16().to(DEVICE)
        value = (torch.randn(20, h, d, generator=gen) * 3).bfloat16().to(DEVICE)
        slots = random_slots(20, 4, 16, device=DEVICE, pad_fraction=0.2, generator=gen)
        k_scale = (torch.rand(ks_n, generator=gen) + 0.1).to(DEVICE)
        v_scale = (torch.rand(vs_n, generator=gen) + 0.1).to(DEVICE)
        rk, rv = kc.clone(), vc.clone()
        with force_backend("reference"):
            kvd.reshape_and_cache_flash(key, value, rk, rv, slots, "fp8", k_scale, v_scale)
        with force_backend("triton"):
            kvd.reshape_and_cache_flash(key, value, kc, vc, slots, "fp8", k_scale, v_scale)
        assert_cache_equal(kc.cpu(), rk.cpu(), True, "key")
        assert_cache_equal(vc.cpu(), rv.cpu(), True, "value")


def _fp8_probe_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite code of ``dtype``, the midpoints between neighbours (ties), one float32 ulp
    either side of each midpoint, values past the largest finite one, and random values."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    finite = codes[torch.isfinite(codes)].unique().sort().values
    mids = (finite[1:] + finite[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    down = torch.nextafter(mids, torch.full_like(mids, float("-inf")))
    fmax = torch.finfo(dtype).max
    big = torch.tensor([fmax * 1.01, fmax * 2, 1e30, 3.0e38, -fmax * 1.5, -1e30])
    tiny = torch.tensor([1e-30, -1e-30, 1e-12, -1e-12, 0.0, -0.0])
    rnd = torch.randn(4096, generator=torch.Generator().manual_seed(5)) * fmax / 8
    return torch.cat([finite, mids, up, down, big, tiny, rnd])


@pytest.mark.parametrize("storage", ["e4m3", "e5m2", "e4m3fnuz"])
def test_fp8_conversion_probes(storage):
    """Every finite code, every tie and its neighbours, saturation, tiny values: the integer
    encoder (the interpreter's, and any platform without a hardware conversion) rounds exactly
    like torch; the hardware paths (GPU) within one step.
    Never NaN."""
    dtype = FP8[storage]
    vals = _fp8_probe_values(dtype)
    d = 64
    vals = torch.cat([vals, vals[: (-vals.numel()) % d]])
    t = vals.numel() // d
    key = vals.reshape(t, 1, d).to(DEVICE)
    value = (-vals).reshape(t, 1, d).to(DEVICE)
    kind = "fp8_e5m2" if storage == "e5m2" else "fp8_e4m3"
    kc, vc = make_kv_cache("NHD", t, 1, 1, d, dtype=dtype, device=DEVICE)
    slots = torch.arange(t, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    rk, rv = kc.clone(), vc.clone()
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, rk, rv, slots, kind, one, one)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc, kind, one, one)
    plan = write.plan_for(key, value, kc, vc, slots, desc)
    with force_backend("triton"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots, kind, one, one)
    for got, want, what in ((kc, rk, "key"), (vc, rv, "value")):
        assert not torch.isnan(got.cpu().float()).any(), f"{storage} {what}: NaN stored"
        if plan.quant != write.SOFT_FP8:
            assert_cache_equal(got.cpu(), want.cpu(), True, f"{storage} {what} (quant mode {plan.quant})")
            continue
        g, w = got.cpu().view(torch.uint8), want.cpu().view(torch.uint8)
        bad = (g != w).nonzero()  # [block, token, head, dim]; block = token index, bs = 1
        inputs = (vals if what == "key" else -vals)[bad[:4, 0] * d + bad[:4, 3]]
        assert bad.numel() == 0, f"{storage} {what}: {bad.shape[0]} codes differ, first inputs {inputs.tolist()}"


def test_supports_declines_what_it_cannot_address():
    kc, vc = make_kv_cache("NHD", 2, 16, 2, 64, dtype=torch.bfloat16)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    plat = desc.platform
    assert write.supports("reshape_and_cache_flash", desc, plat) is None
    assert write.supports("reshape_and_cache_flash", None, plat) is None
    assert "MLA" in write.supports("concat_and_cache_mla", desc, plat)
    ki, vi = torch.zeros(2, 16, 2, 64, dtype=torch.int16), torch.zeros(2, 16, 2, 64, dtype=torch.int16)
    assert "int16" in write.supports("reshape_and_cache_flash", kvd.KVCacheDescriptor.from_tensors(ki, vi), plat)
