"""The public operations: check arguments (metadata only), describe the cache, pick the backend (cached),
run it. Each is also a ``torch.library`` custom op (``torch.ops.kvdispatch.*``), called under
``torch.compile`` / CUDA-graph capture; eager calls skip the dispatcher's round trip."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch._C._dynamo.guards import TensorGuards as _TensorGuards

from .checks import check_attention_values, check_slot_values, checks_values
from .descriptor import FP8_DTYPES, KVCacheDescriptor
from .hookspecs import AttentionArgs
from .platform import env_bytes
from .registry import registry

__all__ = ["reshape_and_cache_flash", "concat_and_cache_mla", "flash_attn_varlen_func"]

_FLOAT_IN = (torch.float16, torch.bfloat16, torch.float32)
_INF = float("inf")
_compiling = torch.compiler.is_compiling


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _same_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the cache's device), got {t.device}")


def _check(t, name: str, dtypes: tuple, ok, expected: str, device=None, shown: Optional[str] = None) -> None:
    """A tensor of ``dtypes`` (else TypeError) whose shape passes ``ok`` (else ValueError), on ``device``."""
    _tensor(t, name)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected {shown or 'dtype ' + ' or '.join(map(str, dtypes))}, got {t.dtype}")
    if not ok(tuple(t.shape)):
        _fail(name, expected, f"shape {tuple(t.shape)}")
    if device is not None:
        _same_device(t, name, device)


def _rows(t: torch.Tensor, name: str, dims: int, what: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims}-D {what}, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride(-1) == 1), "
                         f"got strides {tuple(t.stride())}")


def _check_write_inputs(x, x_name: str, other, other_name: str, desc: KVCacheDescriptor, slot_mapping) -> None:
    """Both writes: ``x``'s dtype (key / kv_c) against the cache's, devices, ``slot_mapping`` (1-D, <= x's rows)."""
    if desc.kv_cache_dtype == "auto":
        if x.dtype != desc.cache_dtype:
            raise TypeError(f"{x_name}: with kv_cache_dtype='auto' the dtype must equal the cache's "
                            f"{desc.cache_dtype}, got {x.dtype}")
    elif x.dtype not in _FLOAT_IN and x.dtype != desc.cache_dtype:
        raise TypeError(f"{x_name}: with kv_cache_dtype={desc.kv_cache_dtype!r} expected float16/bfloat16/float32 "
                        f"(quantized on write) or {desc.cache_dtype} (stored as is), got {x.dtype}")
    _same_device(x, x_name, desc.device)
    _same_device(other, other_name, desc.device)
    _check(slot_mapping, "slot_mapping", (torch.int32, torch.int64), lambda s: len(s) == 1, "a 1-D tensor [num_tokens]")
    if slot_mapping.shape[0] > x.shape[0]:
        raise ValueError(f"slot_mapping: expected at most one entry per key/kv_c row ({x.shape[0]}), "
                         f"got {slot_mapping.shape[0]} entries")
    _same_device(slot_mapping, "slot_mapping", desc.device)


# -- call signatures -----------------------------------------------------------------------------
class _Call:
    """What one signature's calls share: the checked descriptor (and head size), the selected backend, ``plans``."""

    __slots__ = ("desc", "d", "plans", "backend", "checks", "forced", "debug", "generation")

    def __init__(self, desc, d: int = 0):
        self.desc, self.d, self.plans = desc, d, {}
        self.backend = self.checks = self.forced = self.debug = self.generation = None

    def select(self, op: str, dtype: torch.dtype):
        """The backend for q's / key's ``dtype``, selected again when ``KVDISPATCH_BACKEND``, ``KVDISPATCH_DEBUG``
        or the registry changed (fresh ``plans`` after ``clear_selection()``); ``self.checks``: ``checks_values``."""
        forced, dbg = env_bytes(b"KVDISPATCH_BACKEND"), env_bytes(b"KVDISPATCH_DEBUG")  # raw: compared only
        if self.forced != forced or self.debug != dbg or self.generation != registry.generation \
                or self.backend is None:
            self.backend = registry.select(op, self.desc.platform, self.desc, dtype=dtype)
            if self.generation != registry.generation:  # clear_selection(): the plans made before are stale
                self.plans = {}
            self.checks = checks_values(self.backend)
            self.forced, self.debug, self.generation = forced, dbg, registry.generation
        return self.backend


# Each op's recent signatures, newest first, each behind one C++ check of its tensors' metadata (dynamo's TensorGuards,
# ~0.2 us; a Python key costs several us), token and batch dims free: a hit relates them as the checks do.
_RECENT = 16  # signatures kept per op (engines use one or two: every layer shares its metadata)


def _remember(recent: list, call: _Call, extra, tensors: tuple, free: tuple) -> _Call:
    """Put ``call`` first in ``recent`` behind a guard over ``tensors``; ``free``: per tensor, the
    dim whose size may change (or None); ``extra``: what else a hit must match."""
    if len(set(map(id, tensors))) < len(tensors):
        return call  # a guard fails on a tensor passed as two arguments: such calls are checked each time
    g = _TensorGuards(*tensors, dynamic_dims_sizes=[[None if d == f else n for d, n in enumerate(t.shape)]
                                                    for t, f in zip(tensors, free)],
                      dynamic_dims_strides=[list(t.stride()) for t in tensors])
    if g.check(*tensors):
        recent.insert(0, (g.check, call, extra))
        del recent[_RECENT:]
    return call


def _write_op(op: str, recent: list, free: tuple, check, tensors: tuple, kv_cache_dtype, k_scale, v_scale) -> _Call:
    """Either write's call, selected and value-checked; ``tensors``: (rows, other rows, cache(s)..., slot_mapping). A
    remembered signature serves when its kv_cache_dtype, fp8 scales (the descriptor's, weakly held), guard and size
    relations hold, else ``check`` describes the cache. Callers spell out the backend call (``*args`` + keywords:
    ~1 us more)."""
    x, other, slots = tensors[0], tensors[1], tensors[-1]
    for guard, call, kd in recent:
        if (kv_cache_dtype.__class__ is str and kd == kv_cache_dtype
                and (kd == "auto" or (call.desc.k_scale is k_scale and call.desc.v_scale is v_scale))
                and guard(*tensors) and other.shape[0] == x.shape[0] >= slots.shape[0]):
            break
    else:
        desc = check(*tensors, kv_cache_dtype, k_scale, v_scale)
        call = _remember(recent, _Call(desc), kv_cache_dtype, tensors, free)
    call.select(op, x.dtype)
    if call.checks:
        check_slot_values(slots, call.desc)
    return call


# -- reshape_and_cache_flash ---------------------------------------------------------------------
_WRITE_RECENT: list = []
_WRITE_FREE = (0, 0, None, None, 0)  # the token dim of key, value and slot_mapping


def _write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           slot_mapping: torch.Tensor, kv_cache_dtype: str, k_scale: Optional[torch.Tensor],
           v_scale: Optional[torch.Tensor]) -> None:  # also the custom op's body
    c = _write_op("reshape_and_cache_flash", _WRITE_RECENT, _WRITE_FREE, _check_write,
                  (key, value, key_cache, value_cache, slot_mapping), kv_cache_dtype, k_scale, v_scale)
    if c.backend.takes_plans:
        c.backend.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, c.desc, plans=c.plans)
    else:
        c.backend.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, c.desc)


