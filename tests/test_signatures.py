"""The public calls' per-signature cache (``ops._Call`` behind a C++ metadata guard, the most recent
signatures of each op): calls that differ only in how many tokens and sequences they carry share one
entry (checks, descriptor, selection and backend plans made once), every relation the metadata checks test between those sizes still raises its named error
on a signature seen before, and the remembered selection follows ``KVDISPATCH_BACKEND`` and
registrations made at run time."""

from __future__ import annotations

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import ops
from kvdispatch import registry as reg
from kvbench.compare import force_backend
from kvbench.layouts import make_kv_cache, random_block_table, random_slots

H, HQ, D, BS, NB = 2, 4, 32, 16, 16


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(ops, "_ATTN_RECENT", [])
    monkeypatch.setattr(ops, "_WRITE_RECENT", [])
    monkeypatch.setattr(ops, "_MLA_RECENT", [])
    monkeypatch.delenv("KVDISPATCH_BACKEND", raising=False)
    monkeypatch.delenv("KVDISPATCH_DEBUG", raising=False)


def _fixed_width(bt: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """An engine's block table: a fixed number of columns (vLLM slices a persistent buffer)."""
    out = torch.zeros(bt.shape[0], columns, dtype=bt.dtype)
    out[:, :bt.shape[1]] = bt
    return out


def _attention(batch: int, q_len: int, gen: torch.Generator, kc, vc):
    lens = [40 + 7 * b for b in range(batch)]
    q = torch.randn(batch * q_len, HQ, D, generator=gen)
    return dict(q=q, k=kc, v=vc, max_seqlen_q=q_len,
                cu_seqlens_q=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32),
                max_seqlen_k=max(lens), seqused_k=torch.tensor(lens, dtype=torch.int32),
                block_table=_fixed_width(random_block_table(lens, NB, BS, generator=gen)), causal=True,
                out=torch.full((batch * q_len, HQ, D), float("nan")))


def test_token_count_and_batch_share_one_signature(fresh):
    gen = torch.Generator().manual_seed(0)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    kc.normal_(generator=gen), vc.normal_(generator=gen)
    for batch, q_len in ((1, 1), (3, 1), (2, 5), (4, 3)):
        kw = _attention(batch, q_len, gen, kc, vc)
        out = kvd.flash_attn_varlen_func(**kw)
        assert torch.isfinite(out).all()
    assert len(ops._ATTN_RECENT) == 1  # one signature: checked, described and selected once
    for t in (3, 17, 8):
        key, value = torch.randn(t, H, D, generator=gen), torch.randn(t, H, D, generator=gen)
        kvd.reshape_and_cache_flash(key, value, kc, vc, random_slots(t, NB, BS, generator=gen))
    assert len(ops._WRITE_RECENT) == 1
    cache = torch.zeros(NB, BS, 576)
    for t in (3, 17, 8):
        kvd.concat_and_cache_mla(torch.randn(t, 512, generator=gen), torch.randn(t, 64, generator=gen), cache,
                                 random_slots(t, NB, BS, generator=gen))
    assert len(ops._MLA_RECENT) == 1


def test_mla_size_relations_still_checked(fresh):
    gen = torch.Generator().manual_seed(4)
    cache = torch.zeros(NB, BS, 576)
    kv_c, k_pe = torch.randn(6, 512, generator=gen), torch.randn(6, 64, generator=gen)
    kvd.concat_and_cache_mla(kv_c, k_pe, cache, random_slots(6, NB, BS, generator=gen))
    before = cache.clone()
    with pytest.raises(ValueError, match="k_pe: expected 6 tokens"):
        kvd.concat_and_cache_mla(kv_c, k_pe[:5], cache, random_slots(6, NB, BS, generator=gen))
    with pytest.raises(ValueError, match="slot_mapping: expected at most one entry per key"):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, random_slots(7, NB, BS, generator=gen))
    with pytest.raises(ValueError, match="kv_c/k_pe"):
        kvd.concat_and_cache_mla(kv_c, k_pe[:, :32], cache, random_slots(6, NB, BS, generator=gen))
    assert torch.equal(cache, before) and len(ops._MLA_RECENT) == 1


@pytest.mark.parametrize("bad", ["out_rows", "seqused_rows", "block_table_rows", "cu_seqlens_k_rows",
                                 "lse_columns", "alibi_rows"])
