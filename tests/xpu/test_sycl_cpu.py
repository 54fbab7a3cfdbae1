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
from kvbench.layouts import make_kv_cache, random_slots

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
    # engine extras: sinks on rows that see no key (lse = s_aux, out = 0), next to a row of no
    # sink and no key in the same launch shape (lse -inf) below
    replace(_A, sinks=True, lse=True, q_lens=(2, 0, 1), k_lens=(0, 4, 40)),
    replace(_A, sinks=True, lse=True, window=(2, 0), q_lens=(3, 1), k_lens=(1, 5)),  # lk < lq: early rows see nothing
    # per-head slopes / sinks / LSE rows under GT = 8 with two work-groups per kv head (8 + 4
    # heads), a GT = 4 group with a masked head, and GT = 1; several tiles
    replace(_A, num_q_heads=12, num_kv_heads=1, alibi="batch_head", sinks=True, lse=True,
            q_lens=(2, 1), k_lens=(70, 8)),
    replace(_A, num_q_heads=6, num_kv_heads=2, alibi="head", sinks=True, lse=True, q_lens=(5, 1),
            k_lens=(20, 150), dtype=torch.float16, window=(100, 0)),
    replace(_A, num_q_heads=3, num_kv_heads=3, alibi="batch_head", sinks=True, lse=True, q_lens=(4, 1),
            k_lens=(9, 80), dtype=torch.float32),  # MHA: GT = 1
    # ALiBi with softcap, non-paged, non-causal; fp8 q with expanded per-(seq, head) descales
    replace(_A, paged=False, causal=False, alibi="head", softcap=4.0, q_lens=(5, 2), k_lens=(90, 2), lse=True),
    replace(_A, fp8="e4m3", q_fp8=True, descale="batch_head", descale_expand=True, lse=True),
    replace(_A, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            k_lens=(70, 9), q_lens=(1, 1), sinks=True, lse=True, fp8="e4m3", descale_expand=True),
]


@pytest.mark.parametrize("case", EXTRA_ATTENTION, ids=lambda c: c.id)
def test_extra_attention(case):
    run_attention_case(case, BACKEND, seed=3)


def _attention_op(kw, **over):
    """The public custom op (takes a caller's ``softmax_lse``) with make_attention_inputs' kwargs."""
    kw = {**kw, **over}
    wl, wr = kw["window_size"]
    torch.ops.kvdispatch.flash_attn_varlen_func(
        kw["q"], kw["k"], kw["v"], kw["out"], kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
        kw.get("cu_seqlens_k"), kw.get("seqused_k"), kw["softmax_scale"], kw["causal"], wl, wr, kw["softcap"],
        kw.get("block_table"), kw.get("q_descale"), kw.get("k_descale"), kw.get("v_descale"),
        kw.get("alibi_slopes"), kw.get("s_aux"), kw.get("softmax_lse"), kw.get("num_splits", 0))