def _check_write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    """Every check of ``reshape_and_cache_flash`` that reads only metadata; returns the descriptor."""
    for t, name in ((key, "key"), (value, "value"), (value_cache, "value_cache")):
        _tensor(t, name)
    desc = KVCacheDescriptor.from_tensors(key_cache, value_cache, kv_cache_dtype, k_scale, v_scale)
    _rows(key, "key", 3, "[num_tokens, num_kv_heads, head_size]")
    _rows(value, "value", 3, "[num_tokens, num_kv_heads, head_size_v]")
    t, h, dk = key.shape
    if h != desc.num_kv_heads or dk != desc.head_size_k:
        _fail("key", f"[num_tokens, {desc.num_kv_heads}, {desc.head_size_k}] (the key_cache's heads and "
              "head size)", f"shape {tuple(key.shape)}")
    if value.shape[0] != t or value.shape[1] != h or value.shape[2] != desc.head_size_v:
        _fail("value", f"[{t}, {desc.num_kv_heads}, {desc.head_size_v}] (key's tokens, the value_cache's "
              "heads and head size)", f"shape {tuple(value.shape)}")
    if value.dtype != key.dtype:
        raise TypeError(f"value: expected key's dtype {key.dtype}, got {value.dtype}")
    _check_write_inputs(key, "key", value, "value", desc, slot_mapping)
    return desc


