"""The shared layout x dtype x option matrix, run against every backend.

Each backend's tests parametrize over ``write_cases()`` / ``mla_cases()`` / ``attention_cases()`` and call
``run_write_case`` / ``run_mla_case`` / ``run_attention_case`` with their backend's name; the
runner forces that backend through ``KVDISPATCH_BACKEND``, runs the same inputs through the
reference, and compares: caches WHOLE (the underlying buffers, so a write to a wrong place shows),
bit-exact for non-fp8 and within one fp8 rounding step for fp8; attention outputs (poisoned with
NaN first) against a float32 reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import torch

import kvdispatch as kvd
from kvbench.compare import (attention_mismatch, base as _base, cache_mismatch, clone_views, force_backend,  # noqa: F401
                             lse_mismatch)
from kvbench.layouts import make_kv_cache, make_mla_cache, random_block_table, random_fill, random_slots  # noqa: F401

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e4m3fnuz": torch.float8_e4m3fnuz}


def assert_cache_equal(got: torch.Tensor, want: torch.Tensor, fp8: bool, what: str) -> None:
    """Whole-buffer comparison; fp8 allows one rounding step (adjacent codes) on few elements
    (``kvbench.compare.cache_mismatch``, the rule every check uses)."""
    why = cache_mismatch(got, want, fp8)
    assert why is None, f"{what}: {why}"


# -- cache writes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteCase:
    layout: str = "NHD"
    dtype: torch.dtype = torch.bfloat16
    kv_cache_dtype: str = "auto"
    fp8_storage: str = "e4m3"  # for fp8: "e4m3", "e5m2", "e4m3fnuz", or "uint8" (a uint8 view)
    scale: str = "tensor"  # "tensor" or "head"
    input_fp8: bool = False  # key/value already in the cache's fp8 type: stored as is
    head_size: int = 64
    head_size_v: Optional[int] = None
    num_heads: int = 2
    block_size: int = 16
    num_blocks: int = 6
    num_tokens: int = 24
    extra_rows: int = 0  # key rows beyond slot_mapping (CUDA-graph padding): must be ignored
    slot_dtype: torch.dtype = torch.int64
    pad_fraction: float = 0.2

    @property
    def id(self) -> str:
        parts = [self.layout, str(self.dtype).replace("torch.", ""), self.kv_cache_dtype]
        if self.kv_cache_dtype != "auto":
            parts += [self.fp8_storage, self.scale + "scale"]
        if self.input_fp8:
            parts.append("fp8in")
        parts.append(f"D{self.head_size}" + (f"-{self.head_size_v}" if self.head_size_v else ""))
        parts.append(f"H{self.num_heads}-bs{self.block_size}-T{self.num_tokens}")
        if self.slot_dtype == torch.int32:
            parts.append("i32")
        if self.extra_rows:
            parts.append(f"pad{self.extra_rows}")
        return "-".join(parts)

    def cache_dtype(self) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.dtype
        return torch.uint8 if self.fp8_storage == "uint8" else FP8[self.fp8_storage]


def write_cases(big: bool = False) -> list:
    """Small cases for the interpreter/CPU lanes; ``big=True`` for real GPU sizes."""
    b = WriteCase()
    cases = []
    for layout in ("NHD", "HND", "combined", "combined-HND", "cross-layer", "head-major"):
        cases.append(replace(b, layout=layout))
    cases += [
        replace(b, layout="diffkv", head_size=64, head_size_v=32),
        replace(b, layout="NHD", dtype=torch.float16, head_size=80, slot_dtype=torch.int32),
        replace(b, layout="HND", dtype=torch.float32, head_size=96, block_size=1, num_blocks=40),
        replace(b, layout="NHD", head_size=112, block_size=32, num_blocks=2, num_tokens=40, extra_rows=5),
        replace(b, layout="combined", head_size=192, block_size=8, num_tokens=10),
        replace(b, layout="NHD", head_size=256, num_heads=1, num_tokens=7, block_size=64, num_blocks=1),
        replace(b, layout="NHD", num_tokens=0),
        replace(b, layout="NHD", pad_fraction=1.0, num_tokens=5),
        # fp8: per-tensor / per-head scales, e4m3 / e5m2 / fnuz / uint8 views, fp8 inputs stored as is
        replace(b, layout="NHD", kv_cache_dtype="fp8"),
        replace(b, layout="HND", kv_cache_dtype="fp8_e4m3", scale="head"),
        replace(b, layout="combined", kv_cache_dtype="fp8_e5m2", fp8_storage="e5m2"),
        replace(b, layout="NHD", kv_cache_dtype="fp8", fp8_storage="uint8", scale="head", dtype=torch.float16),
        replace(b, layout="cross-layer", kv_cache_dtype="fp8_e5m2", fp8_storage="uint8"),
        replace(b, layout="head-major", kv_cache_dtype="fp8", scale="head"),
        replace(b, layout="NHD", kv_cache_dtype="fp8", fp8_storage="e4m3fnuz"),
        replace(b, layout="NHD", kv_cache_dtype="fp8", input_fp8=True),
        replace(b, layout="NHD", kv_cache_dtype="auto", dtype=torch.float8_e4m3fn),
    ]
    if big:
        cases = [replace(c, num_heads=8, head_size=c.head_size if c.head_size != 64 else 128,
                         head_size_v=c.head_size_v and c.head_size_v * 2,
                         num_tokens=max(c.num_tokens * 80, 1) if c.num_tokens else 0,
                         num_blocks=max(c.num_blocks * 80 * max(c.block_size, 1) // c.block_size, 2))
                 for c in cases]
    return cases


def _write_inputs(case: WriteCase, device, gen: torch.Generator):
    t, h, dk = case.num_tokens, case.num_heads, case.head_size
    dv = case.head_size_v or dk
    in_dtype = case.cache_dtype() if case.input_fp8 else case.dtype
    if case.input_fp8 and in_dtype == torch.uint8:
        raise ValueError("input_fp8 needs an fp8 (not uint8) cache")
    rows = t + case.extra_rows
    # key/value with non-trivial token and head strides (slices of wider rows), last dim contiguous
    key = random_fill(torch.empty(rows, h, dk + 16, dtype=in_dtype, device=device), gen)[..., :dk]
    value = random_fill(torch.empty(rows, h + 1, dv, dtype=in_dtype, device=device), gen)[:, :h]
    if in_dtype.is_floating_point and in_dtype not in FP8.values():
        # a few large values so fp8 saturation is exercised
        key[:: max(t // 3, 1), 0, :2] = 3000.0
    slots = random_slots(t, case.num_blocks, case.block_size, dtype=case.slot_dtype, device=device,
                         pad_fraction=case.pad_fraction, generator=gen)
    return key, value, slots


def _scales(case, heads, device, gen):
    if case.kv_cache_dtype == "auto":
        return None, None
    n = heads if case.scale == "head" else 1
    ks = (torch.rand(n, generator=gen) * 0.5 + 0.05).to(device)
    vs = (torch.rand(n, generator=gen) * 0.5 + 0.05).to(device)
    return ks, vs


def run_write_case(case: WriteCase, backend: str, device="cpu", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cache_dtype = case.cache_dtype()
    kc, vc = make_kv_cache(case.layout, case.num_blocks, case.block_size, case.num_heads, case.head_size,
                           case.head_size_v, dtype=cache_dtype, device=device)
    key, value, slots = _write_inputs(case, device, gen)
    ks, vs = _scales(case, case.num_heads, device, gen)
    ref_k, ref_v = clone_views(kc, vc)
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, value, ref_k, ref_v, slots, case.kv_cache_dtype, ks, vs)
    with force_backend(backend):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots, case.kv_cache_dtype, ks, vs)
    if device != "cpu":
        torch.cuda.synchronize() if str(device).startswith("cuda") else None
    fp8 = case.kv_cache_dtype != "auto" and not case.input_fp8
    assert_cache_equal(_base(kc).cpu(), _base(ref_k).cpu(), fp8, f"{case.id}: key cache buffer")
    assert_cache_equal(_base(vc).cpu(), _base(ref_v).cpu(), fp8, f"{case.id}: value cache buffer")


# -- MLA writes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLACase:
    dtype: torch.dtype = torch.bfloat16
    kv_cache_dtype: str = "auto"
    fp8_storage: str = "e4m3"
    kv_lora_rank: int = 64
    rope_dim: int = 16
    block_size: int = 16
    num_blocks: int = 4
    num_tokens: int = 20
    padded: bool = False
    slot_dtype: torch.dtype = torch.int64

    @property
    def id(self) -> str:
        s = f"mla-{str(self.dtype).replace('torch.', '')}-{self.kv_cache_dtype}-R{self.kv_lora_rank}+{self.rope_dim}"
        s += f"-bs{self.block_size}-T{self.num_tokens}"
        if self.kv_cache_dtype != "auto":
            s += "-" + self.fp8_storage
        return s + ("-padded" if self.padded else "")


def mla_cases(big: bool = False) -> list:
    b = MLACase()
    cases = [b, replace(b, padded=True, slot_dtype=torch.int32), replace(b, block_size=1, num_blocks=30),
             replace(b, kv_cache_dtype="fp8"), replace(b, kv_cache_dtype="fp8_e5m2", fp8_storage="uint8"),
             replace(b, dtype=torch.float16, padded=True, kv_cache_dtype="fp8", fp8_storage="uint8")]
    if big:
        cases = [replace(c, kv_lora_rank=512, rope_dim=64, num_tokens=c.num_tokens * 100,
                         num_blocks=c.num_blocks * 100) for c in cases]
    return cases


def run_mla_case(case: MLACase, backend: str, device="cpu", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = case.dtype if case.kv_cache_dtype == "auto" else (
        torch.uint8 if case.fp8_storage == "uint8" else FP8[case.fp8_storage])
    cache = make_mla_cache(case.num_blocks, case.block_size, case.kv_lora_rank, case.rope_dim,
                           dtype=cache_dtype, device=device, padded=case.padded)
    t = case.num_tokens
    kv_c = random_fill(torch.empty(t, case.kv_lora_rank + 8, dtype=case.dtype, device=device), gen)[:, :case.kv_lora_rank]
    k_pe = random_fill(torch.empty(t, case.rope_dim, dtype=case.dtype, device=device), gen)
    slots = random_slots(t, case.num_blocks, case.block_size, dtype=case.slot_dtype, device=device,
                         pad_fraction=0.2, generator=gen)
    scale = None if case.kv_cache_dtype == "auto" else (torch.rand(1, generator=gen) + 0.1).to(device)
    (ref,) = clone_views(cache)
    with force_backend("reference"):
        kvd.concat_and_cache_mla(kv_c, k_pe, ref, slots, case.kv_cache_dtype, scale)
    with force_backend(backend):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, slots, case.kv_cache_dtype, scale)
    assert_cache_equal(_base(cache).cpu(), _base(ref).cpu(), case.kv_cache_dtype != "auto", f"{case.id}: kv_cache buffer")


# -- attention ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnCase:
    layout: str = "NHD"
    dtype: torch.dtype = torch.bfloat16
    q_lens: tuple = (1, 1, 1)
    k_lens: tuple = (17, 5, 33)
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 64
    head_size_v: Optional[int] = None
    block_size: int = 16
    paged: bool = True
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    softmax_scale: Optional[float] = None
    fp8: Optional[str] = None  # "e4m3" / "e5m2" / "e4m3fnuz": the cache's fp8 type
    descale: str = "tensor"  # "tensor" or "batch_head"
    q_fp8: bool = False
    out_dtype: Optional[torch.dtype] = None
    alibi: str = "none"  # "none", "head" ([Hq]) or "batch_head" ([batch, Hq])
    sinks: bool = False  # s_aux: one sink logit per query head
    lse: bool = False  # return_softmax_lse: the LSE is compared too
    num_splits: int = 0  # 0 automatic, 1 none, n at most n
    descale_expand: bool = False  # descales as stride-0 expand()ed [batch, Hkv] views of one element

    @property
    def id(self) -> str:
        p = [self.layout, str(self.dtype).replace("torch.", ""),
             "q" + ",".join(map(str, self.q_lens)), "k" + ",".join(map(str, self.k_lens)),
             f"H{self.num_q_heads}/{self.num_kv_heads}", f"D{self.head_size}" +
             (f"-{self.head_size_v}" if self.head_size_v else ""), f"bs{self.block_size}"]
        p.append("paged" if self.paged else "varlen")
        if self.causal:
            p.append("causal")
        if self.window != (-1, -1):
            p.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            p.append(f"cap{self.softcap}")
        if self.softmax_scale:
            p.append(f"scale{self.softmax_scale}")
        if self.fp8:
            p.append(f"fp8{self.fp8}-{self.descale}")
        if self.q_fp8:
            p.append("qfp8")
        if self.alibi != "none":
            p.append(f"alibi-{self.alibi}")
        if self.sinks:
            p.append("sinks")
        if self.lse:
            p.append("lse")
        if self.num_splits:
            p.append(f"splits{self.num_splits}")
        if self.descale_expand:
            p.append("expanded")
        return "-".join(p)


def attention_cases(big: bool = False) -> list:
    b = AttnCase()
    prefill = dict(q_lens=(7, 16, 3), k_lens=(7, 16, 3))
    chunked = dict(q_lens=(1, 6, 0, 9), k_lens=(20, 31, 4, 9))
    cases = [
        b,  # decode, GQA 2
        replace(b, causal=False),
        replace(b, **prefill),
        replace(b, **chunked),
        replace(b, layout="HND", **chunked),
        replace(b, layout="combined", **chunked),
        replace(b, layout="combined-HND"),
        replace(b, layout="cross-layer", **prefill),
        replace(b, layout="diffkv", head_size=64, head_size_v=32, **chunked),
        # MLA decode shape (small): one kv head, K and V slices of one buffer, Dv < Dk
        replace(b, layout="mla-slices", num_q_heads=8, num_kv_heads=1, head_size=80, head_size_v=64),
        replace(b, dtype=torch.float16, num_q_heads=2, num_kv_heads=2, head_size=80, **chunked),
        replace(b, dtype=torch.float32, head_size=96, block_size=1, k_lens=(3, 9, 1)),
        replace(b, block_size=32, k_lens=(5, 2, 40)),  # kv shorter than a block
        replace(b, num_q_heads=4, num_kv_heads=1, head_size=128),  # MQA
        replace(b, window=(4, 0), **chunked),
        replace(b, causal=False, window=(3, 2), **prefill),
        replace(b, softcap=5.0, softmax_scale=0.3, **chunked),
        replace(b, paged=False, **prefill),
        replace(b, paged=False, causal=False, **chunked),
        replace(b, q_lens=(0, 0), k_lens=(5, 0)),
        replace(b, fp8="e4m3", **chunked),
        replace(b, fp8="e5m2", descale="batch_head"),
        replace(b, fp8="e4m3", descale="batch_head", layout="HND", **prefill),
        replace(b, fp8="e4m3fnuz"),
        # engine-facing extras (vLLM / flash-attn callers): ALiBi, sinks, LSE, split counts, expanded descales
        replace(b, alibi="head", **chunked),
        replace(b, alibi="batch_head", causal=False, **prefill),
        replace(b, sinks=True, lse=True, **chunked),
        replace(b, sinks=True, window=(4, 0), q_lens=(1, 0, 2), k_lens=(9, 3, 2)),
        replace(b, lse=True, q_lens=(2, 0, 1), k_lens=(0, 4, 40)),  # an empty kv sequence: lse -inf
        replace(b, lse=True, paged=False, **prefill),
        replace(b, sinks=True, lse=True, alibi="head", num_splits=3, k_lens=(70, 5, 33)),
        replace(b, num_splits=1, k_lens=(70, 5, 133)),
        replace(b, fp8="e4m3", descale_expand=True, lse=True),
    ]
    if big:
        cases = [replace(c, q_lens=tuple(q * 13 if q > 1 else q for q in c.q_lens),
                         k_lens=tuple(k * 37 + 3 for k in c.k_lens),
                         num_q_heads=c.num_q_heads * 4, num_kv_heads=c.num_kv_heads * 4 if c.num_kv_heads > 1 else 1,
                         head_size=128 if c.head_size == 64 else c.head_size,
                         head_size_v=c.head_size_v and (64 if c.head_size_v == 32 else c.head_size_v))
                 for c in cases]
    return cases


def make_attention_inputs(case: AttnCase, device="cpu", seed: int = 0):
    """Everything ``flash_attn_varlen_func`` takes for ``case``, as a dict of kwargs."""
    gen = torch.Generator().manual_seed(seed)
    dk = case.head_size
    dv = case.head_size_v or dk
    b = len(case.q_lens)
    cache_dtype = FP8[case.fp8] if case.fp8 else case.dtype
    q_dtype = FP8[case.fp8] if case.q_fp8 else case.dtype
    total_q = sum(case.q_lens)
    q = random_fill(torch.empty(total_q, case.num_q_heads, dk, dtype=q_dtype, device=device), gen)
    cu_q = torch.tensor([0] + list(_cumsum(case.q_lens)), dtype=torch.int32, device=device)
    kw = dict(q=q, max_seqlen_q=max(case.q_lens), cu_seqlens_q=cu_q, max_seqlen_k=max(case.k_lens),
              causal=case.causal, window_size=case.window, softcap=case.softcap,
              softmax_scale=case.softmax_scale)
    if case.paged:
        need = sum((k + case.block_size - 1) // case.block_size for k in case.k_lens)
        nblocks = need + 3
        k, v = make_kv_cache(case.layout, nblocks, case.block_size, case.num_kv_heads, dk,
                             case.head_size_v, dtype=cache_dtype, device=device)
        kw.update(k=k, v=v, block_table=random_block_table(case.k_lens, nblocks, case.block_size, device=device,
                                                           generator=gen),
                  seqused_k=torch.tensor(case.k_lens, dtype=torch.int32, device=device))
    else:
        total_k = sum(case.k_lens)
        k = random_fill(torch.empty(total_k, case.num_kv_heads, dk, dtype=cache_dtype, device=device), gen)
        v = random_fill(torch.empty(total_k, case.num_kv_heads + 1, dv, dtype=cache_dtype, device=device), gen)
        v = v[:, :case.num_kv_heads]
        kw.update(k=k, v=v, cu_seqlens_k=torch.tensor([0] + list(_cumsum(case.k_lens)), dtype=torch.int32,
                                                        device=device))
    if case.fp8:
        shape = (1,) if case.descale == "tensor" else (b, case.num_kv_heads)
        kw["k_descale"] = (torch.rand(shape, generator=gen) * 0.2 + 0.05).to(device)
        kw["v_descale"] = (torch.rand(shape, generator=gen) * 0.2 + 0.05).to(device)
        if case.q_fp8:
            kw["q_descale"] = (torch.rand(shape, generator=gen) * 0.5 + 0.5).to(device)
        if case.descale_expand:  # vLLM: layer._k_scale.expand((batch, num_kv_heads))
            for name in ("q_descale", "k_descale", "v_descale"):
                if name in kw:
                    kw[name] = kw[name].reshape(-1)[:1].expand(b, case.num_kv_heads)
    hq = case.num_q_heads
    if case.alibi != "none":
        # slopes as ALiBi's geometric sequence, spread over heads (and perturbed per sequence)
        base = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)])
        if case.alibi == "batch_head":
            base = base[None, :] * (1.0 + torch.rand(b, hq, generator=gen))
        kw["alibi_slopes"] = base.float().to(device)
    if case.sinks:
        kw["s_aux"] = (torch.randn(hq, generator=gen) * 2.0).float().to(device)
    if case.lse:
        kw["return_softmax_lse"] = True
    if case.num_splits:
        kw["num_splits"] = case.num_splits
    out_dtype = case.out_dtype or (torch.bfloat16 if case.q_fp8 else case.dtype)
    kw["out"] = torch.full((total_q, case.num_q_heads, dv), float("nan"), dtype=out_dtype, device=device)
    return kw


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


TOLERANCE = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_attention_case(case: AttnCase, backend: str, device="cpu", seed: int = 0, rel_tol: Optional[float] = None):
    kw = make_attention_inputs(case, device, seed)
    ref_kw = dict(kw)
    ref_kw["out"] = torch.full(kw["out"].shape, float("nan"), dtype=torch.float32, device=device)
    with force_backend("reference"):
        ref = kvd.flash_attn_varlen_func(**ref_kw)
    with force_backend(backend), poisoned_lse():
        got = kvd.flash_attn_varlen_func(**kw)
    if case.lse:
        (got, lse), (ref, ref_lse) = got, ref
        _compare_lse(case, lse, ref_lse, kw["cu_seqlens_q"])
    assert got is kw["out"], "flash_attn_varlen_func must return the out tensor it wrote"
    tol = rel_tol or TOLERANCE[kw["out"].dtype if kw["out"].dtype in TOLERANCE else torch.bfloat16]
    if case.fp8:
        tol = max(tol, 2e-2)
    why, err = attention_mismatch(got.cpu(), ref.cpu(), tol)
    assert why is None, f"{case.id}: {why}"
    return err


@contextlib.contextmanager
def poisoned_lse():
    """The public call's LSE output allocated NaN-filled (it is torch.empty otherwise, which may
    hold an earlier call's values): a row the backend leaves unwritten shows as NaN."""
    from kvdispatch import ops
    orig = ops._new_lse
    ops._new_lse = lambda q: torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)
    try:
        yield
    finally:
        ops._new_lse = orig


