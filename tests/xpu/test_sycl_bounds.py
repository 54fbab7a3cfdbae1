"""In-kernel bounds of the XPU SYCL kernels ("no silent wrong result"): whatever the index tensors
hold, the kernels never read or write outside their tensors when the value checks are off.

``xpu-sycl`` (Intel GPUs) runs the value checks only under ``KVDISPATCH_DEBUG=1``, so the kernels
carry their own cheap bounds. The CPU lane (``sycl-cpu``) always runs the checks; here they are
switched off (``SyclCpuBackend.always_check_values = False``, restored after each test) so the
kernels see the bad values. Every cache / output / LSE is a view in the middle of a larger flat
buffer filled with a sentinel (NaN for what the kernels read: a read from the guard shows up as
NaN), and the guard regions must be bit-identical afterwards; rows of other sequences still equal
the reference, and where the kernel's clamping defines the result, that too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch.backends.xpu.cpu_lane.runtime import missing

from matrix import AttnCase, force_backend, make_attention_inputs

BACKEND = "sycl-cpu"
_why = missing()
pytestmark = [pytest.mark.sycl, pytest.mark.skipif(_why is not None, reason=f"SYCL CPU lane: {_why}")]


@pytest.fixture(autouse=True)
def no_value_checks(monkeypatch):
    """The kernels see the bad values: no value checks before the sycl-cpu lane."""
    from kvdispatch.backends.xpu import backend as xb
    monkeypatch.delenv("KVDISPATCH_DEBUG", raising=False)
    monkeypatch.setattr(xb.SyclCpuBackend, "always_check_values", False)
    yield


class Guarded:
    """A tensor of ``shape`` as a contiguous view in the middle of a flat buffer with ``guard``
    elements of ``fill`` on each side."""

    def __init__(self, shape, dtype, guard: int, fill: float):
        n = 1
        for s in shape:
            n *= s
        self.n, self.guard = n, guard
        self.buf = torch.full((n + 2 * guard,), fill, dtype=torch.float32).to(dtype)
        self.view = self.buf[guard:guard + n].view(shape)
        self._before = self._bytes().clone()

    def _bytes(self) -> torch.Tensor:
        return self.buf.view(torch.uint8)

    def assert_guards_intact(self, what: str) -> None:
        b, e = self.guard * self.buf.element_size(), (self.guard + self.n) * self.buf.element_size()
        got, want = self._bytes(), self._before
        for name, sl in (("before", slice(0, b)), ("after", slice(e, None))):
            bad = int((got[sl] != want[sl]).sum())
            assert bad == 0, f"{what}: {bad} guard bytes {name} the tensor were written"


# -- writes: a slot >= num_blocks * block_size is dropped like padding ---------------------------

NB, BS, H, D = 3, 4, 2, 16
TOTAL = NB * BS


def _bad_slots(dtype: torch.dtype) -> tuple:
    """(slots with out-of-range entries, the same with those replaced by -1 padding)."""
    far = 2**31 - 1 if dtype == torch.int32 else 2**40
    slots = torch.tensor([0, TOTAL, 5, -1, TOTAL + BS, far, TOTAL - 1, TOTAL * 3 + 1], dtype=dtype)
    clean = torch.where(slots >= TOTAL, torch.full_like(slots, -1), slots)
    return slots, clean


def _guarded_cache(layout: str, dtype: torch.dtype):
    """(key guard, value guard, key_cache view, value_cache view) in ``layout``; one whole cache of
    guard on each side."""
    g = NB * BS * H * D
    fill = -3.0  # representable in every cache dtype here (bf16, fp16, e4m3fn)
    if layout == "NHD":
        kg = Guarded((NB, BS, H, D), dtype, g, fill)
        vg = Guarded((NB, BS, H, D), dtype, g, fill)
        return kg, vg, kg.view, vg.view
    if layout == "HND":
        kg = Guarded((NB, H, BS, D), dtype, g, fill)
        vg = Guarded((NB, H, BS, D), dtype, g, fill)
        return kg, vg, kg.view.permute(0, 2, 1, 3), vg.view.permute(0, 2, 1, 3)
    assert layout == "head-major"
    x = 16 // dtype.itemsize
    kg = Guarded((NB, H, D // x, BS, x), dtype, g, fill)
    vg = Guarded((NB, H, D, BS), dtype, g, fill)
    return kg, vg, kg.view, vg.view


WRITE_CASES = [
    ("NHD", torch.bfloat16, torch.int64, "auto"),
    ("head-major", torch.float16, torch.int32, "auto"),
    ("HND", torch.bfloat16, torch.int64, "fp8"),
]


@pytest.mark.parametrize("layout,dtype,slot_dtype,kv_cache_dtype", WRITE_CASES,
                         ids=["-".join(map(str, c)).replace("torch.", "") for c in WRITE_CASES])
def test_write_slot_past_the_cache_is_dropped(layout, dtype, slot_dtype, kv_cache_dtype):
    quant = kv_cache_dtype != "auto"
    cache_dtype = torch.float8_e4m3fn if quant else dtype
    slots, clean = _bad_slots(slot_dtype)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(slots.numel(), H, D, generator=gen).to(dtype)
    value = torch.randn(slots.numel(), H, D, generator=gen).to(dtype)
    ks = torch.tensor([0.5, 2.0]) if quant else None  # per-head scales
    vs = torch.tensor([1.5, 0.25]) if quant else None
    kg, vg, kc, vc = _guarded_cache(layout, cache_dtype)
    rg, rvg, rk, rv = _guarded_cache(layout, cache_dtype)
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, rk, rv, clean, kv_cache_dtype, ks, vs)
    with force_backend(BACKEND):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots, kv_cache_dtype, ks, vs)
    kg.assert_guards_intact("key_cache")
    vg.assert_guards_intact("value_cache")
    assert torch.equal(kg.buf.view(torch.uint8), rg.buf.view(torch.uint8)), "key_cache differs from the reference"
    assert torch.equal(vg.buf.view(torch.uint8), rvg.buf.view(torch.uint8)), "value_cache differs"


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_write_slot_past_the_cache_is_dropped(slot_dtype):
    rank, rope = 32, 16
    slots, clean = _bad_slots(slot_dtype)
    gen = torch.Generator().manual_seed(1)
    kv_c = torch.randn(slots.numel(), rank, generator=gen).to(torch.bfloat16)
    k_pe = torch.randn(slots.numel(), rope, generator=gen).to(torch.bfloat16)
    g = NB * BS * (rank + rope)
    got = Guarded((NB, BS, rank + rope), torch.bfloat16, g, -3.0)
    ref = Guarded((NB, BS, rank + rope), torch.bfloat16, g, -3.0)
    with force_backend("reference"):
        kvd.concat_and_cache_mla(kv_c, k_pe, ref.view, clean)
    with force_backend(BACKEND):
        kvd.concat_and_cache_mla(kv_c, k_pe, got.view, slots)
    got.assert_guards_intact("kv_cache")
    assert torch.equal(got.buf.view(torch.uint8), ref.buf.view(torch.uint8)), "kv_cache differs from the reference"


def test_write_all_slots_valid_still_written():
    """The bound drops nothing valid: the last slot of the last block is written."""
    slots = torch.tensor([TOTAL - 1, 0], dtype=torch.int64)
    key = torch.randn(2, H, D).to(torch.bfloat16)
    kg, vg, kc, vc = _guarded_cache("NHD", torch.bfloat16)
    with force_backend(BACKEND):
        kvd.reshape_and_cache_flash(key, key, kc, vc, slots)
    assert torch.equal(kc[NB - 1, BS - 1], key[0]) and torch.equal(kc[0, 0], key[1])
    kg.assert_guards_intact("key_cache")


# -- attention ------------------------------------------------------------------------------------

_A = AttnCase(q_lens=(2, 1, 3), k_lens=(20, 5, 33), num_q_heads=4, num_kv_heads=2, head_size=64,
              block_size=16, lse=True)
NAN = float("nan")
OUT_FILL = 123.0


def _attention_op(kw, out, lse):
    wl, wr = kw["window_size"]
    torch.ops.kvdispatch.flash_attn_varlen_func(
        kw["q"], kw["k"], kw["v"], out, kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
        kw.get("cu_seqlens_k"), kw.get("seqused_k"), kw["softmax_scale"], kw["causal"], wl, wr, kw["softcap"],
        kw.get("block_table"), None, None, None, None, None, lse, 0)


def _reference(kw):
    total_q, hq = kw["q"].shape[0], kw["q"].shape[1]
    out = torch.full((total_q, hq, kw["k"].shape[-1]), NAN)
    lse = torch.full((hq, total_q), NAN)
    with force_backend("reference"):
        _attention_op(kw, out, lse)
    return out, lse


def _guarded_inputs(case: AttnCase, seed: int = 0):
    """make_attention_inputs with K / V inside NaN guards (a whole cache each side) and out / LSE
    inside sentinel guards. Returns (kw, guards: dict name -> Guarded, out view, lse view)."""
    kw = make_attention_inputs(case, seed=seed)
    kw.pop("return_softmax_lse", None)
    guards = {}
    for name in ("k", "v"):
        src = kw[name]
        g = Guarded(tuple(src.shape), src.dtype, src.numel(), NAN)
        g.view.copy_(src)
        # the guard bytes were captured at construction (all NaN); copy_ only touched the view
        guards[name] = g
        kw[name] = g.view
    total_q, hq = kw["q"].shape[0], kw["q"].shape[1]
    og = Guarded((total_q, hq, kw["k"].shape[-1]), kw["out"].dtype, 4 * hq * kw["k"].shape[-1], OUT_FILL)
    lg = Guarded((hq, total_q), torch.float32, 4 * total_q, OUT_FILL)
    guards["out"], guards["softmax_lse"] = og, lg
    return kw, guards, og.view, lg.view


def _run(kw, guards, out, lse):
    with force_backend(BACKEND):
        _attention_op(kw, out, lse)
    for name, g in guards.items():
        g.assert_guards_intact(name)


def _rows(kw, b):
    cu = kw["cu_seqlens_q"]
    return slice(int(cu[b]), int(cu[b + 1]))


def _assert_rows_match(got_out, got_lse, ref_out, ref_lse, rows, what):
    g, r = got_out[rows].float(), ref_out[rows].float()
    assert not torch.isnan(g).any(), f"{what}: NaN in out (a read from the guard, or a row unwritten)"
    err = (g - r).norm() / r.norm().clamp_min(1e-6)
    assert err < 2e-2, f"{what}: out relative error {float(err):.2e}"
    gl, rl = got_lse[:, rows], ref_lse[:, rows]
    assert not torch.isnan(gl).any(), f"{what}: NaN in lse"
    assert torch.allclose(gl, rl, atol=5e-2, rtol=0), f"{what}: lse differs"


@pytest.mark.parametrize("bad", ["negative", "huge", "int32-max"])
def test_block_ids_out_of_range_are_clamped(bad):
    """Block ids in live columns of sequence 1 (negative, past num_blocks, INT32_MAX): clamped
    to [0, num_blocks - 1]; the other sequences are untouched, sequence 1 reads the clamped block."""
    kw, guards, out, lse = _guarded_inputs(_A, seed=1)
    ref_out, ref_lse = _reference(kw)
    nb = kw["k"].shape[0]
    val = {"negative": -7, "huge": nb + 5, "int32-max": 2**31 - 1}[bad]
    bt = kw["block_table"].clone()
    bt[1, 0] = val
    bt[2, 1] = -(2**31) if bad == "int32-max" else val  # a middle column of sequence 2 too
    kw_bad = {**kw, "block_table": bt}
    _run(kw_bad, guards, out, lse)
    _assert_rows_match(out, lse, ref_out, ref_lse, _rows(kw, 0), "sequence 0 (valid)")
    clamped_out, clamped_lse = _reference({**kw, "block_table": bt.clamp(0, nb - 1)})
    for b in (1, 2):
        _assert_rows_match(out, lse, clamped_out, clamped_lse, _rows(kw, b), f"sequence {b} (clamped ids)")


@pytest.mark.parametrize("over", [1, 100, 2**31 - 1 - 64])
def test_seqused_k_past_the_block_table_is_clamped(over):
    """seqused_k above max_blocks_per_seq * block_size (block_table.shape[1] columns): clamped to
    that capacity; the other sequences are untouched."""
    kw, guards, out, lse = _guarded_inputs(_A, seed=2)
    ref_out, ref_lse = _reference(kw)
    cap = kw["block_table"].shape[1] * _A.block_size
    used = kw["seqused_k"].clone()
    used[1] = cap + over
    _run({**kw, "seqused_k": used}, guards, out, lse)
    for b in (0, 2):
        _assert_rows_match(out, lse, ref_out, ref_lse, _rows(kw, b), f"sequence {b} (valid)")
    used_c = used.clamp(0, cap)
    clamped_out, clamped_lse = _reference({**kw, "seqused_k": used_c, "max_seqlen_k": cap})
    _assert_rows_match(out, lse, clamped_out, clamped_lse, _rows(kw, 1), "sequence 1 (clamped length)")


def test_negative_seqused_k_sees_no_key():
    kw, guards, out, lse = _guarded_inputs(_A, seed=3)
    ref_out, ref_lse = _reference(kw)
    used = kw["seqused_k"].clone()
    used[0] = -5
    _run({**kw, "seqused_k": used}, guards, out, lse)
    rows = _rows(kw, 0)
    assert torch.equal(out[rows].float(), torch.zeros_like(out[rows].float()))
    assert torch.isinf(lse[:, rows]).all() and (lse[:, rows] < 0).all()
    for b in (1, 2):
        _assert_rows_match(out, lse, ref_out, ref_lse, _rows(kw, b), f"sequence {b} (valid)")


@pytest.mark.parametrize("paged", [True, False])
def test_cu_seqlens_q_past_total_q(paged):
    """cu_seqlens_q[-1] > total_q: no row past q is read or written (out / LSE guards), the last
    sequence's rows are finite, the other sequences equal the reference."""
    case = replace(_A, paged=paged)
    kw, guards, out, lse = _guarded_inputs(case, seed=4)
    ref_out, ref_lse = _reference(kw)
    cu = kw["cu_seqlens_q"].clone()
    total_q = kw["q"].shape[0]
    cu[-1] = total_q + 50
    _run({**kw, "cu_seqlens_q": cu, "max_seqlen_q": 60}, guards, out, lse)
    for b in (0, 1):
        _assert_rows_match(out, lse, ref_out, ref_lse, _rows(kw, b), f"sequence {b} (valid)")
    last = slice(int(cu[-2]), total_q)
    assert torch.isfinite(out[last].float()).all() and not torch.isnan(lse[:, last]).any()


