"""Property-based tests (hypothesis) of the three ops on every CPU backend lane.

Random layouts, strides (key/value/q as slices of wider rows or of a fused qkv buffer), head sizes
(tiny, non-powers of two), block sizes, GQA ratios, fp8 kinds (e4m3fn, e5m2, e4m3fnuz, uint8 views), scale
kinds, padding slots, empty batches, zero-length sequences, ALiBi, sinks, LSE, softcap and windows,
each compared against a SIMPLE LOOP written here from the definitions (per token and head for the
writes, per query row in float64 for attention) AND against kvdispatch's reference backend. Writes
compare the whole cache buffers (filled with random data first): bit-exact for 16/32-bit, fp8 within
one rounding step on ties (``assert_cache_equal``). Attention outputs are poisoned with NaN first.

Random BAD inputs must raise a ValueError/TypeError whose message names the argument, with the
caches bit-identical (and ``out`` still NaN) afterwards; value-level ones under KVDISPATCH_DEBUG=1.

Sizing: ``EXAMPLES`` below per (property, lane), times ``HYPOTHESIS_EXAMPLES_SCALE`` (default 1) for
longer local runs. ``derandomize=True``: the same examples on every run (reproducible in CI), no
example database. The last test checks and prints (``-s``) how many examples each lane ran.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kvdispatch as kvd
from kvdispatch.platform import platform_of
from kvdispatch.registry import registry
from kvbench.compare import base as _base, clone_views, force_backend
from kvbench.layouts import (ATTENTION_LAYOUTS, LAYOUTS, make_kv_cache, make_mla_cache, random_block_table,
                             random_fill, random_slots)

from matrix import TOLERANCE, assert_cache_equal

# -- sizing ------------------------------------------------------------------------------------
PROFILE = "kvdispatch-properties"
settings.register_profile(
    PROFILE,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example),
)
SCALE = float(os.environ.get("HYPOTHESIS_EXAMPLES_SCALE", "1") or 1)
# examples per (property, lane); the bad-input properties run no kernel, so they are cheap everywhere
EXAMPLES = {
    "write": {"reference": 63, "triton": 35, "sycl-cpu": 21},  # 7 layouts
    "mla": {"reference": 40, "triton": 25, "sycl-cpu": 15},  # 5 fp8 modes
    "attention": {"reference": 80, "triton": 40, "sycl-cpu": 24},  # 8 layouts
    "bad-metadata": {"reference": 192, "triton": 128, "sycl-cpu": 128},  # 64 mutations
    "bad-values": {"reference": 65, "triton": 39, "sycl-cpu": 39},  # 13 mutations
}
COUNTS: collections.Counter = collections.Counter()  # (property, lane) -> examples that passed
STARTED: set = set()  # (property, lane) whose test ran (not skipped)
FINISHED: set = set()  # ... and passed


def _examples(prop: str, lane: str) -> int:
    return max(1, int(round(EXAMPLES[prop][lane] * SCALE)))


def _minimum(prop: str, lane: str) -> int:
    return max(1, int(_examples(prop, lane) * 0.8))  # hypothesis may stop early on a small space


def _lane_params():
    cpu = platform_of(torch.device("cpu"))
    by_name = {b.name: b for b in registry.backends}
    out = []
    for name, mark in (("reference", None), ("triton", pytest.mark.interpret), ("sycl-cpu", pytest.mark.sycl)):
        b = by_name.get(name)
        why = "not registered" if b is None else b.available(cpu)
        marks = [mark] if mark else []
        if why is not None:
            marks.append(pytest.mark.skip(reason=f"{name} lane unavailable: {why}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


LANES = _lane_params()
# the Triton softcap computes tanh as 1 - 2 / (exp(2t) + 1): exp overflows to inf (harmless, -> 1)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _run(prop: str, lane: str, strata: list, check) -> None:
    """Run ``check(case, lane)`` on examples of every strategy in ``strata`` (one per layout, fp8
    mode or mutation), sharing the lane's example budget: derandomized generation favours some
    values of a categorical draw heavily, so the categories that matter most are strata, and each
    runs at least once on every lane."""
    STARTED.add((prop, lane))
    per = max(1, -(-_examples(prop, lane) // len(strata)))
    for i, strategy in enumerate(strata):
        def prop_test(case):
            check(case, lane)
            COUNTS[prop, lane] += 1

        # derandomize seeds each run from the test function's digest, which hypothesis extends by this
        # attribute (it sets it to tell @pytest.mark.parametrize cases apart): without it every
        # stratum and lane (same source) would draw the same non-stratified choices
        prop_test._hypothesis_internal_add_digest = f"{prop}/{lane}/{i}".encode()
        settings(settings.get_profile(PROFILE), max_examples=per)(given(case=strategy)(prop_test))()
    FINISHED.add((prop, lane))


@contextlib.contextmanager
def _debug(on: bool):
    """KVDISPATCH_DEBUG=1 (or unset) for a block: monkeypatch's context form, which (unlike the
    function-scoped fixture) is safe inside a hypothesis test."""
    with pytest.MonkeyPatch.context() as mp:
        if on:
            mp.setenv("KVDISPATCH_DEBUG", "1")
        else:
            mp.delenv("KVDISPATCH_DEBUG", raising=False)
        yield


# -- shared pieces -----------------------------------------------------------------------------
def _count(hi: int):
    """0..hi, its simplest example 1 (hypothesis runs the simplest example first: it should write
    or attend something), 0 still drawn."""
    if hi < 1:
        return st.just(0)
    return st.integers(1, hi + hi // 4 + 1).map(lambda n: n if n <= hi else 0)  # ~20% zeros


FLOATS = (torch.bfloat16, torch.float16, torch.float32)
FP8_OF = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
HEAD_SIZES = (8, 16, 24, 32, 40, 48, 64, 80, 96)
BLOCK_SIZES = (16, 1, 8, 32, 3)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t``'s whole underlying buffer (for bit-identical comparisons)."""
    b = _base(t)
    return b.contiguous().view(torch.uint8).clone()


def _rand(shape, dtype, gen) -> torch.Tensor:
    return random_fill(torch.empty(shape, dtype=dtype), gen)


def _rows(kind: str, rows: int, heads: int, d: int, dtype, gen) -> torch.Tensor:
    """``[rows, heads, d]`` input rows, dense or with non-trivial token/head strides (last dim
    contiguous): slices of wider rows, every other row of a taller buffer."""
    if kind == "dense":
        return _rand((rows, heads, d), dtype, gen)
    if kind == "wide":  # token and head strides wider than the row
        return _rand((rows, heads + 1, d + 8), dtype, gen)[:, 1:, 3:3 + d]
    if kind == "every-other":
        return _rand((2 * rows, heads, d), dtype, gen)[::2]
    raise AssertionError(kind)


def _slots(n: int, num_blocks: int, block_size: int, dtype, pad: float, strided: bool, gen) -> torch.Tensor:
    s = random_slots(n, num_blocks, block_size, dtype=dtype, pad_fraction=pad, generator=gen)
    if strided:  # a strided view; the skipped entries are padding, so reading them by mistake shows
        buf = torch.full((2 * n,), -1, dtype=dtype)
        buf[::2] = s
        s = buf[::2]
    return s


def _elem(cache_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """What the cache's elements are (a uint8 view read as the fp8 type kv_cache_dtype names)."""
    if cache_dtype == torch.uint8:
        return FP8_OF[kv_cache_dtype]
    return cache_dtype


# -- the loop references -----------------------------------------------------------------------
def _stored(row: torch.Tensor, kv_cache_dtype: str, elem: torch.dtype, scale, head: int) -> torch.Tensor:
    """What the cache stores for one head row: a copy, or ``row / scale`` saturated and rounded to fp8."""
    if kv_cache_dtype == "auto" or row.dtype == elem:
        return row
    s = scale.reshape(-1)[head if scale.numel() > 1 else 0]
    fmax = torch.finfo(elem).max
    return (row.float() / s).clamp(-fmax, fmax).to(elem)


def loop_write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype="auto", k_scale=None,
               v_scale=None) -> None:
    """``reshape_and_cache_flash`` from its definition, one token and one head at a time."""
    head_major = key_cache.dim() == 5
    elem = _elem(key_cache.dtype, kv_cache_dtype)
    kc = key_cache.view(elem) if key_cache.dtype != elem else key_cache
    vc = value_cache.view(elem) if value_cache.dtype != elem else value_cache
    block_size = key_cache.shape[3] if head_major else key_cache.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):
        if s < 0:
            continue  # padding
        blk, off = divmod(s, block_size)
        for h in range(key.shape[1]):
            k = _stored(key[i, h], kv_cache_dtype, elem, k_scale, h)
            v = _stored(value[i, h], kv_cache_dtype, elem, v_scale, h)
            if head_major:  # key [blocks, H, D // x, bs, x], value [blocks, H, D, bs]
                kc[blk, h, :, off, :] = k.reshape(-1, kc.shape[4])
                vc[blk, h, :, off] = v
            else:
                kc[blk, off, h] = k
                vc[blk, off, h] = v