def reshape_and_cache_flash(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, kv_cache_dtype: str = "auto",
                            k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
    """Write each token's key/value into the paged cache at its slot (vLLM's signature).

    key ``(num_tokens, num_kv_heads, head_size)`` and value ``(..., head_size_v)``: any token stride,
    last dim contiguous. key_cache, value_cache: 4-D ``(num_blocks, block_size, num_kv_heads,
    head_size[_v])`` views in any memory order (NHD, HND, combined/cross-layer slices, diffkv), or the
    head-major pair ``(num_blocks, num_kv_heads, head_size // x, block_size, x)`` / ``(num_blocks,
    num_kv_heads, head_size, block_size)``. slot_mapping: int32/int64 ``(n,)``, ``n <= num_tokens``
    (extra rows, e.g. CUDA-graph padding, are ignored); slot ``s`` is block ``s // block_size``, offset
    ``s % block_size``; ``s < 0`` is padding, skipped. kv_cache_dtype: ``"auto"`` (cache dtype == key
    dtype), ``"fp8"``/``"fp8_e4m3"``, ``"fp8_e5m2"``: stores ``x / scale`` rounded to the cache's fp8
    type, saturating at its max; k_scale, v_scale: float32, one element or ``(num_kv_heads,)``.
    """
    if _compiling():
        torch.ops.kvdispatch.reshape_and_cache_flash(
            key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)
        return
    _write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale)


# reshape_and_cache_flash with the descriptor's kv_cache_dtype and scales (set here: descriptor.py is below)
KVCacheDescriptor.write = lambda self, key, value, key_cache, value_cache, slot_mapping: reshape_and_cache_flash(
    key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype, self.k_scale, self.v_scale)


# -- concat_and_cache_mla ----------------------------------------------------------------------
_MLA_RECENT: list = []
_MLA_FREE = (0, 0, None, 0)  # the token dim of kv_c, k_pe and slot_mapping


def _write_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
               kv_cache_dtype: str, scale: Optional[torch.Tensor]) -> None:  # also the custom op's body
    c = _write_op("concat_and_cache_mla", _MLA_RECENT, _MLA_FREE, _check_mla, (kv_c, k_pe, kv_cache, slot_mapping),
                  kv_cache_dtype, scale, None)
    if c.backend.takes_plans:
        c.backend.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, c.desc, plans=c.plans)
    else:
        c.backend.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, c.desc)