def _compare_lse(case: AttnCase, lse: torch.Tensor, ref: torch.Tensor, cu_q: torch.Tensor) -> None:
    """LSE [Hq, total_q] float32: the same -inf rows (nothing seen, no sink), else close."""
    assert lse.dtype == torch.float32 and lse.shape == ref.shape, f"{case.id}: lse {lse.dtype}{tuple(lse.shape)}"
    rows = int(cu_q[-1])
    why = lse_mismatch(lse[:, :rows].cpu(), ref[:, :rows].cpu(), _lse_tol(case))
    assert why is None, f"{case.id}: {why}"


def _lse_tol(case) -> float:
    return 5e-2 if case.fp8 or case.dtype == torch.bfloat16 else 1e-2


# -- the LSE through the custom op (the caller's own NaN-poisoned, maybe strided, lse) ----------
def lse_op_call(kw, lse, num_splits=0, **extra):
    """The custom op directly, so the test hands in its own (NaN-poisoned, strided) softmax_lse."""
    kw = {**kw, **extra}
    wl, wr = kw["window_size"]
    torch.ops.kvdispatch.flash_attn_varlen_func(
        kw["q"], kw["k"], kw["v"], kw["out"], kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
        kw.get("cu_seqlens_k"), kw.get("seqused_k"), kw["softmax_scale"], kw["causal"], wl, wr, kw["softcap"],
        kw.get("block_table"), kw.get("q_descale"), kw.get("k_descale"), kw.get("v_descale"),
        kw.get("alibi_slopes"), kw.get("s_aux"), lse, num_splits)


