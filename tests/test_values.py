"""Inputs that pass the metadata checks but carry bad values, bad scalars, NaN/Inf, autograd,
repeated slots, and the descriptor cache's hold on scale tensors: named errors raised before
anything is written (cache bit-identical), or the documented result."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import kvdispatch as kvd
from kvbench.compare import force_backend
from kvbench.layouts import make_kv_cache, random_block_table

def _lanes():
    from kvdispatch.platform import platform_of
    from kvdispatch.registry import registry
    names = ["reference", "triton"]
    sycl = [b for b in registry.backends if b.name == "sycl-cpu"]
    if sycl and sycl[0].available(platform_of(torch.device("cpu"))) is None:
        names.append("sycl-cpu")
    return names


BACKENDS = _lanes()


def _attn(**over):
    torch.manual_seed(0)
    k, v = make_kv_cache("NHD", 8, 16, 2, 32, dtype=torch.float32)
    kw = dict(q=torch.randn(4, 4, 32), k=k, v=v, max_seqlen_q=2, cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32),
              max_seqlen_k=40, seqused_k=torch.tensor([40, 9], dtype=torch.int32),
              block_table=random_block_table([40, 9], 8, 16), causal=True)
    kw.update(over)
    return kw


@pytest.mark.parametrize("name,val,err", [
    ("softmax_scale", 0.0, ValueError), ("softmax_scale", -0.5, ValueError), ("softmax_scale", float("nan"), ValueError),
    ("softmax_scale", float("inf"), ValueError), ("softmax_scale", "0.1", TypeError),
    ("softcap", float("nan"), ValueError), ("softcap", float("inf"), ValueError), ("softcap", -1.0, ValueError),
    ("softcap", "2", TypeError), ("window_size", (None, 0), ValueError), ("window_size", (2.5, 0), ValueError),
    ("window_size", (-2, 0), ValueError), ("max_seqlen_q", 2.0, ValueError), ("max_seqlen_k", -1, ValueError),
])
def test_bad_scalars_are_named(name, val, err):
    kw = _attn(**{name: val})
    with pytest.raises(err, match=name):
        kvd.flash_attn_varlen_func(**kw)


def test_int_scalars_are_accepted():
    a = kvd.flash_attn_varlen_func(**_attn(softmax_scale=1, softcap=0))
    b = kvd.flash_attn_varlen_func(**_attn(softmax_scale=1.0, softcap=0.0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape,match", [
    ((4, 0, 2, 32), "block_size"), ((4, 16, 0, 32), "num_kv_heads"), ((4, 16, 2, 0), "head_size"),
])
def test_degenerate_cache_sizes_are_named(shape, match):
    k = torch.empty(shape)
    with pytest.raises(ValueError, match=match):
        kvd.KVCacheDescriptor.from_tensors(k, torch.empty(shape))


def test_kv_cache_dtype_not_a_string_is_named():
    k, v = make_kv_cache("NHD", 4, 16, 2, 32)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kvd.reshape_and_cache_flash(torch.randn(2, 2, 32).bfloat16(), torch.randn(2, 2, 32).bfloat16(), k, v,
                                    torch.tensor([0, 1]), ["fp8"], torch.ones(1), torch.ones(1))


def test_meta_tensors_get_a_named_error():
    k = torch.empty(4, 16, 2, 32, device="meta")
    key = torch.empty(3, 2, 32, device="meta")
    with pytest.raises(kvd.NoBackendError, match="meta tensors"):
        kvd.reshape_and_cache_flash(key, key, k, torch.empty_like(k), torch.zeros(3, dtype=torch.long, device="meta"))


def test_no_autograd_history_on_caches_or_outputs():
    k, v = make_kv_cache("NHD", 4, 16, 2, 32, dtype=torch.float32)
    key = torch.randn(3, 2, 32, requires_grad=True)
    kvd.reshape_and_cache_flash(key, key * 2, k, v, torch.tensor([0, 5, 17]))
    assert k.grad_fn is None and v.grad_fn is None and not k.requires_grad
    q = torch.randn(2, 4, 32, requires_grad=True)
    out = kvd.flash_attn_varlen_func(q, k, v, 1, torch.tensor([0, 1, 2], dtype=torch.int32), 18,
                                     seqused_k=torch.tensor([18, 3], dtype=torch.int32),
                                     block_table=torch.tensor([[1, 0], [2, 3]], dtype=torch.int32))
    assert out.grad_fn is None


# -- repeated slots ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"])  # the kernels (Triton, SYCL) name no winner: README
def test_repeated_slot_keeps_k_and_v_of_one_token(backend):
    k, v = make_kv_cache("NHD", 4, 16, 2, 32, dtype=torch.float32)
    key = torch.randn(4, 2, 32)
    slots = torch.tensor([3, 9, 3, 20])
    with force_backend(backend):
        kvd.reshape_and_cache_flash(key, key * 2, k, v, slots)
    got_k, got_v = k[0, 3], v[0, 3]
    winners = [i for i in (0, 2) if torch.equal(got_k, key[i])]
    assert len(winners) == 1, "the repeated slot holds neither token's key"
    assert torch.equal(got_v, key[winners[0]] * 2), "K and V of one slot come from different tokens"


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_slot_rejected_under_debug(backend, monkeypatch):
    monkeypatch.setenv("KVDISPATCH_DEBUG", "1")
    k, v = make_kv_cache("NHD", 4, 16, 2, 32, dtype=torch.float32)
    before = (k.clone(), v.clone())
    with force_backend(backend), pytest.raises(ValueError, match="slot_mapping: 1 slot"):
        kvd.reshape_and_cache_flash(torch.randn(3, 2, 32), torch.randn(3, 2, 32), k, v, torch.tensor([3, 9, 3]))
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


# -- lengths that pass the metadata checks -----------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over,match", [
    (dict(max_seqlen_q=1), "max_seqlen_q"),
    (dict(max_seqlen_k=20), "max_seqlen_k"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32)), "cu_seqlens_q"),
])
def test_lengths_beyond_the_hints_rejected_under_debug(backend, over, match, monkeypatch):
    monkeypatch.setenv("KVDISPATCH_DEBUG", "1")
    kw = _attn(**over)
    kw["out"] = torch.full((4, 4, 32), float("nan"))
    with force_backend(backend), pytest.raises(ValueError, match=match):
        kvd.flash_attn_varlen_func(**kw)
    assert torch.isnan(kw["out"]).all(), "out was written before the error"


# -- NaN / Inf semantics (flash-attn's): NaN in a row's inputs gives NaN in that row -------------
def test_reference_keeps_nan_and_inf():
    kw = _attn()
    kw["q"][0, 1] = float("nan")  # query row (token 0, head 1)
    out = kvd.flash_attn_varlen_func(**kw)
    assert torch.isnan(out[0, 1]).all()
    assert not torch.isnan(out[1:]).any() and not torch.isnan(out[0, 0]).any()
    kw = _attn()
    blk = int(kw["block_table"][1, 0])
    kw["k"][blk, 0, 0, 0] = float("inf")  # a key of sequence 1, kv head 0 (q heads 0, 1)
    kw["q"][2:, :2, 0] = kw["q"][2:, :2, 0].abs() + 0.1  # so its scores are +inf (-inf would only mask it)
    out = kvd.flash_attn_varlen_func(**kw)
    assert torch.isnan(out[2:, :2]).all() and not torch.isnan(out[:2]).any()


def test_reference_rows_that_see_nothing_are_zero():
    kw = _attn(seqused_k=torch.tensor([40, 0], dtype=torch.int32))
    out, lse = kvd.flash_attn_varlen_func(**kw, return_softmax_lse=True)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    assert torch.isinf(lse[:, 2:]).all() and (lse[:, 2:] < 0).all()


# -- the descriptor cache must not keep dropped scale tensors alive ----------------------------
def test_descriptor_cache_holds_scales_weakly():
    k, v = make_kv_cache("NHD", 4, 16, 2, 32, dtype=torch.float8_e4m3fn)
    key = torch.randn(2, 2, 32)
    ks = torch.ones(1)
    ref = weakref.ref(ks)
    kvd.reshape_and_cache_flash(key, key, k, v, torch.tensor([0, 1]), "fp8", ks, torch.ones(1))
    desc = kvd.KVCacheDescriptor.from_tensors(k, v, "fp8", ks, torch.ones(1))
    assert desc.k_scale is ks
    del ks, desc
    gc.collect()
    assert ref() is None, "a cache kept a dropped scale tensor alive"
    # a new scale (maybe at the dropped one's address) gets a descriptor of its own
    ks2 = torch.full((1,), 2.0)
    d2 = kvd.KVCacheDescriptor.from_tensors(k, v, "fp8", ks2, torch.ones(1))
    assert d2.k_scale is ks2 and math.isclose(float(d2.k_scale), 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz])
def test_fp8_write_keeps_nan_and_saturates_inf(backend, fp8):
    """fp8 stores what the format can hold: NaN stays NaN (0x7F / 0xFF; fnuz's one NaN 0x80),
    +-inf saturates to +-max (e4m3 has no infinity; e5m2 follows the same saturating rule)."""
    kc = torch.zeros(2, 16, 1, 32, dtype=fp8)
    vc = torch.zeros_like(kc)
    key = torch.randn(4, 1, 32)
    key[0, 0, :4] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    scale = torch.full((1,), 0.5)
    with force_backend(backend):
        kvd.reshape_and_cache_flash(key, key, kc, vc, torch.tensor([0, 1, 2, 17]), "fp8" if fp8 != torch.float8_e5m2
                                    else "fp8_e5m2", scale, scale)
    codes = kc[0, 0, 0, :4].view(torch.uint8).tolist()
    fmax = torch.finfo(fp8).max
    # NaN codes (the sign of a NaN carries no meaning): e4m3fn S.1111.111, e5m2 S.11111.xx (xx != 0),
    # e4m3fnuz only 0x80
    if fp8 == torch.float8_e4m3fnuz:
        assert codes[:2] == [0x80, 0x80]
    elif fp8 == torch.float8_e4m3fn:
        assert all(c & 0x7F == 0x7F for c in codes[:2]), [hex(c) for c in codes]
    else:
        assert all(c & 0x7F > 0x7C for c in codes[:2]), [hex(c) for c in codes]
    assert torch.isnan(kc[0, 0, 0, :2].float()).all()
    assert kc[0, 0, 0, 2].float() == fmax and kc[0, 0, 0, 3].float() == -fmax


def test_reference_nan_value_reaches_only_the_rows_that_see_it():
    """Causal prefill: a NaN in the value of key 5 reaches rows 5.. only (rows 0-4 weigh it 0)."""
    torch.manual_seed(1)
    k, v = make_kv_cache("NHD", 2, 16, 1, 32, dtype=torch.float32)
    v[0, 5, 0, 3] = float("nan")
    q = torch.randn(8, 2, 32)
    out = kvd.flash_attn_varlen_func(q, k, v, 8, torch.tensor([0, 8], dtype=torch.int32), 8,
                                     seqused_k=torch.tensor([8], dtype=torch.int32),
                                     block_table=torch.tensor([[0]], dtype=torch.int32), causal=True)
    assert not torch.isnan(out[:5]).any()
    assert torch.isnan(out[5:, :, 3]).all() and not torch.isnan(out[5:, :, :3]).any()
