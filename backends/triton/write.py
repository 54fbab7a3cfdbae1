"""Triton cache-write kernels: ``reshape_and_cache_flash`` and ``concat_and_cache_mla``.

One kernel serves every layout. The unit of work is a *row*: the ``head_size`` elements of one
(token, head), contiguous in the input and (for 4-D caches) contiguous in the cache. A program
takes ``ROWS`` consecutive rows of K and the same rows of V, loads them as 16-byte vectors,
converts if the cache is fp8, and stores each row at

    block*S_BLOCK + token_in_block*S_TOKEN + head*S_HEAD + (d // X)*S_CHUNK + d % X

with the five strides taken from the descriptor (never from a layout name) and passed as
``tl.constexpr``: a cache's strides are fixed for its lifetime, so every layout gets a kernel
compiled for its exact strides (the offset arithmetic folds to shifts and adds, and Triton proves
the 16-byte alignment that vectorizes the stores). On caches where a token's heads are contiguous
(NHD, combined and cross-layer slices) and the input's heads are too, a row is the whole token
(``heads * head_size`` elements): fewer rows, one slot load per token, longer bursts.

Head-major caches (vLLM's 5-D key / 4-D value pair) put a token's elements ``block_size`` apart, so
rows would be stored as 2- or 16-byte pieces: the kernel's ``HEAD_MAJOR`` form takes a block's worth
of tokens of one head per program and, when their slots are consecutive (a prefill's), stores the tile
with the tokens in neighbouring lanes; other slot patterns take the row path in the same kernel.

The MLA write is the same kernel with ``kv_c`` as "K" and ``k_pe`` as "V", both one head, "V"
stored ``kv_lora_rank`` elements into the cache row.

Offsets are int32 when the descriptor proves the cache fits (and the inputs do), else int64.
FP8: ``x * (1 / scale)`` clamped to the type's largest finite value (so a finite input never
becomes NaN/inf), rounded to nearest-even by the hardware conversion where the platform has one
for the type (``Platform.native_fp8``; e4m3fnuz on NVIDIA has none: a shortcut through e4m3fn
stored wrong codes on the H100, 2026-11-22), otherwise by an exact integer encoder
(``_fp8_encode``), which also serves the CPU interpreter (whose own fp8 casts do not round to
nearest-even).

Per-call Python is kept small: everything derived from the descriptor, the input strides, the
pointer alignments and the token-count bucket is cached; on NVIDIA the cached compiled kernel is
launched directly with raw pointers, skipping Triton's per-call argument specialization.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvdispatch.descriptor import INT32_MAX
from kvdispatch.platform import interpreting as _interpreting  # tests patch this name

from .backend import ELEMENT_DTYPES, MAX_ROW as _MAX_ROW
from .launch import direct, no_launch_hooks as _no_launch_hooks, stream as _stream
from .write_configs import WriteConfig, config_for

__all__ = ["supports", "reshape_and_cache_flash", "concat_and_cache_mla", "plan_for"]

# fp8 type -> (exponent bias, mantissa bits, fnuz) for the integer encoder
_FP8_FORMAT = {
    torch.float8_e4m3fn: (7, 3, False),
    torch.float8_e5m2: (15, 2, False),
    torch.float8_e4m3fnuz: (8, 3, True),
}
_FP8 = tuple(_FP8_FORMAT)

# mode of the element conversion (constexpr QUANT): copy; hardware conversion to the cache's fp8
# type; the integer encoder
COPY, NATIVE_FP8, SOFT_FP8 = 0, 1, 2

# whole-token rows only up to this width (elements, padded): wider rows gain nothing (a 2 KB
# token row is already a long burst) and would only grow the per-program tile
_MAX_MERGED_ROW = 1 << 12


# -- kernels ----------------------------------------------------------------------------------------
@triton.jit
def _fp8_encode(y, BIAS: tl.constexpr, MAN: tl.constexpr, FNUZ: tl.constexpr):
    """fp32 ``y`` (already clamped to the type's range; NaN kept) -> fp8 bit patterns, uint8.

    Round to nearest, ties to even, subnormals included; exact for e4m3fn, e5m2 and e4m3fnuz.
    The retained mantissa is ``mant >> s``: ``s = 23 - MAN`` for normal results, larger below the
    smallest normal (the result's quantum is fixed there). A carry out of the mantissa rounds up
    into the exponent field by the addition, as it should.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    e = a >> 23
    mant = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    below_normal = tl.maximum((128 - BIAS) - e, 0)
    s = tl.minimum((23 - MAN) + below_normal, 31)
    k = (mant + ((1 << (s - 1)) - 1) + ((mant >> s) & 1)) >> s
    code = ((tl.maximum(e + (BIAS - 127), 1) - 1) << MAN) + k
    # NaN stays NaN, as torch converts it: 0x7F with the sign (e4m3fn, e5m2), fnuz's one NaN 0x80
    nan = a > 0x7F800000
    if FNUZ:
        sign = tl.where(code == 0, 0, sign)  # fnuz has no negative zero (0x80 is its NaN)
        code = tl.where(nan, 0, code)
        sign = tl.where(nan, 1, sign)
    else:
        code = tl.where(nan, 0x7F, code)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _convert(x, dst, scale, head, d, D: tl.constexpr, HEAD_DIM: tl.constexpr, MERGED: tl.constexpr,
             QUANT: tl.constexpr, SCALE_PER_HEAD: tl.constexpr, FP8_MAX: tl.constexpr, FP8_BIAS: tl.constexpr,
             FP8_MAN: tl.constexpr, FP8_FNUZ: tl.constexpr):
    """Rows ``x`` (input dtype) -> the cache's element type: as they are, or ``x / scale`` in fp8."""
    if QUANT != 0:
        if SCALE_PER_HEAD:
            if MERGED:  # the row holds every head: the head is d // HEAD_DIM
                s = tl.load(scale + d // HEAD_DIM, mask=d < D, other=1.0)[None, :]
            else:
                s = tl.load(scale + head)[:, None]
        else:
            s = tl.load(scale)
        y = x.to(tl.float32) * (1.0 / s)
        # saturate (e4m3fn has no infinity) but keep NaN: plain min/max would turn it into -max
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        if QUANT == 1:
            x = y.to(dst.dtype.element_ty)
        else:
            x = _fp8_encode(y, FP8_BIAS, FP8_MAN, FP8_FNUZ)
    return x


@triton.jit
def _write_side(
    src, src_stride_t, src_stride_h, dst, scale,
    tok, head, blk, off, row_in, row_ok,
    D: tl.constexpr, D_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, MERGED: tl.constexpr,
    S_BLOCK: tl.constexpr, S_TOKEN: tl.constexpr, S_HEAD: tl.constexpr, S_CHUNK: tl.constexpr,
    X: tl.constexpr,
    QUANT: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
    FP8_MAX: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAN: tl.constexpr, FP8_FNUZ: tl.constexpr,
    STREAMING: tl.constexpr,
):
    """Load ``ROWS`` rows of one tensor (K or V), convert, store them at their cache slots.

    The loads are masked by ``row_in`` (the row exists), not by the slot: they do not wait for
    the slot load, so both memory round trips overlap (padding rows are read and dropped).
    """
    d = tl.arange(0, D_PAD)
    col_ok = (d < D)[None, :]
    src_ptrs = src + (tok * src_stride_t + head * src_stride_h)[:, None] + d[None, :]
    if STREAMING:
        x = tl.load(src_ptrs, mask=row_in[:, None] & col_ok, eviction_policy="evict_first")
    else:
        x = tl.load(src_ptrs, mask=row_in[:, None] & col_ok)
    x = _convert(x, dst, scale, head, d, D, HEAD_DIM, MERGED, QUANT, SCALE_PER_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN,
                 FP8_FNUZ)
    row_off = blk * S_BLOCK + off * S_TOKEN + head * S_HEAD
    dst_ptrs = dst + row_off[:, None] + ((d // X) * S_CHUNK + d % X)[None, :]
    mask = row_ok[:, None] & col_ok
    if STREAMING:
        tl.store(dst_ptrs, x, mask=mask, cache_modifier=".cs")
    else:
        tl.store(dst_ptrs, x, mask=mask)


@triton.jit
def _head_major_runs(
    src, src_stride_t, src_stride_h, dst, scale, tok, heads, t, n_here, run, base_a, base_b,
    D: tl.constexpr, D_PAD: tl.constexpr, S_TOKEN: tl.constexpr, S_CHUNK: tl.constexpr, X: tl.constexpr,
    QUANT: tl.constexpr, SCALE_PER_HEAD: tl.constexpr,
    FP8_MAX: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAN: tl.constexpr, FP8_FNUZ: tl.constexpr,
    STREAMING: tl.constexpr,
):
    """One side of the ``HEAD_MAJOR`` fast path of ``_write_kv_kernel``: tokens ``t < run`` go to the slots
    from ``base_a`` on, the rest (to ``n_here``) to those from ``base_b`` (both relative to token 0):
    each store's addresses are a scalar plus ``t * S_TOKEN``, so the compiler lays the tile out
    with the tokens, which are consecutive in the cache, in neighbouring lanes."""
    d = tl.arange(0, D_PAD)
    col_ok = (d < D)[None, :]
    here = t < n_here
    src_ptrs = src + (tok * src_stride_t + heads * src_stride_h)[:, None] + d[None, :]
    if STREAMING:
        x = tl.load(src_ptrs, mask=here[:, None] & col_ok, eviction_policy="evict_first")
    else:
        x = tl.load(src_ptrs, mask=here[:, None] & col_ok)
    x = _convert(x, dst, scale, heads, d, D, D, False, QUANT, SCALE_PER_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN, FP8_FNUZ)
    rel = (t * S_TOKEN)[:, None] + ((d // X) * S_CHUNK + d % X)[None, :]
    first = t < run
    tl.store(dst + base_a + rel, x, mask=(first & here)[:, None] & col_ok)
    tl.store(dst + base_b + rel, x, mask=((t >= run) & here)[:, None] & col_ok)


@triton.jit(do_not_specialize=["n_rows"])
def _write_kv_kernel(
    k_src, v_src, k_dst, v_dst, slot_mapping, k_scale, v_scale,
    n_rows, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SLOTS: tl.constexpr, ROWS: tl.constexpr,
    OFF64: tl.constexpr, MERGED: tl.constexpr,
    DK: tl.constexpr, DK_PAD: tl.constexpr, HEAD_DIM_K: tl.constexpr,
    KB: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KC: tl.constexpr, KX: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    VB: tl.constexpr, VT: tl.constexpr, VH: tl.constexpr, VC: tl.constexpr, VX: tl.constexpr,
    QUANT: tl.constexpr, K_SCALE_HEAD: tl.constexpr, V_SCALE_HEAD: tl.constexpr,
    FP8_MAX: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAN: tl.constexpr, FP8_FNUZ: tl.constexpr,
    STREAMING: tl.constexpr, HEAD_MAJOR: tl.constexpr,
):
    """Row programs: rows ``[pid*ROWS, (pid+1)*ROWS)`` of the ``n_rows = tokens * HEADS`` rows of K
    and V; a row is (token, head) (``HEADS`` = kv heads) or a whole token (``HEADS`` = 1, ``MERGED``).

    ``HEAD_MAJOR`` (value ``[blocks, H, D, block_size]``, key ``[blocks, H, D // x, block_size, x]``;
    ``n_rows`` = tokens): program ``(c, h)`` writes tokens ``[c*ROWS, (c+1)*ROWS)`` (``ROWS <=
    BLOCK_SIZE``) of kv head ``h``. A token's elements are ``block_size`` (value) or ``block_size * x``
    (key) apart there, so row stores are 2- or 16-byte pieces each in its own memory sector. When the
    program's tokens fill consecutive slots -- one run, or two when they cross into another block at
    its start, as the tokens of a prefill do -- the tile is stored with the tokens in neighbouring
    lanes (``_head_major_runs``); any other slot pattern (decode's one token per sequence, padding,
    repeats) takes the row stores.

    Slots < 0 are padding: those rows are not written. So are slots >= ``NUM_SLOTS`` (the cache's
    ``num_blocks * block_size``): whatever slot_mapping holds, nothing is stored outside the cache
    (one compare on the slot already in registers; the value check raises on them first when it runs).
    """
    if HEAD_MAJOR:
        h = tl.program_id(1)
        t = tl.arange(0, ROWS)
        first_tok = tl.program_id(0) * ROWS
        n_here = tl.minimum(n_rows - first_tok, ROWS)
        tok = first_tok + t
        in_range = t < n_here
        head = tl.zeros([ROWS], dtype=tl.int32) + h
    else:
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        in_range = r < n_rows
        tok = r // HEADS
        head = r % HEADS
    slot = tl.load(slot_mapping + tok, mask=in_range, other=-1)
    row_ok = (slot >= 0) & (slot < NUM_SLOTS)
    fast: tl.constexpr = False  # a constexpr: the row programs compile no fast path
    if HEAD_MAJOR:  # the fast path's test: the slots are s0, s0 + 1, ... then s1, s1 + 1, ...
        s0 = tl.load(slot_mapping + first_tok)
        run = BLOCK_SIZE - s0 % BLOCK_SIZE  # tokens left in the first token's block
        s1 = tl.load(slot_mapping + first_tok + run, mask=run < n_here, other=0)
        ok = (slot == tl.where(t < run, s0 + t, s1 + (t - run))) | ~in_range
        fast = ((tl.min(ok.to(tl.int32), axis=0) == 1) & (s0 >= 0) & (s0 < NUM_SLOTS)
                & ((run >= n_here) | ((s1 >= 0) & (s1 < NUM_SLOTS) & (s1 % BLOCK_SIZE + (n_here - run) <= BLOCK_SIZE))))
        if OFF64:
            s0, s1 = s0.to(tl.int64), s1.to(tl.int64)
        else:
            s0, s1 = s0.to(tl.int32), s1.to(tl.int32)
    if OFF64:
        slot = slot.to(tl.int64)
        tok = tok.to(tl.int64)
    else:
        slot = slot.to(tl.int32)
    if fast:
        # the slots of token 0 of each run, as offsets of (block, head, token) without the element
        blk_a, off_a, blk_b, off_b = s0 // BLOCK_SIZE, s0 % BLOCK_SIZE, s1 // BLOCK_SIZE, s1 % BLOCK_SIZE - run
        _head_major_runs(k_src, k_stride_t, k_stride_h, k_dst, k_scale, tok, head, t, n_here, run,
                         blk_a * KB + h * KH + off_a * KT, blk_b * KB + h * KH + off_b * KT,
                         DK, DK_PAD, KT, KC, KX, QUANT, K_SCALE_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN, FP8_FNUZ, STREAMING)
        _head_major_runs(v_src, v_stride_t, v_stride_h, v_dst, v_scale, tok, head, t, n_here, run,
                         blk_a * VB + h * VH + off_a * VT, blk_b * VB + h * VH + off_b * VT,
                         DV, DV_PAD, VT, VC, VX, QUANT, V_SCALE_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN, FP8_FNUZ, STREAMING)
    else:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        _write_side(k_src, k_stride_t, k_stride_h, k_dst, k_scale, tok, head, blk, off, in_range, row_ok,
                    DK, DK_PAD, HEAD_DIM_K, MERGED, KB, KT, KH, KC, KX,
                    QUANT, K_SCALE_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN, FP8_FNUZ, STREAMING)
        _write_side(v_src, v_stride_t, v_stride_h, v_dst, v_scale, tok, head, blk, off, in_range, row_ok,
                    DV, DV_PAD, HEAD_DIM_V, MERGED, VB, VT, VH, VC, VX,
                    QUANT, V_SCALE_HEAD, FP8_MAX, FP8_BIAS, FP8_MAN, FP8_FNUZ, STREAMING)


# -- planning (cached per descriptor, input strides, alignment and batch bucket) -------------------
def _fp8_mode(platform, fp8_dtype: torch.dtype) -> int:
    """fp32 -> ``fp8_dtype`` in hardware where the platform has the conversion, else (and under the
    interpreter, whose casts do not round to nearest even) with the exact integer encoder."""
    return NATIVE_FP8 if not _interpreting() and platform.native_fp8(fp8_dtype) else SOFT_FP8


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _floor_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


class _Plan:
    """One launch configuration: constexprs, tile, the runtime stride arguments and, once the
    first launch compiled it, the compiled kernel (then launched directly)."""

    __slots__ = ("constexprs", "tail", "rows", "heads", "num_warps", "quant", "src_view", "dst_view",
                 "kernel", "config", "int_args", "max_n32", "device", "v_dst_offset_bytes", "desc", "head_major")

    def __repr__(self) -> str:
        c = self.constexprs
        return (f"_Plan(rows={self.rows}, row_heads={self.heads}, merged={c['MERGED']}, "
                f"num_warps={self.num_warps}, quant={self.quant}, off64={c['OFF64']}, "
                f"DK={c['DK']}/{c['DK_PAD']}, DV={c['DV']}/{c['DV_PAD']})")


def _side(strides, d: int, heads: int, merged: bool):
    """constexprs of one side: (D, D_PAD, HEAD_DIM, S_BLOCK, S_TOKEN, S_HEAD, S_CHUNK, X)."""
    if merged:
        width = heads * d
        return width, _pow2(width), d, strides.block, strides.token, 0, width, width
    return d, _pow2(d), d, strides.block, strides.token, strides.head, strides.chunk, strides.x


def _max_tokens_int32(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most tokens whose input rows (2-D or 3-D inputs) stay within int32 offsets."""
    most = INT32_MAX
    for t in (a, b):
        extent = sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:])) + 1
        most = min(most, (INT32_MAX - extent) // max(t.stride(0), 1) + 1)
    return most


def _make_plan(desc, k_strides, v_strides, dk: int, dv: int, heads: int, in_dtype: torch.dtype,
               mergeable: bool, n: int, off64: bool, k_scale_head: bool, v_scale_head: bool,
               cfg: WriteConfig, head_major: bool = False) -> _Plan:
    cache_dtype = desc.cache_dtype
    p = _Plan()
    p.config = cfg
    if desc.kv_cache_dtype != "auto" and in_dtype != cache_dtype:
        p.quant = _fp8_mode(desc.platform, cache_dtype)
        bias, man, fnuz = _FP8_FORMAT[cache_dtype]
        fmax = float(torch.finfo(cache_dtype).max)
    else:
        p.quant = COPY
        bias, man, fnuz, fmax = 0, 0, False, 0.0
    # Pointer types: fp8 copies move bytes (no fp8 type needed on the platform); the integer
    # encoder stores bytes; the hardware conversion stores the fp8 type itself.
    if p.quant == COPY:
        p.src_view = p.dst_view = torch.uint8 if cache_dtype in _FP8 else None
    else:
        p.src_view = None
        p.dst_view = cache_dtype if p.quant == NATIVE_FP8 else torch.uint8
    merged = mergeable if cfg.merge is None else (cfg.merge and mergeable)
    heads_rows = 1 if merged else heads
    sk = _side(k_strides, dk, heads, merged)
    sv = _side(v_strides, dv, heads, merged)
    in_size = torch.empty((), dtype=in_dtype).element_size()
    row_bytes = max(sk[1], sv[1]) * in_size
    n_rows = n * heads_rows
    rows = _floor_pow2(max(cfg.tile_bytes // row_bytes, 1))
    sms = desc.platform.multiprocessors or 1
    while rows > 1 and -(-n_rows // rows) < cfg.min_programs_per_sm * sms:
        rows //= 2
    p.head_major = head_major
    if head_major:  # a program's tokens (at most one block's: at most two runs of slots), one head
        rows = _floor_pow2(min(desc.block_size, 64))
    # no more threads than 16-byte vectors in the tile (extra warps would only replicate)
    vectors = rows * row_bytes // 16
    p.num_warps = max(1, min(cfg.num_warps, _floor_pow2(max(vectors // 32, 1))))
    p.rows, p.heads = rows, heads_rows
    p.constexprs = dict(
        HEADS=heads_rows, BLOCK_SIZE=desc.block_size, NUM_SLOTS=desc.num_blocks * desc.block_size,
        ROWS=rows, OFF64=off64, MERGED=merged,
        DK=sk[0], DK_PAD=sk[1], HEAD_DIM_K=sk[2], KB=sk[3], KT=sk[4], KH=sk[5], KC=sk[6], KX=sk[7],
        DV=sv[0], DV_PAD=sv[1], HEAD_DIM_V=sv[2], VB=sv[3], VT=sv[4], VH=sv[5], VC=sv[6], VX=sv[7],
        QUANT=p.quant, K_SCALE_HEAD=k_scale_head, V_SCALE_HEAD=v_scale_head,
        FP8_MAX=fmax, FP8_BIAS=bias, FP8_MAN=man, FP8_FNUZ=fnuz, STREAMING=cfg.streaming,
        HEAD_MAJOR=head_major,
    )
    p.kernel = None
    p.desc = desc
    return p


def _finish_plan(p: _Plan, k_src, v_src, k_dst, v_dst_offset: int, off64: bool) -> _Plan:
    """Per-plan values the launch reuses: the runtime stride args, the int32 token limit."""
    ks, vs = k_src.stride(), v_src.stride()
    p.int_args = (ks[0], ks[1] if k_src.dim() == 3 else 0, vs[0], vs[1] if v_src.dim() == 3 else 0)
    p.max_n32 = 1 << 62 if off64 else _max_tokens_int32(k_src, v_src)
    p.v_dst_offset_bytes = v_dst_offset * k_dst.element_size()
    p.tail = tuple(p.constexprs.values())
    return p




def _view(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.view(dtype)


def unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when its last dimension is contiguous, else a contiguous copy: the kernels
    read index vectors, block-table rows and per-head scales as contiguous arrays (the public API
    accepts strided views of them)."""
    if t is None or t.is_contiguous() or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _pointers(*tensors) -> tuple:
    return tuple(t.data_ptr() for t in tensors)


def _launch(plan: _Plan, n: int, k_src, v_src, k_dst, v_dst, slot_mapping, k_scale, v_scale, ptrs: tuple,
            v_dst_offset: int = 0) -> None:
    """Launch ``plan`` over ``n`` tokens; ``ptrs``: k_src, v_src, k_dst, v_dst, slot_mapping's data
    pointers (as plan_for saw them); ``v_dst_offset`` shifts V's destination (MLA's k_pe)."""
    if plan.head_major:  # programs (token tiles, heads); the kernel counts tokens
        n_rows, grid, grid_y = n, -(-n // plan.rows), plan.heads
    else:  # programs over rows (token x head, or whole tokens)
        n_rows = n * plan.heads
        grid, grid_y = -(-n_rows // plan.rows), 1
    if plan.kernel is not None and _no_launch_hooks():
        # The compiled kernel of exactly this specialization (the plan key holds everything
        # Triton specializes on), launched with raw pointers (launch.direct); constexpr slots last.
        launch, head = plan.kernel
        ia = plan.int_args
        launch(grid, grid_y, 1, _stream(plan.device), *head,
               ptrs[0], ptrs[1], ptrs[2], ptrs[3] + plan.v_dst_offset_bytes, ptrs[4],
               None if k_scale is None else k_scale.data_ptr(),
               None if v_scale is None else v_scale.data_ptr(),
               n_rows, ia[0], ia[1], ia[2], ia[3], *plan.tail)
        return
    v_dst_t = v_dst[..., v_dst_offset:] if v_dst_offset else v_dst
    ia = plan.int_args
    compiled = _write_kv_kernel[(grid, grid_y, 1)](
        _view(k_src, plan.src_view), _view(v_src, plan.src_view),
        _view(k_dst, plan.dst_view), _view(v_dst_t, plan.dst_view), slot_mapping,
        k_scale, v_scale, n_rows, ia[0], ia[1], ia[2], ia[3],
        num_warps=plan.num_warps, num_stages=1, **plan.constexprs)
    if (plan.kernel is None and not _interpreting() and k_dst.is_cuda and plan.desc.platform.is_nvidia
            and not hasattr(compiled, "result")):
        plan.device = k_dst.get_device()
        plan.kernel = direct(compiled)


def _alignment(*ptrs: int):
    """What Triton specializes pointers on (16-byte alignment), folded into one key element."""
    a = 0
    for p in ptrs:
        a |= p
    return 0 if a & 15 == 0 else tuple(p & 15 for p in ptrs)


def plan_for(key, value, key_cache, value_cache, slot_mapping, desc, plans: Optional[dict] = None,
             ptrs: Optional[tuple] = None) -> _Plan:
    """The launch plan ``reshape_and_cache_flash`` uses for these arguments, kept in ``plans``: the
    dict of the public call's signature (``Backend.takes_plans``), which fixes the descriptor, the
    inputs' dtypes and strides and the slot dtype, so a plan is keyed there by what varies within a
    signature: the pointers' alignment, the token-count bucket and the device. None: a plan for this
    call only. Its ``WriteConfig`` comes from ``config_for(platform)`` when the plan is made (the
    tuning sweeps and the tests replace ``config_for``: no knob in the kernel API). ``ptrs``: the five
    tensors' data pointers when the caller has them (the launch uses the same)."""
    if plans is None:
        plans = {}
    n = slot_mapping.shape[0]
    kp, vp, kcp, vcp, sp = ptrs or _pointers(key, value, key_cache, value_cache, slot_mapping)
    align = (kp | vp | kcp | vcp | sp) & 15
    if align:
        align = (kp & 15, vp & 15, kcp & 15, vcp & 15, sp & 15)
    ck = (align, n.bit_length(), key_cache.get_device())
    plan = plans.get(ck)
    if plan is not None and n <= plan.max_n32:
        return plan
    return _plan_kv(ck, n, key, value, key_cache, value_cache, desc, plans)


def _int64_inputs(ck, n: int, a, b, plans: dict) -> tuple:
    """(key, plan or None, in64): inputs too long for int32 offsets get plans of their own."""
    in64 = n > _max_tokens_int32(a, b)
    if in64:
        ck = ck + ("in64",)
    return ck, plans.get(ck) if in64 else None, in64


def _plan_kv(ck, n, key, value, key_cache, value_cache, desc, plans: dict) -> _Plan:
    ck, plan, in64 = _int64_inputs(ck, n, key, value, plans)
    if plan is not None:
        return plan
    quant_in = key.dtype
    quant = desc.kv_cache_dtype != "auto" and quant_in != desc.cache_dtype
    ks, vs = key.stride(), value.stride()
    h, dk, dv = desc.num_kv_heads, desc.head_size_k, desc.head_size_v
    mergeable = (h > 1 and desc.heads_contiguous and ks[1] == dk and vs[1] == dv
                 and _pow2(h * max(dk, dv)) <= _MAX_MERGED_ROW)
    cfg = config_for(desc.platform, _interpreting())
    off64 = not desc.int32_offsets or in64 or bool(cfg.offsets64)
    plan = _make_plan(desc, desc.k, desc.v, dk, dv, h, quant_in, mergeable, _floor_pow2(n), off64,
                      quant and desc.scale_kinds[0] == "head", quant and desc.scale_kinds[1] == "head", cfg,
                      head_major=desc.is_head_major)
    plans[ck] = plan = _finish_plan(plan, key, value, key_cache, 0, off64)
    return plan


# -- public entry points (called by TritonBackend under the tensors' device) -----------------------
def supports(op: str, desc, platform) -> Optional[str]:
    """None when the write kernels handle ``op`` for ``desc``, else why not."""
    if op not in ("reshape_and_cache_flash", "concat_and_cache_mla"):
        return f"write.py does not implement {op}"
    if desc is None:
        return None
    if desc.cache_dtype not in ELEMENT_DTYPES:
        return f"cache element type {desc.cache_dtype} is not float16/bfloat16/float32/fp8"
    if op == "concat_and_cache_mla":
        if not desc.is_mla:
            return "concat_and_cache_mla needs the 3-D MLA latent cache"
        return None if _pow2(desc.head_size_k) <= _MAX_ROW else \
            f"latent row of {desc.head_size_k} elements exceeds the kernel's {_MAX_ROW}"
    if desc.is_mla:
        return "reshape_and_cache_flash needs a K/V cache pair, not the MLA latent cache"
    widest = max(desc.head_size_k, desc.head_size_v)
    if _pow2(widest) > _MAX_ROW:
        return f"head size {widest} exceeds the kernel's {_MAX_ROW}-element rows"
    return None


def reshape_and_cache_flash(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, slot_mapping: torch.Tensor, desc,
                            plans: Optional[dict] = None) -> None:
    """Write ``key`` ``(T, H, Dk)`` / ``value`` ``(T, H, Dv)`` rows ``[:n]`` (``n = len(slot_mapping)``)
    into the caches described by ``desc``; slots < 0 are skipped. Arguments are already validated.
    """
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slot_mapping = unit_stride(slot_mapping)
    ptrs = _pointers(key, value, key_cache, value_cache, slot_mapping)
    plan = plan_for(key, value, key_cache, value_cache, slot_mapping, desc, plans, ptrs)
    if plan.quant == COPY:
        _launch(plan, n, key, value, key_cache, value_cache, slot_mapping, None, None, ptrs)
    else:
        _launch(plan, n, key, value, key_cache, value_cache, slot_mapping, unit_stride(desc.k_scale),
                unit_stride(desc.v_scale), ptrs)


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, desc, plans: Optional[dict] = None) -> None:
    """Write ``cat(kv_c (T, R), k_pe (T, P))`` rows ``[:n]`` into the MLA latent cache
    ``(num_blocks, block_size, R + P)``; slots < 0 are skipped. Arguments are already validated."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    slot_mapping = unit_stride(slot_mapping)
    if plans is None:
        plans = {}
    rank = kv_c.shape[1]
    ptrs = _pointers(kv_c, k_pe, kv_cache, kv_cache, slot_mapping)
    # the signature (plans) fixes the descriptor, the inputs' dtypes, strides and rank, the slot dtype
    ck = ("mla", _alignment(ptrs[0], ptrs[1], ptrs[2], ptrs[3] + rank * kv_cache.element_size(), ptrs[4]),
          n.bit_length(), kv_cache.get_device())
    plan = plans.get(ck)
    if plan is None or n > plan.max_n32:
        plan = _plan_mla(ck, n, kv_c, k_pe, kv_cache, desc, plans)
    scale = None if plan.quant == COPY else desc.k_scale
    _launch(plan, n, kv_c, k_pe, kv_cache, kv_cache, slot_mapping, scale, scale, ptrs, v_dst_offset=rank)


def _plan_mla(ck, n, kv_c, k_pe, kv_cache, desc, plans: dict) -> _Plan:
    ck, plan, in64 = _int64_inputs(ck, n, kv_c, k_pe, plans)
    if plan is not None:
        return plan
    cfg = config_for(desc.platform, _interpreting())
    off64 = not desc.int32_offsets or in64 or bool(cfg.offsets64)
    rank, rope = kv_c.shape[1], k_pe.shape[1]
    plan = _make_plan(desc, desc.k, desc.k, rank, rope, 1, kv_c.dtype, False, _floor_pow2(n), off64,
                      False, False, cfg)
    plans[ck] = plan = _finish_plan(plan, kv_c, k_pe, kv_cache, rank, off64)
    return plan
