"""The Triton attention kernel against the reference, through ``TRITON_INTERPRET=1`` on CPU tensors
(on a GPU machine the same tests run the compiled kernels on CUDA tensors).

The shared matrix (tests/matrix.py) covers layouts x dtypes x options; the cases here add what is
specific to this kernel: split-KV forced on (the interpreter's tiny machine never splits by
itself), head sizes that are a power of two plus a remainder (80, 112, 192, MLA 576/512), page
sizes that do not hold whole key tiles (the per-key block-table path), fp8 q, an output dtype
that differs from q, long GQA groups spanning several row tiles, and in-place out with strides.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch.backends.triton import attention

from matrix import (AttnCase, attention_cases, force_backend, make_attention_inputs, run_attention_case,
                    run_strided_index_case)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpret if DEVICE == "cpu" else []


@pytest.mark.parametrize("case", attention_cases(), ids=lambda c: c.id)
def test_matrix_attention(case):
    run_attention_case(case, "triton", device=DEVICE)


_B = AttnCase()
_CHUNKED = dict(q_lens=(1, 6, 0, 9), k_lens=(20, 31, 4, 9))
EXTRA = [
    # head sizes: power of two + remainder for K, padded V
    replace(_B, head_size=112, num_q_heads=2, num_kv_heads=1, **_CHUNKED),
    replace(_B, layout="HND", head_size=192, num_q_heads=2, num_kv_heads=2),
    replace(_B, head_size=256, num_q_heads=2, num_kv_heads=1, k_lens=(9, 3, 20)),
    replace(_B, layout="diffkv", head_size=80, head_size_v=112, **_CHUNKED),
    # MLA decode at its real head sizes: q/k 576 (512 + 64 rope), v 512, slices of one buffer
    replace(_B, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1), k_lens=(21, 7)),
    # page sizes that split or do not divide the key tile: one block-table entry per key
    replace(_B, block_size=3, **_CHUNKED),
    replace(_B, layout="combined-HND", block_size=8, k_lens=(17, 9, 30)),
    replace(_B, layout="cross-layer", block_size=64, **_CHUNKED),
    # long GQA group: one decode token spans two 16-row tiles
    replace(_B, num_q_heads=32, num_kv_heads=1, head_size=64, k_lens=(19, 40, 2)),
    # causal + window + softcap together, mixed batch
    replace(_B, window=(5, 0), softcap=3.0, **_CHUNKED),
    replace(_B, causal=False, window=(2, 7), softcap=2.0, paged=False, **_CHUNKED),
    # q_len > k_len with causal: the first rows see no key and must come out 0
    replace(_B, q_lens=(6, 2), k_lens=(3, 2)),
    # fp8 q (out bf16), fp8 caches with per-(batch, head) descales, e5m2 and fnuz
    replace(_B, fp8="e4m3", q_fp8=True, descale="batch_head", **_CHUNKED),
    replace(_B, fp8="e5m2", q_fp8=True, layout="combined"),
    replace(_B, fp8="e4m3fnuz", descale="batch_head", layout="HND", **_CHUNKED),
    # out in another dtype than q
    replace(_B, out_dtype=torch.float32, **_CHUNKED),
    replace(_B, dtype=torch.float16, out_dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", EXTRA, ids=lambda c: c.id)
def test_extra_attention(case):
    # bf16/fp16 q computes in its own precision (P rounded to it): an fp32 out does not make it exact
    tol = 2e-2 if case.out_dtype == torch.float32 and case.dtype != torch.float32 else None
    run_attention_case(case, "triton", device=DEVICE, rel_tol=tol)


SPLIT_CASES = [
    replace(_B, k_lens=(70, 5, 47)),  # decode; a split with no keys for the short sequence
    replace(_B, **_CHUNKED),
    replace(_B, window=(20, 0), k_lens=(70, 33, 64)),  # splits fully outside the window
    replace(_B, fp8="e4m3", descale="batch_head", k_lens=(50, 64, 1)),
    replace(_B, layout="mla-slices", num_q_heads=8, num_kv_heads=1, head_size=80, head_size_v=64,
            q_lens=(1, 1), k_lens=(65, 18)),
    replace(_B, paged=False, causal=False, softcap=4.0, **_CHUNKED),
    replace(_B, q_lens=(0, 1), k_lens=(40, 0)),  # an empty kv sequence: 0 from every split
]


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.id)
def test_split_kv(case, splits, monkeypatch):
    monkeypatch.setattr(attention, "choose_splits", lambda *a, **k: splits)
    run_attention_case(case, "triton", device=DEVICE)


def test_choose_splits_fills_the_gpu_only_when_needed():
    from kvdispatch.backends.triton.attention_configs import NVIDIA
    cfg = NVIDIA[(9, 0)]
    per_sm, min_keys = cfg.split_programs_per_sm, cfg.split_min_keys
    # few long sequences: whole waves of programs (the H100 sweep's best counts, per_sm = 2)
    assert attention.choose_splits(1, 8, 1, 32768, 128, cfg, 132) == min(per_sm * 132 // 8, 32768 // min_keys)
    assert attention.choose_splits(4, 8, 1, 32768, 128, cfg, 132) == per_sm * 132 // 32
    assert attention.choose_splits(8, 8, 1, 8192, 128, cfg, 132) == per_sm * 132 // 64
    # every SM busy already, or keys too short to pay for a split
    assert attention.choose_splits(32, 8, 1, 4096, 128, cfg, 132) == 1
    assert attention.choose_splits(128, 8, 1, 4096, 128, cfg, 132) == 1
    assert attention.choose_splits(1, 8, 1, min_keys - 1, 128, cfg, 132) == 1
    if per_sm == 2:
        assert [attention.choose_splits(b, 8, 1, 32768 // b, 128, cfg, 132) for b in (1, 4, 8, 16)] == [33, 8, 4, 2]


def test_out_rows_outside_sequences_untouched():
    """Rows of out past cu_seqlens_q[-1] (CUDA-graph padding) are not written, split or not."""
    case = replace(_B, k_lens=(40, 9), q_lens=(1, 1))
    for splits in (1, 2):
        kw = make_attention_inputs(case, DEVICE)
        q = kw["q"]
        kw["q"] = torch.cat([q, q[:2]])  # two padding rows past the last sequence
        kw["out"] = torch.full((q.shape[0] + 2,) + tuple(kw["out"].shape[1:]), 7.0,
                               dtype=kw["out"].dtype, device=DEVICE)
        orig = attention.choose_splits
        attention.choose_splits = lambda *a, **k: splits
        try:
            with force_backend("triton"):
                kvd.flash_attn_varlen_func(**kw)
        finally:
            attention.choose_splits = orig
        assert torch.all(kw["out"][-2:] == 7.0)
        assert not torch.isnan(kw["out"][:-2].float()).any()


def test_out_strided_in_place():
    """``out`` a strided view (rows of a wider buffer): written through its strides only."""
    case = replace(_B, **_CHUNKED)
    kw = make_attention_inputs(case, DEVICE)
    ref = kw["out"].float().clone()
    with force_backend("reference"):
        kvd.flash_attn_varlen_func(**{**kw, "out": ref})
    wide = torch.full((kw["out"].shape[0], kw["out"].shape[1] + 1, kw["out"].shape[2]), 5.0,
                      dtype=kw["out"].dtype, device=DEVICE)
    out = wide[:, 1:]
    with force_backend("triton"):
        got = kvd.flash_attn_varlen_func(**{**kw, "out": out})
    assert got is out
    assert torch.all(wide[:, 0] == 5.0)
    err = (out.float().cpu() - ref.cpu()).norm() / ref.norm()
    assert err < 2e-2


def test_supports_declines_what_it_cannot_address():
    from kvdispatch.testing import make_kv_cache, make_mla_cache
    plat = kvd.KVCacheDescriptor.from_tensors(*make_kv_cache("NHD", 2, 16, 1, 64)).platform
    k, v = make_kv_cache("head-major", 2, 16, 1, 64)
    assert "head-major" in attention.supports("flash_attn_varlen_func",
                                              kvd.KVCacheDescriptor.from_tensors(k, v), plat)
    mla = kvd.KVCacheDescriptor.from_tensors(make_mla_cache(2, 16, 64, 16), None)
    assert attention.supports("flash_attn_varlen_func", mla, plat) is not None
    nhd = kvd.KVCacheDescriptor.from_tensors(*make_kv_cache("HND", 2, 16, 2, 128))
    assert attention.supports("flash_attn_varlen_func", nhd, plat) is None


def test_ptxas_crash_retries_with_fewer_stages(monkeypatch):
    """A compiler crash on a multi-stage pipeline falls back to fewer stages (and is remembered)."""
    from kvdispatch.backends.triton import attention_configs as ac

    class FakePTXASError(RuntimeError):
        pass

    tile = ac.TileConfig(1024, block_m=16, block_n=16, num_warps=1, num_stages=3)
    cfg = ac.AttentionConfig(decode=(tile,), prefill=(tile,), split_programs_per_sm=1, split_min_keys=16,
                             source="test")
    monkeypatch.setattr(attention, "config_for", lambda *a, **k: cfg)
    monkeypatch.setattr(attention, "_PTXAS_ERRORS", (FakePTXASError,))
    monkeypatch.setattr(attention, "_PLANS", {})
    real = attention._attention_kernel
    stages_tried = []

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                stages_tried.append(kw["num_stages"])
                if kw["num_stages"] > 1:
                    raise FakePTXASError("ptxas died")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(attention, "_attention_kernel", Kernel())
    run_attention_case(replace(_B, **_CHUNKED), "triton", device=DEVICE)
    assert stages_tried == [3, 2, 1]
    run_attention_case(replace(_B, **_CHUNKED), "triton", device=DEVICE, seed=1)
    assert stages_tried == [3, 2, 1, 1]


def test_strided_index_vectors_and_scales():
    """Strided slot_mapping / per-head scales / block_table / cu_seqlens_q / seqused_k views: the
    kernels read these as contiguous rows, so the backend hands them a contiguous copy."""
    run_strided_index_case("triton", DEVICE, exact_fp8=False)