def _check_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, _=None) -> KVCacheDescriptor:
    """Every check of ``concat_and_cache_mla`` that reads only metadata; returns the descriptor."""
    _tensor(kv_c, "kv_c")
    _tensor(k_pe, "k_pe")
    desc = KVCacheDescriptor.from_tensors(kv_cache, None, kv_cache_dtype, scale, None)
    _rows(kv_c, "kv_c", 2, "[num_tokens, kv_lora_rank]")
    _rows(k_pe, "k_pe", 2, "[num_tokens, rope_dim]")
    t, rank = kv_c.shape
    if k_pe.shape[0] != t:
        _fail("k_pe", f"{t} tokens (kv_c's)", f"shape {tuple(k_pe.shape)}")
    if rank + k_pe.shape[1] != desc.head_size_k:
        _fail("kv_c/k_pe", f"kv_lora_rank + rope_dim == {desc.head_size_k} (the kv_cache's last dim)",
              f"{rank} + {k_pe.shape[1]}")
    if k_pe.dtype != kv_c.dtype:
        raise TypeError(f"k_pe: expected kv_c's dtype {kv_c.dtype}, got {k_pe.dtype}")
    _check_write_inputs(kv_c, "kv_c", k_pe, "k_pe", desc, slot_mapping)
    return desc


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_cache_dtype: str = "auto", scale: Optional[torch.Tensor] = None) -> None:
    """Write MLA latents: ``kv_cache[slot] = concat(kv_c, k_pe)`` (vLLM's signature). kv_c ``(num_tokens,
    kv_lora_rank)``, k_pe ``(num_tokens, rope_dim)``, kv_cache ``(num_blocks, block_size, kv_lora_rank +
    rope_dim)``: any strides, last dims contiguous; slot_mapping, kv_cache_dtype as in
    :func:`reshape_and_cache_flash`; ``scale``: one float32 element."""
    if _compiling():
        torch.ops.kvdispatch.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)
        return
    _write_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale)


# -- flash_attn_varlen_func --------------------------------------------------------------------
def _real(name: str, val, what: str, zero_ok: bool = False) -> float:
    """``val`` as a float if it is a finite real number > 0 (>= 0 with ``zero_ok``), else raise."""
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name}: expected {what}, got {type(val).__name__} {val!r}")
    val = float(val)
    if not math.isfinite(val) or val < 0.0 or (val == 0.0 and not zero_ok):
        _fail(name, what, val)
    return val


def _int_at_least(name: str, val, lo: int, what: str, shown=None) -> None:
    """Raise naming ``name`` unless ``val`` is an int (not a bool) >= ``lo``."""
    if isinstance(val, bool) or not isinstance(val, int) or val < lo:
        _fail(name, what, repr(val) if shown is None else shown)


_ATTN_RECENT: list = []
_make_args = AttentionArgs._make  # skips the NamedTuple's Python __new__ (the checks leave exact ints and floats)


def _attention(q, k, v, out, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
               softmax_scale, causal, window_left, window_right, softcap, block_table,
               q_descale, k_descale, v_descale, alibi_slopes=None, s_aux=None, softmax_lse=None,
               num_splits=0) -> None:
    # the guards' tensors: the five always there, then the optional ones present (``mask`` says which)
    if (cu_seqlens_k is None and seqused_k is not None and block_table is not None and q_descale is None
            and k_descale is None and v_descale is None and alibi_slopes is None and s_aux is None
            and softmax_lse is None):  # an engine's paged call
        ts, mask = (q, k, v, out, cu_seqlens_q, seqused_k, block_table), 6
    else:
        ts, mask = [q, k, v, out, cu_seqlens_q], 0
        for bit, x in ((1, cu_seqlens_k), (2, seqused_k), (4, block_table), (8, q_descale), (16, k_descale),
                       (32, v_descale), (64, alibi_slopes), (128, s_aux), (256, softmax_lse)):
            if x is not None:
                ts.append(x)
                mask |= bit
    # a remembered signature also needs the free sizes as valid calls relate them: out and the LSE
    # have q's rows, every batch dim (index tensors, [batch, heads] descales and slopes) is cu_seqlens_q's - 1
    for check, call, (m, rest) in _ATTN_RECENT:
        if m == mask and check(*ts):
            t, b1 = q.shape[0], cu_seqlens_q.shape[0]
            if (out.shape[0] == t and b1 >= 1 and (cu_seqlens_k is None or cu_seqlens_k.shape[0] == b1)
                    and (seqused_k is None or seqused_k.shape[0] == b1 - 1)
                    and (block_table is None or block_table.shape[0] == b1 - 1)
                    and (not rest or all((ts[j].shape[1] == t) if lse else (ts[j].shape[0] == b1 - 1)
                                         for j, lse in rest))):
                break
    else:
        call = _attention_call(ts, mask, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                               q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse)
    # scalars, every call: exact int / float types in range cost one test; the rest the full check
    if max_seqlen_q.__class__ is not int or max_seqlen_q < 0:
        _int_at_least("max_seqlen_q", max_seqlen_q, 0, "a non-negative int")
    if max_seqlen_k.__class__ is not int or max_seqlen_k < 0:
        _int_at_least("max_seqlen_k", max_seqlen_k, 0, "a non-negative int")
    if softcap.__class__ is not float or not 0.0 <= softcap < _INF:
        softcap = _real("softcap", softcap, "a finite float >= 0 (0 disables it)", zero_ok=True)
    if window_left.__class__ is not int or window_right.__class__ is not int \
            or window_left < -1 or window_right < -1:
        for val in (window_left, window_right):
            _int_at_least("window_size", val, -1, "(left, right) ints with -1 for unbounded",
                          shown=(window_left, window_right))
        window_left, window_right = int(window_left), int(window_right)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(call.d)
    elif softmax_scale.__class__ is not float or not 0.0 < softmax_scale < _INF:
        softmax_scale = _real("softmax_scale", softmax_scale, "a finite float > 0 (None: 1 / sqrt(head_size))")
    if causal:
        window_right = 0
    if num_splits.__class__ is not int or num_splits < 0:
        _int_at_least("num_splits", num_splits, 0, "an int >= 0 (0 = automatic, 1 = no split, n = at most n)")
        num_splits = int(num_splits)
    backend = call.select("flash_attn_varlen_func", q.dtype)
    args = _make_args((cu_seqlens_q, max_seqlen_q, cu_seqlens_k, seqused_k, max_seqlen_k, block_table, softmax_scale,
                       bool(causal), window_left, window_right, softcap,
                       q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse, num_splits, call.plans))
    if call.checks:
        check_attention_values(args, call.desc, q.shape[0])
    paged = block_table is not None
    if not paged and (k.shape[0] == 0 or v.shape[0] == 0):
        _no_keys(q, out, args)
        return
    backend.flash_attn_varlen_func(q, k if paged else k.unsqueeze(0), v if paged else v.unsqueeze(0),
                                   out, call.desc, args)


