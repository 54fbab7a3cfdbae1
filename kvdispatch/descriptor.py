"""``KVCacheDescriptor``: the one description of a paged KV cache that every backend consumes. Every layout (4-D in
any memory order, vLLM's 5-D head-major key cache, the 3-D MLA latent cache) is addressed by one formula over five
numbers per cache (K and V each)::

    offset(block, token, head, d) = block*s_block + token*s_token + head*s_head + (d // x)*s_chunk + d % x

``x`` is the head size for 4-D caches (``d // x == 0``), 16 bytes for the head-major key, 1 for its value. The strides
are the tensors' REAL strides (in elements), never assumed from a layout name, so a kernel that addresses through them
cannot write to the wrong place on a permuted view.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .platform import platform_of

__all__ = ["KVCacheDescriptor", "CacheStrides", "FP8_DTYPES", "LAYOUTS_4D", "INT32_MAX", "max_offset",
           "normalize_kv_cache_dtype"]

INT32_MAX = 2**31 - 1
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)
LAYOUTS_4D = ("NHD", "HND", "combined", "cross-layer", "diffkv", "strided")  # the others: head-major, mla
_FP8_NAMES = {torch.float8_e4m3fn: "e4m3", torch.float8_e4m3fnuz: "e4m3", torch.float8_e5m2: "e5m2"}
_KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def normalize_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """``"auto"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``; raises ValueError naming the argument otherwise."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {sorted(_KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    return _KV_CACHE_DTYPES[kv_cache_dtype]


@dataclass(frozen=True)
class CacheStrides:
    """Real element strides of one cache (K or V) for the addressing formula."""

    block: int
    token: int
    head: int
    chunk: int
    x: int

    def offset(self, block: int, token: int, head: int, d: int) -> int:
        return block * self.block + token * self.token + head * self.head + (d // self.x) * self.chunk + d % self.x

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.block, self.token, self.head, self.chunk, self.x)


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset ``t`` addresses (from its real strides)."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)


def _check_sizes(name: str, block_size: int, heads: int, head_size: int) -> None:
    for what, n in (("block_size", block_size), ("num_kv_heads", heads), ("head_size", head_size)):
        if n < 1:
            raise ValueError(f"{name}: {what} must be >= 1, got {n}")


def _check_last_dim(t: torch.Tensor, name: str) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride(-1) == 1), "
                         f"got strides {tuple(t.stride())}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported, got {tuple(t.stride())}")


def _check_scale(scale, name: str, num_heads: int, device: torch.device) -> str:
    """The scale kind ("tensor" or "head"); raises on anything unusable."""
    if scale is None:
        raise ValueError(f"{name}: an fp8 kv_cache_dtype needs a float32 scale tensor, got None")
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the cache's device), got {scale.device}")
    if scale.numel() == 1:
        return "tensor"
    if scale.numel() == num_heads and scale.dim() == 1:
        return "head"
    raise ValueError(f"{name}: expected one element (per-tensor) or shape [{num_heads}] (per kv head), "
                     f"got shape {tuple(scale.shape)}")


