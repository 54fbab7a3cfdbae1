"""The Triton attention kernel on a real GPU at real sizes (marker ``gpu``; skipped without one).

Every case runs the compiled kernel and the reference (float32) on the same CUDA tensors: the
shared matrix scaled up, batch 1 and 256, lengths that are not multiples of the page, kv shorter
than a page, q_len 0 sequences, window and softcap with causal, fp8 caches, MLA 576/512 slices,
split-KV chosen by the heuristic and forced through ``num_splits`` (with sinks, LSE and ALiBi; the
out-dtype switch that once reused an fp32 merge kernel for bf16), batch invariance with
``num_splits=1``, a cache past 2^31 elements (int64 offsets), opcheck,
``torch.compile(fullgraph=True)`` and CUDA-graph replay with new lengths and block tables.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import ops
from kvdispatch.backends.triton import attention

from matrix import (AttnCase, attention_cases, force_backend, make_attention_inputs, run_attention_case,
                    run_poisoned_lse, run_with_hints)

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("case", attention_cases(big=True), ids=lambda c: c.id)
def test_matrix_attention_big(case):
    run_attention_case(case, "triton", device=DEV)
    run_attention_case(case, "triton", device=DEV, seed=1)  # cached launch: the direct path


_D = AttnCase(num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16)
BIG = [
    # batch 1 and 256 decode, lengths not multiples of the page (and shorter than one page)
    replace(_D, q_lens=(1,), k_lens=(5000,)),
    replace(_D, q_lens=(1,) * 256, k_lens=tuple((i * 37) % 900 + 1 for i in range(256))),
    replace(_D, q_lens=(1, 1, 1, 1), k_lens=(3, 15, 16, 17)),
    # few long sequences: the heuristic splits the keys
    replace(_D, q_lens=(1, 1), k_lens=(20011, 9000)),
    replace(_D, q_lens=(1, 1), k_lens=(20011, 9000), fp8="e4m3", descale="batch_head"),
    replace(_D, q_lens=(1, 1, 1), k_lens=(12000, 333, 7001), fp8="e5m2"),
    # mixed chunked prefill with q_len 0 sequences, window + softcap with causal
    replace(_D, q_lens=(0, 300, 1, 0, 77), k_lens=(50, 1000, 2000, 0, 77)),
    replace(_D, q_lens=(0, 300, 1, 77), k_lens=(50, 1000, 2000, 77), window=(128, 0), softcap=30.0),
    # many decodes around a few chunks (the prefill launch's binary search and its decode tile), fp8 too
    replace(_D, q_lens=(1,) * 40 + (300, 0, 17, 129, 1, 64, 2), k_lens=tuple(3000 - 61 * i for i in range(47))),
    replace(_D, q_lens=(5, 1, 1, 200) + (1,) * 20, k_lens=(40, 4097, 16, 900) + (1500,) * 20, fp8="e4m3",
            layout="HND"),
    replace(_D, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1, 1, 20), k_lens=(3000, 100, 17, 40)),
    replace(_D, q_lens=(513, 64), k_lens=(513, 1500), layout="HND", window=(256, 0)),
    replace(_D, q_lens=(513, 64), k_lens=(513, 1500), paged=False),
    # prefill at a real size, every head size the issue lists
    *[replace(_D, q_lens=(700, 129), k_lens=(700, 200), head_size=d, num_q_heads=8, num_kv_heads=2)
      for d in (64, 80, 96, 128, 192, 256)],
    # MLA decode at its real sizes: 16 q heads, one latent head, q/k 576, v 512, one buffer
    replace(_D, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1,) * 8, k_lens=(4097, 100, 1, 3000, 16, 17, 2048, 999)),
    replace(_D, layout="mla-slices", num_q_heads=128, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1), k_lens=(9000, 4000)),
    # fp8 q and caches, out bf16
    replace(_D, q_lens=(1, 5, 1), k_lens=(3000, 200, 17), fp8="e4m3", q_fp8=True, descale="batch_head"),
    # prefill over fp8 caches (the fp8 prefill tile): fp8 q (QK^T on the fp8 tensor cores) and bf16 q
    replace(_D, q_lens=(700, 129, 1), k_lens=(700, 900, 3000), fp8="e4m3", q_fp8=True, descale="batch_head",
            layout="HND"),
    replace(_D, q_lens=(700, 129), k_lens=(700, 200), fp8="e4m3", q_fp8=True, head_size=80, num_q_heads=8,
            num_kv_heads=2, window=(300, 0), softcap=30.0),
    replace(_D, q_lens=(700, 129), k_lens=(700, 200), fp8="e4m3", descale="batch_head"),
    # other page sizes
    replace(_D, q_lens=(1, 40), k_lens=(1000, 333), block_size=1),
    replace(_D, q_lens=(1, 40), k_lens=(1000, 333), block_size=64, layout="combined"),
]


@pytest.mark.parametrize("case", BIG, ids=lambda c: c.id[:120])
def test_real_sizes(case):
    run_attention_case(case, "triton", device=DEV)


@pytest.mark.parametrize("splits", [1, 4, 37])
def test_split_counts_agree(splits):
    run_attention_case(replace(_D, q_lens=(1, 1, 3), k_lens=(9000, 1, 4000), num_splits=splits), "triton",
                       device=DEV)


def test_split_kv_out_dtype_switch(monkeypatch):
    """The reported merge-key bug: decode B=2, seqused_k [1000, 900] in fp32, then bf16 (then fp16,
    bf16 q into an fp32 out) with the same shapes in one process. The merge kernel's direct-launch
    key lacked out's dtype, so the bf16 call reused the fp32-compiled merge (max error 7e37). Each
    configuration runs twice: the second call takes the direct launch."""
    direct = set()  # out dtypes whose merge found a compiled kernel of its own prepared launch
    merge = attention._merge

    def spied_merge(prep, ws_o, ws_ml, out, cu_q, sink, lse, total_q, batch, num_splits, direct_ok):
        if direct_ok and num_splits in prep.merges:
            direct.add(out.dtype)
        return merge(prep, ws_o, ws_ml, out, cu_q, sink, lse, total_q, batch, num_splits, direct_ok)

    monkeypatch.setattr(attention, "_merge", spied_merge)
    for splits in (4, 0, 7):
        for _ in range(2):
            for dtype, out_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                     (torch.bfloat16, torch.float32)):
                case = replace(_D, q_lens=(1, 1), k_lens=(1000, 900), dtype=dtype, out_dtype=out_dtype,
                               num_splits=splits)
                tol = 2e-2 if out_dtype == torch.float32 else None
                run_attention_case(case, "triton", device=DEV, rel_tol=tol)
    # the direct launches were taken (kept apart by out's dtype: it is in the call signature)
    assert {torch.float32, torch.bfloat16, torch.float16} <= direct, direct


def _run_poisoned_lse(case, num_splits=0, strided=False, seed=0):
    run_poisoned_lse(case, DEV, num_splits=num_splits, strided=strided, seed=seed)


# sinks, LSE and ALiBi at real sizes; with splits 0 (the heuristic splits the long decode cases),
# 1 (never), 4 and 16 (forced)
EXTRAS_BIG = [
    replace(_D, q_lens=(1, 1), k_lens=(20011, 9000), sinks=True, lse=True, alibi="head"),
    replace(_D, q_lens=(1, 1), k_lens=(1000, 900), dtype=torch.float32, sinks=True, lse=True,
            alibi="batch_head"),
    replace(_D, q_lens=(1, 1, 1), k_lens=(12000, 333, 7001), fp8="e4m3", descale="batch_head", sinks=True,
            lse=True, alibi="batch_head"),
    replace(_D, q_lens=(1, 1, 1, 1), k_lens=(0, 3, 15, 5000), sinks=True, lse=True),  # an empty sequence
    replace(_D, q_lens=(1, 1, 1), k_lens=(0, 7000, 5), lse=True, alibi="head"),  # empty, no sink: -inf
    replace(_D, q_lens=(0, 300, 1, 77), k_lens=(50, 1000, 2000, 77), window=(128, 0), softcap=30.0,
            sinks=True, lse=True, alibi="head"),
    replace(_D, q_lens=(513, 64), k_lens=(513, 1500), paged=False, sinks=True, lse=True, alibi="batch_head"),
    replace(_D, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1), k_lens=(9000, 4000), sinks=True, lse=True),
]


@pytest.mark.parametrize("splits", [0, 1, 4, 16])
@pytest.mark.parametrize("case", EXTRAS_BIG, ids=lambda c: c.id[:120])
def test_sinks_lse_alibi_split_kv(case, splits):
    run_attention_case(replace(case, num_splits=splits), "triton", device=DEV)
    _run_poisoned_lse(case, num_splits=splits, strided=splits % 2 == 0)


def test_extras_direct_launch_new_strides_and_lengths():
    """Repeated calls take the direct launches (attention and merge): the ALiBi / LSE strides and
    total_q are runtime arguments there, so a new LSE layout or batch length must still be right."""
    for splits in (1, 4):
        for rnd, (strided, k_lens) in enumerate(((False, (3000, 17)), (True, (3000, 17)), (False, (2999, 1)),
                                                 (True, (100, 3000)))):
            case = replace(_D, q_lens=(1, 1), k_lens=k_lens, sinks=True, alibi="batch_head")
            _run_poisoned_lse(case, num_splits=splits, strided=strided, seed=rnd)


def test_num_splits_1_is_batch_invariant():
    """vLLM's batch-invariant mode passes num_splits=1: a sequence's output is bitwise the same
    alone as in a batch (the heuristic would split the lone long sequence and not the batch)."""
    case = replace(_D, q_lens=(1,) * 8, k_lens=(20011, 17, 300, 5000, 9000, 1, 64, 2048), sinks=True,
                   alibi="head")
    kw = make_attention_inputs(case, DEV)
    with force_backend("triton"):
        full = kvd.flash_attn_varlen_func(**kw, num_splits=1).clone()
        for b in (0, 1, 4):
            alone = dict(kw, q=kw["q"][b:b + 1], cu_seqlens_q=kw["cu_seqlens_q"][:2],
                         seqused_k=kw["seqused_k"][b:b + 1].clone(), block_table=kw["block_table"][b:b + 1],
                         max_seqlen_k=case.k_lens[b],
                         out=torch.full_like(kw["out"][:1], float("nan")))
            got = kvd.flash_attn_varlen_func(**alone, num_splits=1)
            assert torch.equal(got[0], full[b]), b


def test_int64_offsets_cache_over_2_31_elements():
    """A bf16 NHD cache of 2^31 + elements: blocks past the int32 range are read correctly."""
    nb, bs, h, d = (1 << 31) // (16 * 8 * 128) + 64, 16, 8, 128
    k = torch.randn(nb, bs, h, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(nb, bs, h, d, dtype=torch.bfloat16, device=DEV)
    desc = kvd.KVCacheDescriptor.from_tensors(k, v)
    assert not desc.int32_offsets
    lens = [700, 33]
    table = torch.stack([torch.arange(nb - 50, nb - 6), torch.arange(0, 44)]).to(torch.int32).to(DEV)
    q = torch.randn(2, 32, d, dtype=torch.bfloat16, device=DEV)
    kw = dict(q=q, k=k, v=v, max_seqlen_q=1, cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV),
              max_seqlen_k=max(lens), seqused_k=torch.tensor(lens, dtype=torch.int32, device=DEV),
              block_table=table, causal=True)
    with force_backend("reference"):
        ref = kvd.flash_attn_varlen_func(**kw, out=torch.empty(2, 32, d, device=DEV))
    with force_backend("triton"):
        got = kvd.flash_attn_varlen_func(**kw)
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 2e-2
    del k, v
    torch.cuda.empty_cache()


def _op_args(case):
    kw = make_attention_inputs(case, DEV)
    return (kw["q"], kw["k"], kw["v"], kw["out"], kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
            kw.get("cu_seqlens_k"), kw.get("seqused_k"), kw["softmax_scale"], kw["causal"], kw["window_size"][0],
            kw["window_size"][1], kw["softcap"], kw.get("block_table"), kw.get("q_descale"), kw.get("k_descale"),
            kw.get("v_descale"), kw.get("alibi_slopes"), kw.get("s_aux"),
            torch.full((kw["q"].shape[1], kw["q"].shape[0]), float("nan"), device=DEV) if case.lse else None,
            case.num_splits)


@pytest.mark.parametrize("case", [replace(_D, q_lens=(1, 7), k_lens=(300, 20)),
                                  replace(_D, q_lens=(1, 1), k_lens=(300, 20), fp8="e4m3", layout="HND"),
                                  replace(_D, q_lens=(1, 7), k_lens=(3000, 20), alibi="head", sinks=True, lse=True,
                                          num_splits=4)],
                         ids=lambda c: c.id[:80])
def test_opcheck_cuda(case):
    args = _op_args(case)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if case.fp8:
        # opcheck's schema test compares inputs with torch.allclose, which has no fp8 kernel:
        # check here instead that only `out` changes
        utils = utils[1:]
        before = [t.view(torch.uint8).clone() for t in (args[1], args[2])]
    with force_backend("triton"):
        torch.library.opcheck(torch.ops.kvdispatch.flash_attn_varlen_func.default, args, test_utils=utils)
    if case.fp8:
        assert all(torch.equal(b, t.view(torch.uint8)) for b, t in zip(before, (args[1], args[2])))


def test_compile_fullgraph_cuda():
    case = replace(_D, q_lens=(1, 9, 1), k_lens=(400, 30, 2000))
    kw = make_attention_inputs(case, DEV)
    ref_out = torch.empty(kw["out"].shape, dtype=torch.float32, device=DEV)
    with force_backend("reference"):
        ref = kvd.flash_attn_varlen_func(**{**kw, "out": ref_out})

    def step(q, k, v, cu_q, seqused, table, out):
        o = kvd.flash_attn_varlen_func(q, k, v, kw["max_seqlen_q"], cu_q, kw["max_seqlen_k"], seqused_k=seqused,
                                       block_table=table, causal=True, out=out)
        return o * 2

    compiled = torch.compile(step, fullgraph=True)
    with force_backend("triton"):
        got = compiled(kw["q"], kw["k"], kw["v"], kw["cu_seqlens_q"], kw["seqused_k"], kw["block_table"], kw["out"])
    err = (got.float() / 2 - ref).norm() / ref.norm()
    assert err < 2e-2


@pytest.mark.parametrize("fp8", [None, "e4m3"])
def test_cuda_graph_replay_with_new_lengths(fp8):
    """Capture once (max lengths fixed), then replay with new seqused_k / block tables / q."""
    case = replace(_D, q_lens=(1,) * 8, k_lens=(3000,) * 8, fp8=fp8, descale="batch_head")
    kw = make_attention_inputs(case, DEV)
    with force_backend("triton"):
        kvd.flash_attn_varlen_func(**kw)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kvd.flash_attn_varlen_func(**kw)
    gen = torch.Generator().manual_seed(5)
    for lens in ([1, 2999, 17, 3000, 1000, 5, 2048, 64], [3000] * 8, [0, 7, 0, 9, 1, 1, 2, 3]):
        kw["seqused_k"].copy_(torch.tensor(lens, dtype=torch.int32))
        kw["block_table"].copy_(kw["block_table"][torch.randperm(8, generator=gen)])
        kw["q"].copy_(torch.randn(kw["q"].shape, generator=gen).to(kw["q"].dtype))
        kw["out"].fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref_out = torch.empty(kw["out"].shape, dtype=torch.float32, device=DEV)
        with force_backend("reference"):
            ref = kvd.flash_attn_varlen_func(**{**kw, "out": ref_out})
        got = kw["out"].float()
        assert not torch.isnan(got).any()
        err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
        assert err < 2e-2, (lens, float(err))


# -- no silent wrong result: fp8 NaN codes, max_seqlen hints below the real lengths ----------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvdispatch.backends.triton.attention import _to_compute  # noqa: E402

_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e4m3fnuz": torch.float8_e4m3fnuz}
# a NaN code of each kind, for a key and for a value (e4m3fn: S.1111.111; fnuz: 0x80 alone; e5m2: S.11111.xx)
_NAN_CODES = {"e4m3": (0xFF, 0x7F), "e5m2": (0xFF, 0x7E), "e4m3fnuz": (0x80, 0x80)}


@triton.jit
def _decode_codes_kernel(x_ptr, y_ptr, MODE: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(y_ptr + offs, _to_compute(tl.load(x_ptr + offs), MODE, COMPUTE).to(tl.float32))


@pytest.mark.parametrize("compute", ["fp32", "fp16"])
@pytest.mark.parametrize("fp8", list(_FP8))
def test_fp8_bit_decode_every_code_compiled(fp8, compute):
    """The compiled bit-moving decode (below sm89, e4m3fnuz on NVIDIA): torch's value for all 256
    codes, NaN codes NaN (e4m3fn S.1111.111 was 1.875 x factor, fnuz 0x80 was -0), e5m2's inf inf."""
    dtype = _FP8[fp8]
    mode = attention._BITS_MODE[dtype]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    y = torch.empty(256, dtype=torch.float32, device=DEV)
    _decode_codes_kernel[(1,)](codes, y, MODE=mode, COMPUTE=tl.float32 if compute == "fp32" else tl.float16)
    got = (y * attention._BITS_FACTOR[mode]).cpu()
    want = codes.cpu().view(dtype).float()
    bad = torch.nonzero(torch.isnan(got) != torch.isnan(want)).flatten().tolist()
    assert not bad, f"{fp8}: codes {[hex(c) for c in bad]} decode to NaN on one side only"
    fin = ~torch.isnan(want)
    bad = torch.nonzero(fin & (got != want)).flatten().tolist()
    assert not bad, f"{fp8}: codes {[hex(c) for c in bad]} decode to {got[bad].tolist()}, not {want[bad].tolist()}"


