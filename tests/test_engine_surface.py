"""The engine-facing call surface of ``flash_attn_varlen_func`` (ALiBi, sinks, LSE, split counts,
window None, flash-attn / vLLM keywords) on the reference, checked against a per-row loop in
float64 written from the definitions; the flash-attn compat module against the public call;
the descriptor and plan caches under vLLM's calling convention ("auto" with scale tensors)."""

from __future__ import annotations

import math

import pytest
import torch

import kvdispatch as kvd
from kvdispatch.integrations import flash_attn as fa
from kvbench.compare import force_backend
from kvbench.layouts import make_kv_cache, random_block_table
from matrix import AttnCase, make_attention_inputs


def loop_attention(kw) -> tuple:
    """Per-row, per-head float64 attention from the definitions; returns (out, lse)."""
    q, k, v = kw["q"].double(), kw["k"], kw["v"]
    cu = kw["cu_seqlens_q"].tolist()
    bt, used = kw["block_table"], kw["seqused_k"].tolist()
    hq, hkv = q.shape[1], k.shape[2]
    bs = k.shape[1]
    scale = kw.get("softmax_scale") or 1.0 / math.sqrt(q.shape[2])
    wl, wr = kw.get("window_size") or (-1, -1)
    if kw.get("causal"):
        wr = 0
    slopes, sinks, cap = kw.get("alibi_slopes"), kw.get("s_aux"), kw.get("softcap", 0.0)
    out = torch.zeros(q.shape[0], hq, v.shape[3], dtype=torch.float64)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float64)
    for b in range(len(cu) - 1):
        lq, lk = cu[b + 1] - cu[b], used[b]
        keys = [(int(bt[b, j // bs]), j % bs) for j in range(lk)]
        for i in range(lq):
            t, p = cu[b] + i, i + lk - lq
            for h in range(hq):
                kvh = h // (hq // hkv)
                logits, vals = [], []
                for j, (blk, off) in enumerate(keys):
                    if (wr >= 0 and j > p + wr) or (wl >= 0 and j < p - wl):
                        continue
                    s = scale * float(q[t, h] @ k[blk, off, kvh].double())
                    if cap:
                        s = cap * math.tanh(s / cap)
                    if slopes is not None:
                        sl = slopes[h] if slopes.dim() == 1 else slopes[b, h]
                        s -= float(sl) * abs(p - j)
                    logits.append(s)
                    vals.append(v[blk, off, kvh].double())
                den_terms = logits + ([float(sinks[h])] if sinks is not None else [])
                if not den_terms:
                    continue
                m = max(den_terms)
                den = sum(math.exp(x - m) for x in den_terms)
                lse[h, t] = m + math.log(den)
                for x, val in zip(logits, vals):
                    out[t, h] += math.exp(x - m) / den * val
    return out, lse


EXTRA_CASES = [
    AttnCase(alibi="head", q_lens=(1, 6, 0, 9), k_lens=(20, 31, 4, 9), dtype=torch.float32),
    AttnCase(alibi="batch_head", causal=False, q_lens=(3, 4), k_lens=(5, 9), dtype=torch.float32),
    AttnCase(sinks=True, lse=True, q_lens=(1, 2, 0), k_lens=(0, 7, 3), dtype=torch.float32),
    AttnCase(sinks=True, lse=True, alibi="head", softcap=4.0, window=(3, 0), q_lens=(2, 5), k_lens=(9, 5),
             dtype=torch.float32),
    AttnCase(lse=True, q_lens=(2, 1), k_lens=(0, 17), dtype=torch.float32),
]


@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda c: c.id)
def test_reference_extras_match_the_loop(case):
    kw = make_attention_inputs(case)
    want_out, want_lse = loop_attention(kw)
    with force_backend("reference"):
        res = kvd.flash_attn_varlen_func(**kw)
    out, lse = res if case.lse else (res, None)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    if lse is not None:
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def _decode_call(**extra):
    k, v = make_kv_cache("NHD", 10, 16, 2, 32, dtype=torch.float32)
    q = torch.randn(3, 4, 32)
    bt = random_block_table([20, 5, 33], 10, 16)
    cu = torch.arange(4, dtype=torch.int32)
    used = torch.tensor([20, 5, 33], dtype=torch.int32)
    return lambda **kw: kvd.flash_attn_varlen_func(q, k, v, 1, cu, 33, seqused_k=used, block_table=bt,
                                                   **{**extra, **kw})


def test_vllm_keywords_accepted():
    call = _decode_call()
    base = call()
    # FA3 scheduler hints are accepted and change nothing; window None is unbounded
    same = call(scheduler_metadata=torch.zeros(4, dtype=torch.int32), fa_version=3, window_size=None,
                deterministic=True, dropout_p=0.0, return_attn_probs=False, num_splits=1, cp_world_size=1)
    torch.testing.assert_close(same, base)
    out, lse = call(return_softmax_lse=True)
    torch.testing.assert_close(out, base)
    assert lse.shape == (4, 3) and lse.dtype == torch.float32


@pytest.mark.parametrize("kw,err,match", [
    (dict(dropout_p=0.1), ValueError, "dropout_p"),
    (dict(return_attn_probs=True), ValueError, "return_attn_probs"),
    (dict(softmax_scael=0.3), TypeError, "softmax_scael"),
    (dict(cp_world_size=2), ValueError, "cp_world_size"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(num_splits=1.5), ValueError, "num_splits"),
    (dict(window_size=(None, 0)), ValueError, "window_size"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, "alibi_slopes"),
    (dict(s_aux=torch.ones(2)), ValueError, "s_aux"),
    (dict(s_aux=torch.ones(4, dtype=torch.int32)), TypeError, "s_aux"),
])
def test_bad_extras_are_named(kw, err, match):
    with pytest.raises(err, match=match):
        _decode_call()(**kw)


def test_expanded_descales_match_dense():
    case = AttnCase(fp8="e4m3", descale="batch_head")
    kw = make_attention_inputs(case)
    one_k, one_v = kw["k_descale"][:1, :1].clone(), kw["v_descale"][:1, :1].clone()
    dense = dict(kw, k_descale=one_k.repeat(3, 2), v_descale=one_v.repeat(3, 2), out=kw["out"].clone())
    expanded = dict(kw, k_descale=one_k.reshape(1).expand(3, 2), v_descale=one_v.reshape(1).expand(3, 2))
    assert expanded["k_descale"].stride() == (0, 0)
    with force_backend("reference"):
        a = kvd.flash_attn_varlen_func(**dense)
        b = kvd.flash_attn_varlen_func(**expanded)
    torch.testing.assert_close(a, b)


# -- the flash-attn compat module --------------------------------------------------------------
def test_compat_varlen_paged_lengths_from_cu_seqlens_k():
    k, v = make_kv_cache("NHD", 10, 16, 2, 32, dtype=torch.float32)
    lens = [20, 5, 33]
    bt = random_block_table(lens, 10, 16)
    q = torch.randn(6, 4, 32)
    cu_q = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 25, 58], dtype=torch.int32)
    want = kvd.flash_attn_varlen_func(q, k, v, 3, cu_q, 33, seqused_k=torch.tensor(lens, dtype=torch.int32),
                                      block_table=bt, causal=True, window_size=(8, 0))
    got = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 33, 0.0, None, True, torch.tensor([8, 0]),
                                    block_table=bt)
    torch.testing.assert_close(got, want)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 33, causal=True, window_size=[8, 0],
                                                block_table=bt, return_attn_probs=True)
    torch.testing.assert_close(out, want)
    assert lse.shape == (4, 6) and probs is None


