"""The Triton kernels never read or write outside their tensors, whatever the index tensors hold,
with the value checks off (they run only under ``KVDISPATCH_DEBUG=1`` and for the reference).

Every cache / output / block table here is a view in the middle of a larger buffer whose guard
regions hold a sentinel: the guards must come back bit-identical. Reads are caught too: the
guards of K/V hold NaN (a key read from them turns its row NaN), and the guards of a block table
name a NaN-filled "poison" block that no valid entry uses. Rows of a sequence whose indices are
out of range are garbage-but-safe (finite here: every block they can reach holds finite values);
the other sequences of the batch equal the reference run on them alone.
"""

from __future__ import annotations

import pytest
import torch

import kvdispatch as kvd
from kvbench.compare import force_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.interpret if DEVICE == "cpu" else pytest.mark.gpu

G = 256  # guard elements on each side of every guarded tensor (a multiple of 16: keeps alignment)
BIG64 = 2**62


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("KVDISPATCH_DEBUG", raising=False)


def _guarded(shape, dtype, fill, sentinel, perm=None):
    """``(view, buffer)``: a tensor of ``shape`` (stored in ``perm`` order when given) in the middle
    of a flat buffer whose ``G`` elements on each side hold ``sentinel``."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((G + n + G,), sentinel, dtype=dtype, device=DEVICE)
    if perm is None:
        view = buf[G:G + n].view(shape)
    else:
        stored = tuple(shape[p] for p in perm)
        inv = [perm.index(i) for i in range(len(shape))]
        view = buf[G:G + n].view(stored).permute(*inv)
    view.copy_(fill)
    return view, buf


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).clone()


def _guards(buf: torch.Tensor) -> torch.Tensor:
    return torch.cat([_bits(buf[:G]), _bits(buf[-G:])])


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


# -- writes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout,dtype,kv_cache_dtype", [
    ("nhd", torch.float32, "auto"),      # merged whole-token rows
    ("hnd", torch.bfloat16, "auto"),     # per-head rows, permuted cache
    ("nhd", torch.float16, "fp8"),       # fp8 conversion path
])
def test_write_slot_past_the_end_is_dropped(layout, dtype, kv_cache_dtype, slot_dtype):
    gen = torch.Generator().manual_seed(0)
    nb, bs, h, d = 4, 16, 2, 32
    total = nb * bs
    cache_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else dtype
    perm = (0, 2, 1, 3) if layout == "hnd" else None
    init = torch.zeros(nb, bs, h, d, dtype=cache_dtype, device=DEVICE)
    sentinel = 0.5
    kc, kbuf = _guarded((nb, bs, h, d), cache_dtype, init, sentinel, perm)
    vc, vbuf = _guarded((nb, bs, h, d), cache_dtype, init, sentinel, perm)
    huge = BIG64 if slot_dtype == torch.int64 else 2**31 - 1
    slots = [3, total, 17, total + 5, huge, -1, total - 1, total * 1000]
    n = len(slots)
    key = _rand((n, h, d), dtype, gen)
    value = _rand((n, h, d), dtype, gen)
    scale = torch.tensor([0.5], device=DEVICE) if kv_cache_dtype == "fp8" else None
    slot_mapping = torch.tensor(slots, dtype=slot_dtype, device=DEVICE)
    kg, vg = _guards(kbuf), _guards(vbuf)
    with force_backend("triton"):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slot_mapping, kv_cache_dtype, scale, scale)
    assert torch.equal(_guards(kbuf), kg) and torch.equal(_guards(vbuf), vg)
    # what the reference writes for the in-range slots alone
    kr, vr = init.clone(), init.clone()
    if perm is not None:
        kr = kr.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(4)])
        vr = vr.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(4)])
    clean = torch.where((slot_mapping >= 0) & (slot_mapping < total), slot_mapping, -1)
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, kr, vr, clean, kv_cache_dtype, scale, scale)
    assert torch.equal(_bits(kc), _bits(kr)) and torch.equal(_bits(vc), _bits(vr))


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_write_slot_past_the_end_is_dropped(slot_dtype):
    gen = torch.Generator().manual_seed(1)
    nb, bs, rank, rope = 3, 16, 64, 16
    total = nb * bs
    init = torch.zeros(nb, bs, rank + rope, device=DEVICE)
    cache, buf = _guarded((nb, bs, rank + rope), torch.float32, init, 0.5)
    huge = BIG64 if slot_dtype == torch.int64 else 2**31 - 1
    slots = [total, 0, huge, total - 1, -3, total + 1]
    n = len(slots)
    kv_c, k_pe = _rand((n, rank), torch.float32, gen), _rand((n, rope), torch.float32, gen)
    slot_mapping = torch.tensor(slots, dtype=slot_dtype, device=DEVICE)
    guards = _guards(buf)
    with force_backend("triton"):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, slot_mapping)
    assert torch.equal(_guards(buf), guards)
    ref = init.clone()
    clean = torch.where((slot_mapping >= 0) & (slot_mapping < total), slot_mapping, -1)
    with force_backend("reference"):
        kvd.concat_and_cache_mla(kv_c, k_pe, ref, clean)
    assert torch.equal(cache, ref)


# -- paged attention ----------------------------------------------------------------------------
NB, BS, HKV, GROUP, D = 8, 16, 2, 2, 32
POISON = 3  # a NaN-filled block no valid entry names (not 0 / NB - 1: where clamped ids land)


def _paged_cache(dtype, gen):
    fill = torch.randn(NB, BS, HKV, D, generator=gen)
    fill[POISON] = float("nan")
    k, kbuf = _guarded((NB, BS, HKV, D), dtype, fill.to(dtype).to(DEVICE), float("nan"))
    fill = torch.randn(NB, BS, HKV, D, generator=gen)
    fill[POISON] = float("nan")
    v, vbuf = _guarded((NB, BS, HKV, D), dtype, fill.to(dtype).to(DEVICE), float("nan"))
    return k, v, kbuf, vbuf


def _attend(backend, q, k, v, cu_q, max_q, seqused, bt, max_k, out, num_splits, causal=True,
            cu_k=None):
    with force_backend(backend):
        return kvd.flash_attn_varlen_func(q, k, v, max_q, cu_q, max_k, cu_seqlens_k=cu_k, seqused_k=seqused,
                                          causal=causal, block_table=bt, out=out, num_splits=num_splits,
                                          return_softmax_lse=True)


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _check_row_subset(q, k, v, out, lse, cu_q, seqused, bt, rows_of, good, dtype, num_splits,
                      max_q, max_k, causal=True, cu_k=None):
    """Sequences ``good`` of the batch equal the reference run on them alone."""
    for b in good:
        lo, hi = rows_of[b]
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=DEVICE)
        ref_out = torch.empty(hi - lo, q.shape[1], v.shape[-1], dtype=out.dtype, device=DEVICE)
        if bt is not None:
            ref, ref_lse = _attend("reference", q[lo:hi], k, v, cu, max_q, seqused[b:b + 1].clone(),
                                   bt[b:b + 1].clone(), max_k, ref_out, 1, causal)
        else:
            klo, khi = int(cu_k[b]), int(cu_k[b + 1])
            ck = torch.tensor([0, khi - klo], dtype=torch.int32, device=DEVICE)
            ref, ref_lse = _attend("reference", q[lo:hi], k[klo:khi], v[klo:khi], cu, max_q, None, None, max_k,
                                   ref_out, 1, causal, ck)
        torch.testing.assert_close(out[lo:hi].float(), ref.float(), **_tol(dtype))
        torch.testing.assert_close(lse[:, lo:hi], ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 5])
def test_paged_bad_block_ids_and_seqused(dtype, num_splits, q_len):
    """seq 0 valid; seq 1 names negative / huge block ids in its live columns; seq 2 (the block
    table's last row) has seqused_k far past its row's capacity."""
    gen = torch.Generator().manual_seed(2)
    k, v, kbuf, vbuf = _paged_cache(dtype, gen)
    batch, cols = 3, 4
    table = torch.tensor([[0, 5, 2, 7],
                          [-1, 2**31 - 1, -(2**31), 100],
                          [6, 4, 1, 0]], dtype=torch.int32)
    bt, btbuf = _guarded((batch, cols), torch.int32, table.to(DEVICE), POISON)
    seqused = torch.tensor([50, 40, 10**6], dtype=torch.int32, device=DEVICE)
    total_q = batch * q_len
    hq = HKV * GROUP
    q = _rand((total_q, hq, D), dtype, gen)
    out, obuf = _guarded((total_q, hq, D), dtype, torch.zeros(total_q, hq, D, dtype=dtype), 777.0)
    cu_q = torch.arange(0, total_q + 1, q_len, dtype=torch.int32, device=DEVICE)
    snap = (_bits(kbuf), _bits(vbuf), _bits(btbuf), _guards(obuf))
    o, lse = _attend("triton", q, k, v, cu_q, q_len, seqused, bt, 64, out, num_splits)
    assert o is out
    assert torch.equal(_bits(kbuf), snap[0]) and torch.equal(_bits(vbuf), snap[1])
    assert torch.equal(_bits(btbuf), snap[2]) and torch.equal(_guards(obuf), snap[3])
    # garbage-but-safe: no NaN from a guard or the poison block
    assert torch.isfinite(out.float()).all()
    rows_of = {b: (b * q_len, (b + 1) * q_len) for b in range(batch)}
    _check_row_subset(q, k, v, out, lse, cu_q, seqused, bt, rows_of, [0], dtype, num_splits, q_len, 64)
    # the clamped length: seq 2 is exactly the reference over its row's full capacity
    seqused_cap = seqused.clone()
    seqused_cap[2] = cols * BS
    _check_row_subset(q, k, v, out, lse, cu_q, seqused_cap, bt, rows_of, [2], dtype, num_splits, q_len, 64)


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("paged", [True, False])
def test_cu_seqlens_q_past_total_q(paged, num_splits, wrap):
    """cu_seqlens_q[-1] > total_q: no row of q/out at or past total_q is read or written; the
    sequences inside q are exact (the cut one is garbage-but-safe). ``wrap``: one more sequence
    ending at -2^31 (end - start must not wrap around to a huge length); cu_seqlens_q[-1] < 0 then,
    so the split-KV merge (which skips rows past cu_seqlens_q[-1]) writes no row at all."""
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32
    hq = HKV * GROUP
    total_q = 7
    q, qbuf = _guarded((total_q, hq, D), dtype, _rand((total_q, hq, D), dtype, gen), float("nan"))
    out, obuf = _guarded((total_q, hq, D), dtype, torch.zeros(total_q, hq, D), 777.0)
    # seq 2 cut at total_q, seq 3 outside q (wrap: seq 4 from 40 to -2^31)
    cu_q = torch.tensor([0, 3, 5, 12, 40] + ([-2**31] if wrap else []), dtype=torch.int32, device=DEVICE)
    batch = cu_q.shape[0] - 1
    if paged:
        k, v, kbuf, vbuf = _paged_cache(dtype, gen)
        bt = torch.tensor([[0, 1, 2], [4, 5, 6], [7, 0, 1], [2, 4, 5], [0, 1, 2]][:batch], dtype=torch.int32,
                          device=DEVICE)
        seqused = torch.tensor([20, 33, 40, 48, 30][:batch], dtype=torch.int32, device=DEVICE)
        cu_k = None
    else:
        total_k = 60
        k, kbuf = _guarded((total_k, HKV, D), dtype, _rand((total_k, HKV, D), dtype, gen), float("nan"))
        v, vbuf = _guarded((total_k, HKV, D), dtype, _rand((total_k, HKV, D), dtype, gen), float("nan"))
        bt = seqused = None
        cu_k = torch.tensor([0, 10, 25, 45, 60, 60][:batch + 1], dtype=torch.int32, device=DEVICE)
    snap = (_guards(obuf), _bits(qbuf), _bits(kbuf), _bits(vbuf))
    # a max_seqlen_k hint long enough for two splits of any platform's key tile (a GPU's prefill
    # tile holds 64-128 keys: 48 keys would be one split there, and no merge would run)
    max_k = 48 if num_splits == 1 else 1024
    o, lse = _attend("triton", q, k, v, cu_q, 35, seqused, bt, max_k, out, num_splits, cu_k=cu_k)
    assert torch.equal(_guards(obuf), snap[0]) and torch.equal(_bits(qbuf), snap[1])
    assert torch.equal(_bits(kbuf), snap[2]) and torch.equal(_bits(vbuf), snap[3])
    assert torch.isfinite(out).all()  # no q row from the NaN guard
    if wrap and num_splits > 1:
        assert torch.equal(out, torch.zeros_like(out))
        return
    rows_of = {0: (0, 3), 1: (3, 5)}
    _check_row_subset(q, k, v, out, lse, cu_q, seqused, bt, rows_of, [0, 1], dtype, num_splits, 35, max_k,
                      cu_k=cu_k)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_non_paged_cu_seqlens_k_past_total_k(num_splits):
    """Non-paged: cu_seqlens_k past k's rows (and a decreasing entry): keys stay in [0, total_k)."""
    gen = torch.Generator().manual_seed(4)
    dtype = torch.float32
    hq = HKV * GROUP
    total_k = 24
    k, kbuf = _guarded((total_k, HKV, D), dtype, _rand((total_k, HKV, D), dtype, gen), float("nan"))
    v, vbuf = _guarded((total_k, HKV, D), dtype, _rand((total_k, HKV, D), dtype, gen), float("nan"))
    cu_q = torch.tensor([0, 2, 4, 6, 8, 10, 12], dtype=torch.int32, device=DEVICE)
    # seq 0 valid, seq 1 runs past total_k, seq 2 entirely past it, seq 3 decreasing (-> empty),
    # seq 4 ends at -2^31 (end - start must not wrap around), seq 5 starts below 0 (cut to [0, 3))
    cu_k = torch.tensor([0, 9, 40, 10**6, 5, -2**31, 3], dtype=torch.int32, device=DEVICE)
    total_q = 12
    q = _rand((total_q, hq, D), dtype, gen)
    out, obuf = _guarded((total_q, hq, D), dtype, torch.zeros(total_q, hq, D), 777.0)
    snap = (_bits(kbuf), _bits(vbuf), _guards(obuf))
    o, lse = _attend("triton", q, k, v, cu_q, 2, None, None, 64, out, num_splits, causal=False, cu_k=cu_k)
    assert torch.equal(_bits(kbuf), snap[0]) and torch.equal(_bits(vbuf), snap[1])
    assert torch.equal(_guards(obuf), snap[2])
    assert torch.isfinite(out).all()  # no key from the NaN guards
    _check_row_subset(q, k, v, out, lse, cu_q, None, None, {0: (0, 2)}, [0], dtype, num_splits, 2, 64,
                      causal=False, cu_k=cu_k)
    # seq 1 is exactly its keys cut to k's rows: [9, 24)
    cut = cu_k.clone()
    cut[2] = total_k
    _check_row_subset(q, k, v, out, lse, cu_q, None, None, {1: (2, 4)}, [1], dtype, num_splits, 2, 64,
                      causal=False, cu_k=cut)
    # seqs 2, 3 and 4 see no key: 0 and lse -inf
    assert torch.equal(out[4:10], torch.zeros_like(out[4:10]))
    assert torch.isneginf(lse[:, 4:10]).all()
    # seq 5 is keys [0, 3)
    cut = torch.tensor([0, 0, 0, 0, 0, 0, 3], dtype=torch.int32, device=DEVICE)
    _check_row_subset(q, k, v, out, lse, cu_q, None, None, {5: (10, 12)}, [5], dtype, num_splits, 2, 64,
                      causal=False, cu_k=cut)


def test_write_plan_constexprs_in_signature_order():
    """The direct launch passes the plan's constexprs positionally after the runtime ints: the
    dict (NUM_SLOTS included) must follow the kernel's signature."""
    import inspect
    from kvdispatch.backends.triton import write
    from kvbench.layouts import make_kv_cache
    kc, vc = make_kv_cache("NHD", 4, 16, 2, 32, dtype=torch.float32, device=DEVICE)
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    key = torch.zeros(3, 2, 32, device=DEVICE)
    plan = write.plan_for(key, key, kc, vc, torch.zeros(3, dtype=torch.int64, device=DEVICE), desc)
    params = list(inspect.signature(write._write_kv_kernel.fn).parameters.values())
    const = [p.name for p in params if "constexpr" in str(p.annotation)]
    assert list(plan.constexprs) == const
    assert plan.constexprs["NUM_SLOTS"] == 4 * 16
