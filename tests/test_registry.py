"""Selection: mocked platforms, priorities, the override, caching, third-party plugins, the no-backend error."""

import pytest
import torch

import kvdispatch as kvd
from kvdispatch import registry as reg
from kvdispatch.platform import Platform
from kvbench.layouts import make_kv_cache

from matrix import force_backend

NVIDIA = Platform(name="nvidia", device_type="cuda", arch="sm90", capability=(9, 0), multiprocessors=132)
ROCM = Platform(name="rocm", device_type="cuda", arch="gfx942", capability=(9, 4), multiprocessors=304)
XPU = Platform(name="xpu", device_type="xpu", arch="Intel(R) Data Center GPU Max 1550")
CPU = Platform(name="cpu", device_type="cpu")


class FakeBackend(kvd.Backend):
    def __init__(self, name, priority, platforms, ops=reg.OPS, avail=None, decline=None):
        self.name, self.priority, self.platforms, self.ops = name, priority, platforms, ops
        self._avail, self._decline, self.calls = avail, decline, []

    def available(self, platform):
        return self._avail

    def supports(self, op, desc, platform):
        return self._decline(op, desc) if self._decline else None

    def reshape_and_cache_flash(self, *args):
        self.calls.append("reshape_and_cache_flash")


class Plugin:
    def __init__(self, *backends):
        self.backends = list(backends)

    @kvd.hookimpl
    def kvdispatch_backends(self):
        return self.backends


@pytest.fixture
def plugin():
    plugins = []

    def add(*backends):
        p = Plugin(*backends)
        reg.registry.register(p, name=f"test-plugin-{len(plugins)}")
        plugins.append(p)
        return p

    yield add
    for p in plugins:
        reg.registry.unregister(p)


@pytest.fixture
def mock_platform(monkeypatch):
    def set_(p):
        monkeypatch.setattr(reg, "platform_of", lambda _: p)
    return set_


def test_builtins_come_through_entry_points():
    names = kvd.list_backends()
    assert "reference" in names and "triton" in names
    assert names == [b.name for b in reg.registry.backends]


@pytest.mark.parametrize("platform", [NVIDIA, ROCM, XPU, CPU])
def test_without_gpu_everything_falls_back_to_reference(platform, mock_platform):
    mock_platform(platform)
    for op in reg.OPS:
        assert kvd.select_backend(op, "cpu") == "reference"
    rows = dict((b.name, r) for b, r in reg.registry.explain("flash_attn_varlen_func", platform))
    assert rows["reference"] is None
    if platform.name in ("nvidia", "rocm"):
        assert "CUDA" in rows["triton"] or "triton" in rows["triton"]
    elif platform.name == "cpu":
        assert "not a backend for platform 'cpu'" in rows["triton"]


@pytest.mark.parametrize("platform,expect", [(NVIDIA, "fast-cuda"), (ROCM, "fast-cuda"), (XPU, "fast-xpu"),
                                             (CPU, "reference")])
def test_highest_priority_available_backend_of_the_platform_wins(platform, expect, plugin, mock_platform):
    plugin(FakeBackend("fast-cuda", 500, ("nvidia", "rocm")),
           FakeBackend("slow-cuda", 50, ("nvidia", "rocm")),
           FakeBackend("fast-xpu", 400, ("xpu",)),
           FakeBackend("broken", 900, ("nvidia", "rocm", "xpu"), avail="driver too old"))
    mock_platform(platform)
    assert kvd.select_backend("reshape_and_cache_flash", "cpu") == expect


def test_per_descriptor_support_is_asked_and_cached(plugin, mock_platform):
    seen = []

    def decline(op, desc):
        seen.append(desc.layout if desc else None)
        return "HND not supported" if desc is not None and desc.layout == "HND" else None

    fake = FakeBackend("picky", 500, ("cpu",), decline=decline)
    plugin(fake)
    k, v = make_kv_cache("NHD", 4, 16, 2, 64)
    key = torch.randn(3, 2, 64).bfloat16()
    slots = torch.tensor([0, 5, 9])
    for _ in range(3):
        kvd.reshape_and_cache_flash(key, key, k, v, slots)
    assert fake.calls == ["reshape_and_cache_flash"] * 3
    assert seen == ["NHD"]  # asked once per descriptor key
    hk, hv = make_kv_cache("HND", 4, 16, 2, 64)
    kvd.reshape_and_cache_flash(key, key, hk, hv, slots)  # declined -> reference serves it
    assert fake.calls == ["reshape_and_cache_flash"] * 3
    assert torch.equal(hk[0, 0], key[0])


def test_override_forces_and_reports(plugin, mock_platform):
    plugin(FakeBackend("other", 10, ("nvidia",)), FakeBackend("off", 10, ("nvidia",), avail="no device"))
    mock_platform(NVIDIA)
    with force_backend("other"):
        assert kvd.select_backend("reshape_and_cache_flash", "cpu") == "other"
    with force_backend("off"):
        with pytest.raises(kvd.NoBackendError, match="off: no device"):
            kvd.select_backend("reshape_and_cache_flash", "cpu")
    with force_backend("nonexistent"):
        with pytest.raises(kvd.NoBackendError, match="no such backend"):
            kvd.select_backend("reshape_and_cache_flash", "cpu")


def test_triton_forced_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with force_backend("triton"):
        with pytest.raises(kvd.NoBackendError, match="TRITON_INTERPRET=1"):
            kvd.select_backend("flash_attn_varlen_func", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with force_backend("triton"):
        assert kvd.select_backend("flash_attn_varlen_func", "cpu") == "triton"


def test_no_backend_error_lists_every_backend_and_why(plugin, mock_platform, monkeypatch):
    plugin(FakeBackend("a", 10, ("nvidia",), avail="needs sm90"))
    mock_platform(NVIDIA)
    ref = reg.registry.get("reference")
    monkeypatch.setattr(ref, "available", lambda p: "disabled for this test")
    reg.registry.clear_selection()
    with pytest.raises(kvd.NoBackendError) as e:
        kvd.select_backend("concat_and_cache_mla", "cpu")
    msg = str(e.value)
    for b in reg.registry.backends:
        assert f"- {b.name}:" in msg
    assert "needs sm90" in msg and "disabled for this test" in msg
    reg.registry.clear_selection()


def test_unknown_op_name():
    with pytest.raises(ValueError, match="op_name"):
        kvd.select_backend("paged_attention_v3", "cpu")


def test_broken_third_party_entry_point_is_reported_not_fatal(monkeypatch):
    import importlib.metadata as md

    class EP:
        name, group, value = "broken-plugin", "kvdispatch", "no_such_module_xyz"

        def load(self):
            raise ImportError("no module named no_such_module_xyz")

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group: list(real(group=group)) + [EP()])
    r = reg.Registry()
    names = [b.name for b in r.backends]
    assert "reference" in names and "broken-plugin" in names
    broken = r.get("broken-plugin")
    assert "failed to load" in broken.available(CPU)
    assert r.select("reshape_and_cache_flash", CPU).name == "reference"


def test_platform_detection_is_torch_only():
    p = kvd.platform_of(torch.empty(1))
    assert p.name == "cpu" and p.fp8_e4m3_dtype == torch.float8_e4m3fn
    assert kvd.platform_of("xpu").name == "xpu"
    assert kvd.platform_of(torch.device("meta")).name == "meta"
    assert ROCM.is_rocm and ROCM.warp_size == 64 and NVIDIA.warp_size == 32