def loop_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype="auto", scale=None) -> None:
    """``concat_and_cache_mla`` from its definition, one token at a time."""
    elem = _elem(kv_cache.dtype, kv_cache_dtype)
    cache = kv_cache.view(elem) if kv_cache.dtype != elem else kv_cache
    rank = kv_c.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):
        if s < 0:
            continue
        blk, off = divmod(s, kv_cache.shape[1])
        cache[blk, off, :rank] = _stored(kv_c[i], kv_cache_dtype, elem, scale, 0)
        cache[blk, off, rank:] = _stored(k_pe[i], kv_cache_dtype, elem, scale, 0)


def _descale_of(t, b: int, h: int) -> float:
    if t is None:
        return 1.0
    return float(t.reshape(-1)[0]) if t.numel() == 1 else float(t[b, h])


def loop_attention(kw) -> tuple:
    """``flash_attn_varlen_func`` from its definition, per query row and head in float64 (paged or
    not, descales included). Returns (out [total_q, Hq, Dv], lse [Hq, total_q], seen [total_q, Hq]):
    rows past cu_seqlens_q[-1] stay 0 / -inf; ``seen``: the row sees at least one key."""
    q, k, v = kw["q"], kw["k"], kw["v"]
    cu = kw["cu_seqlens_q"].tolist()
    batch = len(cu) - 1
    paged = kw.get("block_table") is not None
    if paged:
        bt, lens = kw["block_table"].tolist(), kw["seqused_k"].tolist()
        bs = k.shape[1]
    else:
        cuk = kw["cu_seqlens_k"].tolist()
        lens = [cuk[b + 1] - cuk[b] for b in range(batch)]
        if kw.get("seqused_k") is not None:
            lens = [min(a, u) for a, u in zip(lens, kw["seqused_k"].tolist())]
    hq, hkv, dv = q.shape[1], k.shape[-2], v.shape[-1]
    scale = kw.get("softmax_scale") or 1.0 / math.sqrt(q.shape[2])
    wl, wr = kw.get("window_size") or (-1, -1)
    if kw.get("causal"):
        wr = 0
    cap = kw.get("softcap") or 0.0
    slopes, sinks = kw.get("alibi_slopes"), kw.get("s_aux")
    out = torch.zeros(q.shape[0], hq, dv, dtype=torch.float64)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float64)
    seen = torch.zeros(q.shape[0], hq, dtype=torch.bool)
    for b in range(batch):
        lq, lk = cu[b + 1] - cu[b], lens[b]
        if paged:
            rows = [(bt[b][j // bs], j % bs) for j in range(lk)]
            keys = [k[blk, off].double() for blk, off in rows]
            vals = [v[blk, off].double() for blk, off in rows]
        else:
            keys = [k[cuk[b] + j].double() for j in range(lk)]
            vals = [v[cuk[b] + j].double() for j in range(lk)]
        for i in range(lq):
            t, p = cu[b] + i, i + lk - lq  # bottom-right aligned: query i sits at key position p
            visible = [j for j in range(lk) if not ((wr >= 0 and j > p + wr) or (wl >= 0 and j < p - wl))]
            for h in range(hq):
                g = h // (hq // hkv)
                qv = q[t, h].double() * _descale_of(kw.get("q_descale"), b, g)
                kd, vd = _descale_of(kw.get("k_descale"), b, g), _descale_of(kw.get("v_descale"), b, g)
                logits = []
                for j in visible:
                    s = scale * float(qv @ (keys[j][g] * kd))
                    if cap:
                        s = cap * math.tanh(s / cap)
                    if slopes is not None:
                        s -= float(slopes[h] if slopes.dim() == 1 else slopes[b, h]) * abs(p - j)
                    logits.append(s)
                terms = logits + ([float(sinks[h])] if sinks is not None else [])
                seen[t, h] = bool(logits)
                if not terms:
                    continue
                m = max(terms)
                den = sum(math.exp(x - m) for x in terms)
                lse[h, t] = m + math.log(den)
                for x, j in zip(logits, visible):
                    out[t, h] += math.exp(x - m) / den * (vals[j][g] * vd)
    return out, lse, seen


# ==============================================================================================
# reshape_and_cache_flash
# ==============================================================================================
@dataclass(frozen=True)
class WriteCase:
    layout: str
    dtype: torch.dtype  # key/value dtype when quantized or plain
    kv_cache_dtype: str  # "auto" / "fp8" / "fp8_e4m3" / "fp8_e5m2"
    cache_dtype: torch.dtype  # storage: dtype, an fp8 type or uint8
    input_fp8: bool  # key/value already in the cache's fp8 type (stored as is)
    scale: str  # "none" / "tensor" / "head" / "head-strided"
    head_size: int
    head_size_v: int
    heads: int
    block_size: int
    num_blocks: int
    tokens: int
    extra_rows: int  # key/value rows past slot_mapping: ignored
    pad: float
    slot_dtype: torch.dtype
    slots_strided: bool
    key_kind: str  # "dense" / "wide" / "every-other" / "qkv" (key and value: slices of a fused qkv buffer)
    value_kind: str
    saturate: bool  # a few huge values (fp8 saturation) and +-inf
    repeats: int  # tokens given another token's slot (reference: the last wins, K and V alike; kernels: no winner)
    debug: bool
    seed: int


@st.composite
def write_cases(draw, layout: str):
    dtype = draw(st.sampled_from(FLOATS))
    mode = draw(st.sampled_from(("auto", "fp8", "fp8_e5m2", "fp8_e4m3", "auto", "auto-fp8")))
    input_fp8 = False
    if mode == "auto":
        kv, cache_dtype = "auto", dtype
    elif mode == "auto-fp8":  # an fp8 cache written by a copy of fp8 rows
        kv, cache_dtype = "auto", draw(st.sampled_from((torch.float8_e4m3fn, torch.float8_e5m2)))
        dtype, input_fp8 = cache_dtype, True
    else:
        kv = mode
        cache_dtype = draw(st.sampled_from((FP8_OF[kv], torch.uint8) + (
            (torch.float8_e4m3fnuz,) if kv != "fp8_e5m2" else ())))
        if draw(st.integers(0, 4)) == 0:  # rows already in the cache's fp8 type: stored as is
            input_fp8 = True
            dtype = _elem(cache_dtype, kv)
    if kv == "auto":
        scale = draw(st.sampled_from(("none", "none", "tensor")))  # vLLM passes its scales with "auto"
    else:
        scale = draw(st.sampled_from(("tensor", "head", "head-strided")))
    x = 16 // torch.empty((), dtype=cache_dtype).element_size()
    sizes = [d for d in HEAD_SIZES if layout != "head-major" or d % x == 0]
    dk = draw(st.sampled_from(sizes))
    dv = draw(st.sampled_from(sizes)) if layout == "diffkv" else dk
    heads = draw(st.sampled_from((2, 1, 3)))
    bs = draw(st.sampled_from(BLOCK_SIZES))
    nb = draw(st.sampled_from((3, 1, 2, 4)))
    tokens = draw(_count(min(12, nb * bs)))
    kinds = ("dense", "wide", "every-other") + (("qkv",) if dk == dv else ())
    key_kind = draw(st.sampled_from(kinds))
    value_kind = "qkv" if key_kind == "qkv" else draw(st.sampled_from(kinds[:3]))
    repeats = draw(st.sampled_from((0, 0, 0, 1, 2))) if tokens >= 2 else 0
    return WriteCase(
        layout=layout, dtype=dtype, kv_cache_dtype=kv, cache_dtype=cache_dtype, input_fp8=input_fp8,
        scale=scale, head_size=dk, head_size_v=dv, heads=heads, block_size=bs, num_blocks=nb, tokens=tokens,
        extra_rows=draw(st.integers(0, 2)), pad=draw(st.sampled_from((0.3, 0.0, 1.0))),
        slot_dtype=draw(st.sampled_from((torch.int64, torch.int32))), slots_strided=draw(st.booleans()),
        key_kind=key_kind, value_kind=value_kind, saturate=draw(st.booleans()), repeats=repeats,
        debug=not repeats and draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def _write_inputs(c: WriteCase):
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    kc, vc = make_kv_cache(c.layout, c.num_blocks, c.block_size, c.heads, c.head_size,
                           c.head_size_v if c.layout == "diffkv" else None, dtype=c.cache_dtype)
    rows = c.tokens + c.extra_rows
    if c.key_kind == "qkv":  # [rows, q heads + K heads + V heads, D]: key/value are slices
        hq = 2 * c.heads
        buf = _rand((rows, hq + 2 * c.heads, c.head_size), c.dtype, gen)
        key, value = buf[:, hq:hq + c.heads], buf[:, hq + c.heads:]
    else:
        key = _rows(c.key_kind, rows, c.heads, c.head_size, c.dtype, gen)
        value = _rows(c.value_kind, rows, c.heads, c.head_size_v, c.dtype, gen)
    if c.saturate and rows and c.dtype in FLOATS:
        key[0, 0, :2] = torch.tensor([3000.0, -1e5]).to(c.dtype)
        value[-1, -1, -2:] = torch.tensor([float("inf"), float("-inf")]).to(c.dtype)
    slots = _slots(c.tokens, c.num_blocks, c.block_size, c.slot_dtype, c.pad, c.slots_strided, gen)
    for _ in range(c.repeats):  # token dst takes token src's slot (pad tokens get one too)
        src, dst = torch.randperm(c.tokens, generator=gen)[:2].tolist()
        if slots[src] < 0:
            slots[src] = int(torch.randint(0, c.num_blocks * c.block_size, (1,), generator=gen))
        slots[dst] = slots[src]
    ks = vs = None
    if c.scale != "none":
        n = c.heads if c.scale.startswith("head") else 1
        if c.scale == "head-strided":
            ks = (torch.rand(2 * n, generator=gen) * 0.5 + 0.05)[::2]
            vs = (torch.rand(2 * n, generator=gen) * 0.5 + 0.05)[1::2]
        else:
            ks = torch.rand(n, generator=gen) * 0.5 + 0.05
            vs = torch.rand(n, generator=gen) * 0.5 + 0.05
    return kc, vc, key, value, slots, ks, vs


def _winners(kc, key, slots, c: WriteCase, args) -> torch.Tensor:
    """slot_mapping with every token that lost its (repeated) slot to another set to -1: the winner
    is the candidate whose key row (head 0) is what the cache holds."""
    elem = _elem(kc.dtype, c.kv_cache_dtype)
    view = kc.view(elem) if kc.dtype != elem else kc
    s = slots.clone()
    groups = collections.defaultdict(list)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            groups[slot].append(i)
    for slot, tokens in groups.items():
        if len(tokens) < 2:
            continue
        blk, off = divmod(slot, c.block_size)
        held = (view[blk, 0, :, off, :].reshape(-1) if kc.dim() == 5 else view[blk, off, 0]).float()
        dist = [float((_stored(key[i, 0], c.kv_cache_dtype, elem, args[1], 0).float() - held).nan_to_num().abs().sum())
                for i in tokens]
        win = tokens[dist.index(min(dist))]
        for i in tokens:
            if i != win:
                s[i] = -1
    return s


def _without_repeats(slots: torch.Tensor) -> torch.Tensor:
    """slot_mapping with every token of a repeated slot set to -1 (padding)."""
    s = slots.clone()
    vals, counts = torch.unique(slots, return_counts=True)
    for v in vals[(counts > 1) & (vals >= 0)].tolist():
        s[slots == v] = -1
    return s


def check_write(c: WriteCase, lane: str) -> None:
    kc, vc, key, value, slots, ks, vs = _write_inputs(c)
    args = (c.kv_cache_dtype, ks, vs)
    inputs_before = (_bytes(key), _bytes(value))
    loop_k, loop_v = clone_views(kc, vc)
    quantized = c.kv_cache_dtype != "auto" and not c.input_fp8
    if lane != "reference":
        ref_k, ref_v = clone_views(kc, vc)
        with force_backend("reference"):
            kvd.reshape_and_cache_flash(key, value, ref_k, ref_v, slots, *args)
    with force_backend(lane), _debug(c.debug):
        kvd.reshape_and_cache_flash(key, value, kc, vc, slots, *args)
    if c.repeats and lane == "reference":
        # the reference keeps one token of a repeated slot (the last), K and V alike: the loop
        # writes the winners it chose, so K and V of one slot from different tokens fail
        loop_write(key, value, loop_k, loop_v, _winners(kc, key, slots, c, args), *args)
    elif c.repeats:
        # the kernels name no winner for a repeated slot (README): the loop writes every other
        # slot, the repeated ones are taken from the lane's result (nothing else may change)
        loop_write(key, value, loop_k, loop_v, _without_repeats(slots), *args)
        for slot in set(slots.tolist()) - set(_without_repeats(slots).tolist()) - {-1}:
            blk, off = divmod(slot, c.block_size)
            at = (blk, slice(None), slice(None), off) if c.layout == "head-major" else (blk, off)
            for lane_view, loop_view in ((kc, loop_k), (vc, loop_v)):
                raw = (lambda t: t.view(torch.uint8)) if lane_view.element_size() == 1 else (lambda t: t)
                raw(loop_view)[at] = raw(lane_view)[at]
    else:
        loop_write(key, value, loop_k, loop_v, slots, *args)
    # the reference computes what the loop does: bit for bit, fp8 included
    fp8_tol = quantized and lane != "reference"
    assert_cache_equal(_base(kc), _base(loop_k), fp8_tol, f"{lane} vs loop: key cache buffer")
    assert_cache_equal(_base(vc), _base(loop_v), fp8_tol, f"{lane} vs loop: value cache buffer")
    if lane != "reference" and not c.repeats:  # (with repeats the winners may differ)
        assert_cache_equal(_base(kc), _base(ref_k), quantized, f"{lane} vs reference: key cache buffer")
        assert_cache_equal(_base(vc), _base(ref_v), quantized, f"{lane} vs reference: value cache buffer")
    assert torch.equal(_bytes(key), inputs_before[0]) and torch.equal(_bytes(value), inputs_before[1]), \
        "the write changed its inputs"


@pytest.mark.parametrize("lane", LANES)
def test_write_matches_loop(lane):
    _run("write", lane, [write_cases(layout) for layout in LAYOUTS], check_write)


# ==============================================================================================
# concat_and_cache_mla
# ==============================================================================================
@dataclass(frozen=True)
class MLACase:
    dtype: torch.dtype
    kv_cache_dtype: str
    cache_dtype: torch.dtype
    input_fp8: bool
    rank: int
    rope: int
    block_size: int
    num_blocks: int
    tokens: int
    extra_rows: int
    pad: float
    slot_dtype: torch.dtype
    slots_strided: bool
    padded: bool  # the cache is a view with room after every row and block
    rows: str  # "dense" / "wide" / "fused" (kv_c and k_pe: slices of one projection output)
    debug: bool
    seed: int


MLA_MODES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "auto-fp8")


@st.composite
def mla_cases(draw, mode: str):
    dtype = draw(st.sampled_from(FLOATS))
    input_fp8 = False
    if mode == "auto":
        kv, cache_dtype = "auto", dtype
    elif mode == "auto-fp8":
        kv, cache_dtype = "auto", draw(st.sampled_from((torch.float8_e4m3fn, torch.float8_e5m2)))
        dtype, input_fp8 = cache_dtype, True
    else:
        kv = mode
        cache_dtype = draw(st.sampled_from((FP8_OF[kv], torch.uint8)))
    bs = draw(st.sampled_from(BLOCK_SIZES))
    nb = draw(st.sampled_from((3, 1, 2, 4)))
    return MLACase(
        dtype=dtype, kv_cache_dtype=kv, cache_dtype=cache_dtype, input_fp8=input_fp8,
        rank=draw(st.sampled_from((16, 32, 48, 64, 80))), rope=draw(st.sampled_from((8, 16, 32))),
        block_size=bs, num_blocks=nb, tokens=draw(_count(min(10, nb * bs))),
        extra_rows=draw(st.integers(0, 2)), pad=draw(st.sampled_from((0.3, 0.0, 1.0))),
        slot_dtype=draw(st.sampled_from((torch.int64, torch.int32))), slots_strided=draw(st.booleans()),
        padded=draw(st.booleans()), rows=draw(st.sampled_from(("dense", "wide", "fused"))),
        debug=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def check_mla(c: MLACase, lane: str) -> None:
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    cache = make_mla_cache(c.num_blocks, c.block_size, c.rank, c.rope, dtype=c.cache_dtype, padded=c.padded)
    n = c.tokens + c.extra_rows
    if c.rows == "dense":
        kv_c, k_pe = _rand((n, c.rank), c.dtype, gen), _rand((n, c.rope), c.dtype, gen)
    elif c.rows == "wide":
        kv_c = _rand((n, c.rank + 8), c.dtype, gen)[:, 4:4 + c.rank]
        k_pe = _rand((2 * n, c.rope), c.dtype, gen)[::2]
    else:
        buf = _rand((n, c.rank + c.rope + 16), c.dtype, gen)
        kv_c, k_pe = buf[:, :c.rank], buf[:, c.rank:c.rank + c.rope]
    slots = _slots(c.tokens, c.num_blocks, c.block_size, c.slot_dtype, c.pad, c.slots_strided, gen)
    scale = None if c.kv_cache_dtype == "auto" else torch.rand(1, generator=gen) + 0.1

    (loop,) = clone_views(cache)
    loop_mla(kv_c, k_pe, loop, slots, c.kv_cache_dtype, scale)
    quantized = c.kv_cache_dtype != "auto" and not c.input_fp8
    if lane != "reference":
        (ref,) = clone_views(cache)
        with force_backend("reference"):
            kvd.concat_and_cache_mla(kv_c, k_pe, ref, slots, c.kv_cache_dtype, scale)
    with force_backend(lane), _debug(c.debug):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache, slots, c.kv_cache_dtype, scale)
    assert_cache_equal(_base(cache), _base(loop), quantized and lane != "reference", f"{lane} vs loop: kv_cache")
    if lane != "reference":
        assert_cache_equal(_base(cache), _base(ref), quantized, f"{lane} vs reference: kv_cache")


@pytest.mark.parametrize("lane", LANES)
def test_mla_write_matches_loop(lane):
    _run("mla", lane, [mla_cases(mode) for mode in MLA_MODES], check_mla)


# ==============================================================================================
# flash_attn_varlen_func
# ==============================================================================================
@dataclass(frozen=True)
class AttnCase:
    layout: str  # one of ATTENTION_LAYOUTS, or "varlen" (not paged: k/v [total_k, H, D] + cu_seqlens_k)
    dtype: torch.dtype  # q's
    fp8: Optional[torch.dtype]  # the cache's fp8 type, or None (cache dtype == q's)
    descale: str  # "none" / "tensor" / "batch_head" / "expanded"
    out_dtype: Optional[torch.dtype]  # None: out=None (allocated by the call)
    out_kind: str  # "dense" / "strided" (a view of a wider NaN buffer) / "none"
    num_kv_heads: int
    group: int  # GQA ratio
    head_size: int
    head_size_v: int
    block_size: int
    q_lens: tuple
    k_lens: tuple
    extra_blocks: int  # unused cache blocks
    extra_cols: int  # block_table columns past the longest sequence
    garbage_cols: bool  # ... holding ids no kernel may follow (-1, past the cache) instead of valid ones
    extra_q_rows: int  # q rows past cu_seqlens_q[-1]
    q_kind: str  # "dense" / "qkv" (a slice of a fused qkv buffer)
    causal: bool
    window: tuple
    softcap: float
    softmax_scale: Optional[float]
    alibi: str  # "none" / "head" / "batch_head"
    sinks: bool
    lse: bool
    num_splits: int
    slack_q: int  # max_seqlen_q / max_seqlen_k above the real maxima (hints may be loose)
    slack_k: int
    varlen_seqused: bool  # not paged: seqused_k shortens the sequences too
    q_fp8: bool  # q in the cache's fp8 type (with q_descale unless descale == "none")
    poison: bool  # every cache slot no sequence uses (and q rows past cu_seqlens_q[-1]) holds NaN
    shared_prefix: bool  # later sequences reuse the first sequence's first block (prefix caching)
    strided_index: bool  # block_table column-major, cu_seqlens_q / seqused_k strided views
    debug: bool
    seed: int


@st.composite
def attention_cases(draw, layout: str):
    dtype = draw(st.sampled_from(FLOATS))
    fp8 = draw(st.sampled_from((None, None, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz)))
    descale = draw(st.sampled_from(("none", "tensor", "batch_head", "expanded"))) if fp8 else "none"
    out_kind = draw(st.sampled_from(("dense", "dense", "strided", "none")))
    out_dtype = None if out_kind == "none" else draw(st.sampled_from((dtype, dtype, torch.float32)))
    hkv = draw(st.sampled_from((2, 1)))
    group = draw(st.sampled_from((2, 1, 4)))
    dk = draw(st.sampled_from(HEAD_SIZES))
    if layout == "diffkv":
        dv = draw(st.sampled_from(HEAD_SIZES))
    elif layout == "mla-slices":
        dv = draw(st.sampled_from([d for d in HEAD_SIZES if d <= dk]))
    else:
        dv = dk
    varlen = layout == "varlen"
    batch = draw(st.sampled_from((2, 1, 3) if varlen else (2, 1, 3, 0)))
    q_lens = tuple(draw(st.lists(st.sampled_from((1, 3, 0, 2, 4)), min_size=batch, max_size=batch)))
    k_lens = tuple(draw(st.lists(_count(40), min_size=batch, max_size=batch)))
    if varlen and not sum(k_lens):  # no key at all: test_varlen_without_keys
        k_lens = (1,) + k_lens[1:]
    window = draw(st.sampled_from(((-1, -1), (-1, -1), "random")))
    if window == "random":
        window = (draw(st.integers(-1, 8)), draw(st.integers(-1, 3)))
    return AttnCase(
        layout=layout, dtype=dtype, fp8=fp8, descale=descale, out_dtype=out_dtype, out_kind=out_kind,
        num_kv_heads=hkv, group=group, head_size=dk, head_size_v=dv,
        block_size=draw(st.sampled_from(BLOCK_SIZES)), q_lens=q_lens, k_lens=k_lens,
        extra_blocks=draw(st.integers(0, 2)), extra_cols=draw(st.integers(0, 2)), garbage_cols=draw(st.booleans()),
        extra_q_rows=draw(st.integers(0, 2)), q_kind=draw(st.sampled_from(("dense", "qkv"))),
        causal=draw(st.sampled_from((True, False))), window=window,
        softcap=draw(st.sampled_from((0.0, 0.0, 2.0, 30.0))),
        softmax_scale=draw(st.sampled_from((None, None, 0.05, 0.3))),
        alibi=draw(st.sampled_from(("none", "none", "head", "batch_head"))), sinks=draw(st.booleans()),
        lse=draw(st.booleans()), num_splits=draw(st.sampled_from((0, 0, 1, 3))),
        slack_q=draw(st.integers(0, 2)), slack_k=draw(st.integers(0, 5)),
        varlen_seqused=layout == "varlen" and draw(st.booleans()),
        q_fp8=fp8 is not None and draw(st.integers(0, 2)) == 0, poison=draw(st.sampled_from((True, False))),
        shared_prefix=draw(st.booleans()), strided_index=draw(st.booleans()), debug=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)))


def _cumsum(xs) -> list:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _poison(t: torch.Tensor, where: torch.Tensor) -> None:
    """NaN into ``t[where]`` (fp8: 0x7F, NaN in e4m3fn and e5m2; e4m3fnuz's one NaN is 0x80)."""
    if t.element_size() == 1:
        t.view(torch.uint8)[where] = 0x80 if t.dtype == torch.float8_e4m3fnuz else 0x7F
    else:
        t[where] = float("nan")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a strided view (every other element of a buffer twice as long)."""
    buf = torch.full((2 * t.shape[0],) + tuple(t.shape[1:]), -7, dtype=t.dtype)
    buf[::2] = t
    return buf[::2]


def attention_inputs(c: AttnCase) -> dict:
    """Every argument of ``flash_attn_varlen_func`` for ``c`` (``out`` poisoned with NaN)."""
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    hkv, hq = c.num_kv_heads, c.num_kv_heads * c.group
    dk, dv = c.head_size, c.head_size_v
    batch = len(c.q_lens)
    cache_dtype = c.fp8 or c.dtype
    q_dtype = c.fp8 if c.q_fp8 else c.dtype
    rows_q = sum(c.q_lens)
    total_q = rows_q + c.extra_q_rows
    if c.q_kind == "qkv":
        q = _rand((total_q, hq + 2 * hkv, dk), q_dtype, gen)[:, :hq]
    else:
        q = _rand((total_q, hq, dk), q_dtype, gen)
    if c.poison:
        _poison(q, torch.arange(total_q) >= rows_q)  # rows no sequence owns
    kw = dict(q=q, max_seqlen_q=max(c.q_lens, default=0) + c.slack_q,
              cu_seqlens_q=torch.tensor(_cumsum(c.q_lens), dtype=torch.int32),
              max_seqlen_k=max(c.k_lens, default=0) + c.slack_k, causal=c.causal, window_size=c.window,
              softcap=c.softcap, softmax_scale=c.softmax_scale, num_splits=c.num_splits)
    if c.layout == "varlen":
        total_k = sum(c.k_lens)
        extra = 2 if c.poison else 0  # rows past cu_seqlens_k[-1]
        kw["k"] = _rand((total_k + extra, hkv, dk), cache_dtype, gen)
        kw["v"] = _rand((total_k + extra, hkv + 1, dv), cache_dtype, gen)[:, 1:]
        cu_k = _cumsum(c.k_lens)
        kw["cu_seqlens_k"] = torch.tensor(cu_k, dtype=torch.int32)
        used = list(c.k_lens)
        if c.varlen_seqused:
            used = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in c.k_lens]
            kw["seqused_k"] = torch.tensor(used, dtype=torch.int32)
        if c.poison:
            live = torch.zeros(total_k + extra, dtype=torch.bool)
            for b in range(batch):
                live[cu_k[b]:cu_k[b] + used[b]] = True
            _poison(kw["k"], ~live)
            _poison(kw["v"], ~live)
    else:
        need = sum((n + c.block_size - 1) // c.block_size for n in c.k_lens)
        nblocks = max(need + c.extra_blocks, 1)
        kw["k"], kw["v"] = make_kv_cache(c.layout, nblocks, c.block_size, hkv, dk, dv if dv != dk else None,
                                         dtype=cache_dtype)
        bt = random_block_table(c.k_lens, nblocks, c.block_size, generator=gen)
        if c.extra_cols:
            more = torch.randint(0, nblocks, (batch, c.extra_cols), generator=gen, dtype=torch.int32)
            if c.garbage_cols:
                more = torch.tensor([-1, nblocks + 1000, 2 ** 31 - 1], dtype=torch.int32)[more % 3]
            bt = torch.cat([bt, more], dim=1)
        if c.shared_prefix and batch > 1 and c.k_lens[0] >= c.block_size:
            for b in range(1, batch):  # a full first block shared by every sequence that has one
                if c.k_lens[b] > c.block_size:
                    bt[b, 0] = bt[0, 0]
        if c.poison:
            live = torch.zeros(nblocks, c.block_size, dtype=torch.bool)
            for b, n in enumerate(c.k_lens):
                for j in range(n):
                    live[int(bt[b, j // c.block_size]), j % c.block_size] = True
            _poison(kw["k"], ~live)
            _poison(kw["v"], ~live)
        kw["block_table"] = bt
        kw["seqused_k"] = torch.tensor(c.k_lens, dtype=torch.int32)
    if c.strided_index:
        kw["cu_seqlens_q"] = _strided(kw["cu_seqlens_q"])
        if kw.get("seqused_k") is not None:
            kw["seqused_k"] = _strided(kw["seqused_k"])
        if kw.get("block_table") is not None:
            kw["block_table"] = kw["block_table"].t().contiguous().t()
    if c.fp8 and c.descale != "none":
        shape = (1,) if c.descale == "tensor" else (batch, hkv)
        for name in ("q_descale", "k_descale", "v_descale") if c.q_fp8 else ("k_descale", "v_descale"):
            if c.descale == "expanded":  # vLLM: layer._k_scale.expand((batch, num_kv_heads))
                t = (torch.rand(1, generator=gen) * 0.2 + 0.05).expand(batch, hkv)
            else:
                t = torch.rand(shape, generator=gen) * 0.2 + 0.05
            kw[name] = t * 4 if name == "q_descale" else t
    if c.alibi != "none":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)])
        if c.alibi == "batch_head":
            slopes = slopes[None, :] * (1.0 + torch.rand(batch, hq, generator=gen))
        kw["alibi_slopes"] = slopes.float()
    if c.sinks:
        kw["s_aux"] = torch.randn(hq, generator=gen) * 2.0
    if c.lse:
        kw["return_softmax_lse"] = True
    out_dtype = _expected_out_dtype(c)
    if c.out_kind == "dense":
        kw["out"] = torch.full((total_q, hq, dv), float("nan"), dtype=out_dtype)
    elif c.out_kind == "strided":
        kw["out_buffer"] = torch.full((total_q, hq + 1, dv + 8), float("nan"), dtype=out_dtype)
        kw["out"] = kw["out_buffer"][:, 1:, 4:4 + dv]
    return kw


def _call(kw: dict):
    args = {n: t for n, t in kw.items() if n != "out_buffer"}
    res = kvd.flash_attn_varlen_func(**args)
    return res if kw.get("return_softmax_lse") else (res, None)


def _expected_out_dtype(c: AttnCase) -> torch.dtype:
    if c.out_dtype is not None:
        return c.out_dtype
    return torch.bfloat16 if c.q_fp8 else c.dtype


def _compare(c: AttnCase, what: str, out, lse, want_out, want_lse, seen, cu) -> None:
    rows = cu[-1]
    out_dtype = _expected_out_dtype(c)
    assert out.dtype == out_dtype and tuple(out.shape) == tuple(want_out.shape), \
        f"{what}: out {out.dtype}{tuple(out.shape)}"
    got, want = out[:rows].double(), want_out[:rows].double()
    nan = torch.isnan(got)
    assert not nan.any(), f"{what}: {int(nan.sum())} output elements unwritten or NaN"
    # rows that see no key are exactly 0
    blind = ~seen[:rows]
    assert torch.equal(got[blind], torch.zeros_like(got[blind])), f"{what}: rows that see no key are not 0"
    tol = TOLERANCE[out_dtype if out_dtype in TOLERANCE else torch.bfloat16]
    low = c.fp8 is not None or c.dtype == torch.bfloat16
    if c.fp8 or c.dtype != out_dtype:
        tol = max(tol, TOLERANCE[c.dtype], 2e-2 if c.fp8 else 0.0)
    for b in range(len(cu) - 1):  # per sequence, so one wrong sequence cannot hide in the batch
        g, w = got[cu[b]:cu[b + 1]], want[cu[b]:cu[b + 1]]
        if g.numel():
            err = float((g - w).norm() / w.norm().clamp_min(1e-6))
            assert err < tol, f"{what}: sequence {b}: relative error {err:.2e} >= {tol:.0e}"
    if lse is not None:
        assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(want_lse.shape), \
            f"{what}: lse {lse.dtype}{tuple(lse.shape)}"
        lg, lw = lse[:, :rows].double(), want_lse[:, :rows]
        assert not torch.isnan(lg).any(), f"{what}: lse has NaN (unwritten rows?)"
        inf = torch.isinf(lw)
        assert torch.equal(torch.isinf(lg) & (lg < 0), inf), f"{what}: lse -inf rows differ"
        if (~inf).any():
            err = float((lg - lw)[~inf].abs().max())
            assert err < (5e-2 if low else 1e-2), f"{what}: lse error {err:.2e}"


def check_attention(c: AttnCase, lane: str) -> None:
    kw = attention_inputs(c)
    cu = kw["cu_seqlens_q"].tolist()
    before = {n: _bytes(kw[n]) for n in ("q", "k", "v")}
    want_out, want_lse, seen = loop_attention(kw)
    if lane == "reference" and c.layout != "varlen" and c.fp8 is None:
        # the loop here agrees with test_engine_surface's loop (written independently)
        from test_engine_surface import loop_attention as engine_loop
        other_out, other_lse = engine_loop(kw)
        torch.testing.assert_close(want_out, other_out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(want_lse, other_lse, rtol=1e-9, atol=1e-9)
    with force_backend(lane), _debug(c.debug):
        out, lse = _call(kw)
    if "out" in kw:
        assert out is kw["out"], "flash_attn_varlen_func must return the out tensor it was given"
    if "out_buffer" in kw:
        outside = torch.ones(kw["out_buffer"].shape, dtype=torch.bool)
        outside[:, 1:, 4:4 + c.head_size_v] = False
        assert torch.isnan(kw["out_buffer"][outside]).all(), f"{lane}: wrote outside the out view"
    _compare(c, f"{lane} vs loop", out, lse, want_out, want_lse, seen, cu)
    if lane != "reference":
        ref_kw = dict(kw)
        ref_kw.pop("out_buffer", None)
        ref_kw["out"] = torch.full(want_out.shape, float("nan"), dtype=torch.float32)
        with force_backend("reference"):
            ref_out, ref_lse = _call(ref_kw)
        # the reference as truth: its float32 output, the lane's own output dtype tolerance
        _compare(c, f"{lane} vs reference", out, lse, ref_out, ref_lse, seen, cu)
    for n, b in before.items():
        assert torch.equal(_bytes(kw[n]), b), f"{lane}: attention changed {n}"


@pytest.mark.parametrize("lane", LANES)
def test_varlen_without_keys(lane):
    """Non-paged, no key at all (k/v [0, H, D]): rows that see nothing are 0, LSE the sink or -inf,
    rows past cu_seqlens_q[-1] untouched (found by this suite: it raised a ValueError naming
    key_cache before)."""
    q = torch.randn(2, 2, 16)
    kv = torch.empty(0, 2, 16)
    out = torch.full_like(q, float("nan"))
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32)
    sinks = torch.tensor([0.5, -1.0])
    with force_backend(lane):
        _, lse = kvd.flash_attn_varlen_func(q, kv, kv, 1, cu_q, 0, cu_seqlens_k=cu_k, out=out, s_aux=sinks,
                                            return_softmax_lse=True)
        _, lse2 = kvd.flash_attn_varlen_func(q, kv, kv, 1, cu_q, 0, cu_seqlens_k=cu_k, return_softmax_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isnan(out[1]).all()
    assert torch.equal(lse[:, 0], sinks) and torch.isinf(lse2[:, 0]).all() and (lse2[:, 0] < 0).all()


@pytest.mark.parametrize("lane", LANES)
def test_attention_matches_loop(lane):
    _run("attention", lane, [attention_cases(layout) for layout in ATTENTION_LAYOUTS + ("varlen",)],
         check_attention)


# ==============================================================================================
# bad inputs: named errors, nothing written
# ==============================================================================================
@dataclass(frozen=True)
class BadCase:
    op: str  # "write" / "mla" / "attention"
    mutation: str
    layout: str
    dtype: torch.dtype
    fp8: bool
    heads: int
    head_size: int
    block_size: int
    tokens: int
    variant: int  # picks among the ways of a mutation
    seed: int


WRITE_MUTATIONS = (
    "key_heads", "key_head_size", "value_head_size", "value_tokens", "kv_dtype", "value_dtype",
    "kv_cache_dtype", "no_k_scale", "no_v_scale", "scale_dtype", "scale_shape", "slot_dtype", "slot_shape",
    "slot_too_long", "key_stride", "value_stride", "key_device", "slot_device", "value_cache_dtype",
    "value_cache_heads", "fp8_kind", "auto_on_uint8", "key_not_tensor", "slot_not_tensor", "scale_device",
    "value_cache_device",
)
MLA_MUTATIONS = ("rank", "k_pe_tokens", "k_pe_dtype", "kv_c_dtype", "kv_cache_dtype", "no_scale", "scale_dtype",
                 "slot_dtype", "slot_shape", "slot_too_long", "kv_c_stride", "cache_dims")
ATTN_MUTATIONS = (
    "q_heads", "q_head_size", "q_dtype", "out_shape", "out_dtype", "block_table_dtype", "block_table_shape",
    "seqused_missing", "seqused_dtype", "seqused_shape", "cu_q_dtype", "cu_q_shape", "alibi_shape",
    "alibi_dtype", "s_aux_shape", "descale_shape", "descale_dtype", "q_stride", "q_device", "head_major",
    "cu_k_missing", "k_not_tensor", "block_table_device", "out_device", "seqused_device", "alibi_device",
)
WRITE_VALUE_MUTATIONS = ("slot_high", "slot_repeat")
ATTN_VALUE_MUTATIONS = ("block_id_high", "block_id_negative", "seqused_over_capacity", "seqused_negative",
                        "max_seqlen_q_low", "max_seqlen_k_low", "cu_q_last_high", "cu_q_decreasing",
                        "cu_k_last_high")


def bad_strata(values: bool) -> list:
    if values:
        muts = {"write": WRITE_VALUE_MUTATIONS, "mla": WRITE_VALUE_MUTATIONS, "attention": ATTN_VALUE_MUTATIONS}
    else:
        muts = {"write": WRITE_MUTATIONS, "mla": MLA_MUTATIONS, "attention": ATTN_MUTATIONS}
    return [bad_cases(op, m) for op, ms in muts.items() for m in ms]


@st.composite
def bad_cases(draw, op: str, mutation: str):
    layouts = {"write": LAYOUTS, "mla": ("mla",), "attention": ATTENTION_LAYOUTS}[op]
    layout = draw(st.sampled_from(layouts))
    return BadCase(op=op, mutation=mutation, layout=layout, dtype=draw(st.sampled_from(FLOATS)),
                   fp8=draw(st.booleans()), heads=draw(st.integers(1, 3)),
                   head_size=draw(st.sampled_from((16, 32, 48))),
                   block_size=draw(st.sampled_from(BLOCK_SIZES)), tokens=draw(st.integers(2, 8)),
                   variant=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2 ** 16)))


def _bad_write(c: BadCase, gen):
    """(kwargs of reshape_and_cache_flash, caches to check, exception type, argument name)."""
    m, h, d, t = c.mutation, c.heads, c.head_size, c.tokens
    nb = max(1, -(-t // c.block_size)) + 1
    fp8 = c.fp8 or m in ("no_k_scale", "no_v_scale", "scale_dtype", "scale_shape", "fp8_kind")
    cache_dtype = (torch.uint8 if c.variant % 2 else torch.float8_e4m3fn) if fp8 else c.dtype
    kc, vc = make_kv_cache(c.layout, nb, c.block_size, h, d, dtype=cache_dtype)
    a = dict(key=_rand((t, h, d), c.dtype, gen), value=_rand((t, h, d), c.dtype, gen), key_cache=kc,
             value_cache=vc, slot_mapping=random_slots(t, nb, c.block_size, generator=gen),
             kv_cache_dtype="fp8" if fp8 else "auto", k_scale=torch.rand(1) + 0.1,
             v_scale=torch.rand(h) + 0.1)
    other = {torch.bfloat16: torch.float16, torch.float16: torch.float32, torch.float32: torch.bfloat16}[c.dtype]
    if m == "key_heads":
        a["key"] = _rand((t, h + 1, d), c.dtype, gen)
        return a, ValueError, "key"
    if m == "key_head_size":
        a["key"] = _rand((t, h, d + 8 if c.variant % 2 else d - 8), c.dtype, gen)
        return a, ValueError, "key"
    if m == "value_head_size":
        a["value"] = _rand((t, h, d + 16), c.dtype, gen)
        return a, ValueError, "value"
    if m == "value_tokens":
        a["value"] = _rand((t - 1 if c.variant % 2 else t + 1, h, d), c.dtype, gen)
        return a, ValueError, "value"
    if m == "kv_dtype":  # key and value of one dtype, not the cache's ("auto")
        a.update(key=a["key"].to(other), value=a["value"].to(other), kv_cache_dtype="auto")
        if fp8:
            a.update(key=a["key"].to(torch.int8), value=a["value"].to(torch.int8), kv_cache_dtype="fp8")
        return a, TypeError, "key"
    if m == "value_dtype":
        a["value"] = a["value"].to(other)
        return a, TypeError, "value"
    if m == "kv_cache_dtype":
        a["kv_cache_dtype"] = ("int8", "fp16", "fp8_e4m3fnuz", "FP8", "fp8_inc", " auto", "", "bf16")[
            (c.seed + c.variant) % 8]
        return a, ValueError, "kv_cache_dtype"
    if m == "no_k_scale":
        a["k_scale"] = None
        return a, ValueError, "k_scale"
    if m == "no_v_scale":
        a["v_scale"] = None
        return a, ValueError, "v_scale"
    if m == "scale_dtype":
        which = ("k_scale", "v_scale")[c.variant % 2]
        a[which] = a[which].to((torch.float64, torch.float16, torch.bfloat16, torch.int32)[c.variant])
        return a, TypeError, which
    if m == "scale_shape":
        which = ("k_scale", "v_scale")[c.variant % 2]
        a[which] = torch.rand(h + 1) + 0.1 if c.variant < 2 else torch.rand(1, h) + 0.1 if h > 1 else torch.rand(2)
        return a, ValueError, which
    if m == "slot_dtype":
        a["slot_mapping"] = a["slot_mapping"].to((torch.int16, torch.int8, torch.float32, torch.uint8)[c.variant])
        return a, TypeError, "slot_mapping"
    if m == "slot_shape":
        a["slot_mapping"] = a["slot_mapping"].reshape(1, -1) if c.variant % 2 else a["slot_mapping"][None, :, None]
        return a, ValueError, "slot_mapping"
    if m == "slot_too_long":
        a["slot_mapping"] = torch.cat([a["slot_mapping"], torch.tensor([-1] * (c.variant + 1))])
        return a, ValueError, "slot_mapping"
    if m == "key_stride":
        a["key"] = _rand((t, h, 2 * d), c.dtype, gen)[..., ::2]
        return a, ValueError, "key"
    if m == "value_stride":
        a["value"] = _rand((t, h, 2 * d), c.dtype, gen)[..., ::2]
        return a, ValueError, "value"
    if m == "key_device":
        a["key"] = torch.empty((t, h, d), dtype=c.dtype, device="meta")
        a["value"] = torch.empty((t, h, d), dtype=c.dtype, device="meta")
        return a, ValueError, "key"
    if m == "slot_device":
        a["slot_mapping"] = torch.empty((t,), dtype=torch.int64, device="meta")
        return a, ValueError, "slot_mapping"
    if m == "value_cache_dtype":
        vdt = torch.float32 if cache_dtype != torch.float32 else torch.bfloat16
        if c.layout == "head-major":
            a["value_cache"] = random_fill(torch.empty(nb, h, d, c.block_size, dtype=vdt))
        else:
            a["value_cache"] = make_kv_cache("NHD", nb, c.block_size, h, d, dtype=vdt)[1]
        return a, TypeError, "value_cache"
    if m == "value_cache_heads":
        if c.layout == "head-major":
            a["value_cache"] = random_fill(torch.empty(nb, h + 1, d, c.block_size, dtype=cache_dtype))
        else:
            a["value_cache"] = make_kv_cache("NHD", nb, c.block_size, h + 1, d, dtype=cache_dtype)[1]
        return a, ValueError, "value_cache"
    if m == "fp8_kind":  # e5m2 asked of an e4m3 cache
        if cache_dtype == torch.uint8:  # a uint8 view is either: make the cache e4m3
            a["key_cache"], a["value_cache"] = make_kv_cache(c.layout, nb, c.block_size, h, d,
                                                             dtype=torch.float8_e4m3fn)
        a["kv_cache_dtype"] = "fp8_e5m2"
        return a, TypeError, "key_cache"
    if m == "auto_on_uint8":
        a["key_cache"], a["value_cache"] = make_kv_cache(c.layout, nb, c.block_size, h, d, dtype=torch.uint8)
        a["kv_cache_dtype"] = "auto"
        return a, TypeError, "kv_cache_dtype"
    if m == "key_not_tensor":
        a["key"] = a["key"].tolist()
        return a, TypeError, "key"
    if m == "scale_device":
        a.update(kv_cache_dtype="fp8" if fp8 else "auto", v_scale=torch.ones(1, device="meta"))
        if not fp8:  # "auto" ignores scales: make it an fp8 write
            a["key_cache"], a["value_cache"] = make_kv_cache(c.layout, nb, c.block_size, h, d,
                                                             dtype=torch.float8_e4m3fn)
            a["kv_cache_dtype"] = "fp8"
        return a, ValueError, "v_scale"
    if m == "value_cache_device":
        a["value_cache"] = torch.empty(a["value_cache"].shape, dtype=a["value_cache"].dtype, device="meta")
        return a, ValueError, "value_cache"
    if m == "slot_not_tensor":
        a["slot_mapping"] = a["slot_mapping"].tolist()
        return a, TypeError, "slot_mapping"
    if m == "slot_high":
        s = a["slot_mapping"].clone()
        s[c.variant % t] = nb * c.block_size + c.variant * 7
        a["slot_mapping"] = s.to(torch.int32) if c.seed % 2 else s
        return a, ValueError, "slot_mapping"
    if m == "slot_repeat":
        s = a["slot_mapping"].clone()
        s[-1] = s[c.variant % (t - 1)]
        a["slot_mapping"] = s
        return a, ValueError, "slot_mapping"
    raise AssertionError(m)


def _bad_mla(c: BadCase, gen):
    m, t = c.mutation, c.tokens
    rank, rope = c.head_size, 16
    nb = max(1, -(-t // c.block_size)) + 1
    fp8 = c.fp8 or m in ("no_scale", "scale_dtype")
    cache_dtype = (torch.uint8 if c.variant % 2 else torch.float8_e5m2) if fp8 else c.dtype
    cache = make_mla_cache(nb, c.block_size, rank, rope, dtype=cache_dtype, padded=bool(c.seed % 2))
    a = dict(kv_c=_rand((t, rank), c.dtype, gen), k_pe=_rand((t, rope), c.dtype, gen), kv_cache=cache,
             slot_mapping=random_slots(t, nb, c.block_size, generator=gen),
             kv_cache_dtype="fp8_e5m2" if fp8 else "auto", scale=torch.rand(1) + 0.1)
    other = {torch.bfloat16: torch.float16, torch.float16: torch.float32, torch.float32: torch.bfloat16}[c.dtype]
    if m == "rank":
        a["kv_c"] = _rand((t, rank + (8 if c.variant % 2 else -8)), c.dtype, gen)
        return a, ValueError, "kv_c"
    if m == "k_pe_tokens":
        a["k_pe"] = _rand((t + 1, rope), c.dtype, gen)
        return a, ValueError, "k_pe"
    if m == "k_pe_dtype":
        a["k_pe"] = a["k_pe"].to(other)
        return a, TypeError, "k_pe"
    if m == "kv_c_dtype":
        a.update(kv_c=a["kv_c"].to(other), k_pe=a["k_pe"].to(other), kv_cache_dtype="auto")
        if fp8:
            a.update(kv_c=a["kv_c"].to(torch.int8), k_pe=a["k_pe"].to(torch.int8), kv_cache_dtype="fp8_e5m2")
        return a, TypeError, "kv_c"
    if m == "kv_cache_dtype":
        a["kv_cache_dtype"] = ("int8", "fp8_ds_mla", "e5m2", "fp8-e5m2")[c.variant]
        return a, ValueError, "kv_cache_dtype"
    if m == "no_scale":
        a["scale"] = None
        return a, ValueError, "scale"
    if m == "scale_dtype":
        a["scale"] = a["scale"].to((torch.float64, torch.float16, torch.bfloat16, torch.int32)[c.variant])
        return a, TypeError, "scale"
    if m == "slot_dtype":
        a["slot_mapping"] = a["slot_mapping"].to((torch.int16, torch.int8, torch.float32, torch.uint8)[c.variant])
        return a, TypeError, "slot_mapping"
    if m == "slot_shape":
        a["slot_mapping"] = a["slot_mapping"].reshape(1, -1)
        return a, ValueError, "slot_mapping"
    if m == "slot_too_long":
        a["slot_mapping"] = torch.cat([a["slot_mapping"], torch.tensor([-1])])
        return a, ValueError, "slot_mapping"
    if m == "kv_c_stride":
        a["kv_c"] = _rand((t, 2 * rank), c.dtype, gen)[:, ::2]
        return a, ValueError, "kv_c"
    if m == "cache_dims":
        a["kv_cache"] = make_kv_cache("NHD", nb, c.block_size, 1, rank + rope, dtype=cache_dtype)[0]
        return a, ValueError, "kv_cache"
    if m == "slot_high":
        s = a["slot_mapping"].clone()
        s[c.variant % t] = nb * c.block_size + c.variant
        a["slot_mapping"] = s
        return a, ValueError, "slot_mapping"
    if m == "slot_repeat":
        s = a["slot_mapping"].clone()
        s[0] = s[1 + c.variant % (t - 1)]
        a["slot_mapping"] = s
        return a, ValueError, "slot_mapping"
    raise AssertionError(m)


def _bad_attention(c: BadCase, gen):
    m, hkv, d = c.mutation, c.heads, c.head_size
    hq = hkv * (1 + c.variant % 2)
    bs = c.block_size
    q_lens = [1 + c.seed % 3, 1, 2][: 1 + c.variant % 3]
    batch = len(q_lens)
    k_lens = [q + (c.seed >> 2) % 20 for q in q_lens]
    need = sum(-(-n // bs) for n in k_lens)
    nb = need + 1
    cache_dtype = torch.float8_e4m3fn if c.fp8 else c.dtype
    k, v = make_kv_cache(c.layout, nb, bs, hkv, d, dtype=cache_dtype)
    total_q = sum(q_lens)
    kw = dict(q=_rand((total_q, hq, d), c.dtype, gen), k=k, v=v, max_seqlen_q=max(q_lens),
              cu_seqlens_q=torch.tensor(_cumsum(q_lens), dtype=torch.int32), max_seqlen_k=max(k_lens),
              seqused_k=torch.tensor(k_lens, dtype=torch.int32),
              block_table=random_block_table(k_lens, nb, bs, generator=gen), causal=bool(c.seed % 2),
              out=torch.full((total_q, hq, d), float("nan"), dtype=c.dtype))
    if c.fp8:
        kw.update(k_descale=torch.rand(1) + 0.1, v_descale=torch.rand(batch, hkv) + 0.1)
    other = {torch.bfloat16: torch.float16, torch.float16: torch.float32, torch.float32: torch.bfloat16}[c.dtype]
    if m == "q_heads":  # not a multiple of num_kv_heads (or a wrong head count for out)
        kw["q"] = _rand((total_q, hkv + 1 if hkv > 1 else 3, d), c.dtype, gen)
        return kw, ValueError, "q" if hkv > 1 else "out"
    if m == "q_head_size":
        kw["q"] = _rand((total_q, hq, d + 8), c.dtype, gen)
        return kw, ValueError, "q"
    if m == "q_dtype":
        if c.fp8:
            kw["q"] = kw["q"].to(torch.int8)
        else:
            kw["q"] = kw["q"].to(other)
        return kw, TypeError, "q"
    if m == "out_shape":
        kw["out"] = torch.full((total_q + 1 if c.variant % 2 else total_q, hq, d + 8 * (1 - c.variant % 2)),
                               float("nan"), dtype=c.dtype)
        return kw, ValueError, "out"
    if m == "out_dtype":
        kw["out"] = torch.full((total_q, hq, d), float("nan"), dtype=torch.float64)
        kw["out"] = kw["out"].to((torch.float64, torch.int32, torch.float8_e4m3fn, torch.float64)[c.variant])
        return kw, TypeError, "out"
    if m == "block_table_dtype":
        kw["block_table"] = kw["block_table"].to(torch.int64 if c.variant % 2 else torch.int16)
        return kw, TypeError, "block_table"
    if m == "block_table_shape":
        bt = kw["block_table"]
        kw["block_table"] = bt[:-1] if c.variant % 2 else bt.reshape(-1)
        return kw, ValueError, "block_table"
    if m == "seqused_missing":
        kw["seqused_k"] = None
        return kw, ValueError, "seqused_k"
    if m == "seqused_dtype":
        kw["seqused_k"] = kw["seqused_k"].to(torch.int64)
        return kw, TypeError, "seqused_k"
    if m == "seqused_shape":
        kw["seqused_k"] = torch.cat([kw["seqused_k"], torch.tensor([1], dtype=torch.int32)])
        return kw, ValueError, "seqused_k"
    if m == "cu_q_dtype":
        kw["cu_seqlens_q"] = kw["cu_seqlens_q"].to(torch.int64)
        return kw, TypeError, "cu_seqlens_q"
    if m == "cu_q_shape":
        kw["cu_seqlens_q"] = kw["cu_seqlens_q"].reshape(1, -1) if c.variant % 2 else kw["cu_seqlens_q"][:0]
        return kw, ValueError, "cu_seqlens_q"
    if m == "alibi_shape":
        kw["alibi_slopes"] = torch.rand(hq + 1) if c.variant % 2 else torch.rand(batch + 1, hq)
        return kw, ValueError, "alibi_slopes"
    if m == "alibi_dtype":
        kw["alibi_slopes"] = torch.rand(hq, dtype=torch.float64)
        return kw, TypeError, "alibi_slopes"
    if m == "s_aux_shape":
        kw["s_aux"] = torch.rand(hq + 1) if c.variant % 2 else torch.rand(1, hq)
        return kw, ValueError, "s_aux"
    if m == "descale_shape":
        kw["k_descale"] = torch.rand(batch + 1, hkv) if c.variant % 2 else torch.rand(hkv + 1)
        return kw, ValueError, "k_descale"
    if m == "descale_dtype":
        kw["v_descale"] = torch.rand(1, dtype=torch.float64 if c.variant % 2 else torch.bfloat16)
        return kw, TypeError, "v_descale"
    if m == "q_stride":
        kw["q"] = _rand((total_q, hq, 2 * d), c.dtype, gen)[..., ::2]
        return kw, ValueError, "q"
    if m == "q_device":
        kw["q"] = torch.empty((total_q, hq, d), dtype=c.dtype, device="meta")
        return kw, ValueError, "q"
    if m == "head_major":
        kw["k"], kw["v"] = make_kv_cache("head-major", nb, bs, hkv, d, dtype=cache_dtype)
        return kw, ValueError, "k"
    if m == "cu_k_missing":  # not paged (no block_table) needs cu_seqlens_k
        total_k = sum(k_lens)
        kw.update(k=_rand((total_k, hkv, d), cache_dtype, gen), v=_rand((total_k, hkv, d), cache_dtype, gen),
                  block_table=None)
        return kw, ValueError, "cu_seqlens_k"
    if m == "k_not_tensor":
        kw["k"] = None
        return kw, TypeError, "k"
    if m.endswith("_device"):
        name = {"block_table_device": "block_table", "out_device": "out", "seqused_device": "seqused_k",
                "alibi_device": "alibi_slopes"}[m]
        t = kw[name] if name != "alibi_slopes" else torch.rand(hq)
        kw[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        return kw, ValueError, name
    # value-level (KVDISPATCH_DEBUG=1)
    bt, used = kw["block_table"].clone(), kw["seqused_k"].clone()
    b = c.variant % batch
    if m == "block_id_high":
        bt[b, (c.seed % k_lens[b]) // bs] = nb + c.variant
        kw["block_table"] = bt
        return kw, ValueError, "block_table"
    if m == "block_id_negative":
        bt[b, 0] = -1 - c.variant
        kw["block_table"] = bt
        return kw, ValueError, "block_table"
    if m == "seqused_over_capacity":
        used[b] = bt.shape[1] * bs + 1 + c.variant
        kw["seqused_k"], kw["max_seqlen_k"] = used, int(used.max())
        return kw, ValueError, "seqused_k"
    if m == "seqused_negative":
        used[b] = -1 - c.variant
        kw["seqused_k"] = used
        return kw, ValueError, "seqused_k"
    if m == "max_seqlen_q_low":
        kw["max_seqlen_q"] = max(q_lens) - 1 - c.variant % max(q_lens)
        return kw, ValueError, "max_seqlen_q"
    if m == "max_seqlen_k_low":
        kw["max_seqlen_k"] = max(k_lens) - 1 - (c.seed % max(k_lens))
        return kw, ValueError, "max_seqlen_k"
    if m == "cu_q_last_high":
        cuq = kw["cu_seqlens_q"].clone()
        cuq[-1] = total_q + 1 + c.variant
        kw["cu_seqlens_q"] = cuq
        return kw, ValueError, "cu_seqlens_q"
    if m == "cu_q_decreasing":
        cuq = kw["cu_seqlens_q"].clone()
        if batch > 1:
            cuq[1] = cuq[2] + 1
        else:
            cuq[0] = 1
        kw["cu_seqlens_q"] = cuq
        return kw, ValueError, "cu_seqlens_q"
    if m == "cu_k_last_high":  # not paged: cu_seqlens_k past k's rows
        total_k = sum(k_lens)
        cuk = torch.tensor(_cumsum(k_lens), dtype=torch.int32)
        cuk[-1] = total_k + 1 + c.variant
        kw.update(k=_rand((total_k, hkv, d), cache_dtype, gen), v=_rand((total_k, hkv, d), cache_dtype, gen),
                  block_table=None, seqused_k=None, cu_seqlens_k=cuk, max_seqlen_k=total_k + 1 + c.variant)
        return kw, ValueError, "cu_seqlens_k"
    raise AssertionError(m)


def check_bad(c: BadCase, lane: str, values: bool) -> None:
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    build = {"write": _bad_write, "mla": _bad_mla, "attention": _bad_attention}[c.op]
    a, exc, name = build(c, gen)
    fn = {"write": kvd.reshape_and_cache_flash, "mla": kvd.concat_and_cache_mla,
          "attention": kvd.flash_attn_varlen_func}[c.op]
    watched = [t for n, t in a.items() if n in ("key_cache", "value_cache", "kv_cache", "k", "v", "q", "key", "value")
               and isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = [_bytes(t) for t in watched]
    out = a.get("out") if isinstance(a.get("out"), torch.Tensor) else None
    out_before = None if out is None else _bytes(out)
    # value checks: under KVDISPATCH_DEBUG=1 for every lane; the lanes that always check values
    # (reference, sycl-cpu) must raise without it too, except for repeated slots (a debug-only check)
    always = next(b for b in registry.backends if b.name == lane).always_check_values
    debug = True if not values else (c.mutation in ("slot_repeat",) or not always or c.seed % 2 == 0)
    with force_backend(lane), _debug(debug):
        try:
            fn(**a)
        except (ValueError, TypeError) as e:
            err = e
        else:
            raise AssertionError(f"{c.op} {c.mutation}: no error raised")
    assert type(err) is exc or isinstance(err, exc), f"{c.mutation}: {type(err).__name__} {err}"
    msg = str(err)
    assert re.match(rf"{name}[:/]", msg), f"{c.mutation}: the message does not start with {name!r}: {msg}"
    for t, b in zip(watched, before):
        assert torch.equal(_bytes(t), b), f"{c.mutation}: a tensor changed before the error"
    if out is not None and out.device.type == "cpu":
        assert torch.equal(_bytes(out), out_before), f"{c.mutation}: out written before the error"


@pytest.mark.parametrize("lane", LANES)
def test_bad_metadata_is_named_and_writes_nothing(lane):
    _run("bad-metadata", lane, bad_strata(values=False), lambda c, lane: check_bad(c, lane, values=False))


@pytest.mark.parametrize("lane", LANES)
def test_bad_values_are_named_and_write_nothing(lane):
    _run("bad-values", lane, bad_strata(values=True), lambda c, lane: check_bad(c, lane, values=True))


# ==============================================================================================
# how many examples ran (keep this test last)
# ==============================================================================================
def test_zz_example_counts():
    if not STARTED:
        pytest.skip("no property test ran in this session")
    lines = [f"{'property':<14}{'lane':<11}{'examples':>9}{'minimum':>9}"]
    short = []
    for prop, lane in sorted(STARTED):
        n, need = COUNTS[prop, lane], _minimum(prop, lane)
        done = (prop, lane) in FINISHED
        lines.append(f"{prop:<14}{lane:<11}{n:>9}{need:>9}" + ("" if done else "  (failed: reported above)"))
        if done and n < need:
            short.append(f"{prop}/{lane}: {n} < {need}")
    per_lane = collections.Counter()
    for (prop, lane), n in COUNTS.items():
        per_lane[lane] += n
    lines.append("per lane: " + ", ".join(f"{lane} {n}" for lane, n in sorted(per_lane.items())))
    print("\nproperty examples (HYPOTHESIS_EXAMPLES_SCALE=%g)\n" % SCALE + "\n".join(lines))
    assert not short, "too few examples: " + "; ".join(short)