def _reference_run(case, device, seed: int, lse: bool):
    """The case's inputs (custom-op form) and the reference's float32 out (and LSE with ``lse``),
    NaN-poisoned before the call."""
    kw = make_attention_inputs(case, device, seed)
    kw.pop("return_softmax_lse", None)
    kw.pop("num_splits", None)
    total_q, hq = kw["q"].shape[0], kw["q"].shape[1]
    ref_out = torch.full(kw["out"].shape, float("nan"), dtype=torch.float32, device=device)
    ref_lse = torch.full((hq, total_q), float("nan"), dtype=torch.float32, device=device) if lse else None
    with force_backend("reference"):
        lse_op_call({**kw, "out": ref_out}, ref_lse)
    return kw, ref_out, ref_lse


def run_poisoned_lse(case, device, num_splits=0, strided=False, seed=0, backend="triton"):
    """``case`` through the custom op with out and softmax_lse NaN-poisoned (``strided``: lse the
    transpose of a [total_q, Hq + 1] buffer), against the reference: out and LSE compared."""
    kw, ref_out, ref_lse = _reference_run(case, device, seed, lse=True)
    total_q, hq = kw["q"].shape[0], kw["q"].shape[1]
    nan = float("nan")
    if strided:
        buf = torch.full((total_q, hq + 1), nan, dtype=torch.float32, device=device)
        lse = buf.t()[:hq]
    else:
        lse = torch.full((hq, total_q), nan, dtype=torch.float32, device=device)
    with force_backend(backend):
        lse_op_call(kw, lse, num_splits)
    rows = int(kw["cu_seqlens_q"][-1])
    tol = max(TOLERANCE.get(kw["out"].dtype, 2e-2), 2e-2 if case.fp8 else 0.0)
    why, _ = attention_mismatch(kw["out"][:rows].cpu(), ref_out[:rows].cpu(), tol)
    assert why is None, f"{case.id}: out: {why}"
    why = lse_mismatch(lse[:, :rows].cpu(), ref_lse[:, :rows].cpu(), _lse_tol(case))
    assert why is None, f"{case.id}: {why}"


