"""Triton ``flash_attn_varlen_func``: decode, prefill and mixed batches, paged or not, one kernel.

Work split: program ``(tile, b * num_kv_heads + kvh, split)`` owns ``BLOCK_M`` *rows* of sequence
``b`` and kv head ``kvh``; row ``r`` is query token ``r // GROUP`` and query head
``kvh * GROUP + r % GROUP``. Packing the GQA group into rows means a decode step (q_len 1) fills
its tile with the heads that read the same keys, so K/V are loaded once per kv head, and prefill
reuses every K/V tile for all heads of the group as well.

Two grids. Decode launches (``max_seqlen_q`` within the decode tile): the grid's tile count comes from
the ``max_seqlen_q`` hint, and a program walks its sequence's REAL tiles with the grid's size as stride
(one tile or none when the hint holds), so a hint below the longest query never leaves rows unwritten.
Prefill launches (``FLAT``): axis 0 numbers the q tiles of all sequences (``total_q * GROUP //
BLOCK_M + batch`` programs per kv head, no hint involved) and a program finds its sequence by binary
search over ``cu_seqlens_q``; a sequence of at most ``SMALL_M`` rows (a decode of a mixed batch)
takes the config's ``mixed`` tile instead of the prefill tile. A mixed batch so costs neither a
prefill-sized tile per decode nor a grid of hint-sized rows of idle programs, and its compute-bound
prefill tiles and memory-bound decodes run side by side.

Keys are walked ``BLOCK_N`` at a time (online softmax in base 2). Key ``j`` of a paged sequence
lives at ``block_table[b, j // PAGE] * S_BLOCK + (j % PAGE) * S_TOKEN + kvh * S_HEAD + d``
with the cache's real strides from the descriptor, passed as ``tl.constexpr``: a cache keeps its
strides for its lifetime, so each layout (packed NHD, HND, combined and cross-layer slices,
diffkv and MLA slices) gets code specialized for its page stride; when a page holds whole tiles,
one block-table entry is read per tile instead of one per key. Non-paged calls arrive as one
"block" of every key (``ops.py``), addressed from ``cu_seqlens_k``.

The key range of a tile is cut to what its rows can see (bottom-right causal, window), and split
in three loops: masked edge tiles, unmasked full tiles in the middle, masked tiles at the end.

Head sizes are handled as a power-of-two part plus a remainder (80 = 64 + 16, 192 = 128 + 64,
MLA 576 = 512 + 64), so no padded lanes are loaded for K. FP8 caches (and fp8 q) are decoded to
the compute type, fp16 unless q is float32 (a bf16 q enters fp16 scaled by 1/16; see ``plan_for``),
by the hardware conversion where Triton has one for the platform, else
by moving the bits into an fp16 pattern (exact for e4m3fn, e5m2, e4m3fnuz, NaN codes NaN and
e5m2's inf inf; the power-of-two exponent-bias difference is folded into the descales). An e4m3 q
over an e4m3 cache (``FP8_DOT``, sm90) skips the decoding for QK^T: the fp8 tensor cores take q and K
as stored (exact products, fp32 sums); PV stays 16-bit (see ``_fp8_dot``).

Split-KV (flash-decoding): when batch x kv heads x tiles leaves the GPU underfilled and keys are
long, each program takes one of ``num_splits`` key ranges and writes an unnormalized partial
output with its running max and sum to a float32 workspace; a second kernel merges them. The
ranges come from the ``max_seqlen_k`` hint, the last one running to the sequence's real end: a hint
below the longest kv length unbalances the splits but drops no key.
``AttentionArgs.num_splits`` overrides the choice (1: never split, for batch invariance).

Engine extras, each a constexpr switch (calls without them compile to the plain kernel): ALiBi
(``-slope * |p - j|`` added after the softcap, in base 2), attention sinks (``s_aux``: one logit
per query head in the denominator, added once: in the epilogue, or in the merge kernel when
split) and the natural-log LSE of every row (written by the epilogue or the merge kernel).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kvdispatch.descriptor import FP8_DTYPES as _FP8, INT32_MAX as _INT32_MAX
from kvdispatch.platform import interpreting as _interpreting  # the platform's answer; tests patch it

from .attention_configs import AttentionConfig, TileConfig, config_for
from .backend import MAX_HEAD as _MAX_HEAD  # widest head (padded) one tile holds; MLA's 576 fits
from .launch import gatherer as _gatherer, keep as _keep, no_launch_hooks as _no_launch_hooks, stream as _stream
from .write import unit_stride

__all__ = ["supports", "flash_attn_varlen_func", "plan_for"]

_LOG2E = 1.4426950408889634

# KV_MODE / Q_MODE: how a loaded element becomes the compute type
PLAIN, FP8_NATIVE, FP8_E4M3_BITS, FP8_E5M2_BITS, FP8_E4M3FNUZ_BITS = 0, 1, 2, 3, 4
# an fp8 value over the fp16 pattern its bits are moved into: 2^(15 - bias)
_BITS_FACTOR = {FP8_E4M3_BITS: 2.0 ** 8, FP8_E5M2_BITS: 1.0, FP8_E4M3FNUZ_BITS: 2.0 ** 7}
_BITS_MODE = {torch.float8_e4m3fn: FP8_E4M3_BITS, torch.float8_e5m2: FP8_E5M2_BITS,
              torch.float8_e4m3fnuz: FP8_E4M3FNUZ_BITS}
_PTXAS_ERRORS = tuple(e for e in (getattr(getattr(triton.runtime, "errors", None), n, None)
                                   for n in ("PTXASError", "OutOfResources"))
                      if e is not None)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# -- kernels ----------------------------------------------------------------------------------------
@triton.jit
def _to_compute(x, MODE: tl.constexpr, COMPUTE: tl.constexpr):
    """A loaded tile -> the compute type (fp8 bit patterns decoded; see module docstring)."""
    if MODE == 0:
        return x.to(COMPUTE)
    elif MODE == 1:
        return x.to(COMPUTE)
    else:
        u = x.to(tl.uint16)
        if MODE == 3:
            # e5m2 is the high byte of an fp16: its inf (S.11111.00) and NaN codes move over as is
            h = u << 8
        else:
            h = ((u & 0x80) << 8) | ((u & 0x7F) << 7)
            # the NaN codes have no fp16 twin under the shift: e4m3fn's S.1111.111 would land on
            # 1.875 (times the folded factor), e4m3fnuz's 0x80 (its only NaN) on -0. Both get
            # fp16's exponent bits set over a nonzero mantissa, branch-free (no select per element):
            if MODE == 2:
                # the low 7 bits all ones carry into bit 7: 0x3F80 | 0x4000 = 0x7F80 (sign kept)
                h |= (((u & 0x7F) + 1) & 0x80) << 7
            else:
                # u ^ 0x80 is 0 only for 0x80: minus 1 wraps to 0xFFFF there, below 0x100 elsewhere
                h |= ((u ^ 0x80) - 1) & 0x7E00
        return h.to(tl.float16, bitcast=True).to(COMPUTE)


@triton.jit
def _host_int(x):
    """Interpreter only (called under ``if INTERPRET``): a loop bound as a Python int. The
    interpreter's scalars are 1-element arrays, which ``range`` cannot take with numpy 2; so both
    modes share one ``for`` loop (compiled: an ``scf.for``, which Triton pipelines)."""
    return x.handle.data.item()


@triton.jit
def _tile(acc, l_i, m_i, qa, qb, k_ptr, v_ptr, bt_row, start, k_start, kvh, lk, p_row,
          window_left, window_right, qk_scale, softcap, slope2,
          K_SB: tl.constexpr, K_ST: tl.constexpr, K_SH: tl.constexpr,
          V_SB: tl.constexpr, V_ST: tl.constexpr, V_SH: tl.constexpr,
          PAGE: tl.constexpr, NUM_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
          DA: tl.constexpr, DB: tl.constexpr, DB_VALID: tl.constexpr,
          DV: tl.constexpr, DV_VALID: tl.constexpr,
          PAGED: tl.constexpr, INT64: tl.constexpr, KV_MODE: tl.constexpr,
          COMPUTE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
          SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
          HAS_ALIBI: tl.constexpr, V_IS_K: tl.constexpr, FP8_DOT: tl.constexpr, MASKED: tl.constexpr):
    """One key tile ``[start, start + BLOCK_N)``: scores, (ALiBi), (masks), online-softmax update.

    ``slope2`` (HAS_ALIBI): each row's ALiBi slope in base-2 units (slope * log2(e)); unused otherwise.
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    key_ok = offs_n < lk
    if PAGED:
        if PAGE % BLOCK_N == 0:
            # the whole tile sits in one page: one block-table entry, consecutive tokens
            blk = tl.load(bt_row + start // PAGE)
            # a block id outside the cache reads block 0 / the last one: garbage for that
            # sequence, never a read outside the cache (one clamp on the loaded id)
            blk = tl.minimum(tl.maximum(blk, 0), NUM_BLOCKS - 1)
            if INT64:
                blk = blk.to(tl.int64)
            tok = (start % PAGE) + tl.arange(0, BLOCK_N)
            k_rows = blk * K_SB + tok * K_ST
            v_rows = blk * V_SB + tok * V_ST
        else:
            if MASKED:
                blk = tl.load(bt_row + offs_n // PAGE, mask=key_ok, other=0)
            else:
                blk = tl.load(bt_row + offs_n // PAGE)
            blk = tl.minimum(tl.maximum(blk, 0), NUM_BLOCKS - 1)
            if INT64:
                blk = blk.to(tl.int64)
            tok = offs_n % PAGE
            k_rows = blk * K_SB + tok * K_ST
            v_rows = blk * V_SB + tok * V_ST
    else:
        pos = k_start + offs_n
        if INT64:
            pos = pos.to(tl.int64)
        k_rows = pos * K_ST
        v_rows = pos * V_ST
    k_rows += kvh * K_SH
    v_rows += kvh * V_SH

    offs_da = tl.arange(0, DA)
    if MASKED:
        ka = tl.load(k_ptr + k_rows[None, :] + offs_da[:, None], mask=key_ok[None, :], other=0.0)
    else:
        ka = tl.load(k_ptr + k_rows[None, :] + offs_da[:, None])
    if FP8_DOT:
        s = tl.dot(qa, ka)  # fp8 q and K as stored: fp8 tensor cores, exact products, fp32 sums
    else:
        ka = _to_compute(ka, KV_MODE, COMPUTE)
        if DOT_F32:
            s = tl.dot(qa.to(tl.float32), ka.to(tl.float32), input_precision="ieee")
        elif IEEE:
            s = tl.dot(qa, ka, input_precision="ieee")
        else:
            s = tl.dot(qa, ka)
    if DB > 0:
        offs_db = DA + tl.arange(0, DB)
        kb_mask = offs_db[:, None] < DA + DB_VALID
        if MASKED:
            kb_mask = kb_mask & key_ok[None, :]
        kb = tl.load(k_ptr + k_rows[None, :] + offs_db[:, None], mask=kb_mask, other=0.0)
        if FP8_DOT:
            s += tl.dot(qb, kb)
        else:
            kb = _to_compute(kb, KV_MODE, COMPUTE)
            if DOT_F32:
                s += tl.dot(qb.to(tl.float32), kb.to(tl.float32), input_precision="ieee")
            elif IEEE:
                s += tl.dot(qb, kb, input_precision="ieee")
            else:
                s += tl.dot(qb, kb)

    if SOFTCAP:
        # softcap * tanh(x / softcap) on the scaled score, then to base 2 for exp2
        t = s * qk_scale / softcap
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * t) + 1.0)) * 1.4426950408889634
        s_scale = 1.0
    else:
        # the scale (> 0) is applied after the row max, fused with the subtraction (one FMA)
        s_scale = qk_scale
    if HAS_ALIBI:
        # -slope * |p - j| on the scaled (and capped) score, in base 2: the scale is applied first
        dist = tl.abs(p_row[:, None] - offs_n[None, :]).to(tl.float32)
        s = s * s_scale - slope2[:, None] * dist
        s_scale = 1.0
    if MASKED:
        ok = key_ok[None, :]
        if HAS_RIGHT:
            ok = ok & (offs_n[None, :] <= p_row[:, None] + window_right)
        if HAS_LEFT:
            ok = ok & (offs_n[None, :] >= p_row[:, None] - window_left)
        s = tl.where(ok, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
    if MASKED:
        # a row that has seen no key yet keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # an unmasked tile gives every row finite scores
    p = tl.math.exp2(s * s_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]

    offs_dv = tl.arange(0, DV)
    if V_IS_K:
        # V is the first DV columns of K's rows (MLA's latent cache read as K and V): the tile
        # already loaded, transposed in registers, instead of a second load of the same bytes
        v = tl.trans(ka)
    elif DV_VALID < DV:
        v_mask = offs_dv[None, :] < DV_VALID
        if MASKED:
            v_mask = v_mask & key_ok[:, None]
        v = tl.load(v_ptr + v_rows[:, None] + offs_dv[None, :], mask=v_mask, other=0.0)
    elif MASKED:
        v = tl.load(v_ptr + v_rows[:, None] + offs_dv[None, :], mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + v_rows[:, None] + offs_dv[None, :])
    if not V_IS_K:
        v = _to_compute(v, KV_MODE, COMPUTE)
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(COMPUTE), v, acc)
    return acc, l_i, m_new