def _attention_call(ts, mask, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, q_descale,
                    k_descale, v_descale, alibi_slopes, s_aux, softmax_lse) -> _Call:
    """A new signature (``ts``, ``mask``: the guards' tensors): every metadata check, then remembered."""
    desc, d = _check_attention_tensors(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                                       q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse)
    # free dims: q's and out's tokens, the index tensors' batch dim, and (``rest``) the batch dim of
    # [batch, heads] descales and ALiBi slopes and the LSE's tokens
    free = [0, None, None, 0, 0] + [0] * ((cu_seqlens_k is not None) + (seqused_k is not None)
                                          + (block_table is not None))
    rest = []
    for x in (q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse):
        if x is None:
            continue
        dim = None
        if x is not s_aux and x.dim() == 2 and x.numel() != 1:
            dim = 1 if x is softmax_lse else 0
            rest.append((len(free), x is softmax_lse))
        free.append(dim)
    return _remember(_ATTN_RECENT, _Call(desc, d), (mask, tuple(rest)), ts, tuple(free))


def _no_keys(q, out, args: AttentionArgs) -> None:
    """Non-paged, zero keys: out 0, LSE the sink or -inf (rows past ``cu_seqlens_q[-1]`` kept); no sync."""
    rows = torch.arange(q.shape[0], device=q.device) < args.cu_seqlens_q[-1]
    out.masked_fill_(rows[:, None, None], 0.0)
    if args.softmax_lse is not None:
        sink = float("-inf") if args.s_aux is None else args.s_aux.float()[:, None]
        args.softmax_lse.copy_(torch.where(rows[None, :], sink, args.softmax_lse))