# -- hints below the real lengths ------------------------------------------------------------
def run_with_hints(case, device, max_seqlen_q=None, max_seqlen_k=None, num_splits=0, lse=False, seed=0):
    """``case`` through the Triton backend with the given (wrong) ``max_seqlen_q`` / ``max_seqlen_k``
    hints and no value checks (the reference gets the right ones): out NaN-poisoned, two padding
    rows past cu_seqlens_q[-1] that must stay untouched, the LSE too with ``lse``."""
    kw, ref_out, ref_lse = _reference_run(case, device, seed, lse)
    total_q, hq = kw["q"].shape[0], kw["q"].shape[1]
    nan = float("nan")
    kw["q"] = torch.cat([kw["q"], kw["q"][:2]])  # two padding rows past the last sequence
    kw["out"] = torch.full((total_q + 2,) + tuple(kw["out"].shape[1:]), nan, dtype=kw["out"].dtype,
                           device=device)
    kw["out"][total_q:] = 7.0
    got_lse = None
    if lse:
        got_lse = torch.full((hq, total_q + 2), nan, dtype=torch.float32, device=device)
    hints = {}
    if max_seqlen_q is not None:
        hints["max_seqlen_q"] = max_seqlen_q
    if max_seqlen_k is not None:
        hints["max_seqlen_k"] = max_seqlen_k
    with force_backend("triton"):
        lse_op_call(kw, got_lse, num_splits, **hints)
    out = kw["out"].float().cpu()
    assert torch.all(out[total_q:] == 7.0), f"{case.id}: rows past cu_seqlens_q[-1] written"
    tol = max(TOLERANCE.get(kw["out"].dtype, 2e-2), 2e-2 if case.fp8 else 0.0)
    why, err = attention_mismatch(out[:total_q], ref_out.cpu(), tol)
    assert why is None, f"{case.id}: {why} (hints {hints}, splits {num_splits})"
    if lse:
        got_lse = got_lse.cpu()
        assert torch.isnan(got_lse[:, total_q:]).all(), f"{case.id}: lse past cu_seqlens_q[-1] written"
        why = lse_mismatch(got_lse[:, :total_q], ref_lse.cpu(), 5e-2)
        assert why is None, f"{case.id}: {why} (hints {hints}, splits {num_splits})"
    return err