@triton.jit
def _q_tile(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_ml_ptr, alibi_ptr, sink_ptr, lse_ptr, bt_row,
            tile, b, kvh, split, q_start, lq, lk, k_start, split_keys, split_hi, qk_scale, out_scale,
            softcap, window_left, window_right, total_q, s_qt, s_qh, s_ot, s_oh, al_sb, al_sh, s_lh, s_lt,
            K_SB: tl.constexpr, K_ST: tl.constexpr, K_SH: tl.constexpr,
            V_SB: tl.constexpr, V_ST: tl.constexpr, V_SH: tl.constexpr,
            NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr, NUM_BLOCKS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
            DA: tl.constexpr, DB: tl.constexpr, DB_VALID: tl.constexpr,
            DV: tl.constexpr, DV_VALID: tl.constexpr, PAGED: tl.constexpr, INT64: tl.constexpr,
            KV_MODE: tl.constexpr, Q_MODE: tl.constexpr, COMPUTE: tl.constexpr, Q_PRE: tl.constexpr,
            DOT_F32: tl.constexpr, IEEE: tl.constexpr,
            SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LSE: tl.constexpr, V_IS_K: tl.constexpr,
            FP8_DOT: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows ``[tile * BLOCK_M, tile * BLOCK_M + BLOCK_M)`` of sequence ``b`` (``tile * BLOCK_M < lq * GROUP``)
    and kv head ``kvh`` over its keys (with SPLIT: this split's, ``[split * split_keys, split_hi)``): the q
    tile, the three key regions (their loops pipelined ``STAGES`` deep), the epilogue."""
    row0 = tile * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < lq * GROUP
    q_tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    p_row = q_tok + lk - lq  # key position each row is aligned to (bottom-right)
    p_min = row0 // GROUP + lk - lq
    p_max = tl.minimum((row0 + BLOCK_M - 1) // GROUP, lq - 1) + lk - lq

    # the keys this tile can see, cut to this program's split
    lo = 0
    hi = lk
    if HAS_RIGHT:
        hi = tl.minimum(hi, p_max + window_right + 1)
    if HAS_LEFT:
        lo = tl.maximum(p_min - window_left, 0) // BLOCK_N * BLOCK_N
    if SPLIT:
        lo = tl.maximum(lo, split * split_keys)
        hi = tl.minimum(hi, split_hi)
    hi = tl.maximum(hi, lo)
    # [full_lo, full_hi): tiles every row sees whole (no mask needed)
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.maximum(lo, tl.cdiv(tl.maximum(p_max - window_left, 0), BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    vis_end = lk
    if HAS_RIGHT:
        vis_end = tl.minimum(vis_end, p_min + window_right + 1)
    full_hi = vis_end // BLOCK_N * BLOCK_N
    if SPLIT:
        full_hi = tl.minimum(full_hi, split_hi)
    full_hi = tl.maximum(full_hi, full_lo)

    # q tile, in two column parts (power of two + remainder)
    q_rows = (q_start + q_tok).to(tl.int64) * s_qt + head * s_qh
    offs_da = tl.arange(0, DA)
    qa = tl.load(q_ptr + q_rows[:, None] + offs_da[None, :], mask=row_ok[:, None], other=0.0)
    if Q_PRE != 1.0:
        qa = qa.to(tl.float32) * Q_PRE
    if not FP8_DOT:
        qa = _to_compute(qa, Q_MODE, COMPUTE)
    if DB > 0:
        offs_db = DA + tl.arange(0, DB)
        qb = tl.load(q_ptr + q_rows[:, None] + offs_db[None, :],
                     mask=row_ok[:, None] & (offs_db[None, :] < DA + DB_VALID), other=0.0)
        if Q_PRE != 1.0:
            qb = qb.to(tl.float32) * Q_PRE
        if not FP8_DOT:
            qb = _to_compute(qb, Q_MODE, COMPUTE)
    else:
        qb = qa

    if HAS_ALIBI:
        slope2 = tl.load(alibi_ptr + b * al_sb + head * al_sh, mask=row_ok, other=0.0).to(tl.float32) \
            * 1.4426950408889634
    else:
        slope2 = qk_scale  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    # the three key regions: masked edge tiles, whole tiles (no masks), masked tiles at the end
    for region in tl.static_range(3):
        r_lo = lo if region == 0 else (full_lo if region == 1 else full_hi)
        r_hi = full_lo if region == 0 else (full_hi if region == 1 else hi)
        if INTERPRET:
            r_lo, r_hi = _host_int(r_lo), _host_int(r_hi)
        for start in tl.range(r_lo, r_hi, BLOCK_N, num_stages=STAGES):
            acc, l_i, m_i = _tile(acc, l_i, m_i, qa, qb, k_ptr, v_ptr, bt_row, start, k_start, kvh, lk, p_row,
                                  window_left, window_right, qk_scale, softcap, slope2, K_SB, K_ST, K_SH, V_SB,
                                  V_ST, V_SH, PAGE, NUM_BLOCKS, BLOCK_N, DA, DB, DB_VALID, DV, DV_VALID, PAGED,
                                  INT64, KV_MODE, COMPUTE, DOT_F32, IEEE, SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_ALIBI,
                                  V_IS_K, FP8_DOT, region != 1)

    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv[None, :] < DV_VALID
    if SPLIT:
        ws_row = (split * total_q + q_start + q_tok).to(tl.int64) * (NUM_KV_HEADS * GROUP) + head
        tl.store(ws_o_ptr + ws_row[:, None] * DV_VALID + offs_dv[None, :], acc * out_scale,
                 mask=row_ok[:, None] & dv_ok)
        tl.store(ws_ml_ptr + ws_row * 2, m_i, mask=row_ok)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i, mask=row_ok)
    else:
        o_scale = out_scale
        if HAS_SINKS:
            # the sink joins the denominator with no value: rescale (l, m) to max(m, sink) so a
            # row that saw no key (m = -inf) gets l = 1 at m = sink (out 0, lse = sink)
            sink2 = tl.load(sink_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m_s = tl.maximum(m_i, sink2)
            m_s_use = tl.where(m_s == float("-inf"), 0.0, m_s)
            alpha = tl.math.exp2(m_i - m_s_use)
            l_i = l_i * alpha + tl.math.exp2(sink2 - m_s_use)
            o_scale = out_scale * alpha
            m_i = m_s
        # rows that saw no key (and have no sink) have acc == 0 and l == 0: they come out 0
        o = acc * (o_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        o_rows = (q_start + q_tok).to(tl.int64) * s_ot + head * s_oh
        tl.store(out_ptr + o_rows[:, None] + offs_dv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok)
        if HAS_LSE:
            # natural log: (m + log2(l)) / log2(e); -inf for a row with an empty denominator
            lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            tl.store(lse_ptr + head.to(tl.int64) * s_lh + (q_start + q_tok).to(tl.int64) * s_lt, lse,
                     mask=row_ok)


# Values that change from step to step are not specialized on, so one compiled kernel serves every
# step of a plan and can be launched directly (see ``_launch``).
@triton.jit(do_not_specialize=["total_q", "kv_limit", "split_keys", "batch", "s_bt", "al_sb", "al_sh", "s_lh", "s_lt"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_ml_ptr,
    cu_q_ptr, cu_k_ptr, seqused_ptr, bt_ptr,
    qd_ptr, kd_ptr, vd_ptr, alibi_ptr, sink_ptr, lse_ptr,
    scale, softcap, v_factor, window_left, window_right, total_q, kv_limit, split_keys, batch,
    s_qt, s_qh, s_ot, s_oh, s_bt, qd_sb, qd_sh, kd_sb, kd_sh, vd_sb, vd_sh,
    al_sb, al_sh, s_lh, s_lt,
    K_SB: tl.constexpr, K_ST: tl.constexpr, K_SH: tl.constexpr,
    V_SB: tl.constexpr, V_ST: tl.constexpr, V_SH: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr, NUM_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
    SMALL_M: tl.constexpr, SMALL_N: tl.constexpr, SMALL_STAGES: tl.constexpr, FLAT: tl.constexpr,
    DA: tl.constexpr, DB: tl.constexpr, DB_VALID: tl.constexpr,
    DV: tl.constexpr, DV_VALID: tl.constexpr,
    PAGED: tl.constexpr, HAS_SEQUSED: tl.constexpr, INT64: tl.constexpr,
    KV_MODE: tl.constexpr, Q_MODE: tl.constexpr, COMPUTE: tl.constexpr, Q_PRE: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    HAS_QD: tl.constexpr, HAS_KD: tl.constexpr, HAS_VD: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LSE: tl.constexpr, V_IS_K: tl.constexpr,
    FP8_DOT: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """q ``(total_q, Hq, Dk)``, caches via the constexpr strides, out ``(total_q, Hq, Dv)``.

    With SPLIT, writes ``ws_o`` ``(splits, total_q, Hq, DV_VALID)`` (unnormalized) and ``ws_ml``
    ``(splits, total_q, Hq, 2)`` (running max in base 2, sum) instead of ``out``; the sink and
    the LSE are then the merge kernel's. HAS_ALIBI: slopes at ``alibi_ptr + b * al_sb + head * al_sh``
    (fp32). HAS_SINKS: one logit per query head at ``sink_ptr`` (contiguous; fp32/fp16/bf16).
    HAS_LSE: the natural-log LSE of each row to ``lse_ptr + head * s_lh + token * s_lt``.

    Bounds, whatever the index tensors hold (their value checks run only for the reference and
    under KVDISPATCH_DEBUG=1): q rows are cut to ``[0, total_q)``; the kv length to ``[0, kv_limit]``
    (paged: the block table's columns x PAGE, so no read past a block-table row; not paged: k's
    ``total_k`` rows, the key range also cut to them); block ids clamped to ``[0, NUM_BLOCKS)``.
    A sequence whose indices are out of range gets a garbage-but-safe result; the others are exact.
    Each is a min/max on a value already loaded (no extra load).
    """
    split = tl.program_id(2)
    if FLAT:
        # axis 0 numbers the q tiles of every sequence, axis 1 is the kv head: sequence b's tiles
        # are numbered from start(b) = cu_seqlens_q[b] * GROUP // BLOCK_M + b, which counts at least
        # the tiles of the sequences before it (a sequence may have one number more than tiles), so
        # a program finds its sequence by binary search over cu_seqlens_q and the grid,
        # total_q * GROUP // BLOCK_M + batch programs, needs no hint. Programs of both kinds, long
        # prefill tiles and decodes, are spread over the grid (per kv head), so a mixed batch runs
        # them side by side. Within a sequence, the last tile (causal: the most keys) comes first.
        i = tl.program_id(0)
        b = batch * 0
        hi_b = batch
        while hi_b - b > 1:
            mid = (b + hi_b) // 2
            s_mid = tl.minimum(tl.maximum(tl.load(cu_q_ptr + mid), 0), total_q) * GROUP // BLOCK_M + mid
            b = tl.where(s_mid <= i, mid, b)
            hi_b = tl.where(s_mid <= i, hi_b, mid)
        kvh = tl.program_id(1)
    else:
        # program p of axis 0 takes the sequence's q tiles t = P - 1 - p, t + P, t + 2P, ... below its
        # real tile count (from cu_seqlens_q), P the grid's size along axis 0, which comes from the
        # max_seqlen_q hint: when the hint holds each program has one tile or none, the longest
        # (causal: most keys) first; a hint below the real length only costs parallelism, never an
        # unwritten row
        b = tl.program_id(1) // NUM_KV_HEADS
        kvh = tl.program_id(1) % NUM_KV_HEADS

    # query rows within q's real rows [0, total_q), whatever cu_seqlens_q says: start clamped to
    # [0, total_q], end to [start, total_q] (so lq is in [0, total_q - start]: no int32 wrap-around
    # from an end of -2^31)
    q_start = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b), 0), total_q)
    lq = tl.minimum(tl.maximum(tl.load(cu_q_ptr + b + 1), q_start), total_q) - q_start
    n_tiles = tl.cdiv(lq * GROUP, BLOCK_M)
    if FLAT:
        # this program's one tile (none: the spare number of a sequence, or a non-monotone
        # cu_seqlens_q's garbage)
        first = n_tiles - 1 - (i - (q_start * GROUP // BLOCK_M + b))
        programs = tl.maximum(n_tiles, 1)
        if first < 0:
            return
    else:
        programs = tl.num_programs(0)
        first = programs - 1 - tl.program_id(0)
    if first >= n_tiles:
        return
    if PAGED:
        # kv_limit = block_table.shape[1] * PAGE: no key past the row's last block-table entry
        lk = tl.minimum(tl.maximum(tl.load(seqused_ptr + b), 0), kv_limit)
        k_start = 0
    else:
        # kv_limit = total_k: the key range [k_start, k_start + lk) stays within k's rows
        k_start = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b), 0), kv_limit)
        lk = tl.minimum(tl.maximum(tl.load(cu_k_ptr + b + 1), k_start), kv_limit) - k_start
        if HAS_SEQUSED:
            lk = tl.maximum(tl.minimum(lk, tl.load(seqused_ptr + b)), 0)
    if SPLIT:
        # split s takes keys [s * split_keys, (s + 1) * split_keys), the last one every key from
        # its start on: split_keys comes from the max_seqlen_k hint, which may be below the
        # real length (then the last split takes more keys; none is dropped)
        split_hi = (split + 1) * split_keys
        if split == tl.num_programs(2) - 1:
            split_hi = tl.maximum(split_hi, lk)
    else:
        split_hi = lk

    qk_scale = scale
    if HAS_QD:
        qk_scale *= tl.load(qd_ptr + b * qd_sb + kvh * qd_sh)
    if HAS_KD:
        qk_scale *= tl.load(kd_ptr + b * kd_sb + kvh * kd_sh)
    if not SOFTCAP:
        qk_scale *= 1.4426950408889634
    out_scale = v_factor
    if HAS_VD:
        out_scale *= tl.load(vd_ptr + b * vd_sb + kvh * vd_sh)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt

    if INTERPRET:
        first, n_tiles, programs = _host_int(first), _host_int(n_tiles), _host_int(programs)
    for tile in range(first, n_tiles, programs):
        if SMALL_M > 0 and lq * GROUP <= SMALL_M:
            # a sequence with few rows in a launch of prefill tiles (a decode in a mixed batch):
            # the decode tile, so its keys are not multiplied against BLOCK_M - SMALL_M empty rows
            _q_tile(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_ml_ptr, alibi_ptr, sink_ptr, lse_ptr, bt_row,
                    tile, b, kvh, split, q_start, lq, lk, k_start, split_keys, split_hi, qk_scale, out_scale,
                    softcap, window_left, window_right, total_q, s_qt, s_qh, s_ot, s_oh, al_sb, al_sh, s_lh, s_lt,
                    K_SB, K_ST, K_SH, V_SB, V_ST, V_SH, NUM_KV_HEADS, GROUP, PAGE, NUM_BLOCKS,
                    SMALL_M, SMALL_N, SMALL_STAGES, DA, DB, DB_VALID, DV, DV_VALID, PAGED, INT64,
                    KV_MODE, Q_MODE, COMPUTE, Q_PRE, DOT_F32, IEEE, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                    HAS_ALIBI, HAS_SINKS, HAS_LSE, V_IS_K, FP8_DOT, SPLIT, INTERPRET)
        else:
            _q_tile(q_ptr, k_ptr, v_ptr, out_ptr, ws_o_ptr, ws_ml_ptr, alibi_ptr, sink_ptr, lse_ptr, bt_row,
                    tile, b, kvh, split, q_start, lq, lk, k_start, split_keys, split_hi, qk_scale, out_scale,
                    softcap, window_left, window_right, total_q, s_qt, s_qh, s_ot, s_oh, al_sb, al_sh, s_lh, s_lt,
                    K_SB, K_ST, K_SH, V_SB, V_ST, V_SH, NUM_KV_HEADS, GROUP, PAGE, NUM_BLOCKS,
                    BLOCK_M, BLOCK_N, STAGES, DA, DB, DB_VALID, DV, DV_VALID, PAGED, INT64,
                    KV_MODE, Q_MODE, COMPUTE, Q_PRE, DOT_F32, IEEE, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                    HAS_ALIBI, HAS_SINKS, HAS_LSE, V_IS_K, FP8_DOT, SPLIT, INTERPRET)


@triton.jit(do_not_specialize=["total_q", "batch", "s_lh", "s_lt"])
def _merge_splits_kernel(ws_o_ptr, ws_ml_ptr, out_ptr, cu_q_ptr, sink_ptr, lse_ptr, total_q, batch, s_ot, s_oh,
                         s_lh, s_lt,
                         NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         SPLITS_P2: tl.constexpr, DV: tl.constexpr, DV_VALID: tl.constexpr,
                         HAS_SINKS: tl.constexpr, HAS_LSE: tl.constexpr):
    """out[t, h] = sum_s 2^(m_s - M) o_s / (sum_s 2^(m_s - M) l_s [+ 2^(sink - M)]) over the splits'
    partials (M the largest m_s [and the sink]); the sink is added here, once, not per split.
    HAS_LSE: lse[h, t] = (M + log2(denominator)) in natural-log units (-inf when it is 0)."""
    # the grid is (total_q, heads): t < total_q whatever cu_seqlens_q holds, so every ws / out /
    # lse row touched here exists (a row no sequence covers, possible only with a non-monotone
    # cu_seqlens_q, reads allocated but unwritten workspace: garbage-but-safe)
    t = tl.program_id(0)
    h = tl.program_id(1)
    if t >= tl.load(cu_q_ptr + batch):
        return  # rows past the last sequence are not ours to write
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    ws_row = (offs_s.to(tl.int64) * total_q + t) * NUM_HEADS + h
    m = tl.load(ws_ml_ptr + ws_row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ws_ml_ptr + ws_row * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    if HAS_SINKS:
        sink2 = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink2)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_use)
    w = tl.where(s_ok, w, 0.0)
    denom = tl.sum(w * l, 0)
    if HAS_SINKS:
        denom += tl.math.exp2(sink2 - m_use)
    offs_dv = tl.arange(0, DV)
    dv_ok = offs_dv < DV_VALID
    o = tl.load(ws_o_ptr + ws_row[:, None] * DV_VALID + offs_dv[None, :],
                mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + t.to(tl.int64) * s_ot + h * s_oh + offs_dv, o.to(out_ptr.dtype.element_ty),
             mask=dv_ok)
    if HAS_LSE:
        lse = tl.where(denom > 0.0, (m_use + tl.math.log2(tl.where(denom > 0.0, denom, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lse_ptr + h.to(tl.int64) * s_lh + t.to(tl.int64) * s_lt, lse)


# -- launch -----------------------------------------------------------------------------------------
def supports(op: str, desc, platform) -> Optional[str]:
    """None when the attention kernel handles ``desc``, else why not."""
    if op != "flash_attn_varlen_func":
        return f"attention.py does not implement {op}"
    if desc is None:
        return None
    if desc.is_mla or desc.is_head_major:
        return f"attention reads 4-D caches; got the {desc.layout} layout"
    if desc.cache_dtype not in _FP8 + tuple(_TL):
        return f"cache element type {desc.cache_dtype} is not float16/bfloat16/float32/fp8"
    if desc.head_size_k > _MAX_HEAD or desc.head_size_v > _MAX_HEAD:
        return f"head sizes {desc.head_size_k}/{desc.head_size_v} exceed the kernel's {_MAX_HEAD}"
    return None


class Plan(NamedTuple):
    """Everything fixed by (descriptor, q/out dtypes, heads, options, batch shape bucket)."""
    key: tuple
    tile: TileConfig
    constexprs: dict
    v_factor: float
    k_factor: float
    q_factor: float
    config: AttentionConfig


def _mode(dtype: torch.dtype, platform, interpreting: bool) -> int:
    if dtype not in _FP8:
        return PLAIN
    return FP8_NATIVE if not interpreting and platform.native_fp8(dtype) else _BITS_MODE[dtype]


def plan_for(q: torch.Tensor, out: torch.Tensor, desc, args, decode: bool, v_is_k: bool = False) -> Plan:
    """The kernel's constexprs and launch config for this call shape (kept by ``_prepare``); ``v_is_k``:
    V is K's tensor read through its first ``head_size_v`` columns (``v_aliases_k``)."""
    interp = _interpreting()
    # every input of the constexprs and the tile below (the descriptor's key holds the cache's
    # dtypes, strides, head sizes, page size, int32 flag and device type)
    key = (desc.key, q.dtype, out.dtype, q.shape[1], decode, args.paged, args.seqused_k is not None,
           args.softcap > 0, args.window_left >= 0, args.window_right >= 0, args.q_descale is not None,
           args.k_descale is not None, args.v_descale is not None, args.alibi_slopes is not None,
           args.s_aux is not None, args.softmax_lse is not None, interp, desc.platform, v_is_k)
    cfg = config_for(desc.platform, interp)
    dk, dv = desc.head_size_k, desc.head_size_v
    tile = cfg.tile(("decode_shared_kv" if v_is_k else "decode") if decode else
                    "prefill_fp8" if desc.cache_dtype in _FP8 else "prefill", max(dk, dv))
    # a prefill launch serves a sequence of at most the config's mixed tile's rows (a decode of a
    # mixed batch) with that tile, pipelined at most as deep as the prefill tile
    small = cfg.tile("mixed", max(dk, dv)) if cfg.mixed and not decode else None
    if small is not None and small.block_m >= tile.block_m:
        small = None
    da = _pow2_floor(dk)
    rest = dk - da
    fp8_dot = _fp8_dot(q.dtype, desc, v_is_k, interp, da)
    db = _pow2_ceil(rest) if rest else 0
    min_k = 32 if fp8_dot else 16  # tl.dot's smallest K (fp8: 32)
    if db and db < min_k:
        db = min_k
    kv_mode = FP8_NATIVE if fp8_dot else _mode(desc.cache_dtype, desc.platform, interp)
    q_mode = FP8_NATIVE if fp8_dot else _mode(q.dtype, desc.platform, interp)
    if q.dtype == torch.float32:
        compute = tl.float32
    elif q.dtype in _FP8:
        # fp8 q: fp16 holds every e4m3/e5m2 value exactly and keeps 10 bits of P
        compute = tl.float16
    else:
        compute = _TL[q.dtype]
    q_pre = 1.0
    if desc.cache_dtype in _FP8 and compute == tl.bfloat16:
        # fp8 K/V with bf16 q: decode K/V to fp16 (one hardware conversion per two elements on
        # sm89+, against fp8 -> fp16 -> fp32 -> bf16) and run both dots in fp16, which holds
        # every e4m3/e5m2 value exactly and P with 3 more bits than bf16. q enters fp16 scaled
        # by 1/16 (folded back into the softmax scale): no overflow below 1.05e6, and full
        # precision above 2^-10 (absolute error <= 2^-21 below).
        compute = tl.float16
        q_pre = 1.0 / 16.0
    group = q.shape[1] // desc.num_kv_heads
    ks, vs = desc.k, desc.v
    paged = args.paged
    constexprs = dict(
        K_SB=ks.block if paged else 0, K_ST=ks.token, K_SH=ks.head,
        V_SB=vs.block if paged else 0, V_ST=vs.token, V_SH=vs.head,
        NUM_KV_HEADS=desc.num_kv_heads, GROUP=group, PAGE=desc.block_size if paged else 1,
        NUM_BLOCKS=desc.num_blocks,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.num_stages,
        SMALL_M=small.block_m if small else 0, SMALL_N=small.block_n if small else 0,
        SMALL_STAGES=min(small.num_stages, tile.num_stages) if small else 0, FLAT=not decode,
        DA=da, DB=db, DB_VALID=rest, DV=_pow2_ceil(max(dv, 16)), DV_VALID=dv,
        PAGED=paged, HAS_SEQUSED=args.seqused_k is not None, INT64=not desc.int32_offsets,
        KV_MODE=kv_mode, Q_MODE=q_mode, COMPUTE=compute, Q_PRE=q_pre,
        DOT_F32=interp and compute != tl.float32, IEEE=compute == tl.float32,
        HAS_QD=args.q_descale is not None, HAS_KD=args.k_descale is not None,
        HAS_VD=args.v_descale is not None, SOFTCAP=args.softcap > 0,
        HAS_LEFT=args.window_left >= 0, HAS_RIGHT=args.window_right >= 0,
        HAS_ALIBI=args.alibi_slopes is not None, HAS_SINKS=args.s_aux is not None,
        HAS_LSE=args.softmax_lse is not None, V_IS_K=v_is_k, FP8_DOT=fp8_dot,
    )
    kv_factor = _BITS_FACTOR.get(kv_mode, 1.0)
    return Plan(key, tile, constexprs, kv_factor, kv_factor, _BITS_FACTOR.get(q_mode, 1.0) / q_pre, cfg)


def _fp8_dot(q_dtype, desc, v_is_k: bool, interp: bool, da: int) -> bool:
    """``FP8_DOT``: QK^T on the fp8 tensor cores, q and K as stored, when both are float8_e4m3fn (the
    caller quantized q, with ``q_descale``, as vLLM does for FA3) and Triton drives the platform's fp8
    tensor cores (NVIDIA sm90, measured; the interpreter computes the same dot exactly). Exact: fp8
    products summed in fp32, as the 16-bit dot of the decoded values. PV stays 16-bit: fp8 wgmma wants
    V key-contiguous in shared memory, which Triton 3.6 builds through registers (H200, 8 x 2048:
    155-261 TFLOP/s with P in fp8, against 351-458 for QK^T alone; benchmarks/results/h200_fp8_ab.txt).
    Compiled fp8 dots need 32 along K: the head's power-of-two part."""
    if q_dtype != torch.float8_e4m3fn or desc.cache_dtype != torch.float8_e4m3fn or v_is_k:
        return False
    if interp:
        return True
    plat = desc.platform
    return plat.is_nvidia and (plat.capability or (0, 0)) >= (9, 0) and da >= 32


def _descale_strides(t: Optional[torch.Tensor]):
    if t is None or t.numel() == 1:
        return 0, 0
    return t.stride(0), t.stride(1)


def choose_splits(batch: int, num_kv_heads: int, q_tiles: int, max_seqlen_k: int, block_n: int,
                  cfg: AttentionConfig, multiprocessors: int, programs_per_sm: int = 0) -> int:
    """Split-KV count: none once every multiprocessor has a program (splitting then only adds
    the partial round trip); else as many splits as keep the programs within
    ``split_programs_per_sm`` waves of the machine (rounded DOWN: a partly filled last wave costs
    a whole wave; on the H100 9 splits of batch 4 x 32768 took 217 us, 8 took 185 us), none
    shorter than ``split_min_keys``. ``programs_per_sm`` (the tile's own, when it sets one: a tile
    so large that one program fills a multiprocessor) replaces the config's count."""
    programs = batch * num_kv_heads * q_tiles
    sms = max(multiprocessors, 1)
    if programs >= sms:
        return 1
    by_fill = (programs_per_sm or cfg.split_programs_per_sm) * sms // programs
    by_length = max_seqlen_k // cfg.split_min_keys
    return max(1, min(by_fill, by_length, 256))


def split_count(num_splits: int, max_seqlen_k: int, block_n: int, automatic) -> tuple:
    """(splits, keys per split) for ``num_splits`` (0: ``automatic()``, the heuristic; n >= 1:
    n, capped at one key tile per split). Each split holds a whole number of ``block_n`` tiles
    (the kernel's unmasked tiles must not cross into the next split), so the count is rounded
    to what equal tile-aligned splits give: never more than asked, possibly fewer (70 keys in
    16-key tiles: 4 asked -> 3 splits of 32 keys)."""
    n_keys = max(max_seqlen_k, 1)
    n = automatic() if num_splits == 0 else min(num_splits, -(-n_keys // block_n))
    split_keys = -(-n_keys // max(n, 1))
    split_keys = -(-split_keys // block_n) * block_n
    return max(1, -(-n_keys // split_keys)), split_keys


class _Prepared:
    """One call signature (``AttentionArgs.plans``) with one set of options (decode or prefill tile,
    softcap on, the window, the device): what all its calls share. The plan; the runtime arguments
    that come from the signature (strides, the kv length bound); the compiled kernels kept for
    direct launches: ``kernels[split]``, ``merges[num_splits]``. A compiled kernel is specialized on
    every constexpr (the plan), on the dtype of each pointer and on the ints Triton specializes
    (strides, window; all fixed here by the signature and the options), on the int width of the
    others (total_q and split_keys are checked per call) and on 16-byte pointer alignment (checked
    per call: a misaligned pointer takes Triton's own launch)."""

    __slots__ = ("plan", "decode", "device", "direct", "statics", "kv_limit", "tails", "group", "hkv", "scale_factor",
                 "block_m", "block_n", "sms", "strided", "kernels", "merges", "merge_tail", "merge_statics",
                 "gathers", "last_split")

    def __init__(self, plan: Plan, decode: bool, device: int, direct: bool):
        self.plan, self.decode, self.device, self.direct = plan, decode, device, direct
        self.kernels: dict = {}  # split -> (launch, head) of the compiled kernel (launch.direct)
        self.merges: dict = {}  # num_splits -> the same for the merge kernel
        self.tails: dict = {}  # split -> the launch's last arguments (static ints, constexprs, SPLIT, INTERPRET)
        self.gathers: dict = {}  # split -> the direct launch's pointer gatherer (launch.gatherer)
        # the last call's split: ((grid axis 0, axis 1, max_seqlen_k, num_splits), (splits, keys per split));
        # an engine's layers repeat one step's metadata, so the heuristic runs once per step
        self.last_split = (None, None)


# the kernel's pointer arguments: the expressions the gatherer reads them from (``a``: AttentionArgs)
_POINTERS = ("q", "k", "v", "out", "ws_o", "ws_ml", "a.cu_seqlens_q", "a.cu_seqlens_k", "a.seqused_k",
             "a.block_table", "a.q_descale", "a.k_descale", "a.v_descale", "a.alibi_slopes", "a.s_aux",
             "a.softmax_lse")


def _prepare(q, k, out, desc, args, decode: bool, v_is_k: bool, device: int) -> _Prepared:
    plan = plan_for(q, out, desc, args, decode, v_is_k)
    c = plan.constexprs
    p = _Prepared(plan, decode, device, q.is_cuda and desc.platform.is_nvidia and not _interpreting())
    p.strided = any(unit_stride(t) is not t for t in (args.cu_seqlens_q, args.cu_seqlens_k, args.seqused_k,
                                                      args.block_table, args.s_aux))
    if p.strided:
        args = _contiguous_indices(args)  # the strides below are the copies' (as _launch passes them)
    bt, lse, alibi = args.block_table, args.softmax_lse, args.alibi_slopes
    if alibi is None:
        al_sb = al_sh = 0
    elif alibi.dim() == 1:
        al_sb, al_sh = 0, alibi.stride(0)
    else:
        al_sb, al_sh = alibi.stride(0), alibi.stride(1)
    s_lh, s_lt = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    s_bt = bt.stride(0) if args.paged else 0
    p.statics = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), s_bt,
                 *_descale_strides(args.q_descale), *_descale_strides(args.k_descale),
                 *_descale_strides(args.v_descale), al_sb, al_sh, s_lh, s_lt)
    # the kv length bound: block-table columns x page (paged), k's rows (not paged: one block)
    p.kv_limit = bt.shape[1] * desc.block_size if args.paged else k.shape[1]
    if max(abs(x) for x in (p.kv_limit, s_bt, al_sb, al_sh, s_lh, s_lt)) > _INT32_MAX:
        p.direct = False  # do_not_specialize ints wider than int32: Triton's launch types them
    p.scale_factor = plan.k_factor * plan.q_factor
    p.group = c["GROUP"]
    p.hkv = desc.num_kv_heads
    # splits hold whole key tiles of both paths (powers of two: the larger is a multiple of the other)
    p.block_m, p.block_n = c["BLOCK_M"], max(c["BLOCK_N"], c["SMALL_N"])
    p.sms = desc.platform.multiprocessors or 1
    p.merge_tail = (q.shape[1], c["DV"], c["DV_VALID"], args.s_aux is not None, lse is not None)
    p.merge_statics = (out.stride(0), out.stride(1), s_lh, s_lt)
    if p.direct:
        p.gathers = _gathers(args)
    return p


def _gathers(args) -> dict:
    """split -> the pointer gatherer of a direct launch for the tensors ``args`` has (absent ones, and
    the split workspace without a split, are never read: 0)."""
    present = [True] * 4 + [False, False] + [True] + [getattr(args, e[2:]) is not None for e in _POINTERS[7:]]
    out = {}
    for split in (False, True):
        present[4] = present[5] = split
        out[split] = _gatherer("q, k, v, out, ws_o, ws_ml, a", tuple(e if on else None for e, on in zip(_POINTERS, present)))
    return out


def v_aliases_k(desc) -> bool:
    """Can V be K's tensor read through its first ``head_size_v`` columns (MLA's latent cache passed
    as both, ``k = cache``, ``v = cache[..., :kv_lora_rank]``)? Then, when the two pointers are equal,
    the kernel reuses the K tile it loaded. Needs equal strides and V exactly K's power-of-two part."""
    ks, vs = desc.k, desc.v
    return (desc.head_size_v < desc.head_size_k and desc.head_size_v == _pow2_floor(desc.head_size_k)
            and (ks.block, ks.token, ks.head) == (vs.block, vs.token, vs.head))


def _decode_block_m(desc) -> int:
    cfg = config_for(desc.platform, _interpreting())
    return cfg.tile("decode", max(desc.head_size_k, desc.head_size_v)).block_m


def _device_index(t: torch.Tensor) -> int:
    return t.get_device()


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, desc,
                           args) -> None:
    """Attention of ``q`` ``(total_q, Hq, Dk)`` over the caches ``k``/``v`` (4-D, any strides; the
    non-paged case as one block ``(1, total_k, Hkv, D)``) into ``out`` ``(total_q, Hq, Dv)``.

    ``args`` is a :class:`kvdispatch.registry.AttentionArgs`, already validated: its
    ``num_splits`` (0 automatic, 1 never, n: n splits at most) sets the split-KV count, its
    ``alibi_slopes`` / ``s_aux`` / ``softmax_lse`` switch on the kernel's ALiBi, sinks and LSE;
    ``plans`` keeps the prepared launch of this signature (none kept when it is None).
    """
    total_q = q.shape[0]
    batch = args.cu_seqlens_q.shape[0] - 1
    if batch == 0 or total_q == 0:
        return
    plans = args.plans
    if plans is None:
        plans = {}
    # this signature's decode boundary (max_seqlen_q <= base[0]) and whether its V may be K's tensor
    base = plans.get(None)
    if base is None:
        base = plans[None] = (_decode_block_m(desc) // (q.shape[1] // desc.num_kv_heads), v_aliases_k(desc))
    opts = (args.max_seqlen_q <= base[0], args.softcap > 0, args.window_left, args.window_right,
            base[1] and k.data_ptr() == v.data_ptr(), _device_index(q))
    prep = plans.get(opts)
    if prep is None:
        prep = plans[opts] = _prepare(q, k, out, desc, args, opts[0], opts[4], opts[5])
    _launch(prep, q, k, v, out, args, total_q, batch)


def _splits(prep: _Prepared, args, batch: int, q_tiles: int) -> tuple:
    """(splits, keys per split) of this call: ``args.num_splits``, or ``choose_splits``' count for 0
    (``batch x kv heads x q_tiles``: the programs of the unsplit launch)."""
    n = args.num_splits
    if n == 0:
        n = choose_splits(batch, prep.hkv, q_tiles, args.max_seqlen_k, prep.block_n, prep.plan.config, prep.sms,
                          prep.plan.tile.programs_per_sm)
    if n == 1:  # split_count's answer for one split, without its arithmetic
        return 1, -(-max(args.max_seqlen_k, 1) // prep.block_n) * prep.block_n
    return split_count(n, args.max_seqlen_k, prep.block_n, None)


def _contiguous_indices(args):
    """Strided index views (allowed by the API) as contiguous copies: the kernels read them as rows."""
    return args._replace(cu_seqlens_q=unit_stride(args.cu_seqlens_q), cu_seqlens_k=unit_stride(args.cu_seqlens_k),
                         seqused_k=unit_stride(args.seqused_k), block_table=unit_stride(args.block_table),
                         s_aux=unit_stride(args.s_aux))


def _launch(prep: _Prepared, q, k, v, out, args, total_q: int, batch: int) -> None:
    if prep.strided:
        args = _contiguous_indices(args)
    plan = prep.plan
    if not prep.decode:
        # a prefill launch (FLAT): every sequence's q tiles along axis 0, the kv heads along axis 1
        grid0, grid1 = total_q * prep.group // prep.block_m + batch, prep.hkv
    else:
        # the hint only sets how many programs share a sequence's q tiles (at least one: a hint of
        # 0 below the real length must not skip the call); the kernel walks the real tile count
        grid0, grid1 = max(1, -(-args.max_seqlen_q * prep.group // prep.block_m)), batch * prep.hkv
    key = (grid0, grid1, args.max_seqlen_k, args.num_splits)
    last, got = prep.last_split
    if key == last:
        num_splits, split_keys = got
    else:
        num_splits, split_keys = got = _splits(prep, args, grid1 // prep.hkv, grid0)
        prep.last_split = (key, got)
    split = num_splits > 1
    if split:
        ws_o = torch.empty((num_splits, total_q, q.shape[1], out.shape[2]), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((num_splits, total_q, q.shape[1], 2), dtype=torch.float32, device=q.device)
    else:
        ws_o = ws_ml = out
    cu = args.cu_seqlens_q
    keep = False
    if prep.direct and total_q <= _INT32_MAX and split_keys <= _INT32_MAX:
        ptrs = prep.gathers[split](q, k, v, out, ws_o, ws_ml, args)
        keep = ptrs is not None  # every pointer 16-byte aligned, as the kernel was compiled
        direct = prep.kernels.get(split) if keep else None
        if direct is not None and _no_launch_hooks():
            # the compiled kernel of exactly this specialization (see _Prepared), with raw arguments
            launch, head = direct
            launch(grid0, grid1, num_splits, _stream(prep.device), *head, *ptrs,
                   args.softmax_scale * prep.scale_factor, args.softcap, plan.v_factor, args.window_left,
                   args.window_right, total_q, prep.kv_limit, split_keys, batch, *prep.tails[split])
            if split:
                _merge(prep, ws_o, ws_ml, out, cu, args.s_aux, args.softmax_lse, total_q, batch, num_splits, True)
            return
    c = plan.constexprs
    dummy = cu
    bits = c["KV_MODE"] >= FP8_E4M3_BITS
    tensors = (q.view(torch.uint8) if c["Q_MODE"] >= FP8_E4M3_BITS else q, k.view(torch.uint8) if bits else k,
               v.view(torch.uint8) if bits else v, out, ws_o, ws_ml, cu)
    tensors += tuple(dummy if t is None else t for t in (
        args.cu_seqlens_k, args.seqused_k, args.block_table if args.paged else None, args.q_descale,
        args.k_descale, args.v_descale, args.alibi_slopes, args.s_aux, args.softmax_lse))
    # fp8 bit decoding leaves a power-of-two factor on K (scores) and V (output): folded here
    runtime_args = (args.softmax_scale * prep.scale_factor, args.softcap, plan.v_factor, args.window_left,
                    args.window_right, total_q, prep.kv_limit, split_keys, batch, *prep.statics)
    grid = (grid0, grid1, num_splits)
    while True:
        try:
            compiled = _attention_kernel[grid](
                *tensors, *runtime_args,
                SPLIT=split, INTERPRET=_interpreting(), num_warps=plan.tile.num_warps,
                num_stages=plan.tile.num_stages, **c,
            )
            break
        except _PTXAS_ERRORS:
            # ptxas (12.9, triton 3.6) segfaults on some multi-stage pipelines, and a pipeline may
            # need more shared memory than the device has (wide heads whose V is not K's tile);
            # nothing has run yet, so retrying with fewer stages is safe.
            if plan.tile.num_stages <= 1:
                raise
            stages = plan.tile.num_stages - 1
            c = dict(c, STAGES=stages, SMALL_STAGES=min(c["SMALL_STAGES"], stages))
            plan = prep.plan = plan._replace(tile=dataclasses.replace(plan.tile, num_stages=stages), constexprs=c)
    if keep:
        _keep(prep.kernels, split, compiled)
        prep.tails[split] = (*prep.statics, *tuple(plan.constexprs.values()), split, False)
    if split:
        _merge(prep, ws_o, ws_ml, out, cu, args.s_aux, args.softmax_lse, total_q, batch, num_splits, keep)


def _merge(prep: _Prepared, ws_o, ws_ml, out, cu_q, sink, lse, total_q: int, batch: int, num_splits: int,
           direct_ok: bool) -> None:
    """The split-KV reduction (with the sink and the LSE); like the attention kernel, a compiled
    merge kernel (one per split count: everything else it specializes on is fixed by ``prep``) is
    launched directly on later calls (Triton's generic launcher costs about 60 us of host time)."""
    hq, dv, dv_valid, has_sinks, has_lse = prep.merge_tail
    s_ot, s_oh, s_lh, s_lt = prep.merge_statics
    direct = prep.merges.get(num_splits) if direct_ok else None
    if direct is not None:
        d = cu_q.data_ptr()
        launch, head = direct
        launch(total_q, hq, 1, _stream(prep.device), *head, ws_o.data_ptr(), ws_ml.data_ptr(), out.data_ptr(), d,
               d if sink is None else sink.data_ptr(), d if lse is None else lse.data_ptr(),
               total_q, batch, s_ot, s_oh, s_lh, s_lt, hq, num_splits, _pow2_ceil(num_splits), dv, dv_valid,
               has_sinks, has_lse)
        return
    compiled = _merge_splits_kernel[(total_q, hq)](
        ws_o, ws_ml, out, cu_q, cu_q if sink is None else sink, cu_q if lse is None else lse,
        total_q, batch, s_ot, s_oh, s_lh, s_lt, num_warps=4 if dv <= 256 else 8,
        NUM_HEADS=hq, NUM_SPLITS=num_splits, SPLITS_P2=_pow2_ceil(num_splits), DV=dv, DV_VALID=dv_valid,
        HAS_SINKS=has_sinks, HAS_LSE=has_lse)
    if direct_ok:
        _keep(prep.merges, num_splits, compiled)
