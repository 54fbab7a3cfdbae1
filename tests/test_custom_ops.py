"""The ops as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) on the CPU."""

import pytest
import torch

import kvdispatch as kvd
from kvbench.layouts import make_kv_cache, make_mla_cache, random_slots

from matrix import AttnCase, force_backend, make_attention_inputs


def _write_args(layout="NHD", fp8=False):
    k, v = make_kv_cache(layout, 4, 16, 2, 64, dtype=torch.uint8 if fp8 else torch.bfloat16)
    key, value = torch.randn(10, 2, 64).bfloat16(), torch.randn(10, 2, 64).bfloat16()
    slots = random_slots(10, 4, 16, pad_fraction=0.2)
    scales = (torch.ones(1) * 0.5, torch.ones(2)) if fp8 else (None, None)
    return key, value, k, v, slots, "fp8" if fp8 else "auto", *scales


@pytest.mark.parametrize("layout,fp8", [("NHD", False), ("HND", False), ("NHD", True)])
def test_opcheck_write(layout, fp8):
    torch.library.opcheck(torch.ops.kvdispatch.reshape_and_cache_flash.default, _write_args(layout, fp8))


def test_opcheck_mla():
    cache = make_mla_cache(4, 16, 64, 16)
    args = (torch.randn(9, 64).bfloat16(), torch.randn(9, 16).bfloat16(), cache, random_slots(9, 4, 16), "auto", None)
    torch.library.opcheck(torch.ops.kvdispatch.concat_and_cache_mla.default, args)


def _attn_op_args(case):
    kw = make_attention_inputs(case)
    return (kw["q"], kw["k"], kw["v"], kw["out"], kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
            kw.get("cu_seqlens_k"), kw.get("seqused_k"), None, case.causal, -1, -1, 0.0, kw.get("block_table"),
            None, None, None, kw.get("alibi_slopes"), kw.get("s_aux"),
            torch.full((kw["q"].shape[1], kw["q"].shape[0]), float("nan")) if case.lse else None, case.num_splits)


@pytest.mark.parametrize("case", [AttnCase(), AttnCase(paged=False, q_lens=(3, 4), k_lens=(3, 4)),
                                  AttnCase(q_lens=(1, 4), k_lens=(9, 21), alibi="head", sinks=True, lse=True)],
                         ids=lambda c: c.id)
def test_opcheck_attention(case):
    torch.library.opcheck(torch.ops.kvdispatch.flash_attn_varlen_func.default, _attn_op_args(case))


def test_compile_fullgraph_write_and_attention():
    torch._dynamo.reset()
    case = AttnCase(q_lens=(1, 3), k_lens=(9, 21))
    kw = make_attention_inputs(case)
    k, v = kw["k"], kw["v"]
    new_k = torch.randn(2, k.shape[2], k.shape[3]).bfloat16()
    new_v = torch.randn(2, k.shape[2], k.shape[3]).bfloat16()
    slots = torch.tensor([3, 17], dtype=torch.int64)

    def step(q, k_cache, v_cache, out):
        kvd.reshape_and_cache_flash(new_k, new_v, k_cache, v_cache, slots)
        return kvd.flash_attn_varlen_func(q, k_cache, v_cache, kw["max_seqlen_q"], kw["cu_seqlens_q"],
                                          kw["max_seqlen_k"], seqused_k=kw["seqused_k"], causal=True,
                                          block_table=kw["block_table"], out=out) * 2

    k2, v2 = k.clone(), v.clone()
    out_eager = torch.empty_like(kw["out"])
    with force_backend("reference"):
        want = step(kw["q"], k2, v2, out_eager)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(kw["q"], k, v, kw["out"])
    assert torch.equal(k, k2) and torch.equal(v, v2), "the cache write happened inside the compiled graph"
    torch.testing.assert_close(got, want)


def test_compile_fullgraph_views_of_a_combined_buffer():
    torch._dynamo.reset()
    k, v = make_kv_cache("combined", 4, 16, 2, 64)
    base = k._base
    key, value = torch.randn(5, 2, 64).bfloat16(), torch.randn(5, 2, 64).bfloat16()
    slots = torch.tensor([0, 9, 20, -1, 63])

    def write(buf):
        kvd.reshape_and_cache_flash(key, value, buf[:, 0], buf[:, 1], slots)

    want = base.clone()
    write(want)
    torch.compile(write, fullgraph=True, backend="aot_eager")(base)
    assert torch.equal(base, want)
