"""Capabilities declared, selection decides: ``Backend`` declarations filtered by ``Registry.explain``
(with the reason) before ``supports()``; the platform's answers (fp8 types, native conversions,
interpreter mode); the descriptor's derived facts that backends use."""

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import ops, platform
from kvdispatch import registry as reg
from kvdispatch.descriptor import INT32_MAX, KVCacheDescriptor, max_offset
from kvdispatch.platform import Platform

CPU = Platform(name="cpu", device_type="cpu")
OP = "flash_attn_varlen_func"


class Declaring(kvd.Backend):
    name, priority, platforms, ops = "declaring", 900, ("cpu",), reg.OPS
    dtypes = (torch.bfloat16,)
    kv_cache_dtypes = (torch.bfloat16, torch.float8_e4m3fn)
    block_sizes = (16, 32)
    head_sizes = range(64, 129)
    layouts = {OP: ("NHD",)}  # per op: the writes take any layout

    def __init__(self):
        self.asked = []

    def supports(self, op, desc, platform):
        self.asked.append(op)
        return None


class Undeclared(kvd.Backend):
    """A third-party backend from before the declarations: its own supports() still decides."""
    name, priority, platforms, ops = "undeclared", 800, ("cpu",), reg.OPS

    def supports(self, op, desc, platform):
        return None if desc is None or desc.block_size == 16 else "block size 16 only"


@pytest.fixture
def plugins():
    backends = [Declaring(), Undeclared()]

    class Plugin:
        @kvd.hookimpl
        def kvdispatch_backends(self):
            return backends

    p = Plugin()
    reg.registry.register(p, name="test-capabilities")
    yield backends
    reg.registry.unregister(p)


def _desc(bs=16, d=128, dtype=torch.bfloat16, hnd=False):
    if hnd:
        k = torch.zeros(4, 2, bs, d, dtype=dtype).permute(0, 2, 1, 3)
        return KVCacheDescriptor.from_tensors(k, torch.zeros(4, 2, bs, d, dtype=dtype).permute(0, 2, 1, 3))
    return KVCacheDescriptor.from_tensors(torch.zeros(4, bs, 2, d, dtype=dtype), torch.zeros(4, bs, 2, d, dtype=dtype))


def _why(op, desc=None, dtype=None):
    return {b.name: r for b, r in reg.registry.explain(op, CPU, desc, dtype=dtype)}


def test_declarations_filter_before_supports_and_name_what_was_declined(plugins):
    declaring = plugins[0]
    assert reg.registry.select(OP, CPU, _desc(), dtype=torch.bfloat16).name == "declaring"
    cases = [
        (dict(dtype=torch.float16), "dtypes bfloat16: not float16"),
        (dict(desc=_desc(dtype=torch.float16)), "kv cache dtypes bfloat16, float8_e4m3fn: not float16"),
        (dict(desc=_desc(bs=8)), "block sizes 16, 32: not 8"),
        (dict(desc=_desc(d=32)), "head sizes 64..128: not 32"),
        (dict(desc=_desc(hnd=True)), "layouts NHD: not HND"),
    ]
    for kw, reason in cases:
        declaring.asked.clear()
        assert _why(OP, **kw)["declaring"] == f"declares {reason}", kw
        assert declaring.asked == []  # declined before its supports() was asked
    # a dict declares per op: the write takes the HND cache the attention declaration excludes
    assert _why("reshape_and_cache_flash", _desc(hnd=True))["declaring"] is None


def test_no_declarations_take_anything_and_supports_still_decides(plugins):
    assert _why(OP, _desc(bs=16), torch.float16)["undeclared"] is None
    assert _why(OP, _desc(bs=8), torch.float16)["undeclared"] == "block size 16 only"
    assert reg.registry.select(OP, CPU, _desc(bs=16), dtype=torch.float16).name == "undeclared"
    assert reg.registry.select(OP, CPU, _desc(bs=8), dtype=torch.float16).name == "reference"
    # without a dtype (select_backend, callers that do not pass one) dtypes are not filtered on
    assert reg.registry.select(OP, CPU, _desc(bs=16)).name == "declaring"
    assert kvd.select_backend(OP, "cpu") == "declaring"


def test_selection_is_cached_per_dtype(plugins):
    desc = _desc()
    a = reg.registry.select(OP, CPU, desc, dtype=torch.bfloat16)
    b = reg.registry.select(OP, CPU, desc, dtype=torch.float32)
    assert (a.name, b.name) == ("declaring", "undeclared")
    assert reg.registry.select(OP, CPU, desc, dtype=torch.bfloat16) is a


def test_public_call_signature_selects_with_its_dtype(plugins, monkeypatch):
    """``ops._Call.select`` hands the signature's dtype to the registry, and re-selects when the
    registered backends change."""
    monkeypatch.delenv("KVDISPATCH_BACKEND", raising=False)
    call = ops._Call(_desc())
    assert call.select(OP, torch.float16).name == "undeclared"
    assert call.select(OP, torch.float16).name == "undeclared"  # kept
    reg.registry.clear_selection()
    assert ops._Call(_desc()).select(OP, torch.bfloat16).name == "declaring"