def _check_attention_tensors(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                             q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse):
    """Every check of ``flash_attn_varlen_func`` that reads only tensor metadata (the engine-facing
    extras, ALiBi slopes, sinks and the LSE output, last); returns ``(descriptor, head_size)``."""
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out")):
        _tensor(t, name)
    paged = block_table is not None
    if paged:
        desc = KVCacheDescriptor.from_tensors(k, v)
        if desc.layout == "head-major" or desc.is_mla:
            _fail("k", "a 4-D paged cache [num_blocks, block_size, num_kv_heads, head_size] (any strides)",
                  f"shape {tuple(k.shape)}")
    elif k.dim() != 3 or v.dim() != 3:
        _fail("k" if k.dim() != 3 else "v", "[total_k, num_kv_heads, head_size] without block_table "
              "(or pass block_table for a paged cache)", f"shape {tuple((k if k.dim() != 3 else v).shape)}")
    elif k.shape[0] == 0 or v.shape[0] == 0:
        # no keys at all: every row sees nothing (_attention answers without a backend); the
        # descriptor of a one-token stand-in carries the heads, head sizes, dtype and device
        desc = KVCacheDescriptor.from_tensors(k.new_empty((1, 1) + tuple(k.shape[1:])),
                                              v.new_empty((1, 1) + tuple(v.shape[1:])))
    else:  # the non-paged case is one "block" holding every key: same descriptor, same kernels
        desc = KVCacheDescriptor.from_tensors(k.unsqueeze(0), v.unsqueeze(0))
    dev = desc.device
    _rows(q, "q", 3, "[total_q, num_q_heads, head_size]")
    _same_device(q, "q", dev)
    total_q, hq, d = q.shape
    hkv = desc.num_kv_heads
    if d != desc.head_size_k:
        _fail("q", f"head_size {desc.head_size_k} (k's)", f"shape {tuple(q.shape)}")
    if hq % hkv:
        _fail("q", f"num_q_heads a multiple of num_kv_heads={hkv}", f"{hq} heads")
    if desc.is_fp8:
        if q.dtype not in _FLOAT_IN + FP8_DTYPES:
            raise TypeError(f"q: expected float16/bfloat16/float32 (or fp8 with q_descale), got {q.dtype}")
    elif q.dtype != desc.cache_dtype:
        raise TypeError(f"q: expected k/v's dtype {desc.cache_dtype}, got {q.dtype}")
    if q.dtype in FP8_DTYPES and out.dtype in FP8_DTYPES:
        raise TypeError(f"out: expected float16/bfloat16/float32 for fp8 q, got {out.dtype}")
    _rows(out, "out", 3, "[total_q, num_q_heads, head_size_v]")
    if tuple(out.shape) != (total_q, hq, desc.head_size_v):
        _fail("out", f"shape {(total_q, hq, desc.head_size_v)}", f"shape {tuple(out.shape)}")
    if out.dtype not in _FLOAT_IN:
        raise TypeError(f"out: expected float16/bfloat16/float32, got {out.dtype}")
    _same_device(out, "out", dev)
    _tensor(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        _fail("cu_seqlens_q", "int32 [batch + 1]", f"shape {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.shape[0] - 1

    def index(t, name, dims, n, what):  # int32, ``dims``-D, ``n`` rows, on the cache's device
        _check(t, name, (torch.int32,), lambda s: len(s) == dims and s[0] == n, what, dev)

    index(cu_seqlens_q, "cu_seqlens_q", 1, batch + 1, "int32 [batch + 1]")
    if paged:
        index(block_table, "block_table", 2, batch, f"int32 [batch={batch}, max_blocks_per_seq]")
        if seqused_k is None:
            raise ValueError("seqused_k: required with block_table (int32 [batch], kv length per sequence)")
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k: required without block_table (int32 [batch + 1])")
    lengths = ((seqused_k, "seqused_k", batch, f"int32 [batch={batch}]"),
               (cu_seqlens_k, "cu_seqlens_k", batch + 1, "int32 [batch + 1]"))
    for t, name, n, what in lengths if paged else lengths[::-1]:  # the required one first
        if t is not None:
            index(t, name, 1, n, what)
    for t, name in ((q_descale, "q_descale"), (k_descale, "k_descale"), (v_descale, "v_descale")):
        if t is not None:
            _check(t, name, (torch.float32,), lambda s: math.prod(s) == 1 or s == (batch, hkv),
                   f"one element or shape [{batch}, {hkv}] (batch, num_kv_heads)", dev)
    if alibi_slopes is not None:
        _check(alibi_slopes, "alibi_slopes", (torch.float32,), lambda s: s in ((hq,), (batch, hq)),
               f"shape [{hq}] or [{batch}, {hq}] (num_q_heads, or batch x num_q_heads)", dev)
    if s_aux is not None:
        _check(s_aux, "s_aux", _FLOAT_IN, lambda s: s == (hq,), f"shape [{hq}] (one sink logit per query head)",
               dev, shown="float32 (or float16/bfloat16)")
    if softmax_lse is not None:
        _tensor(softmax_lse, "softmax_lse")
        if softmax_lse.dtype != torch.float32 or tuple(softmax_lse.shape) != (hq, total_q):
            _fail("softmax_lse", f"float32 [{hq}, {total_q}] (num_q_heads, total_q)",
                  f"{softmax_lse.dtype} {tuple(softmax_lse.shape)}")
        _same_device(softmax_lse, "softmax_lse", dev)
    return desc, d


# FA3's scheduler plans and the FA version are ignored keyword parameters (binding them is cheaper than **); keywords
# taken only at their no-op value (context parallelism, FA3's q_v) arrive in ``engine_hints``; any other: TypeError.
_DEFAULT_ONLY = {"cp_world_size": 1, "cp_rank": 0, "cp_tot_seqused_k": None, "q_v": None}


def _new_lse(q: torch.Tensor) -> torch.Tensor:
    """The LSE output ``[num_q_heads, total_q]``, uninitialized as flash-attn's (tests swap in a NaN-filled one)."""
    return torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)


def _check_hints(hints: dict, dropout_p, return_attn_probs) -> None:
    if dropout_p:
        _fail("dropout_p", "0.0 (kvdispatch's attention is for inference)", dropout_p)
    if return_attn_probs:
        _fail("return_attn_probs", "False (the probabilities are never materialized)", return_attn_probs)
    for name, val in hints.items():
        if name in _DEFAULT_ONLY and val is not _DEFAULT_ONLY[name] and val != _DEFAULT_ONLY[name]:
            raise ValueError(f"{name}: only the default {_DEFAULT_ONLY[name]!r} is supported, got {val!r}")
        if name not in _DEFAULT_ONLY:
            raise TypeError(f"flash_attn_varlen_func() got an unexpected keyword argument {name!r}")


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_seqlen_q: int, cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int, cu_seqlens_k: Optional[torch.Tensor] = None, seqused_k: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Optional[Sequence[int]] = (-1, -1),
    softcap: float = 0.0, block_table: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None, k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None, return_softmax_lse: bool = False, num_splits: int = 0, *,
    dropout_p: float = 0.0, deterministic: bool = False, return_attn_probs: bool = False,
    scheduler_metadata=None, fa_version: Optional[int] = None, **engine_hints,
):
    """Variable-length attention, paged or not (flash-attn / vLLM signature). Returns ``out``, or
    ``(out, softmax_lse)`` with ``return_softmax_lse=True``.

    q ``(total_q, num_q_heads, head_size)``, ``cu_seqlens_q`` int32 ``(batch + 1,)``. Paged (``block_table`` int32
    ``(batch, max_blocks_per_seq)``, ``seqused_k`` int32 ``(batch,)``): k, v are caches ``(num_blocks, block_size,
    num_kv_heads, head_size[_v])`` in any memory order; else ``(total_k, num_kv_heads, head_size[_v])`` with
    ``cu_seqlens_k`` int32 ``(batch + 1,)``. num_q_heads % num_kv_heads == 0 (GQA/MQA). ``causal``: bottom-right
    aligned, query i sits at key position p = i + Lk - Lq (Lq = 2, Lk = 5: q0 sees keys 0-3, q1 keys 0-4);
    ``window_size`` ``(left, right)`` (None: unbounded) keeps keys in ``[p - left, p + right]``, -1 unbounded.
    ``softcap`` > 0: ``softcap * tanh(s / softcap)`` on the scaled scores; ``softmax_scale`` default ``1 /
    sqrt(head_size)``; ``out``: optional ``(total_q, num_q_heads, head_size_v)``, written in place. ``q/k/v_descale``:
    float32, one element or ``(batch, num_kv_heads)`` (``expand``-ed views too), multiply the stored fp8 values.
    ``alibi_slopes``: float32 ``(num_q_heads,)`` or ``(batch, num_q_heads)``, adds ``-slope * |p - j|`` to the
    (soft-capped) score of key j. ``s_aux`` ``(num_q_heads,)``: sink logits, each joins its head's softmax
    denominator and contributes no value. ``return_softmax_lse``: also float32 ``(num_q_heads, total_q)``, the log of
    each row's denominator (sink included), -inf for a row that sees nothing. ``num_splits``: split-KV, 0 automatic, 1
    never, n at most n. ``dropout_p`` only 0.0, ``return_attn_probs`` only False; ``deterministic`` accepted (every
    backend is); ``scheduler_metadata``, ``fa_version``: FA3 hints, ignored. A row that sees no key is 0.
    """
    if engine_hints or dropout_p or return_attn_probs:
        _check_hints(engine_hints, dropout_p, return_attn_probs)
    if out is None or return_softmax_lse:
        _tensor(q, "q")
    if out is None:
        _tensor(v, "v")
        if q.dim() != 3 or v.dim() not in (3, 4):
            _fail("q" if q.dim() != 3 else "v", "3-D q and 3-D/4-D v", f"shapes {tuple(q.shape)}, {tuple(v.shape)}")
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]), dtype=torch.bfloat16 if q.dtype in FP8_DTYPES
                          else q.dtype)
    if window_size is None:
        wl = wr = -1
    elif not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or None in window_size:
        _fail("window_size", "a (left, right) pair of ints (-1 = unbounded) or None", repr(window_size))
    else:
        wl, wr = window_size
    lse = _new_lse(q) if return_softmax_lse else None
    if _compiling():
        torch.ops.kvdispatch.flash_attn_varlen_func(
            q, k, v, out, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
            softmax_scale, causal, wl, wr, softcap, block_table, q_descale, k_descale, v_descale,
            alibi_slopes, s_aux, lse, num_splits)
    else:
        _attention(q, k, v, out, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
                   softmax_scale, causal, wl, wr, softcap, block_table, q_descale, k_descale, v_descale,
                   alibi_slopes, s_aux, lse, num_splits)
    return (out, lse) if return_softmax_lse else out


