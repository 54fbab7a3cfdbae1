"""The XPU backend's SYCL kernels on the OpenCL CPU device (backend ``sycl-cpu``), against the
reference on the shared matrix (tests/matrix.py) plus cases specific to these kernels.

Each kernel specialization is compiled once per session by DPC++'s run-time compiler (2-4 s
each); the lane needs ci/install_sycl.sh and g++, and skips with the reason otherwise.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch.backends.xpu.cpu_lane.runtime import missing
from kvdispatch.testing import make_kv_cache, random_slots

from matrix import (AttnCase, MLACase, WriteCase, attention_cases, force_backend, mla_cases,
                    run_attention_case, run_mla_case, run_strided_index_case, run_write_case, write_cases)

BACKEND = "sycl-cpu"
_why = missing()
pytestmark = [pytest.mark.sycl, pytest.mark.skipif(_why is not None, reason=f"SYCL CPU lane: {_why}")]


@pytest.mark.parametrize("case", write_cases(), ids=lambda c: c.id)
def test_matrix_write(case):
    run_write_case(case, BACKEND)


@pytest.mark.parametrize("case", mla_cases(), ids=lambda c: c.id)
def test_matrix_mla(case):
    run_mla_case(case, BACKEND)


@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c.id)
def test_matrix_attention(case):
    run_attention_case(case, BACKEND)


_W = WriteCase(num_tokens=12, num_blocks=4)
EXTRA_WRITES = [
    replace(_W, layout="head-major", head_size=80, dtype=torch.float16, slot_dtype=torch.int32),
    replace(_W, layout="head-major", head_size=96, dtype=torch.float32, block_size=8),
    replace(_W, layout="HND", block_size=3, num_blocks=6, head_size=112),
    replace(_W, layout="diffkv", head_size=192, head_size_v=128, extra_rows=3),
    replace(_W, layout="HND", kv_cache_dtype="fp8_e5m2", fp8_storage="e5m2", scale="head"),
    replace(_W, layout="head-major", kv_cache_dtype="fp8", fp8_storage="uint8", head_size=128),
    replace(_W, layout="combined-HND", kv_cache_dtype="fp8", fp8_storage="e4m3fnuz", scale="head",
            dtype=torch.float32),
    replace(_W, layout="cross-layer", kv_cache_dtype="fp8_e5m2", fp8_storage="e5m2", input_fp8=True),
]


@pytest.mark.parametrize("case", EXTRA_WRITES, ids=lambda c: c.id)
def test_extra_write(case):
    run_write_case(case, BACKEND, seed=1)


_A = AttnCase()
EXTRA_ATTENTION = [
    # MLA decode at real size: K = the 576-wide latent row, V = its first 512 dims, one kv head
    replace(_A, layout="mla-slices", num_q_heads=4, num_kv_heads=1, head_size=576, head_size_v=512,
            k_lens=(70, 9), q_lens=(1, 1)),
    # more keys than one work-group tile (64), several tiles with a window cutting through them
    replace(_A, q_lens=(3, 1), k_lens=(150, 129), window=(100, 0), block_size=16),
    replace(_A, paged=False, causal=False, q_lens=(5, 2), k_lens=(140, 2), softcap=3.0),
    # fp8 queries with per-(sequence, head) descales; MQA 8:1
    replace(_A, fp8="e4m3", q_fp8=True, descale="batch_head"),
    replace(_A, num_q_heads=8, num_kv_heads=1, fp8="e5m2", q_lens=(4, 1), k_lens=(30, 66)),
    # query heads per kv head not a multiple of the work-group's GT: 12 -> two groups of 8 and 4
    # heads, 3 -> one group of 4 with a masked head
    replace(_A, num_q_heads=12, num_kv_heads=1, q_lens=(2, 1), k_lens=(70, 8)),
    replace(_A, num_q_heads=6, num_kv_heads=2, q_lens=(5, 1), k_lens=(20, 90), dtype=torch.float16),
    # float32 output from a bf16 cache
    replace(_A, out_dtype=torch.float32, q_lens=(2, 5), k_lens=(9, 5)),
]


@pytest.mark.parametrize("case", EXTRA_ATTENTION, ids=lambda c: c.id)
def test_extra_attention(case):
    run_attention_case(case, BACKEND, seed=3)


def test_fp8_encoder_matches_torch_exhaustively():
    """Every fp32 bit pattern class that matters for fp8 rounding: all fp8 codes, the midpoints
    between neighbours (ties to even) and values just around them, both signs, beyond-max values
    (saturation) and subnormals; stored through the write kernel with scale 1."""
    for dt, kind in ((torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2")):
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dt).float()
        finite = codes[torch.isfinite(codes)].unique().sort().values
        mids = (finite[1:] + finite[:-1]) / 2
        vals = torch.cat([finite, mids, torch.nextafter(mids, torch.full_like(mids, float("inf"))),
                          torch.nextafter(mids, torch.full_like(mids, float("-inf"))),
                          torch.tensor([1e6, -1e6, 1e-12, -1e-12, 0.0, -0.0])])
        n = vals.numel()
        heads, d = 1, 16
        rows = (n + d - 1) // d
        key = torch.zeros(rows * d)
        key[:n] = vals
        key = key.view(rows, heads, d)
        kc, vc = make_kv_cache("NHD", rows, 1, heads, d, dtype=dt, fill=False)
        kc.view(torch.uint8).fill_(0x33)
        vc.view(torch.uint8).fill_(0x33)
        slots = torch.arange(rows, dtype=torch.int64)
        one = torch.ones(1)
        with force_backend(BACKEND):
            kvd.reshape_and_cache_flash(key, key.clone(), kc, vc, slots, kind, one, one)
        want = key.clamp(-torch.finfo(dt).max, torch.finfo(dt).max).to(dt)
        got = kc.reshape(rows, heads, d)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), \
            f"{dt}: {int((got.view(torch.uint8) != want.view(torch.uint8)).sum())} codes differ"


def test_int64_offsets_specialization():
    """A cache whose offsets do not fit int32 gets the int64 kernel (checked on the launch plan of
    meta tensors: nothing is allocated), a small one the int32 kernel."""
    from kvdispatch.backends.xpu import kernels
    big = torch.empty((2**18, 16, 8, 128), dtype=torch.bfloat16, device="meta")
    desc = kvd.KVCacheDescriptor.from_tensors(big, big)
    assert not desc.int32_offsets
    key = torch.empty(4, 8, 128, dtype=torch.bfloat16, device="meta")
    slots = torch.zeros(4, dtype=torch.int64, device="meta")
    assert kernels.cache_write_launch(key, key, big, big, slots, desc).spec.template_args[-1] == "int64_t"
    small = torch.empty((4, 16, 8, 128), dtype=torch.bfloat16, device="meta")
    d2 = kvd.KVCacheDescriptor.from_tensors(small, small)
    assert kernels.cache_write_launch(key, key, small, small, slots, d2).spec.template_args[-1] == "int32_t"


@pytest.mark.parametrize("case", [write_cases()[1], write_cases()[5], mla_cases()[3]] + attention_cases()[3:5],
                         ids=lambda c: c.id)
def test_int64_kernels_run(case, monkeypatch):
    """The 64-bit-offset instantiations are the ones big caches run: run them here too."""
    from kvdispatch.backends.xpu import kernels
    monkeypatch.setattr(kernels, "_fits32", lambda *a: False)
    if isinstance(case, WriteCase):
        run_write_case(case, BACKEND, seed=5)
    elif isinstance(case, MLACase):
        run_mla_case(case, BACKEND, seed=5)
    else:
        run_attention_case(case, BACKEND, seed=5)


def test_out_of_range_slot_raises_before_writing():
    kc, vc = make_kv_cache("NHD", 2, 4, 1, 16)
    before = kc.clone(), vc.clone()
    key = torch.randn(3, 1, 16, dtype=torch.bfloat16)
    slots = torch.tensor([0, 8, 1])
    with force_backend(BACKEND), pytest.raises(ValueError, match="slot_mapping"):
        kvd.reshape_and_cache_flash(key, key, kc, vc, slots)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_many_slots_larger_than_a_group():
    """More tokens than anything else in the matrix, random padding, int32 slots."""
    run_write_case(replace(_W, num_tokens=300, num_blocks=30, layout="combined-HND",
                           slot_dtype=torch.int32, pad_fraction=0.3), BACKEND, seed=7)


def test_strided_index_vectors_and_scales():
    """slot_mapping, per-head scales, block_table, cu_seqlens and seqused_k may be strided views."""
    run_strided_index_case(BACKEND)