def test_cu_seqlens_q_garbage_stays_in_batch():
    """Non-monotonic / negative / huge cu_seqlens_q: the bisection over [0, batch) keeps every
    per-sequence read in bounds; every row written is finite (no NaN read from a K/V guard)."""
    kw, guards, out, lse = _guarded_inputs(_A, seed=5)
    cu = torch.tensor([3, -(2**31), 2**31 - 1, 1], dtype=torch.int32)
    _run({**kw, "cu_seqlens_q": cu, "max_seqlen_q": 2**31 - 1}, guards, out, lse)
    written = ~(out.float() == OUT_FILL).all(dim=2).all(dim=1)
    assert not torch.isnan(out.float()[written]).any()


@pytest.mark.parametrize("bad", ["last-past", "start-past", "negative-start", "decreasing"])
def test_non_paged_cu_seqlens_k_past_total_k(bad):
    """Non-paged keys: [cu_seqlens_k[b], cu_seqlens_k[b + 1]) clamped to k's real rows
    [0, total_k); NaN guards around k / v show any read outside them."""
    case = replace(_A, paged=False, causal=False)
    kw, guards, out, lse = _guarded_inputs(case, seed=6)
    ref_out, ref_lse = _reference(kw)
    total_k = kw["k"].shape[0]
    ck = kw["cu_seqlens_k"].clone()  # [0, 20, 25, 58]
    if bad == "last-past":
        ck[-1] = total_k + 1000
    elif bad == "start-past":
        ck[2], ck[3] = total_k + 7, total_k + 40
    elif bad == "negative-start":
        ck[2] = -30
    else:
        ck[2] = 2**31 - 1  # sequence 1 has a negative length, sequence 2 starts past the end
    _run({**kw, "cu_seqlens_k": ck, "max_seqlen_k": 2**31 - 1}, guards, out, lse)
    _assert_rows_match(out, lse, ref_out, ref_lse, _rows(kw, 0), "sequence 0 (valid)")
    assert torch.isfinite(out.float()).all(), "NaN in out: a key or value was read from a guard"
    if bad == "last-past":  # defined by the clamp: the last sequence ends at total_k
        ck_c = ck.clamp(0, total_k)
        c_out, c_lse = _reference({**kw, "cu_seqlens_k": ck_c})
        for b in (1, 2):
            _assert_rows_match(out, lse, c_out, c_lse, _rows(kw, b), f"sequence {b}")


def test_empty_batch_with_a_nonzero_offset_reads_nothing():
    """batch = 0 (cu_seqlens_q of one element) with cu_seqlens_q[0] > 0: no sequence, so no row
    is written and no per-sequence value is read (the index vectors sit in guards that would give
    a huge key range)."""
    case = replace(_A, paged=False, causal=False)
    kw, guards, out, lse = _guarded_inputs(case, seed=7)
    big = 2**31 - 1
    cq = torch.full((5,), big, dtype=torch.int32)
    cq[2] = 3  # cu_seqlens_q = [3]: rows 0..2 would be below the "end" of the batch
    ck = torch.full((5,), big, dtype=torch.int32)
    ck[2] = 0
    kw = {**kw, "cu_seqlens_q": cq[2:3], "cu_seqlens_k": ck[2:3], "max_seqlen_q": big, "max_seqlen_k": big}
    _run(kw, guards, out, lse)
    assert (out.float() == OUT_FILL).all() and (lse == OUT_FILL).all(), "a row of no sequence was written"