def test_size_relations_still_checked_on_a_known_signature(fresh, bad):
    """A valid call first (its signature is then known), then the same tensors with one size
    relation broken: the full checks run and name the argument."""
    gen = torch.Generator().manual_seed(1)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    kw = _attention(3, 2, gen, kc, vc)
    extra = {}
    if bad == "cu_seqlens_k_rows":
        extra["cu_seqlens_k"] = torch.tensor([0, 40, 87, 141], dtype=torch.int32)
    if bad == "alibi_rows":
        extra["alibi_slopes"] = torch.rand(3, HQ, generator=gen)
    if bad == "lse_columns":
        extra["return_softmax_lse"] = True
    kvd.flash_attn_varlen_func(**kw, **extra)
    seen = len(ops._ATTN_RECENT)
    broken = dict(kw, **extra)
    if bad == "out_rows":
        broken["out"] = torch.empty(7, HQ, D)
        match = "out: expected shape"
    elif bad == "seqused_rows":
        broken["seqused_k"] = kw["seqused_k"][:2].clone()
        match = "seqused_k: expected int32"
    elif bad == "block_table_rows":
        broken["block_table"] = kw["block_table"][:2].clone()
        match = "block_table: expected int32"
    elif bad == "cu_seqlens_k_rows":
        broken["cu_seqlens_k"] = extra["cu_seqlens_k"][:3].clone()
        match = "cu_seqlens_k: expected int32"
    elif bad == "alibi_rows":
        broken["alibi_slopes"] = extra["alibi_slopes"][:2].clone()
        match = "alibi_slopes: expected shape"
    else:  # the LSE is the call's own: a wrong one only through the custom op's argument
        lse = torch.empty(HQ, kw["q"].shape[0] + 1)
        with pytest.raises(ValueError, match="softmax_lse"):
            ops._attention(kw["q"], kc, vc, kw["out"], 2, kw["cu_seqlens_q"], kw["max_seqlen_k"], None,
                           kw["seqused_k"], None, True, -1, -1, 0.0, kw["block_table"], None, None, None,
                           None, None, lse, 0)
        assert len(ops._ATTN_RECENT) == seen
        return
    with pytest.raises(ValueError, match=match):
        kvd.flash_attn_varlen_func(**broken)
    assert len(ops._ATTN_RECENT) == seen  # nothing remembered for a call that failed its checks


def test_write_size_relations_still_checked(fresh):
    gen = torch.Generator().manual_seed(2)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    key, value = torch.randn(6, H, D, generator=gen), torch.randn(6, H, D, generator=gen)
    kvd.reshape_and_cache_flash(key, value, kc, vc, random_slots(6, NB, BS, generator=gen))
    assert len(ops._WRITE_RECENT) == 1
    before = (kc.clone(), vc.clone())
    with pytest.raises(ValueError, match="value: expected"):
        kvd.reshape_and_cache_flash(key, value[:5], kc, vc, random_slots(5, NB, BS, generator=gen))
    with pytest.raises(ValueError, match="slot_mapping: expected at most one entry per key"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, random_slots(7, NB, BS, generator=gen))
    with pytest.raises(TypeError, match="value: expected key's dtype"):
        kvd.reshape_and_cache_flash(key, value.double(), kc, vc, random_slots(6, NB, BS, generator=gen))
    with pytest.raises(ValueError, match="key: expected"):
        kvd.reshape_and_cache_flash(key[:, :1], value[:, :1], kc, vc, random_slots(6, NB, BS, generator=gen))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_recent_guards_serve_repeat_calls(fresh, monkeypatch):
    """After one call, calls of the same signature with other token counts and batches are served by
    the C++ guard of ``_WRITE_RECENT`` / ``_ATTN_RECENT`` (no signature key built, no checks), and
    give the reference's results."""
    gen = torch.Generator().manual_seed(5)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    kc.normal_(generator=gen), vc.normal_(generator=gen)
    kvd.reshape_and_cache_flash(torch.randn(4, H, D, generator=gen), torch.randn(4, H, D, generator=gen), kc, vc,
                                random_slots(4, NB, BS, generator=gen))
    kvd.flash_attn_varlen_func(**_attention(2, 1, gen, kc, vc))
    missed = []
    for name in ("_check_write", "_check_attention_tensors"):
        orig = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _o=orig, _n=name: missed.append(_n) or _o(*a))
    for t in (1, 9, 30):
        key, value = torch.randn(t, H, D, generator=gen), torch.randn(t, H, D, generator=gen)
        slots = random_slots(t, NB, BS, generator=gen)
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
        assert torch.equal(kc.flatten(0, 1)[slots.long()], key) and torch.equal(vc.flatten(0, 1)[slots.long()], value)
    for batch, q_len in ((1, 1), (3, 1), (2, 4)):
        kw = _attention(batch, q_len, gen, kc, vc)
        got = kvd.flash_attn_varlen_func(**kw)
        ref = kvd.flash_attn_varlen_func(**dict(kw, out=None, window_size=[-1, -1]))  # a list: not the fast path
        assert torch.equal(got, ref)
    assert missed == [] and len(ops._WRITE_RECENT) == 1 and len(ops._ATTN_RECENT) == 1


