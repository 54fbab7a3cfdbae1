"""The Triton attention kernel against the reference, through ``TRITON_INTERPRET=1`` on CPU tensors
(on a GPU machine the same tests run the compiled kernels on CUDA tensors).

The shared matrix (tests/matrix.py) covers layouts x dtypes x options; the cases here add what is
specific to this kernel: split-KV forced on through ``num_splits`` (the interpreter's tiny machine
never splits by itself), also with sinks, LSE and ALiBi (the sink is the merge's, once), the
direct-launch keys (everything a compiled kernel specializes on: out dtype, device, ...), head sizes that are a power of two plus a remainder (80, 112, 192, MLA 576/512), page
sizes that do not hold whole key tiles (the per-key block-table path), fp8 q, an output dtype
that differs from q, long GQA groups spanning several row tiles, and in-place out with strides.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import ops
from kvdispatch.platform import Platform
from kvdispatch.backends.triton import attention

from matrix import (AttnCase, attention_cases, force_backend, lse_op_call, make_attention_inputs,
                    run_attention_case, run_poisoned_lse, run_strided_index_case, run_with_hints)

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
    # long GQA group: one decode token spans two row tiles (the interpreter's prefill tile has 32 rows)
    replace(_B, num_q_heads=64, num_kv_heads=1, head_size=64, k_lens=(19, 40, 2)),
    # causal + window + softcap together, mixed batch
    replace(_B, window=(5, 0), softcap=3.0, **_CHUNKED),
    replace(_B, causal=False, window=(2, 7), softcap=2.0, paged=False, **_CHUNKED),
    # q_len > k_len with causal: the first rows see no key and must come out 0
    replace(_B, q_lens=(6, 2), k_lens=(3, 2)),
    # fp8 q (out bf16), fp8 caches with per-(batch, head) descales, e5m2 and fnuz
    replace(_B, fp8="e4m3", q_fp8=True, descale="batch_head", **_CHUNKED),
    # fp8 q over e4m3 (QK^T in fp8 where compiled): a remainder part (80 = 64 + 16), many key tiles
    replace(_B, fp8="e4m3", q_fp8=True, head_size=80, q_lens=(20, 1, 3), k_lens=(70, 33, 3)),
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
def test_split_kv(case, splits):
    run_attention_case(replace(case, num_splits=splits), "triton", device=DEVICE)


def test_split_kv_automatic_choice(monkeypatch):
    """num_splits=0 takes choose_splits' count (the interpreter's machine never splits by itself)."""
    calls = []

    def choose(*a, **k):
        calls.append(a)
        return 3
    monkeypatch.setattr(attention, "choose_splits", choose)
    run_attention_case(replace(_B, sinks=True, lse=True, k_lens=(70, 5, 47)), "triton", device=DEVICE)
    assert len(calls) == 1
    run_attention_case(replace(_B, sinks=True, lse=True, k_lens=(70, 5, 47), num_splits=1), "triton", device=DEVICE)
    assert len(calls) == 1  # an explicit count does not ask the heuristic


# split-KV with the engine extras: the sink joins the denominator once (in the merge), the LSE
# comes from the merge, ALiBi is per key
EXTRAS_SPLIT_CASES = [
    replace(_B, sinks=True, lse=True, alibi="head", k_lens=(70, 5, 47)),
    replace(_B, sinks=True, lse=True, alibi="batch_head", **_CHUNKED),
    replace(_B, dtype=torch.float32, sinks=True, lse=True, alibi="batch_head", k_lens=(70, 5, 47)),
    replace(_B, sinks=True, lse=True, window=(20, 0), softcap=3.0, k_lens=(70, 33, 64)),
    replace(_B, sinks=True, lse=True, alibi="head", q_lens=(0, 1, 2), k_lens=(40, 0, 0)),  # no keys: lse = sink
    replace(_B, lse=True, alibi="head", q_lens=(1, 1), k_lens=(40, 0)),  # no keys, no sink: lse -inf
    replace(_B, fp8="e4m3", descale="batch_head", sinks=True, lse=True, alibi="head", k_lens=(50, 64, 1)),
    replace(_B, paged=False, causal=False, sinks=True, lse=True, alibi="head", **_CHUNKED),
    replace(_B, num_q_heads=32, num_kv_heads=1, sinks=True, lse=True, alibi="batch_head", k_lens=(19, 40, 2)),
]


@pytest.mark.parametrize("splits", [1, 2, 3, 4])
@pytest.mark.parametrize("case", EXTRAS_SPLIT_CASES, ids=lambda c: c.id)
def test_split_kv_with_sinks_lse_alibi(case, splits):
    run_attention_case(replace(case, num_splits=splits), "triton", device=DEVICE)
    # again with the LSE in a NaN-poisoned tensor of the test's own (the public call allocates
    # it with torch.empty, whose memory may hold an earlier call's LSE), contiguous and strided
    run_poisoned_lse(case, DEVICE, num_splits=splits, strided=splits % 2 == 0)


def test_split_count():
    """0: the heuristic; n >= 1: n splits at most, no more than one per key tile, each a whole
    number of tiles, none empty."""
    assert attention.split_count(0, 1000, 16, lambda: 5) == (5, 208)
    assert attention.split_count(1, 1000, 16, lambda: 1 / 0) == (1, 1008)
    assert attention.split_count(100, 70, 16, lambda: 1 / 0) == (5, 16)
    assert attention.split_count(4, 70, 16, lambda: 1 / 0) == (3, 32)
    assert attention.split_count(3, 0, 16, lambda: 1 / 0) == (1, 16)
    for n in range(1, 40):
        for max_k in (1, 15, 16, 17, 70, 133, 1000, 4096):
            splits, keys = attention.split_count(n, max_k, 16, lambda: 1 / 0)
            assert 1 <= splits <= min(n, -(-max_k // 16)) and keys % 16 == 0
            assert (splits - 1) * keys < max_k <= splits * keys


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_lse_alibi_and_16bit_sinks(sink_dtype, splits):
    """softmax_lse and alibi_slopes as strided views (written / read through their strides),
    s_aux strided and in the model's 16-bit dtype; rows of lse past the last sequence untouched."""
    case = replace(_B, sinks=True, alibi="batch_head", **_CHUNKED)
    kw = make_attention_inputs(case, DEVICE)
    kw.pop("return_softmax_lse", None)
    hq, total_q = case.num_q_heads, kw["q"].shape[0]
    kw["s_aux"] = torch.stack([kw["s_aux"], -kw["s_aux"]], 1).reshape(-1).to(sink_dtype)[::2]  # stride 2
    assert kw["s_aux"].stride(0) == 2
    slopes = kw["alibi_slopes"]
    kw["alibi_slopes"] = torch.cat([slopes, slopes * 7], 1)[:, :hq]  # row stride 2 * hq
    ref_out = torch.full(kw["out"].shape, float("nan"), dtype=torch.float32, device=DEVICE)
    ref_lse = torch.full((hq, total_q), float("nan"), dtype=torch.float32, device=DEVICE)
    with force_backend("reference"):
        lse_op_call({**kw, "out": ref_out}, ref_lse, s_aux=kw["s_aux"].float())
    # lse [Hq, total_q + 2] as the transpose of a [total_q + 2, Hq + 1] buffer: strides (1, Hq + 1)
    buf = torch.full((total_q + 2, hq + 1), float("nan"), dtype=torch.float32, device=DEVICE)
    lse = buf.t()[:hq]
    kw["q"] = torch.cat([kw["q"], kw["q"][:2]])  # two padding rows past the last sequence
    kw["out"] = torch.full((total_q + 2,) + tuple(kw["out"].shape[1:]), float("nan"), dtype=kw["out"].dtype,
                           device=DEVICE)
    with force_backend("triton"):
        lse_op_call(kw, lse, num_splits=splits)
    assert torch.isnan(buf[:, hq]).all() and torch.isnan(lse[:, total_q:]).all()
    got = lse[:, :total_q].cpu()
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(ref_lse.cpu()))
    fin = ~torch.isinf(got)
    assert float((got - ref_lse.cpu())[fin].abs().max()) < 5e-2
    o = kw["out"][:total_q].float().cpu()
    assert not torch.isnan(o).any()
    assert float((o - ref_out.cpu()).norm() / ref_out.norm()) < 2e-2