class KVCacheDescriptor:
    """Layout, real strides and fp8 scales of a paged KV cache; build it with :meth:`from_tensors`.

    Fields: ``layout`` (for humans: one of ``LAYOUTS_4D``, "head-major", "mla"), ``num_blocks``, ``block_size``,
    ``num_kv_heads``, ``head_size_k``, ``head_size_v``, ``storage_dtype`` (the tensor's, maybe uint8), ``cache_dtype``
    (the element type kernels read and write, fp8 resolved), ``kv_cache_dtype`` (canonical), ``fp8`` (None, "e4m3",
    "e5m2"), ``k`` / ``v`` (:class:`CacheStrides`; ``v`` is None for MLA), ``scale_kinds`` (K's and V's: "none",
    "tensor", "head"; ``scale_kind`` is "head" if either is), ``packed`` (K and V packed-contiguous NHD: the fast
    path), ``heads_contiguous`` (each token's heads one contiguous row in K and V), ``max_offset`` (of either cache),
    ``int32_offsets`` (it fits in int32), ``key`` (hashable, no tensors); per instance ``k_scale``, ``v_scale``,
    ``device``, ``platform``. ``desc.write(key, value, key_cache, value_cache, slot_mapping)`` (attached by
    ``ops.py``) is ``reshape_and_cache_flash`` with the descriptor's kv_cache_dtype and scales.

    The scales are held WEAKLY: descriptors are cached for the life of the process and must not keep dropped tensors
    alive. Keep the scales alive while you use a descriptor (engines hold them as layer buffers); once one is freed,
    ``k_scale`` / ``v_scale`` read None and the next call builds a new one.
    """

    __slots__ = ("layout", "num_blocks", "block_size", "num_kv_heads", "head_size_k", "head_size_v", "storage_dtype",
                 "cache_dtype", "kv_cache_dtype", "fp8", "k", "v", "scale_kind", "scale_kinds", "packed",
                 "heads_contiguous", "max_offset", "int32_offsets", "key", "device", "platform", "_k_scale", "_v_scale")
    _cache: dict = {}
    _CACHE_LIMIT = 4096

    @classmethod
    def from_tensors(cls, key_cache: torch.Tensor, value_cache: Optional[torch.Tensor], kv_cache_dtype: str = "auto",
                     k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
                     ) -> "KVCacheDescriptor":
        """Describe ``key_cache`` / ``value_cache`` (``value_cache=None``: the MLA latent cache); raises
        ValueError/TypeError naming the argument for anything a backend could not address. Cached by the
        tensors' metadata and the scales' identity: calling it on every step costs a dict lookup."""
        if not isinstance(key_cache, torch.Tensor):
            raise TypeError(f"key_cache: expected a tensor, got {type(key_cache).__name__}")
        if kv_cache_dtype.__class__ is not str:
            normalize_kv_cache_dtype(kv_cache_dtype)  # raises, naming the argument
        vc = value_cache
        # "auto" ignores scales (vLLM always passes its layer's): keep them out of the key so such calls hit one entry
        ks, vs = (None, None) if kv_cache_dtype == "auto" else (k_scale, v_scale)
        ck = (key_cache.shape, key_cache.stride(), key_cache.dtype, key_cache.device,
              None if vc is None else (vc.shape, vc.stride(), vc.dtype, vc.device)
              if isinstance(vc, torch.Tensor) else type(vc), kv_cache_dtype, id(ks), id(vs))
        d = cls._cache.get(ck)
        if d is not None and d.k_scale is ks and d.v_scale is vs:
            return d
        d = cls._build(key_cache, value_cache, kv_cache_dtype, k_scale, v_scale)
        if len(cls._cache) >= cls._CACHE_LIMIT:
            cls._cache.clear()
        cls._cache[ck] = d
        return d

    @classmethod
    def _build(cls, kc, vc, kv_cache_dtype, k_scale, v_scale) -> "KVCacheDescriptor":
        kind = normalize_kv_cache_dtype(kv_cache_dtype)
        _check_last_dim(kc, "key_cache")
        d = object.__new__(cls)
        d.device, d.platform = kc.device, platform_of(kc)
        if vc is None:  # MLA latent cache [blocks, block_size, kv_lora_rank + rope_dim]
            if kc.dim() != 3:
                raise ValueError("kv_cache: the MLA latent cache must be 3-D [num_blocks, block_size, "
                                 f"kv_lora_rank + rope_dim], got shape {tuple(kc.shape)}")
            (nb, bs, dk), h, dv = kc.shape, 1, 0
            _check_sizes("kv_cache", bs, h, dk)
            d.layout, d.packed, d.k, d.v = "mla", kc.is_contiguous(), CacheStrides(*kc.stride()[:2], 0, dk, dk), None
        else:
            if not isinstance(vc, torch.Tensor):
                raise TypeError(f"value_cache: expected a tensor, got {type(vc).__name__}")
            _check_last_dim(vc, "value_cache")
            if vc.device != kc.device:
                raise ValueError(f"value_cache: expected the key_cache's device {kc.device}, got {vc.device}")
            if vc.dtype != kc.dtype:
                raise TypeError(f"value_cache: expected the key_cache's dtype {kc.dtype}, got {vc.dtype}")
            if kc.dim() not in (4, 5):
                raise ValueError("key_cache: expected 4-D [num_blocks, block_size, num_kv_heads, head_size], "
                                 "5-D head-major [num_blocks, num_kv_heads, head_size // x, block_size, x], "
                                 f"or 3-D MLA with value_cache=None; got shape {tuple(kc.shape)}")
            if vc.dim() != 4:
                want = ("[num_blocks, num_kv_heads, head_size, block_size] with a 5-D head-major key_cache"
                        if kc.dim() == 5 else "[num_blocks, block_size, num_kv_heads, head_size] like key_cache")
                raise ValueError(f"value_cache: expected 4-D {want}, got shape {tuple(vc.shape)}")
            if kc.dim() == 5:  # head-major: key [blocks, H, D // x, bs, x], value [blocks, H, D, bs]
                (nb, h, nchunk, bs, x), (vnb, vh, dv, vbs) = kc.shape, vc.shape
                d.layout, dk, d.packed = "head-major", nchunk * x, False
                d.k = CacheStrides(block=kc.stride(0), token=kc.stride(3), head=kc.stride(1), chunk=kc.stride(2), x=x)
                d.v = CacheStrides(block=vc.stride(0), token=vc.stride(3), head=vc.stride(1), chunk=vc.stride(2), x=1)
            else:
                (nb, bs, h, dk), (vnb, vbs, vh, dv) = kc.shape, vc.shape
                d.k, d.v = (CacheStrides(*t.stride()[:3], chunk=t.shape[3], x=t.shape[3]) for t in (kc, vc))
                d.packed = kc.is_contiguous() and vc.is_contiguous()
                d.layout = _name_4d(d.k, bs, h, dk, dv, d.packed)
            if (vnb, vbs, vh) != (nb, bs, h):
                raise ValueError("value_cache: expected the key_cache's num_blocks, block_size and num_kv_heads "
                                 f"{(nb, bs, h)}, got {(vnb, vbs, vh)}")
            _check_sizes("key_cache", bs, h, dk)
            _check_sizes("value_cache", bs, h, dv)
        d.num_blocks, d.block_size, d.num_kv_heads, d.head_size_k, d.head_size_v = nb, bs, h, dk, dv
        d.storage_dtype = d.cache_dtype = kc.dtype
        d.kv_cache_dtype, d.fp8 = kind, _FP8_NAMES.get(kc.dtype)
        if kc.dtype == torch.uint8:
            if kind == "auto":
                raise TypeError("kv_cache_dtype: 'auto' cannot read a uint8 cache; say 'fp8_e4m3' or 'fp8_e5m2'")
            d.cache_dtype, d.fp8 = d.platform.fp8_dtype(kind), kind[4:]
        elif kind != "auto" and d.fp8 != kind[4:]:
            raise TypeError(f"{'kv_cache' if vc is None else 'key_cache'}: kv_cache_dtype={kind!r} needs a cache "
                            f"of an fp8 {kind[4:]} dtype or a uint8 view, got {kc.dtype}")
        # scales: an explicit fp8 kv_cache_dtype needs them (the write quantizes); "auto" ignores them (it copies)
        ks = vs = "none"
        d._k_scale = d._v_scale = None
        if kind != "auto":
            ks = _check_scale(k_scale, "scale" if vc is None else "k_scale", d.num_kv_heads, kc.device)
            vs = "none" if vc is None else _check_scale(v_scale, "v_scale", d.num_kv_heads, kc.device)
            d._k_scale, d._v_scale = weakref.ref(k_scale), None if v_scale is None else weakref.ref(v_scale)
        d.scale_kinds, d.scale_kind = (ks, vs), "head" if "head" in (ks, vs) else ks
        d.heads_contiguous = vc is not None and all(s.x == n == s.head for s, n in ((d.k, dk), (d.v, dv)))
        d.max_offset = max(max_offset(t) for t in (kc, vc) if t is not None)
        d.int32_offsets = d.max_offset <= INT32_MAX
        d.key = (d.layout, d.num_blocks, d.block_size, d.num_kv_heads, d.head_size_k, d.head_size_v,
                 d.storage_dtype, d.cache_dtype, d.kv_cache_dtype, d.fp8, d.k.as_tuple(),
                 None if d.v is None else d.v.as_tuple(), d.scale_kinds, d.packed, d.int32_offsets, kc.device.type)
        return d

    k_scale = property(lambda self: self._k_scale and self._k_scale())  # weakly held: None once freed
    v_scale = property(lambda self: self._v_scale and self._v_scale())
    is_mla = property(lambda self: self.v is None)
    is_fp8 = property(lambda self: self.fp8 is not None)
    is_head_major = property(lambda self: self.layout == "head-major")

    def __repr__(self) -> str:
        v = "" if self.v is None else f", v_strides={self.v.as_tuple()}"
        fp8 = f", fp8={self.fp8}({self.cache_dtype}), scales={self.scale_kind}" if self.fp8 else ""
        return (f"KVCacheDescriptor(layout={self.layout!r}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_size={self.head_size_k}/{self.head_size_v}, "
                f"dtype={self.storage_dtype}{fp8}, k_strides={self.k.as_tuple()}{v} (block, token, head, chunk, x), "
                f"packed={self.packed}, int32_offsets={self.int32_offsets}, device={self.device})")

    def __eq__(self, other) -> bool:
        return (isinstance(other, KVCacheDescriptor) and self.key == other.key
                and self.k_scale is other.k_scale and self.v_scale is other.v_scale)

    def __hash__(self) -> int:
        return hash(self.key)


def _name_4d(k: CacheStrides, bs: int, h: int, dk: int, dv: int, packed: bool) -> str:
    if packed:
        return "NHD"
    if h > 1 and k.head > k.token:
        return "HND"
    if dk != dv:
        return "diffkv"
    page = bs * k.token
    if k.token == h * k.head and k.head == dk and k.block % page == 0 and k.block > page:
        return "combined" if k.block == 2 * page else "cross-layer"
    return "strided"
