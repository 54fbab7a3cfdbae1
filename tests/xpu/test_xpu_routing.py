"""Routing on XPU with a mocked platform (no Intel GPU here): xpu tensors go to ``xpu-sycl`` when the
extension is built, else to ``triton`` when Intel's Triton XPU backend is installed, else to the
reference; every decline has a reason ``kvdispatch info`` shows. One test runs the whole XPU path
end to end with the mocked platform, the extension's op replaced by the CPU lane."""

from __future__ import annotations

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import registry as reg
from kvdispatch.backends.triton import backend as triton_backend
from kvdispatch.backends.xpu import extension, kernels
from kvdispatch.descriptor import KVCacheDescriptor
from kvdispatch.platform import Platform
from kvbench.layouts import make_kv_cache

from matrix import WriteCase, attention_cases, force_backend, run_attention_case, run_write_case

XPU = Platform(name="xpu", device_type="xpu", arch="Intel(R) Arc(TM) B580", device_name="Intel(R) Arc(TM) B580")


@pytest.fixture
def xpu(monkeypatch):
    """Every tensor looks like an XPU tensor to selection; caches of selections/descriptors cleared."""
    import kvdispatch.descriptor as descriptor
    monkeypatch.setattr(reg, "platform_of", lambda _: XPU)
    monkeypatch.setattr(descriptor, "platform_of", lambda _: XPU)
    monkeypatch.setattr(KVCacheDescriptor, "_cache", {})
    reg.registry.clear_selection()
    extension._load.cache_clear()
    triton_backend._triton_import_error.cache_clear()
    yield
    reg.registry.clear_selection()
    extension._load.cache_clear()


def _extension_built(monkeypatch, names=None):
    names = frozenset(names if names is not None else (s.name for s in kernels.aot_specs()))
    monkeypatch.setattr(extension, "_load", _cached(lambda: (None, names)))


def _cached(fn):
    fn.cache_clear = lambda: None
    return fn


def _triton_ops():
    """The ops the Triton backend can be asked about (its attention module may not exist yet)."""
    import importlib.util
    have_attention = importlib.util.find_spec("kvdispatch.backends.triton.attention") is not None
    return [op for op in reg.OPS if op != "flash_attn_varlen_func" or have_attention]


def _reasons(op, desc=None):
    return {b.name: r for b, r in reg.registry.explain(op, XPU, desc)}


def test_without_extension_or_intel_triton_xpu_goes_to_reference(xpu):
    for op in reg.OPS:
        assert kvd.select_backend(op, "cpu") == "reference"
    why = _reasons("reshape_and_cache_flash")
    assert "XPU" in why["xpu-sycl"] or "not built" in why["xpu-sycl"]
    assert "Intel's Triton XPU backend" in why["triton"]
    assert "runs CPU tensors only" in why["sycl-cpu"] or "not a backend" in why["sycl-cpu"]