def test_compat_varlen_not_paged():
    q, k, v = torch.randn(7, 4, 32), torch.randn(9, 2, 32), torch.randn(9, 2, 32)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    want = kvd.flash_attn_varlen_func(q, k, v, 4, cu_q, 5, cu_seqlens_k=cu_k, causal=True)
    torch.testing.assert_close(fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True), want)


@pytest.mark.parametrize("paged", [True, False])
def test_compat_with_kvcache_appends_then_attends(paged):
    torch.manual_seed(0)
    batch, lq, new, hq, hkv, d, page = 3, 2, 2, 4, 2, 32, 8
    lens = torch.tensor([5, 0, 11], dtype=torch.int32)
    if paged:
        kc, vc = make_kv_cache("HND", 12, page, hkv, d, dtype=torch.float32)
        bt = random_block_table([16, 16, 16], 12, page)
        table, kwargs = bt, dict(block_table=bt)
    else:
        kc, vc = torch.randn(batch, 16, hkv, d), torch.randn(batch, 16, hkv, d)
        table, kwargs, page = torch.arange(batch, dtype=torch.int32)[:, None], {}, 16
    q = torch.randn(batch, lq, hq, d)
    k_new, v_new = torch.randn(batch, new, hkv, d), torch.randn(batch, new, hkv, d)
    ref_k, ref_v = kc.clone(), vc.clone()
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True,
                                          return_softmax_lse=True, **kwargs)
    # the same by hand: write the new tokens at lens[b] + i, then one paged call
    for b in range(batch):
        for i in range(new):
            pos = int(lens[b]) + i
            blk = int(table[b, pos // page])
            ref_k[blk, pos % page] = k_new[b, i]
            ref_v[blk, pos % page] = v_new[b, i]
    torch.testing.assert_close(kc, ref_k)
    torch.testing.assert_close(vc, ref_v)
    want, want_lse = kvd.flash_attn_varlen_func(
        q.reshape(batch * lq, hq, d), ref_k, ref_v, lq, torch.arange(0, (batch + 1) * lq, lq, dtype=torch.int32),
        16, seqused_k=lens + new, block_table=table, causal=True, return_softmax_lse=True)
    torch.testing.assert_close(out, want.view(batch, lq, hq, d))
    torch.testing.assert_close(lse, want_lse.view(hq, batch, lq).permute(1, 0, 2))


def test_compat_refuses_what_it_cannot_do():
    q = torch.randn(1, 1, 4, 32)
    kc = vc = torch.randn(1, 16, 2, 32)
    with pytest.raises(ValueError, match="rotary"):
        fa.flash_attn_with_kvcache(q, kc, vc, rotary_cos=torch.ones(1), rotary_sin=torch.ones(1))
    with pytest.raises(ValueError, match="cache_leftpad"):
        fa.flash_attn_with_kvcache(q, kc, vc, cache_leftpad=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="reshape_and_cache_flash"):
        fa.reshape_and_cache(torch.randn(1, 2, 32), torch.randn(1, 2, 32), kc, vc, torch.zeros(1, dtype=torch.long))


def test_compat_reshape_and_cache_head_major():
    kc, vc = make_kv_cache("head-major", 4, 16, 2, 64)
    ref_k, ref_v = kc.clone(), vc.clone()
    key = torch.randn(5, 2, 64, dtype=kc.dtype)
    slots = torch.tensor([3, 17, -1, 40, 63])
    fa.reshape_and_cache(key, key * 2, kc, vc, slots)
    kvd.reshape_and_cache_flash(key, key * 2, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


# -- engine calling conventions hit the caches --------------------------------------------------
def test_auto_with_scale_tensors_hits_the_descriptor_cache():
    """vLLM passes layer._k_scale / _v_scale on every write, also with kv_cache_dtype="auto"."""
    k, v = make_kv_cache("NHD", 4, 16, 2, 64)
    ks, vs = torch.ones(1), torch.ones(1)
    d1 = kvd.KVCacheDescriptor.from_tensors(k, v, "auto", ks, vs)
    d2 = kvd.KVCacheDescriptor.from_tensors(k, v, "auto", torch.ones(1), torch.ones(1))
    d3 = kvd.KVCacheDescriptor.from_tensors(k, v, "auto")
    assert d1 is d2 is d3 and d1.k_scale is None