def test_split_kv_out_dtype_switch():
    """Decode with split-KV in fp32, then bf16, then fp16 with the same shapes in one process:
    each call must use kernels compiled for its own dtypes (the merge kernel's direct-launch key
    once lacked out's dtype; see test_prepared_launch_keys for the keys)."""
    for dtype, out_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                             (torch.bfloat16, torch.float32), (torch.bfloat16, None)):
        for lse in (False, True):
            case = replace(_B, dtype=dtype, out_dtype=out_dtype, q_lens=(1, 1), k_lens=(70, 61), num_splits=3,
                           lse=lse, sinks=lse)
            run_attention_case(case, "triton", device=DEVICE)


class _Compiled:
    function = packed_metadata = None

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append("direct")


class _Jit:
    """``kernel[grid](...)``: records the generic launch, returns something direct launches can use."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append("jit")
            return _Compiled(self.log)
        return launch


def test_prepared_launch_keys(monkeypatch):
    """A compiled kernel is launched directly only for what it was compiled for: the options
    (decode tile, softcap, exact window, device) pick the prepared launch of a signature, the split
    flag its kernel; a misaligned pointer always takes Triton's own launch (alignment is checked
    on every call)."""
    log = []
    monkeypatch.setattr(attention, "_interpreting", lambda: False)
    monkeypatch.setattr(attention, "_no_launch_hooks", lambda: True)
    monkeypatch.setattr(attention, "_attention_kernel", _Jit(log))
    monkeypatch.setattr(attention, "_merge_splits_kernel", _Jit(log))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    kw = make_attention_inputs(_B, DEVICE)
    cpu_desc = kvd.KVCacheDescriptor.from_tensors(kw["k"], kw["v"])
    desc = object.__new__(kvd.KVCacheDescriptor)  # the same cache, said to be on an H100
    for slot in kvd.KVCacheDescriptor.__slots__:
        setattr(desc, slot, getattr(cpu_desc, slot))
    desc.platform = Platform(name="nvidia", device_type="cuda", arch="sm90", capability=(9, 0), multiprocessors=132)
    from kvdispatch.registry import AttentionArgs
    base = AttentionArgs(kw["cu_seqlens_q"], kw["max_seqlen_q"], None, kw["seqused_k"], kw["max_seqlen_k"],
                         kw["block_table"], 0.125, True, -1, 0, 0.0, None, None, None, num_splits=1, plans={})

    class Cuda:  # q as the kernel sees it: a CUDA tensor on device 0
        def __init__(self, t, index=0):
            self.t, self.index = t, index

        is_cuda = True

        def get_device(self):
            return self.index

        def __getattr__(self, name):
            return getattr(self.t, name)

    def call(args, q=None, out=None):
        log.clear()
        attention.flash_attn_varlen_func(Cuda(kw["q"]) if q is None else q, kw["k"], kw["v"],
                                         kw["out"] if out is None else out, desc, args)
        return list(log)

    assert call(base) == ["jit"] and call(base) == ["direct"]
    for other in (base._replace(window_left=16), base._replace(window_left=17), base._replace(softcap=2.0),
                  base._replace(max_seqlen_q=200)):
        assert call(other) == ["jit"], other  # a prepared launch of its own
        assert call(other) == ["direct"]
    assert call(base, q=Cuda(kw["q"], 1)) == ["jit"]  # another device
    split = base._replace(num_splits=2, max_seqlen_k=4096)  # a hint long enough for 2 and 3 splits
    assert call(split) == ["jit", "jit"] and call(split) == ["direct", "direct"]  # attention + merge
    assert call(split._replace(num_splits=3)) == ["direct", "jit"]  # merge specialized on the count
    out = kw["out"]
    misaligned = torch.empty(out.numel() + 8, dtype=out.dtype)[1:1 + out.numel()].view(out.shape)
    assert misaligned.stride() == out.stride() and misaligned.data_ptr() % 16
    assert call(base, out=misaligned) == ["jit"] and call(base, out=misaligned) == ["jit"]
    assert call(base) == ["direct"]


def _kernel_params(kernel):
    import inspect
    params = list(inspect.signature(kernel.fn).parameters.values())
    runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
    const = [p.name for p in params if "constexpr" in str(p.annotation)]
    return runtime, const


def test_direct_launch_argument_order(monkeypatch):
    """The direct launches pass every argument positionally (pointers, runtime values, then the
    constexprs in dict order): the generic launch the tests exercise must match the signatures."""
    seen = {}

    class Spy:
        def __init__(self, name, real):
            self.name, self.real = name, real

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen[self.name] = (args, dict(kw))
                return self.real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(attention, "_attention_kernel", Spy("attn", attention._attention_kernel))
    monkeypatch.setattr(attention, "_merge_splits_kernel", Spy("merge", attention._merge_splits_kernel))
    run_attention_case(replace(_B, sinks=True, lse=True, alibi="head", num_splits=2, k_lens=(40, 9, 33)),
                       "triton", device=DEVICE)
    for name, kernel in (("attn", attention._attention_kernel.real), ("merge", attention._merge_splits_kernel.real)):
        runtime, const = _kernel_params(kernel)
        args, kw = seen[name]
        assert len(args) == len(runtime), (name, len(args), runtime)
        kw.pop("num_warps"), kw.pop("num_stages", None)
        if name == "attn":
            # the plan's constexprs in signature order, then SPLIT and INTERPRET (passed last)
            order = [k for k in kw if k not in ("SPLIT", "INTERPRET")] + ["SPLIT", "INTERPRET"]
        else:
            order = list(kw)
        assert order == const, (name, order, const)


def test_plan_key_covers_extras():
    """ALiBi, sinks and LSE are constexprs: a plan made without them is never reused with them."""
    case = replace(_B, alibi="head", sinks=True, lse=True)
    kw = make_attention_inputs(case, DEVICE)
    desc = kvd.KVCacheDescriptor.from_tensors(kw["k"], kw["v"])
    from kvdispatch.registry import AttentionArgs
    hq, total_q = kw["q"].shape[1], kw["q"].shape[0]
    args = AttentionArgs(kw["cu_seqlens_q"], kw["max_seqlen_q"], None, kw["seqused_k"], kw["max_seqlen_k"],
                         kw["block_table"], 0.125, True, -1, 0, 0.0, None, None, None)
    lse = torch.empty(hq, total_q)
    plans = {}
    for extra in ({}, {"alibi_slopes": kw["alibi_slopes"]}, {"s_aux": kw["s_aux"]}, {"softmax_lse": lse}):
        plan = attention.plan_for(kw["q"], kw["out"], desc, args._replace(**extra), True)
        plans[tuple(extra)] = plan
        c = plan.constexprs
        assert (c["HAS_ALIBI"], c["HAS_SINKS"], c["HAS_LSE"]) == (
            "alibi_slopes" in extra, "s_aux" in extra, "softmax_lse" in extra)
    assert len({p.key for p in plans.values()}) == 4


def _on(desc, platform):
    """``desc`` said to be on ``platform`` (the plan reads only the descriptor's fields)."""
    other = object.__new__(kvd.KVCacheDescriptor)
    for slot in kvd.KVCacheDescriptor.__slots__:
        setattr(other, slot, getattr(desc, slot))
    other.platform = platform
    return other


@pytest.mark.parametrize("fp8", ["e4m3", "e5m2"])
def test_fp8_dot_only_for_e4m3_q_over_an_e4m3_cache_on_sm90(monkeypatch, fp8):
    """QK^T runs on the fp8 tensor cores for an fp8 q over a cache of the same e4m3 kind on sm90 (measured
    there); a bf16 q, e5m2, MLA's shared K/V tile, sm80/sm89 and ROCm keep the 16-bit dots. Prefill
    launches over fp8 caches take the fp8 prefill tile where the table has one."""
    from kvdispatch.backends.triton.attention_configs import NVIDIA
    from kvdispatch.registry import AttentionArgs
    monkeypatch.setattr(attention, "_interpreting", lambda: False)
    sm = {c: Platform(name="nvidia", device_type="cuda", arch=f"sm{c[0]}{c[1]}", capability=c, multiprocessors=132)
          for c in ((9, 0), (8, 9), (8, 0))}
    rocm = Platform(name="rocm", device_type="cuda", arch="gfx942", multiprocessors=304)
    case = replace(_B, fp8=fp8, q_fp8=True, head_size=128, q_lens=(40, 1), k_lens=(60, 9))
    kw = make_attention_inputs(case, DEVICE)
    desc = kvd.KVCacheDescriptor.from_tensors(kw["k"], kw["v"])
    args = AttentionArgs(kw["cu_seqlens_q"], kw["max_seqlen_q"], None, kw["seqused_k"], kw["max_seqlen_k"],
                         kw["block_table"], 0.125, True, -1, 0, 0.0, None, None, None)
    q16 = kw["q"].to(torch.bfloat16)
    for plat, q, v_is_k, want in ((sm[(9, 0)], kw["q"], False, fp8 == "e4m3"), (sm[(9, 0)], q16, False, False),
                                  (sm[(9, 0)], kw["q"], True, False), (sm[(8, 9)], kw["q"], False, False),
                                  (sm[(8, 0)], kw["q"], False, False), (rocm, kw["q"], False, False)):
        for decode in (True, False):
            plan = attention.plan_for(q, kw["out"], _on(desc, plat), args, decode, v_is_k)
            c = plan.constexprs
            assert c["FP8_DOT"] == want, (plat, q.dtype, v_is_k, decode)
            if want:  # q and K as stored: no bit decoding, no factor
                assert (c["KV_MODE"], c["Q_MODE"], plan.k_factor, plan.q_factor) == (
                    attention.FP8_NATIVE, attention.FP8_NATIVE, 1.0, 1.0)
    plan = attention.plan_for(q16, kw["out"], _on(desc, sm[(9, 0)]), args, False)
    fp8_tile = NVIDIA[(9, 0)].prefill_fp8[0]
    assert (plan.constexprs["BLOCK_M"], plan.constexprs["BLOCK_N"]) == (fp8_tile.block_m, fp8_tile.block_n)
    wide = NVIDIA[(9, 0)].tile("prefill_fp8", 256)  # no fp8 tile that wide: the prefill table's
    assert wide == NVIDIA[(9, 0)].tile("prefill", 256)


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
        with force_backend("triton"):
            kvd.flash_attn_varlen_func(**kw, num_splits=splits)
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
    from kvbench.layouts import make_kv_cache, make_mla_cache
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
    monkeypatch.setattr(ops, "_ATTN_RECENT", [])  # the prepared launches of earlier tests hold their plans
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


# -- no silent wrong result: fp8 NaN codes, max_seqlen hints below the real lengths ----------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kvdispatch.backends.triton.attention import _to_compute  # noqa: E402

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e4m3fnuz": torch.float8_e4m3fnuz}
# a NaN code of each kind, for a key and for a value (e4m3fn: S.1111.111; fnuz: 0x80 alone; e5m2: S.11111.xx)
NAN_CODES = {"e4m3": (0xFF, 0x7F), "e5m2": (0xFF, 0x7E), "e4m3fnuz": (0x80, 0x80)}


@triton.jit
def _decode_codes_kernel(x_ptr, y_ptr, MODE: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(y_ptr + offs, _to_compute(tl.load(x_ptr + offs), MODE, tl.float32))


@pytest.mark.parametrize("fp8", list(FP8_DTYPES))
def test_fp8_bit_decode_every_code(fp8):
    """The bit-moving fp8 decode (the interpreter's, below sm89's, e4m3fnuz's on NVIDIA) gives
    torch's value for all 256 codes: NaN codes NaN, e5m2's inf inf, finite values exact (the
    power-of-two factor folded into the descales applied here)."""
    dtype = FP8_DTYPES[fp8]
    mode = attention._BITS_MODE[dtype]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEVICE)
    y = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_codes_kernel[(1,)](codes, y, MODE=mode)
    got = (y * attention._BITS_FACTOR[mode]).cpu()
    want = codes.cpu().view(dtype).float()
    bad = torch.nonzero(torch.isnan(got) != torch.isnan(want)).flatten().tolist()
    assert not bad, f"{fp8}: codes {[hex(c) for c in bad]} decode to NaN on one side only"
    fin = ~torch.isnan(want)
    bad = torch.nonzero(fin & (got != want)).flatten().tolist()
    assert not bad, f"{fp8}: codes {[hex(c) for c in bad]} decode to {got[bad].tolist()}, not {want[bad].tolist()}"
    if fp8 == "e5m2":
        assert got[0x7C] == float("inf") and got[0xFC] == float("-inf")


def _poke(kw, which: str, b: int, j: int, kvh: int, d, code: int) -> None:
    """Store the byte ``code`` at key ``j`` of sequence ``b``, kv head ``kvh``, dims ``d`` of the
    paged K (``which="key"``) or V cache."""
    cache = kw["k"] if which == "key" else kw["v"]
    bs = cache.shape[1]
    blk = int(kw["block_table"][b, j // bs])
    cache.view(torch.uint8)[blk, j % bs, kvh, d] = code


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("fp8", list(FP8_DTYPES))
def test_fp8_nan_code_gives_nan_rows(fp8, splits):
    """flash-attn semantics: a NaN in a row's inputs gives NaN in that row. One NaN code in a key
    of a chunked-prefill sequence (kv head 1): NaN in the rows of that head's group that see the
    key (causal: the later query tokens), whole rows; one in a value of a decode sequence (kv
    head 0, dim 3): NaN in dim 3 of that group's rows. The NaN mask equals the reference's (which
    decodes through torch); everything else is finite and close."""
    case = replace(_B, fp8=fp8, q_lens=(1, 6, 3), k_lens=(20, 9, 5), num_splits=splits)
    kw = make_attention_inputs(case, DEVICE)
    key_code, value_code = NAN_CODES[fp8]
    _poke(kw, "key", 1, 5, 1, slice(7, 8), key_code)
    _poke(kw, "value", 0, 7, 0, slice(3, 4), value_code)
    ref = torch.full(kw["out"].shape, float("nan"), dtype=torch.float32, device=DEVICE)
    with force_backend("reference"):
        kvd.flash_attn_varlen_func(**{**kw, "out": ref})
    with force_backend("triton"):
        got = kvd.flash_attn_varlen_func(**{**kw, "out": torch.zeros_like(kw["out"])}).float()
    got, ref = got.cpu(), ref.cpu()
    want = torch.zeros(ref.shape, dtype=torch.bool)
    want[3:7, 2:4, :] = True  # sequence 1 is rows 1..6: key 5 is seen from query 2 on (causal, lk - lq = 3)
    want[0, 0:2, 3] = True  # sequence 0 (decode) sees value 7
    same_ref, same = torch.equal(torch.isnan(ref), want), torch.equal(torch.isnan(got), want)
    assert same_ref, "the reference's NaN rows are not the ones this test expects"
    assert same, (
        f"{case.id}: NaN at {torch.nonzero(torch.isnan(got)).tolist()[:8]}..., expected them at "
        f"{torch.nonzero(want).tolist()[:8]}...")
    fin = ~want
    assert torch.isfinite(got[fin]).all()
    err = float((got[fin] - ref[fin]).norm() / ref[fin].norm())
    assert err < 2e-2, f"{case.id}: relative error {err:.2e} outside the NaN rows"


def _run_with_hints(case, **kw):
    return run_with_hints(case, DEVICE, **kw)


Q_HINT_CASES = [
    replace(_B, q_lens=(7, 16, 3), k_lens=(7, 16, 3)),  # prefill: 32 rows (two tiles) for the longest
    replace(_B, **_CHUNKED),
    # GQA 8: a 13-token chunk is 104 rows, 7 tiles; with sinks and the LSE
    replace(_B, num_q_heads=8, num_kv_heads=1, q_lens=(1, 13, 0, 5), k_lens=(20, 31, 4, 9), sinks=True,
            lse=True),
]


@pytest.mark.parametrize("hint", [0, 1, "half"])
@pytest.mark.parametrize("case", Q_HINT_CASES, ids=lambda c: c.id)
def test_max_seqlen_q_below_the_real_longest(case, hint):
    """The grid's tile count comes from max_seqlen_q, but each program walks its sequence's real
    tiles: a hint of 0, 1 or half the longest query still writes every row (and only those)."""
    hint = max(case.q_lens) // 2 if hint == "half" else hint
    _run_with_hints(case, max_seqlen_q=hint, lse=case.lse)


@pytest.mark.parametrize("splits", [2, 4])
def test_max_seqlen_q_below_the_real_longest_split(splits):
    """The same with split-KV forced: every (tile, split) partial is written, the merge sees all."""
    case = replace(_B, num_q_heads=8, num_kv_heads=1, q_lens=(1, 13, 0, 5), k_lens=(70, 31, 4, 40),
                   sinks=True, alibi="head")
    _run_with_hints(case, max_seqlen_q=1, num_splits=splits, lse=True)


K_HINT_CASES = [
    replace(_B, k_lens=(200, 5, 47)),  # decode
    replace(_B, q_lens=(1, 6, 0, 9), k_lens=(150, 31, 4, 9)),  # chunked
    replace(_B, window=(20, 0), k_lens=(150, 33, 64)),
    replace(_B, sinks=True, lse=True, alibi="batch_head", k_lens=(150, 5, 47)),
    replace(_B, fp8="e4m3", descale="batch_head", k_lens=(150, 64, 1)),
    replace(_B, paged=False, causal=False, softcap=4.0, q_lens=(1, 6, 0, 9), k_lens=(150, 31, 4, 9)),
]


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("case", K_HINT_CASES, ids=lambda c: c.id)
def test_max_seqlen_k_below_the_real_longest_split(case, splits):
    """split_keys comes from max_seqlen_k; with a hint of a third of the real length, the last
    split takes every key past its start, so none is dropped (it was 0.87 relative error)."""
    hint = max(case.k_lens) // 3
    if DEVICE == "cpu":  # the interpreter's 16-key tiles: the case really has a tail past the splits
        n, keys = attention.split_count(splits, hint, 16, lambda: 1 / 0)
        assert n > 1 and n * keys < max(case.k_lens)
    _run_with_hints(case, max_seqlen_k=hint, num_splits=splits, lse=case.lse)


def test_both_hints_below_the_real_longest():
    case = replace(_B, num_q_heads=8, num_kv_heads=2, q_lens=(1, 13, 0, 5), k_lens=(150, 31, 4, 90))
    _run_with_hints(case, max_seqlen_q=2, max_seqlen_k=40, num_splits=3)


# A prefill launch numbers every sequence's q tiles along one grid axis and each program finds its
# sequence by binary search over cu_seqlens_q; sequences of at most the mixed tile's rows (decodes)
# take that tile. Many sequences of every kind: empty, decode, a few tokens, several q tiles.
_MANY_Q = (0, 1, 17, 1, 2, 0, 40, 1, 1, 5, 33, 1, 0, 0, 9, 1, 64, 3, 1, 1, 16, 1, 7, 0, 1, 2, 48, 1, 1, 31, 1)
MANY_SEQ_CASES = [
    replace(_B, q_lens=_MANY_Q, k_lens=tuple(q + (7 * i) % 23 for i, q in enumerate(_MANY_Q))),
    # the decodes first, the prefills last (vLLM's order), GQA 4, a window and the LSE
    replace(_B, num_q_heads=8, num_kv_heads=2, q_lens=(1,) * 9 + (20, 3, 37), k_lens=(30,) * 9 + (60, 3, 50),
            window=(12, 0), lse=True),
]


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("case", MANY_SEQ_CASES, ids=lambda c: c.id[:60])
def test_prefill_launch_many_sequences(case, splits):
    if DEVICE == "cpu":  # the cases take the prefill plan, with the short-sequence tile, in the interpreter
        cfg = attention.config_for(None, True)
        group = case.num_q_heads // case.num_kv_heads
        assert max(case.q_lens) * group > cfg.tile("decode", 64).block_m
        assert cfg.mixed and cfg.tile("mixed", 64).block_m < cfg.tile("prefill", 64).block_m
    run_attention_case(replace(case, num_splits=splits), "triton", device=DEVICE)