def test_unbuilt_extension_says_how_to_build(xpu, monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    why = extension.load_error()
    assert "not built" in why and "setup_xpu.py" in why
    shown = _reasons("flash_attn_varlen_func")["xpu-sycl"]
    assert why in shown and "KVDISPATCH_XPU_JIT=1" in shown


def test_intel_triton_xpu_is_next_when_extension_missing(xpu, monkeypatch):
    monkeypatch.setattr(triton_backend, "_intel_triton_xpu", lambda: True)
    for op in _triton_ops():
        assert kvd.select_backend(op, "cpu") == "triton"


def test_built_extension_wins_over_triton(xpu, monkeypatch):
    monkeypatch.setattr(triton_backend, "_intel_triton_xpu", lambda: True)
    _extension_built(monkeypatch)
    for op in _triton_ops():
        assert kvd.select_backend(op, "cpu") == "xpu-sycl"


def test_head_sizes_missing_from_the_build_fall_through(xpu, monkeypatch):
    _extension_built(monkeypatch, [s.name for s in kernels.aot_specs(((128, 128),))])
    k, v = make_kv_cache("NHD", 4, 16, 2, 64, fill=False)
    desc = KVCacheDescriptor.from_tensors(k, v)
    why = _reasons("flash_attn_varlen_func", desc)["xpu-sycl"]
    assert "64/64" in why and "KVDISPATCH_XPU_HEAD_SIZES" in why
    assert reg.registry.select("flash_attn_varlen_func", XPU, desc).name == "reference"
    assert reg.registry.select("reshape_and_cache_flash", XPU, desc).name == "xpu-sycl"


def test_what_sycl_does_not_take_is_declined_at_selection(xpu, monkeypatch):
    """A q dtype or cache element type outside xpu-sycl's declarations is declined at selection with
    the reason (the next backend serves the call) instead of a TypeError at call time."""
    monkeypatch.setattr(triton_backend, "_intel_triton_xpu", lambda: True)
    _extension_built(monkeypatch)
    op = "flash_attn_varlen_func"
    k = torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    desc = KVCacheDescriptor.from_tensors(k, k.clone())
    assert reg.registry.select(op, XPU, desc, dtype=torch.bfloat16).name == "xpu-sycl"
    assert reg.registry.select(op, XPU, desc, dtype=torch.float8_e4m3fn).name == "xpu-sycl"
    why = {b.name: r for b, r in reg.registry.explain(op, XPU, desc, dtype=torch.float64)}
    assert "declares dtypes" in why["xpu-sycl"] and why["xpu-sycl"].endswith("not float64")
    assert reg.registry.select(op, XPU, desc, dtype=torch.float64).name == "reference"  # triton declines too
    k16 = torch.zeros(4, 16, 2, 128, dtype=torch.int16)
    d16 = KVCacheDescriptor.from_tensors(k16, k16.clone())
    why = {b.name: r for b, r in reg.registry.explain(op, XPU, d16)}
    assert why["xpu-sycl"].startswith("declares kv cache dtypes") and why["xpu-sycl"].endswith("not int16")
    assert reg.registry.select(op, XPU, d16, dtype=torch.int16).name == "reference"
    # the writes copy any 2-byte element: an int16 cache is still written by xpu-sycl
    assert reg.registry.select("reshape_and_cache_flash", XPU, d16, dtype=torch.int16).name == "xpu-sycl"


def test_aot_names_cover_every_launch_the_matrix_makes():
    """Every launch plan of the shared matrix (at head sizes the build has) names an instantiation
    the AOT table contains, so an XPU build never lacks a kernel the CPU lane tested."""
    from matrix import make_attention_inputs, mla_cases, write_cases
    names = {s.name for s in kernels.aot_specs(kernels.DEFAULT_AOT_HEAD_SIZES + ((64, 32), (80, 64), (64, 64)))}
    seen = []

    def spy(make):
        def f(*a, **kw):
            launch = make(*a, **kw)
            seen.append(launch.spec)
            return launch
        return f

    mp = pytest.MonkeyPatch()
    try:
        from kvdispatch.backends.xpu import backend as xb
        for fn in ("cache_write_launch", "mla_write_launch", "attention_launch"):
            mp.setattr(kernels, fn, spy(getattr(kernels, fn)))
        mp.setattr(xb.SyclCpuBackend, "_run", lambda self, launch: None)
        for case in write_cases():
            try:
                run_write_case(case, "sycl-cpu")
            except AssertionError:
                pass  # nothing ran: only the plan matters here
        from matrix import run_mla_case
        for case in mla_cases():
            try:
                run_mla_case(case, "sycl-cpu")
            except AssertionError:
                pass
        for case in attention_cases():
            try:
                run_attention_case(case, "sycl-cpu")
            except AssertionError:
                pass
    finally:
        mp.undo()
    assert len(seen) > 40
    missing = {(s.family, s.template_args) for s in seen if s.name not in names}
    assert not missing, f"AOT table lacks {sorted(missing)[:5]}"


def test_xpu_path_end_to_end_with_the_op_run_by_the_cpu_lane(xpu, monkeypatch):
    """Mocked XPU platform + 'built' extension whose launch op is the CPU lane: the public call
    routes to xpu-sycl, the launch goes through split_args in parameter order, results match."""
    from kvdispatch.backends.xpu.cpu_lane.runtime import missing
    if missing():
        pytest.skip(missing())
    from kvdispatch.backends.xpu.cpu_lane.runtime import runtime
    _extension_built(monkeypatch)
    calls = []

    def fake_launch(launch):
        tensors, ints, floats = kernels.split_args(launch)
        it_t, it_i, it_f = iter(tensors), iter(ints), iter(floats)
        rebuilt = [(k, next(it_t) if k == "ptr" else next(it_f) if k == "f32" else next(it_i), out)
                   for k, _v, out in launch.args]
        calls.append(launch.spec.family)
        runtime().launch(kernels.Launch(launch.spec, rebuilt, launch.groups, launch.local))

    monkeypatch.setattr(extension, "launch", fake_launch)
    with force_backend(None):
        assert kvd.select_backend("reshape_and_cache_flash", "cpu") == "xpu-sycl"
    # run_*_case forces the backend by name; "xpu-sycl" is what selection picked above
    run_write_case(WriteCase(layout="HND", kv_cache_dtype="fp8", scale="head"), "xpu-sycl")
    run_attention_case(attention_cases()[3], "xpu-sycl")
    assert calls == ["cache_write", "paged_attention"]


def _fake_jit_module(calls):
    """jit_ops.cpp's interface, run by the CPU lane: build compiles the source, launch re-pairs the
    per-kind value lists with the kinds exactly as the C++ side does."""
    from kvdispatch.backends.xpu.cpu_lane.runtime import runtime

    class Fake:
        specs = {}

        def build(self, device, source, options, name):
            calls.append(("build", name))
            self.specs[name] = source

        def launch(self, device, name, tensors, kinds, ints, floats, groups, local):
            calls.append(("launch", name))
            it_t, it_i, it_f = iter(tensors), iter(ints), iter(floats)
            names = {0: "ptr", 1: "i64", 2: "i32", 3: "f32"}
            args = [(names[k], next(it_t) if k == 0 else next(it_f) if k == 3 else next(it_i), True)
                    for k in kinds]
            assert next(it_t, None) is None and next(it_i, None) is None and next(it_f, None) is None
            spec = _SpecFromSource(name, self.specs[name])
            runtime().launch(kernels.Launch(spec, args, groups, local))

    return Fake()


class _SpecFromSource:
    """Stands in for a Spec in the CPU runtime: the name and the source the JIT module was given."""

    def __init__(self, name, source):
        self.name, self._source = name, source

    def free_function_source(self):
        return self._source


def test_first_use_compilation_path(xpu, monkeypatch):
    """KVDISPATCH_XPU_JIT=1 without an AOT build: xpu-sycl is available, compiles each
    instantiation once and launches it (module replaced by the CPU lane; head sizes outside
    the AOT list are served too)."""
    from kvdispatch.backends.xpu import jit
    from kvdispatch.backends.xpu.cpu_lane.runtime import missing
    if missing():
        pytest.skip(missing())
    monkeypatch.setenv("KVDISPATCH_XPU_JIT", "1")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(jit, "unavailable", lambda: None)
    calls = []
    fake = _fake_jit_module(calls)
    monkeypatch.setattr(jit, "module", lambda: fake)
    monkeypatch.setattr(jit, "_built", set())
    monkeypatch.setattr(jit, "device_index", lambda t: 0)
    assert kvd.select_backend("flash_attn_varlen_func", "cpu") == "xpu-sycl"
    case = attention_cases()[8]  # diffkv 64/32: not in the AOT head-size list
    run_attention_case(case, "xpu-sycl")
    run_attention_case(case, "xpu-sycl", seed=1)  # same instantiation: no second compile
    run_write_case(WriteCase(layout="combined-HND"), "xpu-sycl")
    builds = [n for k, n in calls if k == "build"]
    assert len(builds) == len(set(builds)) == 2, calls  # one compile per instantiation
    assert sum(k == "launch" for k, _ in calls) == 3