@pytest.fixture
def fp8_bits(monkeypatch):
    """Every fp8 cache through the bit-moving decode (as below sm89), in plans and compiled kernels
    of the test's own."""
    monkeypatch.setattr(attention, "_mode",
                        lambda dtype, platform, interpreting: attention._BITS_MODE.get(dtype, attention.PLAIN))
    monkeypatch.setattr(ops, "_ATTN_RECENT", [])  # prepared launches of the fixture's own


def _poke(kw, which: str, b: int, j: int, kvh: int, d: int, code: int) -> None:
    """The byte ``code`` at key ``j`` of sequence ``b``, kv head ``kvh``, dim ``d`` of the paged cache."""
    cache = kw["k"] if which == "key" else kw["v"]
    bs = cache.shape[1]
    blk = int(kw["block_table"][b, j // bs])
    cache.view(torch.uint8)[blk, j % bs, kvh, d:d + 1] = code


@pytest.mark.parametrize("splits", [0, 1, 4])
@pytest.mark.parametrize("decode", ["native", "bits"])
@pytest.mark.parametrize("fp8", list(_FP8))
def test_fp8_nan_code_gives_nan_rows_big(fp8, decode, splits, request):
    """A NaN in a row's inputs gives NaN in that row (flash-attn). One NaN code in a key of a
    chunked-prefill sequence (kv head 3: q heads 12..15 of the rows that see it, whole rows) and
    one in a value of a long decode sequence (kv head 5, dim 17: q heads 20..23, dim 17). The NaN
    mask equals the reference's; the rest is finite and close. ``bits``: the bit-moving decode
    forced (as on GPUs below sm89); e4m3fnuz takes it on NVIDIA anyway."""
    if decode == "bits":
        request.getfixturevalue("fp8_bits")
    case = replace(_D, fp8=fp8, descale="batch_head", q_lens=(1, 300, 77), k_lens=(5000, 1000, 77),
                   num_splits=splits)
    kw = make_attention_inputs(case, DEV)
    key_code, value_code = _NAN_CODES[fp8]
    _poke(kw, "key", 1, 800, 3, 40, key_code)
    _poke(kw, "value", 0, 4321, 5, 17, value_code)
    ref = torch.full(kw["out"].shape, float("nan"), dtype=torch.float32, device=DEV)
    with force_backend("reference"):
        kvd.flash_attn_varlen_func(**{**kw, "out": ref})
    with force_backend("triton"):
        got = kvd.flash_attn_varlen_func(**{**kw, "out": torch.zeros_like(kw["out"])}).float()
    want = torch.zeros(ref.shape, dtype=torch.bool, device=DEV)
    want[1 + 100:1 + 300, 12:16, :] = True  # sequence 1: lk - lq = 700, key 800 is seen from query 100 on
    want[0, 20:24, 17] = True
    same_ref, same = torch.equal(torch.isnan(ref), want), torch.equal(torch.isnan(got), want)
    assert same_ref, "the reference's NaN rows are not the ones this test expects"
    assert same, (f"{case.id}: {int(torch.isnan(got).sum())} NaN where {int(want.sum())} are expected; "
                  f"first differences at {torch.nonzero(torch.isnan(got) != want)[:4].tolist()}")
    fin = ~want
    assert torch.isfinite(got[fin]).all()
    err = float((got[fin] - ref[fin]).norm() / ref[fin].norm())
    assert err < 2e-2, f"{case.id}: relative error {err:.2e} outside the NaN rows"


def _run_with_hints(case, **kw):
    run_with_hints(case, DEV, **kw)


Q_HINT_BIG = [
    replace(_D, q_lens=(700, 129), k_lens=(700, 200), num_q_heads=8, num_kv_heads=2),  # prefill
    replace(_D, q_lens=(0, 300, 1, 0, 77), k_lens=(50, 1000, 2000, 0, 77)),  # chunked
    replace(_D, q_lens=(513, 64), k_lens=(513, 1500), paged=False, sinks=True, lse=True, alibi="head"),
    # MLA decode, 128 q heads on one kv head: 128 rows per token, several row tiles
    replace(_D, layout="mla-slices", num_q_heads=128, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1, 2), k_lens=(9000, 4000, 70)),
]


@pytest.mark.parametrize("splits", [0, 1, 4])
@pytest.mark.parametrize("hint", [0, 1, "half"])
@pytest.mark.parametrize("case", Q_HINT_BIG, ids=lambda c: c.id[:100])
def test_max_seqlen_q_below_the_real_longest_big(case, hint, splits):
    """max_seqlen_q (0, 1, half the longest query) only sets the grid: every row is written."""
    hint = max(case.q_lens) // 2 if hint == "half" else hint
    _run_with_hints(case, max_seqlen_q=hint, num_splits=splits, lse=case.lse)


K_HINT_BIG = [
    replace(_D, q_lens=(1, 1), k_lens=(20011, 9000)),
    replace(_D, q_lens=(1, 1, 1), k_lens=(12000, 333, 7001), fp8="e4m3", descale="batch_head", sinks=True,
            lse=True, alibi="batch_head"),
    replace(_D, q_lens=(0, 300, 1, 77), k_lens=(50, 1000, 6000, 77), window=(128, 0), softcap=30.0),
    replace(_D, q_lens=(1, 7), k_lens=(9000, 3000), paged=False, causal=False),
    replace(_D, layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576, head_size_v=512,
            q_lens=(1, 1), k_lens=(9000, 4000), lse=True),
]


@pytest.mark.parametrize("splits", [0, 4, 16])
@pytest.mark.parametrize("case", K_HINT_BIG, ids=lambda c: c.id[:100])
def test_max_seqlen_k_below_the_real_longest_split_big(case, splits):
    """max_seqlen_k a third of the real longest: the splits' key ranges come from it, the last
    split takes every key past its start (the dropped tail was 0.87 relative error)."""
    _run_with_hints(case, max_seqlen_k=max(case.k_lens) // 3, num_splits=splits, lse=case.lse)


def test_both_hints_below_the_real_longest_big():
    case = replace(_D, q_lens=(1, 300, 0, 77), k_lens=(20011, 1000, 4, 900), sinks=True, lse=True)
    for splits in (1, 8):
        _run_with_hints(case, max_seqlen_q=1, max_seqlen_k=100, num_splits=splits, lse=True)