@pytest.mark.parametrize("sink_dtype", [torch.bfloat16, torch.float16])
def test_extras_strided_and_16bit_sinks(sink_dtype):
    """s_aux in the model's 16-bit dtype (read as stored, no host conversion) and as a strided
    view; ALiBi slopes [batch, Hq] as a transposed view; the LSE written into a caller's strided
    (transposed, padded) buffer whose other elements stay untouched; rows past cu_seqlens_q[-1]
    keep their LSE."""
    from matrix import make_attention_inputs
    case = replace(_A, num_q_heads=8, num_kv_heads=2, q_lens=(3, 0, 2), k_lens=(40, 7, 0), alibi="batch_head",
                   sinks=True, window=(30, 0))
    kw = make_attention_inputs(case, seed=11)
    kw.pop("return_softmax_lse", None)
    hq, total_q = case.num_q_heads, kw["q"].shape[0]
    b = len(case.q_lens)
    kw["alibi_slopes"] = kw["alibi_slopes"].t().contiguous().t()  # [b, hq], strides (1, b)
    assert kw["alibi_slopes"].stride() == (1, b)
    sinks = torch.zeros(hq, 3, dtype=sink_dtype)
    sinks[:, 1] = kw["s_aux"].to(sink_dtype)
    kw["s_aux"] = sinks[:, 1]  # stride 3
    kw["cu_seqlens_q"] = kw["cu_seqlens_q"].clone()
    kw["cu_seqlens_q"][-1] -= 1  # the last q row belongs to nobody: out and lse untouched there
    lse_buf = torch.full((total_q + 3, hq + 1), 7.0)
    lse = lse_buf[1:total_q + 1, :hq].t()  # [hq, total_q], strides (1, hq + 1)
    ref_lse = torch.full((hq, total_q), 7.0)
    ref_out = torch.full(kw["out"].shape, float("nan"))
    with force_backend("reference"):
        _attention_op(kw, out=ref_out, softmax_lse=ref_lse, s_aux=kw["s_aux"].float())
    before = lse_buf.clone()
    with force_backend(BACKEND):
        _attention_op(kw, softmax_lse=lse)
    rows = int(kw["cu_seqlens_q"][-1])
    got = kw["out"].float()
    assert torch.isnan(got[rows:]).all(), "a row past cu_seqlens_q[-1] was written"
    err = (got[:rows] - ref_out[:rows]).norm() / ref_out[:rows].norm()
    assert err < 2e-2, f"relative error {float(err):.2e}"
    # the sequence with no key: out 0, lse = the sink
    assert torch.equal(got[3:rows], torch.zeros_like(got[3:rows]))
    assert torch.allclose(lse[:, 3:rows], kw["s_aux"].float()[:, None].expand(hq, rows - 3))
    assert torch.allclose(lse[:, :rows], ref_lse[:, :rows], atol=5e-2, rtol=0)
    assert torch.equal(lse[:, rows:], torch.full((hq, total_q - rows), 7.0))
    mask = torch.ones_like(lse_buf, dtype=torch.bool)
    mask[1:total_q + 1, :hq] = False
    assert torch.equal(lse_buf[mask], before[mask]), "the LSE kernel wrote outside its view"


def test_sinks_without_keys_and_minus_inf_sink():
    """A row with no key and a sink of -inf behaves like no sink at all: out 0, lse -inf (no NaN
    from -inf - -inf); a finite sink on the same rows gives lse = sink."""
    from matrix import make_attention_inputs
    case = replace(_A, q_lens=(2, 1), k_lens=(0, 9), sinks=True)
    kw = make_attention_inputs(case, seed=2)
    kw.pop("return_softmax_lse", None)
    hq, total_q = case.num_q_heads, kw["q"].shape[0]
    s_aux = kw["s_aux"].clone()
    s_aux[0] = float("-inf")
    lse = torch.full((hq, total_q), 7.0)
    with force_backend(BACKEND):
        _attention_op(kw, s_aux=s_aux, softmax_lse=lse)
    out = kw["out"].float()
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isinf(lse[0, :2]).all() and (lse[0, :2] < 0).all()
    assert torch.equal(lse[1:, :2], s_aux[1:, None].expand(hq - 1, 2))
    assert torch.isfinite(lse[:, 2]).all() and not torch.isnan(out).any()


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


def test_attention_specialization_from_the_descriptor():
    """Attention takes its head sizes and its cache offset width from the descriptor (int32 where
    ``desc.int32_offsets``), checked on the launch plan of meta tensors."""
    from kvdispatch.backends.xpu import kernels
    from kvdispatch.registry import AttentionArgs

    def i32(*shape):
        return torch.zeros(shape, dtype=torch.int32, device="meta")

    def spec(blocks):
        cache = torch.empty((blocks, 16, 2, 128), dtype=torch.bfloat16, device="meta")
        desc = kvd.KVCacheDescriptor.from_tensors(cache, cache)
        q = torch.empty(3, 8, 128, dtype=torch.bfloat16, device="meta")
        args = AttentionArgs(i32(4), 1, None, i32(3), 16, i32(3, 4), 0.125, True, -1, 0, 0.0, None, None, None)
        return desc, kernels.attention_launch(q, cache, cache, q, desc, args).spec.template_args

    desc, small = spec(4)
    assert desc.int32_offsets and small[3:5] == ("128", "128") and small[-1] == "int32_t"
    desc, big = spec(2**21)
    assert not desc.int32_offsets and big[-1] == "int64_t"


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
