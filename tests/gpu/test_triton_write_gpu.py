"""The Triton write kernels on a real GPU at real sizes (marker ``gpu``; skipped without one).

Run on the GPU machine: ``python -m pytest -m gpu tests/gpu/test_triton_write_gpu.py``.
Every case compares the WHOLE cache buffers against the reference backend run on copies.
Each matrix case runs twice with fresh data: the second call takes the cached direct-launch
path (compiled kernel + raw pointers), which must write exactly what the first path writes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch.backends.triton import write
from kvbench.layouts import make_kv_cache, make_mla_cache, random_slots

from matrix import (MLACase, WriteCase, assert_cache_equal, force_backend, mla_cases, run_mla_case,
                    run_write_case, write_cases)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("case", write_cases(big=True), ids=lambda c: c.id)
def test_matrix_write_big(case):
    run_write_case(case, "triton", device=DEV, seed=0)
    run_write_case(case, "triton", device=DEV, seed=1)  # cached plan: direct launch


@pytest.mark.parametrize("case", mla_cases(big=True), ids=lambda c: c.id)
def test_matrix_mla_big(case):
    run_mla_case(case, "triton", device=DEV, seed=0)
    run_mla_case(case, "triton", device=DEV, seed=1)


_SIZES = WriteCase(num_heads=8, num_tokens=3000, num_blocks=400, pad_fraction=0.05)


@pytest.mark.parametrize("head_size", [64, 80, 96, 112, 128, 192, 256])
@pytest.mark.parametrize("layout", ["NHD", "HND", "combined-HND", "head-major"])
def test_head_sizes(layout, head_size):
    run_write_case(replace(_SIZES, layout=layout, head_size=head_size), "triton", device=DEV)


@pytest.mark.parametrize("block_size", [1, 2, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("layout", ["NHD", "HND", "head-major"])
def test_block_sizes(layout, block_size):
    case = replace(_SIZES, layout=layout, head_size=128, block_size=block_size,
                   num_blocks=max(6000 // block_size, 12))
    run_write_case(case, "triton", device=DEV)


@pytest.mark.parametrize("kind,storage,scale", [("fp8", "e4m3", "tensor"), ("fp8", "e4m3", "head"),
                                                ("fp8_e5m2", "e5m2", "head"), ("fp8", "uint8", "tensor"),
                                                ("fp8", "e4m3fnuz", "head")])
@pytest.mark.parametrize("layout", ["NHD", "HND", "cross-layer", "head-major"])
def test_fp8_big(layout, kind, storage, scale):
    case = replace(_SIZES, layout=layout, head_size=128, kv_cache_dtype=kind, fp8_storage=storage,
                   scale=scale)
    run_write_case(case, "triton", device=DEV)
    run_write_case(case, "triton", device=DEV, seed=3)


def test_fp8_conversion_modes_on_this_gpu():
    """Which conversion each fp8 type gets here (the probes in test_triton_write.py check each)."""
    kc, vc = make_kv_cache("NHD", 4, 16, 2, 64, dtype=torch.uint8, device=DEV)
    key = torch.randn(8, 2, 64, device=DEV).bfloat16()
    slots = torch.arange(8, device=DEV)
    one = torch.ones(1, device=DEV)
    cap = torch.cuda.get_device_capability()
    modes = {}
    for kind in ("fp8_e4m3", "fp8_e5m2"):
        desc = kvd.KVCacheDescriptor.from_tensors(kc, vc, kind, one, one)
        modes[kind] = write.plan_for(key, key, kc, vc, slots, desc).quant
    fnuz = make_kv_cache("NHD", 4, 16, 2, 64, dtype=torch.float8_e4m3fnuz, device=DEV)
    desc = kvd.KVCacheDescriptor.from_tensors(*fnuz, "fp8", one, one)
    modes["fnuz"] = write.plan_for(key, key, *fnuz, slots, desc).quant
    if kvd.platform_of(kc).is_nvidia and cap >= (8, 9):
        # NVIDIA has no e4m3fnuz conversion: the exact integer encoder serves it
        assert modes == {"fp8_e4m3": write.NATIVE_FP8, "fp8_e5m2": write.NATIVE_FP8,
                         "fnuz": write.SOFT_FP8}, modes


def _fill_bits(t: torch.Tensor) -> torch.Tensor:
    """Random bit patterns, generated on the GPU (a CPU fill of several GB takes too long)."""
    t.view(torch.int16).random_(-(2**15), 2**15)
    return t


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_int64_offsets_cache_over_2_31_elements(layout):
    """A cache of more than 2**31 elements: slots in its last blocks need int64 offsets."""
    h, d, bs = 8, 128, 16
    per_block = h * d * bs
    nb = (2**31) // per_block + 64  # 131136 blocks: 2**31 + 1M elements, 4.3 GB per cache
    free, _ = torch.cuda.mem_get_info()
    need = 4 * nb * per_block * 2
    if free < need * 1.1:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB available")
    kc, vc = make_kv_cache(layout, nb, bs, h, d, dtype=torch.bfloat16, device=DEV, fill=False)
    for t in (kc, vc):
        _fill_bits(t if t._base is None else t._base)
    assert kc.numel() > 2**31
    n = 4096
    gen = torch.Generator().manual_seed(7)
    # most tokens in the blocks past 2**31 elements, some anywhere, some padding
    tail = nb * bs - 64 * bs * 4
    slots = torch.cat([tail + torch.randperm(64 * bs * 4, generator=gen)[: n // 2],
                       torch.randperm(tail, generator=gen)[: n - n // 2]])
    slots[torch.rand(n, generator=gen) < 0.05] = -1
    slots = slots.to(DEV)
    key = torch.randn(n, h, d, device=DEV, dtype=torch.bfloat16)
    value = torch.randn(n, h, d, device=DEV, dtype=torch.bfloat16)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    assert not desc.int32_offsets
    assert write.plan_for(key, value, kc, vc, slots, desc).constexprs["OFF64"] is True
    base_k = (kc if kc._base is None else kc._base)
    base_v = (vc if vc._base is None else vc._base)
    ref_k, ref_v = base_k.clone(), base_v.clone()
    rk = ref_k.as_strided(kc.shape, kc.stride(), kc.storage_offset())
    rv = ref_v.as_strided(vc.shape, vc.stride(), vc.storage_offset())
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, rk, rv, slots)
    with force_backend("triton"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
    torch.cuda.synchronize()
    assert torch.equal(base_k.view(torch.int16), ref_k.view(torch.int16)), "key cache differs"
    assert torch.equal(base_v.view(torch.int16), ref_v.view(torch.int16)), "value cache differs"
    del ref_k, ref_v, kc, vc, base_k, base_v, rk, rv
    torch.cuda.empty_cache()


def _write_args(layout="NHD", fp8=False, n=64, h=8, d=128):
    kc, vc = make_kv_cache(layout, 32, 16, h, d, dtype=torch.uint8 if fp8 else torch.bfloat16, device=DEV)
    key = torch.randn(n, h, d, device=DEV).bfloat16()
    value = torch.randn(n, h, d, device=DEV).bfloat16()
    slots = random_slots(n, 32, 16, device=DEV, pad_fraction=0.1)
    scales = (torch.full((1,), 0.5, device=DEV), torch.rand(h, device=DEV) + 0.5) if fp8 else (None, None)
    return key, value, kc, vc, slots, "fp8" if fp8 else "auto", *scales


@pytest.mark.parametrize("layout,fp8", [("NHD", False), ("HND", False), ("head-major", False), ("NHD", True)])
def test_opcheck_cuda(layout, fp8):
    with force_backend("triton"):
        torch.library.opcheck(torch.ops.kvdispatch.reshape_and_cache_flash.default, _write_args(layout, fp8))


def test_opcheck_mla_cuda():
    cache = make_mla_cache(8, 16, 512, 64, device=DEV)
    args = (torch.randn(40, 512, device=DEV).bfloat16(), torch.randn(40, 64, device=DEV).bfloat16(), cache,
            random_slots(40, 8, 16, device=DEV), "auto", None)
    with force_backend("triton"):
        torch.library.opcheck(torch.ops.kvdispatch.concat_and_cache_mla.default, args)


def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    key, value, kc, vc, slots, _, _, _ = _write_args("HND")
    mla = make_mla_cache(8, 16, 512, 64, device=DEV)
    kv_c = torch.randn(40, 512, device=DEV).bfloat16()
    k_pe = torch.randn(40, 64, device=DEV).bfloat16()
    mla_slots = random_slots(40, 8, 16, device=DEV)

    def step(key, value, kc, vc, slots, kv_c, k_pe, mla, mla_slots):
        kvd.reshape_and_cache_flash(key * 2, value, kc, vc, slots)
        kvd.concat_and_cache_mla(kv_c, k_pe + 1, mla, mla_slots)
        return kc.sum()

    refs = [t.clone() for t in (kc, vc, mla)]
    rk, rv, rm = (r.as_strided(t.shape, t.stride()) for r, t in zip(refs, (kc, vc, mla)))
    with force_backend("reference"):
        step(key, value, rk, rv, slots, kv_c, k_pe, rm, mla_slots)
    compiled = torch.compile(step, fullgraph=True)
    with force_backend("triton"):
        compiled(key, value, kc, vc, slots, kv_c, k_pe, mla, mla_slots)
    torch.cuda.synchronize()
    for got, want, what in ((kc, rk, "key"), (vc, rv, "value"), (mla, rm, "mla")):
        assert torch.equal(got.contiguous().view(torch.int16), want.contiguous().view(torch.int16)), what


@pytest.mark.parametrize("layout,fp8", [("NHD", False), ("HND", False), ("NHD", True), ("head-major", False)])
def test_cuda_graph_replay_with_new_slots(layout, fp8):
    """Capture one write; replay it with new slot mappings (and new key/value) copied into the
    captured tensors; each replay writes exactly what the reference writes. Key rows beyond the
    slot mapping (the graph's padding) are ignored."""
    n_rows, n = 96, 80
    key, value, kc, vc, slots, kind, ks, vs = _write_args(layout, fp8, n=n_rows)
    slot_buf = slots[:n].clone()
    with force_backend("triton"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slot_buf, kind, ks, vs)  # compile first
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kvd.reshape_and_cache_flash(key, value, kc, vc, slot_buf, kind, ks, vs)
    gen = torch.Generator().manual_seed(11)
    for step in range(3):
        new = random_slots(n, 32, 16, device=DEV, pad_fraction=0.1, generator=gen)
        slot_buf.copy_(new)
        key.copy_(torch.randn(key.shape, generator=gen).to(DEV).bfloat16())
        value.copy_(torch.randn(value.shape, generator=gen).to(DEV).bfloat16())
        want_k, want_v = kc.clone(), vc.clone()
        with force_backend("reference"):
            kvd.reshape_and_cache_flash(key, value, want_k, want_v, new, kind, ks, vs)
        g.replay()
        torch.cuda.synchronize()
        assert_cache_equal(kc.cpu(), want_k.cpu(), fp8, f"replay {step} key")
        assert_cache_equal(vc.cpu(), want_v.cpu(), fp8, f"replay {step} value")


def test_mla_cuda_graph_replay():
    cache = make_mla_cache(64, 16, 512, 64, device=DEV, padded=True)
    kv_c = torch.randn(128, 512, device=DEV).bfloat16()
    k_pe = torch.randn(128, 64, device=DEV).bfloat16()
    slot_buf = random_slots(100, 64, 16, device=DEV)
    with force_backend("triton"):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, slot_buf)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kvd.concat_and_cache_mla(kv_c, k_pe, cache, slot_buf)
    gen = torch.Generator().manual_seed(12)
    for step in range(3):
        new = random_slots(100, 64, 16, device=DEV, pad_fraction=0.1, generator=gen)
        slot_buf.copy_(new)
        kv_c.copy_(torch.randn(kv_c.shape, generator=gen).to(DEV).bfloat16())
        want = cache._base.clone()
        w = want.as_strided(cache.shape, cache.stride(), cache.storage_offset())
        with force_backend("reference"):
            kvd.concat_and_cache_mla(kv_c, k_pe, w, new)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(cache._base.view(torch.int16), want.view(torch.int16)), f"replay {step}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_cuda1_while_cuda0_current():
    torch.cuda.set_device(0)
    case = replace(_SIZES, layout="HND", head_size=128)
    run_write_case(case, "triton", device="cuda:1")
    run_mla_case(replace(MLACase(), kv_lora_rank=512, rope_dim=64), "triton", device="cuda:1")
    assert torch.cuda.current_device() == 0
