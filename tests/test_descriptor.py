"""KVCacheDescriptor on every layout: real strides, the addressing formula, flags, int32 safety."""

import pytest
import torch

from kvdispatch import KVCacheDescriptor
from kvdispatch.descriptor import INT32_MAX
from kvbench.layouts import LAYOUTS, make_kv_cache, make_mla_cache

EXPECTED_NAME = {"NHD": "NHD", "HND": "HND", "combined": "combined", "combined-HND": "HND",
                 "cross-layer": "cross-layer", "diffkv": "diffkv", "head-major": "head-major"}


def _addr_of_element(t, idx):
    return sum(i * s for i, s in zip(idx, t.stride()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_formula_matches_tensor_indexing(layout, dtype):
    nb, bs, h, d = 5, 16, 4, 64
    dv = 32 if layout == "diffkv" else None
    k, v = make_kv_cache(layout, nb, bs, h, d, dv, dtype=dtype, fill=False)
    desc = KVCacheDescriptor.from_tensors(k, v)
    assert desc.layout == EXPECTED_NAME[layout]
    assert (desc.num_blocks, desc.block_size, desc.num_kv_heads) == (nb, bs, h)
    assert (desc.head_size_k, desc.head_size_v) == (d, dv or d)
    assert desc.packed == (layout == "NHD")
    assert desc.int32_offsets
    for blk, tok, head, dim in [(0, 0, 0, 0), (4, 15, 3, 63), (2, 7, 1, 9), (3, 1, 2, 17)]:
        for cache, strides, dsz in ((k, desc.k, d), (v, desc.v, dv or d)):
            dim = dim % dsz
            if layout == "head-major" and cache is k:
                x = strides.x
                idx = (blk, head, dim // x, tok, dim % x)
            elif layout == "head-major":
                idx = (blk, head, dim, tok)
            else:
                idx = (blk, tok, head, dim)
            assert strides.offset(blk, tok, head, dim) == _addr_of_element(cache, idx)
    if layout == "head-major":
        assert desc.k.x == 16 // k.element_size() and desc.v.x == 1


def test_mla_descriptor():
    c = make_mla_cache(7, 16, 512, 64, padded=True, fill=False)
    desc = KVCacheDescriptor.from_tensors(c, None)
    assert desc.is_mla and desc.layout == "mla" and desc.head_size_k == 576 and not desc.packed
    assert desc.k.offset(3, 5, 0, 100) == 3 * c.stride(0) + 5 * c.stride(1) + 100
    assert KVCacheDescriptor.from_tensors(make_mla_cache(2, 16, fill=False), None).packed


def test_repr_names_layout_and_strides():
    k, v = make_kv_cache("HND", 4, 16, 2, 64, fill=False)
    r = repr(KVCacheDescriptor.from_tensors(k, v))
    assert "layout='HND'" in r and str(k.stride()[:3]).strip("()") in r.replace("(", "").replace(")", "") or "k_strides" in r
    assert f"k_strides=({k.stride(0)}, {k.stride(1)}, {k.stride(2)}, 64, 64)" in r


def test_key_is_hashable_tensor_free_and_cached():
    k, v = make_kv_cache("NHD", 4, 16, 2, 64, dtype=torch.uint8, fill=False)
    ks, vs = torch.ones(1), torch.ones(2)
    d1 = KVCacheDescriptor.from_tensors(k, v, "fp8", ks, vs)
    d2 = KVCacheDescriptor.from_tensors(k, v, "fp8", ks, vs)
    assert d1 is d2  # cached: per-call construction is a dict lookup
    hash(d1.key)
    assert not any(isinstance(x, torch.Tensor) for x in _walk(d1.key))
    assert d1.cache_dtype == torch.float8_e4m3fn and d1.fp8 == "e4m3" and d1.scale_kind == "head"
    d3 = KVCacheDescriptor.from_tensors(k, v, "fp8", torch.ones(1), torch.ones(1))
    assert d3.key != d1.key and d3.scale_kind == "tensor" and d3.k_scale is not ks
    other_k, other_v = make_kv_cache("NHD", 4, 16, 2, 64, dtype=torch.uint8, fill=False)
    assert KVCacheDescriptor.from_tensors(other_k, other_v, "fp8", ks, vs).key == d1.key


def _walk(x):
    if isinstance(x, tuple):
        for y in x:
            yield from _walk(y)
    else:
        yield x


def test_fp8_kinds():
    k, v = make_kv_cache("NHD", 2, 16, 1, 64, dtype=torch.uint8, fill=False)
    one = torch.ones(1)
    assert KVCacheDescriptor.from_tensors(k, v, "fp8_e5m2", one, one).cache_dtype == torch.float8_e5m2
    k8, v8 = make_kv_cache("NHD", 2, 16, 1, 64, dtype=torch.float8_e4m3fnuz, fill=False)
    d = KVCacheDescriptor.from_tensors(k8, v8, "fp8", one, one)
    assert d.cache_dtype == torch.float8_e4m3fnuz
    auto = KVCacheDescriptor.from_tensors(k8, v8)
    assert auto.fp8 == "e4m3" and auto.scale_kind == "none"


def test_fp8_on_rocm_mi300_means_fnuz(monkeypatch):
    from kvdispatch import descriptor, platform
    mi300 = platform.Platform(name="rocm", device_type="cuda", arch="gfx942")
    monkeypatch.setattr(descriptor, "platform_of", lambda t: mi300)
    k, v = make_kv_cache("NHD", 2, 16, 1, 64, dtype=torch.uint8, fill=False)
    KVCacheDescriptor._cache.clear()
    d = KVCacheDescriptor.from_tensors(k, v, "fp8", torch.ones(1), torch.ones(1))
    KVCacheDescriptor._cache.clear()
    assert d.cache_dtype == torch.float8_e4m3fnuz
    assert platform.Platform(name="rocm", device_type="cuda", arch="gfx950").fp8_e4m3_dtype == torch.float8_e4m3fn


def test_int32_safety_from_strides_not_allocation():
    # A view whose offsets exceed int32, without allocating: meta tensors carry strides only
    k = torch.empty_strided((2, 16, 8, 128), (2**31, 1024, 128, 1), dtype=torch.bfloat16, device="meta")
    desc = KVCacheDescriptor.from_tensors(k, k)
    assert not desc.int32_offsets
    small = torch.empty_strided((2, 16, 8, 128), (INT32_MAX // 4, 1024, 128, 1), dtype=torch.bfloat16,
                                device="meta")
    assert KVCacheDescriptor.from_tensors(small, small).int32_offsets