def test_no_backend_error_names_the_declared_dtypes(plugins, monkeypatch):
    monkeypatch.setenv("KVDISPATCH_BACKEND", "declaring")
    with pytest.raises(kvd.NoBackendError, match="declares dtypes bfloat16: not float16") as e:
        reg.registry.select(OP, CPU, _desc(), dtype=torch.float16)
    assert "with torch.float16 inputs" in str(e.value)


def test_builtin_declarations():
    triton = reg.registry.get("triton")
    assert torch.float64 not in triton.dtypes and torch.float8_e4m3fnuz in triton.kv_cache_dtypes
    assert 1024 in triton.head_sizes[OP] and 1025 not in triton.head_sizes[OP]
    assert triton.layouts["concat_and_cache_mla"] == ("mla",) and "head-major" not in triton.layouts[OP]
    sycl = reg.registry.get("sycl-cpu")
    assert torch.float8_e5m2 in sycl.dtypes[OP] and "reshape_and_cache_flash" not in sycl.kv_cache_dtypes
    ref = reg.registry.get("reference")
    assert all(getattr(ref, a) is None for a in ("dtypes", "kv_cache_dtypes", "block_sizes", "head_sizes",
                                                 "layouts"))


# -- the platform's answers -----------------------------------------------------------------------
def _rocm(arch):
    return Platform(name="rocm", device_type="cuda", arch=arch)


def test_fp8_dtype_per_kind():
    for p, e4m3 in ((_rocm("gfx942"), torch.float8_e4m3fnuz), (_rocm("gfx940"), torch.float8_e4m3fnuz),
                    (_rocm("gfx950"), torch.float8_e4m3fn), (CPU, torch.float8_e4m3fn)):
        assert p.fp8_dtype("e4m3") == p.fp8_dtype("fp8_e4m3") == p.fp8_e4m3_dtype == e4m3
        assert p.fp8_dtype("e5m2") == torch.float8_e5m2
    assert _rocm("gfx942").fnuz and not _rocm("gfx950").fnuz and not CPU.fnuz


def test_native_fp8_conversions():
    """Triton's lowering: NVIDIA cvt for e4m3fn / e5m2 from sm89; AMD fnuz on CDNA3 (gfx94x), OCP on
    CDNA4 (gfx950) and gfx1250; everything else emulated (never native)."""
    e4, fnuz, e5 = torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2

    def native(p):
        return {d for d in (e4, fnuz, e5) if p.native_fp8(d)}

    nv = lambda cc: Platform(name="nvidia", device_type="cuda", arch="sm", capability=cc)  # noqa: E731
    assert native(nv((8, 0))) == set() and native(nv((8, 9))) == native(nv((9, 0))) == {e4, e5}
    assert native(_rocm("gfx942")) == {fnuz} and native(_rocm("gfx942:sramecc+:xnack-")) == {fnuz}
    assert native(_rocm("gfx950")) == native(_rocm("gfx1250")) == {e4, e5}
    assert native(_rocm("gfx90a")) == native(_rocm("gfx1100")) == native(CPU) == set()
    assert not CPU.native_fp8(torch.bfloat16)


def test_kernels_ask_the_platform(monkeypatch):
    pytest.importorskip("triton")
    from kvdispatch.backends.triton import attention, backend, write
    gfx950 = _rocm("gfx950")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not platform.interpreting() and not Platform.interpreting()
    assert write._fp8_mode(gfx950, torch.float8_e5m2) == write.NATIVE_FP8  # one rule for both kernels
    assert attention._mode(torch.float8_e5m2, gfx950, False) == attention.FP8_NATIVE
    assert attention._mode(torch.float8_e4m3fn, _rocm("gfx90a"), False) == attention.FP8_E4M3_BITS
    assert write._fp8_mode(_rocm("gfx90a"), torch.float8_e4m3fn) == write.SOFT_FP8
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert platform.interpreting() and write._interpreting() and attention._interpreting()
    assert backend.interpreting() and write._fp8_mode(gfx950, torch.float8_e5m2) == write.SOFT_FP8


# -- the descriptor's facts -----------------------------------------------------------------------
def test_descriptor_facts_backends_use():
    k = torch.zeros(4, 16, 2, 64)
    one, per_head = torch.ones(1), torch.ones(2)
    d = KVCacheDescriptor.from_tensors(k.to(torch.uint8), k.to(torch.uint8), "fp8", one, per_head)
    assert d.scale_kinds == ("tensor", "head") and d.scale_kind == "head"
    assert KVCacheDescriptor.from_tensors(k, k).scale_kinds == ("none", "none")
    assert d.packed and d.heads_contiguous and d.max_offset == max_offset(k) == k.numel() - 1
    combined = torch.zeros(4, 2, 16, 2, 64)
    c = KVCacheDescriptor.from_tensors(combined[:, 0], combined[:, 1])
    assert c.layout == "combined" and c.heads_contiguous and not c.packed
    hnd = torch.zeros(4, 2, 16, 64).permute(0, 2, 1, 3)
    assert not KVCacheDescriptor.from_tensors(hnd, hnd).heads_contiguous
    big = torch.empty_strided((2, 16, 8, 128), (2**31, 1024, 128, 1), dtype=torch.bfloat16, device="meta")
    b = KVCacheDescriptor.from_tensors(big, big)
    assert b.max_offset > INT32_MAX and not b.int32_offsets