# -- torch.library registration (the fake kernels return None: the mutated arguments say it all) --
_write_op_def = torch.library.custom_op("kvdispatch::reshape_and_cache_flash", _write,
                                        mutates_args=("key_cache", "value_cache"))
_mla_op_def = torch.library.custom_op("kvdispatch::concat_and_cache_mla", _write_mla, mutates_args=("kv_cache",))


@torch.library.custom_op("kvdispatch::flash_attn_varlen_func", mutates_args=("out", "softmax_lse"))
def _flash_attn_varlen_func_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, max_seqlen_q: int, cu_seqlens_q: torch.Tensor,
    max_seqlen_k: int, cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor],
    softmax_scale: Optional[float], causal: bool, window_left: int, window_right: int, softcap: float,
    block_table: Optional[torch.Tensor], q_descale: Optional[torch.Tensor], k_descale: Optional[torch.Tensor],
    v_descale: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor], s_aux: Optional[torch.Tensor],
    softmax_lse: Optional[torch.Tensor], num_splits: int) -> None:
    # no defaults: torch 2.11 drops a mutated optional argument passed at its default value and
    # then fails its in-place bookkeeping (opcheck, torch.compile); callers pass all of them
    _attention(q, k, v, out, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, seqused_k,
               softmax_scale, causal, window_left, window_right, softcap, block_table,
               q_descale, k_descale, v_descale, alibi_slopes, s_aux, softmax_lse, num_splits)


for _op in (_write_op_def, _mla_op_def, _flash_attn_varlen_func_op):
    _op.register_fake(lambda *args: None)