# -- strided index views -----------------------------------------------------------------------
def run_strided_index_case(backend: str, device="cpu", exact_fp8: bool = True) -> None:
    """slot_mapping, per-head scales, block_table, cu_seqlens and seqused_k given as strided views
    (the API accepts them): the backend must match the reference (fp8 codes bit for bit unless
    ``exact_fp8`` is False: one rounding step allowed, the Triton interpreter's known gap)."""
    kc, vc = make_kv_cache("HND", 6, 16, 2, 64, dtype=torch.float8_e4m3fn, device=device)
    rk, rv = kc.clone(), vc.clone()
    key = torch.randn(10, 2, 64, dtype=torch.bfloat16, device=device)
    slots = random_slots(20, 6, 16, device=device)[::2]
    ks = torch.rand(4, device=device)[::2] + 0.1
    vs = torch.rand(4, device=device)[1::2] + 0.1
    with force_backend("reference"):
        kvd.reshape_and_cache_flash(key, key * 2, rk, rv, slots, "fp8", ks, vs)
    with force_backend(backend):
        kvd.reshape_and_cache_flash(key, key * 2, kc, vc, slots, "fp8", ks, vs)
    assert_cache_equal(kc, rk, not exact_fp8, "key_cache (strided slots, per-head scale)")
    assert_cache_equal(vc, rv, not exact_fp8, "value_cache (strided slots, per-head scale)")

    k, v = make_kv_cache("NHD", 12, 16, 2, 64, device=device)
    lens = [30, 7, 51]
    bt = random_block_table(lens, 12, 16, device=device).t().contiguous().t()  # column-major
    q = torch.randn(6, 4, 64, dtype=torch.bfloat16, device=device)
    cu_q = torch.tensor([0, 0, 2, 0, 5, 0, 6], dtype=torch.int32, device=device)[::2]
    used = torch.tensor([30, 0, 7, 0, 51, 0], dtype=torch.int32, device=device)[::2]
    outs = []
    for name in ("reference", backend):
        out = torch.full_like(q, float("nan"))
        with force_backend(name):
            kvd.flash_attn_varlen_func(q, k, v, 3, cu_q, 51, seqused_k=used, block_table=bt, causal=True, out=out)
        outs.append(out.float())
    assert torch.allclose(outs[0], outs[1], atol=2e-2, rtol=2e-2), (outs[0] - outs[1]).abs().max()