def test_guard_misses_on_anything_else(fresh):
    """What the guard fixes (dtype, which optional tensors are present, one tensor passed twice)
    gets a signature of its own; [batch, heads] descales keep their batch relation."""
    gen = torch.Generator().manual_seed(6)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    kc.normal_(generator=gen), vc.normal_(generator=gen)
    kw = _attention(3, 1, gen, kc, vc)
    kvd.flash_attn_varlen_func(**kw)
    with pytest.raises(TypeError, match="q: expected"):
        kvd.flash_attn_varlen_func(**dict(kw, q=kw["q"].double(), out=None))
    alibi = torch.rand(HQ, generator=gen)
    with_alibi = kvd.flash_attn_varlen_func(**dict(kw, out=None, alibi_slopes=alibi))
    assert not torch.equal(with_alibi, kvd.flash_attn_varlen_func(**dict(kw, out=None)))
    assert len(ops._ATTN_RECENT) == 2
    # fp8 with [batch, heads] descales: a batch of 3, then descales of 2 rows on the known signature
    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    ds = [torch.rand(3, H, generator=gen) + 0.5 for _ in range(3)]
    kw8 = dict(kw, k=k8, v=v8, out=None, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2])
    kvd.flash_attn_varlen_func(**kw8)
    assert ops._ATTN_RECENT[0][2] == (2 | 4 | 8 | 16 | 32, ((7, False), (8, False), (9, False)))  # descales' batch dims
    with pytest.raises(ValueError, match="v_descale: expected one element or shape"):
        kvd.flash_attn_varlen_func(**dict(kw8, v_descale=ds[2][:2].clone()))
    # one tensor as two arguments: never behind a guard (it would always fail), checked every call
    kvd.flash_attn_varlen_func(**dict(kw8, v_descale=ds[1]))
    assert len(ops._ATTN_RECENT) == 3
    key = torch.randn(5, H, D, generator=gen)
    kvd.reshape_and_cache_flash(key, key, kc, vc, random_slots(5, NB, BS, generator=gen))
    kvd.reshape_and_cache_flash(key, key, kc, vc, random_slots(5, NB, BS, generator=gen))
    assert len(ops._WRITE_RECENT) == 0


class _Recorder(kvd.Backend):
    name, priority, platforms, ops = "recorder", 10_000, ("cpu",), reg.OPS

    def __init__(self):
        self.calls = 0

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc):
        self.calls += 1


class _Plugin:
    def __init__(self, backend):
        self.backend = backend

    @kvd.hookimpl
    def kvdispatch_backends(self):
        return [self.backend]


def test_remembered_selection_follows_the_env_and_registrations(fresh):
    gen = torch.Generator().manual_seed(3)
    kc, vc = make_kv_cache("NHD", NB, BS, H, D, dtype=torch.float32)
    key, value = torch.randn(4, H, D, generator=gen), torch.randn(4, H, D, generator=gen)
    slots = random_slots(4, NB, BS, generator=gen)
    kvd.reshape_and_cache_flash(key, value, kc, vc, slots)  # the reference, remembered for this signature
    rec = _Recorder()
    plugin = _Plugin(rec)
    reg.registry.register(plugin, name="signature-test-recorder")
    try:
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
        assert rec.calls == 1  # a registration made after the first call: selected again
        with force_backend("reference"):
            kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
        assert rec.calls == 1  # KVDISPATCH_BACKEND set at run time: followed
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
        assert rec.calls == 2  # and unset again
    finally:
        reg.registry.unregister(plugin)
    kvd.reshape_and_cache_flash(key, value, kc, vc, slots)
    assert rec.calls == 2  # unregistered: the reference again
    assert len(ops._WRITE_RECENT) == 1


def test_descriptor_write_is_the_public_write_with_its_scales(fresh):
    """``desc.write(...)``: ``reshape_and_cache_flash`` with the descriptor's kv_cache_dtype and scales."""
    gen = torch.Generator().manual_seed(3)
    kc, vc = make_kv_cache("HND", NB, BS, H, D, dtype=torch.float8_e4m3fn)
    ks, vs = torch.tensor([0.05]), torch.tensor([0.03, 0.07])
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc, "fp8", ks, vs)
    key, value = torch.randn(9, H, D, generator=gen), torch.randn(9, H, D, generator=gen)
    slots = random_slots(9, NB, BS, generator=gen)
    kr, vr, before = kc.clone(), vc.clone(), kc.clone()
    desc.write(key, value, kc, vc, slots)
    kvd.reshape_and_cache_flash(key, value, kr, vr, slots, "fp8", ks, vs)
    assert torch.equal(kc.view(torch.uint8), kr.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vr.view(torch.uint8))
    assert not torch.equal(kc.view(torch.uint8), before.view(torch.uint8))  # it wrote
