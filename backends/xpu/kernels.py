"""Kernel specializations and launch plans of the SYCL kernels in ``csrc/``, shared by every way
they run: the AOT SyclExtension on XPU (``extension.py``) and the run-time compiler on the OpenCL
CPU device (``cpu_lane/``).

A :class:`Spec` names one instantiation of a kernel template (element types, head sizes, index
width) and can write the tiny translation unit that exposes it as a free-function kernel. A
:class:`Launch` is everything one call needs: the spec, the arguments in the order of the
kernel's ``KVX_*_PARAMS`` macro, and the nd-range. The descriptor decides what is static
(element types, 32/64-bit offsets, head sizes, scale kinds); per-call values (strides of key/q, lengths) are
arguments.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from kvdispatch.descriptor import INT32_MAX, KVCacheDescriptor, max_offset
from kvdispatch.registry import AttentionArgs

CSRC = Path(__file__).resolve().parent / "csrc"

PLAIN = {
    torch.float32: "kvx::Plain<float>",
    torch.float16: "kvx::Plain<sycl::half>",
    torch.bfloat16: "kvx::Plain<sycl::ext::oneapi::bfloat16>",
}
FP8 = {
    torch.float8_e4m3fn: "kvx::Fp8<kvx::E4M3FN>",
    torch.float8_e4m3fnuz: "kvx::Fp8<kvx::E4M3FNUZ>",
    torch.float8_e5m2: "kvx::Fp8<kvx::E5M2>",
}
RAW = {1: "kvx::Raw<uint8_t>", 2: "kvx::Raw<uint16_t>", 4: "kvx::Raw<uint32_t>"}
INDEX = {torch.int32: "int32_t", torch.int64: "int64_t"}

# work-group sizes: a write group covers one token's heads x dims; attention scores WG keys a tile
WRITE_WG_MAX = 256
ATTENTION_WG = 64

# kernel family -> (header, template function, params macro, args macro)
FAMILIES = {
    "cache_write": ("cache_write.hpp", "kvx::cache_write", "KVX_CACHE_WRITE_PARAMS", "KVX_CACHE_WRITE_ARGS"),
    "concat_and_cache_mla": ("concat_and_cache_mla.hpp", "kvx::concat_and_cache_mla",
                             "KVX_MLA_WRITE_PARAMS", "KVX_MLA_WRITE_ARGS"),
    # ESIMD twin of cache_write (Intel GPUs only; compile-checked on the CPU lane, never run there)
    "cache_write_esimd": ("esimd/cache_write_esimd.hpp", "kvx::cache_write_esimd",
                          "KVX_CACHE_WRITE_ESIMD_PARAMS", "KVX_CACHE_WRITE_ESIMD_ARGS"),
    "paged_attention": ("paged_attention.hpp", "kvx::paged_attention", "KVX_ATTENTION_PARAMS",
                        "KVX_ATTENTION_ARGS"),
}


@dataclass(frozen=True)
class Spec:
    """One instantiation: ``family`` (a key of FAMILIES), the template arguments, and the element
    policies whose ``storage`` types fill the params macro."""

    family: str
    template_args: tuple
    macro_types: tuple

    @functools.cached_property  # hashed once per Spec object, not per launch
    def name(self) -> str:
        h = hashlib.sha1(repr((self.family, self.template_args)).encode()).hexdigest()[:12]
        if self.family == "paged_attention":
            return f"kvx_{self.family}_d{self.template_args[3]}x{self.template_args[4]}_{h}"
        return f"kvx_{self.family}_{h}"

    @property
    def is_esimd(self) -> bool:
        return self.family.endswith("_esimd")

    def free_function_source(self) -> str:
        """A translation unit exposing this instantiation as an ``extern "C"`` free-function kernel
        (what the run-time compiler builds; compile with ``-I csrc``)."""
        header, fn, params, args = FAMILIES[self.family]
        types = ", ".join(self.macro_types)
        esimd = "[[intel::sycl_explicit_simd]] " if self.is_esimd else ""
        return (
            f'#include "{header}"\n'
            "extern \"C\" SYCL_EXT_ONEAPI_FUNCTION_PROPERTY((sycl::ext::oneapi::experimental::nd_range_kernel<1>))\n"
            f"{esimd}void {self.name}({params}({types})) {{\n"
            f"  {fn}<{', '.join(self.template_args)}>(\n"
            f"      sycl::ext::oneapi::this_work_item::get_nd_item<1>(), {args});\n"
            "}\n"
        )


@dataclass
class Launch:
    """A kernel call: ``args`` are ``(kind, value, is_output)`` in the params macro's order, kind
    one of "ptr" (a tensor or None), "i64", "i32", "f32"; ``groups`` work-groups of ``local``."""

    spec: Spec
    args: list
    groups: int
    local: int


def split_args(launch: Launch):
    """(tensors, ints, floats) of a launch, each in parameter order: how the AOT extension's
    ``launch`` op takes them (its C++ side walks the kernel's parameter types in the same order)."""
    tensors, ints, floats = [], [], []
    for kind, value, _out in launch.args:
        if kind == "ptr":
            tensors.append(value)
        elif kind == "f32":
            floats.append(float(value))
        else:
            ints.append(int(value))
    return tensors, ints, floats


def _storage(policy: str) -> str:
    return f"{policy}::storage"


def _fits32(desc: KVCacheDescriptor, *tensors: torch.Tensor) -> bool:
    """32-bit offsets: the descriptor's caches and ``tensors`` (a write's inputs) fit."""
    return desc.int32_offsets and all(max_offset(t) <= INT32_MAX for t in tensors)


def _elements(in_dtype: torch.dtype, desc: KVCacheDescriptor):
    """(In policy, Cache policy, quantize?) of a write of ``in_dtype`` rows into ``desc``'s cache."""
    if desc.kv_cache_dtype != "auto" and in_dtype != desc.cache_dtype:
        return PLAIN[in_dtype], FP8[desc.cache_dtype], True
    raw = RAW[desc.cache_dtype.itemsize]
    return raw, raw, False


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Index vectors and scales are read as dense arrays by the kernels; the public API accepts
    any strides for them, so a strided one (rare) is copied."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_group(elements: int) -> int:
    wg = 32
    while wg < elements and wg < WRITE_WG_MAX:
        wg *= 2
    return wg


@functools.lru_cache(maxsize=None)  # one Spec per instantiation: its name is hashed once
def write_spec(family: str, in_p: str, cache_p: str, quant: bool, slot: str, idx: str) -> Spec:
    return Spec(family, (in_p, cache_p, "true" if quant else "false", slot, idx),
                (_storage(in_p), _storage(cache_p), slot))


@functools.lru_cache(maxsize=None)  # one Spec per instantiation: its name is hashed once
def attention_spec(qe: str, kve: str, oe: str, dk: int, dv: int, heads_per_group: int, idx: str) -> Spec:
    # ``idx``: the cache offsets' type (the descriptor's int32_offsets); q/out/LSE use 64-bit steps
    return Spec("paged_attention", (qe, kve, oe, str(dk), str(dv), str(heads_per_group), str(ATTENTION_WG),
                                    idx),
                (_storage(qe), _storage(kve), _storage(oe)))


def heads_per_group(group: int) -> int:
    """Query heads one attention work-group serves (GT): all of a kv head's group up to 8, in
    three sizes so the AOT table stays small (MHA 1, GQA up to 4, else 8)."""
    return 1 if group == 1 else 4 if group <= 4 else 8


@functools.lru_cache(maxsize=None)  # one Spec per instantiation: its name is hashed once
def esimd_spec(raw: str, dk: int, dv: int, slot: str, idx: str) -> Spec:
    return Spec("cache_write_esimd", (f"{raw}::storage", str(dk), str(dv), slot, idx), (f"{raw}::storage", slot))


ESIMD_ENV = "KVDISPATCH_XPU_ESIMD"


def esimd_eligible(key, value, key_cache, value_cache, desc: KVCacheDescriptor) -> bool:
    """The ESIMD write moves whole head rows with 16-byte-aligned block messages: an element copy
    into a 4-D cache where every row start (inputs and both caches) is 16-byte aligned."""
    if desc.is_head_major or desc.is_mla or _elements(key.dtype, desc)[2]:
        return False
    unit = 16 // desc.cache_dtype.itemsize
    if desc.head_size_k % unit or desc.head_size_v % unit:
        return False
    strides = (key.stride(0), key.stride(1), value.stride(0), value.stride(1),
               desc.k.block, desc.k.token, desc.k.head, desc.v.block, desc.v.token, desc.v.head)
    return (all(st % unit == 0 for st in strides)
            and all(t.data_ptr() % 16 == 0 for t in (key, value, key_cache, value_cache)))


def cache_write_esimd_launch(key, value, key_cache, value_cache, slot_mapping,
                             desc: KVCacheDescriptor) -> Launch:
    """The ESIMD twin: one work-item per (token, head), a group per token."""
    raw = RAW[desc.cache_dtype.itemsize]
    idx = "int32_t" if _fits32(desc, key, value) else "int64_t"
    spec = esimd_spec(raw, desc.head_size_k, desc.head_size_v, INDEX[slot_mapping.dtype], idx)
    k, v = desc.k, desc.v
    args = [
        ("ptr", key, False), ("ptr", value, False), ("ptr", key_cache, True), ("ptr", value_cache, True),
        ("ptr", _dense(slot_mapping), False),
        *[("i64", n, False) for n in (key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                                      desc.num_kv_heads, desc.block_size, desc.num_blocks,
                                      k.block, k.token, k.head,
                                      v.block, v.token, v.head)],
    ]
    return Launch(spec, args, slot_mapping.shape[0], desc.num_kv_heads)


def cache_write_launch(key, value, key_cache, value_cache, slot_mapping,
                       desc: KVCacheDescriptor, esimd: bool = False) -> Launch:
    """``reshape_and_cache_flash``: one group per slot_mapping entry (extra key rows ignored).
    ``esimd=True`` picks the ESIMD twin where it applies (XPU only)."""
    if esimd and esimd_eligible(key, value, key_cache, value_cache, desc):
        return cache_write_esimd_launch(key, value, key_cache, value_cache, slot_mapping, desc)
    in_p, cache_p, quant = _elements(key.dtype, desc)
    idx = "int32_t" if _fits32(desc, key, value) else "int64_t"
    spec = write_spec("cache_write", in_p, cache_p, quant, INDEX[slot_mapping.dtype], idx)
    k, v = desc.k, desc.v
    ks, vs = (_dense(desc.k_scale), _dense(desc.v_scale)) if quant else (None, None)
    slot_mapping = _dense(slot_mapping)
    args = [
        ("ptr", key, False), ("ptr", value, False), ("ptr", key_cache, True), ("ptr", value_cache, True),
        ("ptr", slot_mapping, False), ("ptr", ks, False), ("ptr", vs, False),
        ("i64", key.stride(0), False), ("i64", key.stride(1), False),
        ("i64", value.stride(0), False), ("i64", value.stride(1), False),
        ("i64", desc.num_kv_heads, False), ("i64", desc.head_size_k, False), ("i64", desc.head_size_v, False),
        ("i64", desc.block_size, False), ("i64", desc.num_blocks, False),  # slots past the cache: dropped
        *[("i64", s, False) for s in k.as_tuple()], *[("i64", s, False) for s in v.as_tuple()],
        *[("i64", int(quant and kind == "head"), False) for kind in desc.scale_kinds],
    ]
    wg = _write_group(desc.num_kv_heads * max(desc.head_size_k, desc.head_size_v))
    return Launch(spec, args, slot_mapping.shape[0], wg)


def mla_write_launch(kv_c, k_pe, kv_cache, slot_mapping, desc: KVCacheDescriptor) -> Launch:
    in_p, cache_p, quant = _elements(kv_c.dtype, desc)
    idx = "int32_t" if _fits32(desc, kv_c, k_pe) else "int64_t"
    spec = write_spec("concat_and_cache_mla", in_p, cache_p, quant, INDEX[slot_mapping.dtype], idx)
    slot_mapping = _dense(slot_mapping)
    args = [
        ("ptr", kv_c, False), ("ptr", k_pe, False), ("ptr", kv_cache, True), ("ptr", slot_mapping, False),
        ("ptr", _dense(desc.k_scale) if quant else None, False),
        ("i64", kv_c.stride(0), False), ("i64", k_pe.stride(0), False),
        ("i64", kv_c.shape[1], False), ("i64", k_pe.shape[1], False), ("i64", desc.block_size, False),
        ("i64", desc.num_blocks, False), ("i64", desc.k.block, False), ("i64", desc.k.token, False),
    ]
    return Launch(spec, args, slot_mapping.shape[0], _write_group(desc.head_size_k))


def _elem(dtype: torch.dtype) -> str:
    return PLAIN.get(dtype) or FP8[dtype]


def _descale_steps(t: Optional[torch.Tensor]):
    """(per-sequence, per-head) element steps of a descale: one element, or [batch, kv_heads]."""
    if t is None or t.numel() == 1:
        return 0, 0
    return t.stride(0), t.stride(1)


# s_aux element types the attention kernel reads (its sink_dtype argument)
SINK_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def attention_launch(q, k, v, out, desc: KVCacheDescriptor, args: AttentionArgs) -> Launch:
    """One group per (row of q, kv head, GT of its query heads); rows past ``cu_seqlens_q[-1]``
    return at once. ``args.num_splits`` needs nothing: the kernel never splits a row's keys, which
    satisfies every value (0 automatic, 1 none, n at most n)."""
    hq, hkv = q.shape[1], desc.num_kv_heads
    gt = heads_per_group(hq // hkv)
    spec = attention_spec(_elem(q.dtype), _elem(desc.cache_dtype), _elem(out.dtype), desc.head_size_k,
                          desc.head_size_v, gt, "int32_t" if _fits32(desc) else "int64_t")
    bt = args.block_table
    if bt is not None and bt.stride(1) != 1:
        bt = bt.contiguous()
    # ALiBi slopes [Hq] or [batch, Hq], sinks [Hq] (float32 / half / bf16, read as stored) and
    # the LSE [Hq, total_q] are addressed through their strides: never copied
    alibi, sink, lse = args.alibi_slopes, args.s_aux, args.softmax_lse
    if alibi is None:
        al_steps = (0, 0)
    elif alibi.dim() == 1:
        al_steps = (0, alibi.stride(0))
    else:
        al_steps = (alibi.stride(0), alibi.stride(1))
    a = [
        ("ptr", q, False), ("ptr", k, False), ("ptr", v, False), ("ptr", out, True),
        ("ptr", _dense(args.cu_seqlens_q), False), ("ptr", _dense(args.cu_seqlens_k), False),
        ("ptr", _dense(args.seqused_k), False),
        ("ptr", bt, False), ("ptr", args.q_descale, False), ("ptr", args.k_descale, False),
        ("ptr", args.v_descale, False),
        ("i64", q.stride(0), False), ("i64", q.stride(1), False),
        ("i64", out.stride(0), False), ("i64", out.stride(1), False),
        *[("i64", s, False) for s in desc.k.as_tuple()], *[("i64", s, False) for s in desc.v.as_tuple()],
        ("i64", bt.stride(0) if bt is not None else 0, False), ("i64", desc.block_size, False),
        # in-kernel bounds: block ids clamped to [0, num_blocks), seqused_k to the block table's
        # max_blocks_per_seq * block_size (non-paged: block_size is total_k, the one block's rows)
        ("i64", desc.num_blocks, False), ("i64", bt.shape[1] if bt is not None else 0, False),
        ("i32", args.batch, False), ("i32", hq, False), ("i32", hq // hkv, False),
        ("i32", 1 if bt is not None else 0, False),
        ("f32", float(args.softmax_scale), False), ("f32", float(args.softcap), False),
        ("i32", args.window_left, False), ("i32", args.window_right, False),
        *[("i64", s, False) for t in (args.q_descale, args.k_descale, args.v_descale)
          for s in _descale_steps(t)],
        # engine extras: null pointers switch them off (no extra instantiations)
        ("ptr", alibi, False), ("ptr", sink, False), ("ptr", lse, True),
        ("i64", al_steps[0], False), ("i64", al_steps[1], False),
        ("i64", sink.stride(0) if sink is not None else 0, False),
        ("i32", SINK_DTYPES[sink.dtype] if sink is not None else 0, False),
        ("i64", lse.stride(0) if lse is not None else 0, False),
        ("i64", lse.stride(1) if lse is not None else 0, False),
    ]
    tiles = -(-(hq // hkv) // gt)
    return Launch(spec, a, q.shape[0] * hkv * tiles, ATTENTION_WG)


# -- the ahead-of-time build's instantiations ------------------------------------------------------
# (head_size_k, head_size_v) pairs the AOT attention kernels are built for; KVDISPATCH_XPU_HEAD_SIZES
# ("64x64,128x128,...") overrides. 576x512 is MLA (DeepSeek): V is a slice of the latent row.
DEFAULT_AOT_HEAD_SIZES = ((64, 64), (80, 80), (96, 96), (128, 128), (192, 192), (256, 256),
                          (192, 128), (576, 512))


def aot_specs(head_sizes=DEFAULT_AOT_HEAD_SIZES) -> list:
    """Every instantiation the SyclExtension build compiles: all writes (element copy of 1/2/4-byte
    elements, or quantization from float/half/bf16 to each fp8 kind; int32/int64 slots; 32/64-bit
    offsets) and their ESIMD twins per head-size pair, and attention for q = out in
    float/half/bf16 over a cache of the same type, bf16/half q over any fp8 kind, fp8 q (the
    cache's kind) with a bf16/half out, for each head-size pair, heads-per-group size and offset
    width."""
    specs = []
    writes = [(RAW[n], RAW[n], False) for n in sorted(RAW)]
    writes += [(PLAIN[i], FP8[f], True) for i in PLAIN for f in FP8]
    for family in ("cache_write", "concat_and_cache_mla"):
        for in_p, cache_p, quant in writes:
            for slot in ("int32_t", "int64_t"):
                for idx in ("int32_t", "int64_t"):
                    specs.append(write_spec(family, in_p, cache_p, quant, slot, idx))
    for dk, dv in head_sizes:
        for n in sorted(RAW):
            if dk * n % 16 or dv * n % 16:
                continue
            for slot in ("int32_t", "int64_t"):
                for idx in ("int32_t", "int64_t"):
                    specs.append(esimd_spec(RAW[n], dk, dv, slot, idx))
    half = (torch.bfloat16, torch.float16)
    combos = [(PLAIN[t], PLAIN[t], PLAIN[t]) for t in PLAIN]
    combos += [(PLAIN[t], kv, PLAIN[t]) for t in half for kv in FP8.values()]
    combos += [(FP8[f], FP8[f], PLAIN[o]) for f in FP8 for o in half]
    for dk, dv in head_sizes:
        # MLA (Dv < Dk, one kv head) always has many query heads per kv head
        for gt in ((8,) if (dk, dv) == (576, 512) else (1, 4, 8)):
            for qe, kve, oe in combos:
                for idx in ("int32_t", "int64_t"):
                    specs.append(attention_spec(qe, kve, oe, dk, dv, gt, idx))
    return specs


def aot_table(specs) -> str:
    """The body of csrc/xpu_ops.sycl's launcher table (kvx_aot_kernels.inc)."""
    lines = []
    for sp in specs:
        fn = FAMILIES[sp.family][1]
        if sp.is_esimd:
            # g++'s host-side check of this file cannot parse the ESIMD headers (clang vector
            # extensions); the run-time compiler checks these instead (tests/xpu/test_xpu_build.py)
            lines.append("#ifndef KVX_HOST_SYNTAX_CHECK")
            lines.append(f'{{"{sp.name}", KVX_AOT_ESIMD_LAUNCHER({fn}, {", ".join(sp.template_args)})}},')
            lines.append("#endif")
        else:
            lines.append(f'{{"{sp.name}", KVX_AOT_LAUNCHER({fn}, {", ".join(sp.template_args)})}},')
    return "\n".join(lines) + "\n"
