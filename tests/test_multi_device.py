"""Two devices kept apart by every cache, tested on one CPU with mocked device ids (issue 14, item 3).

kvdispatch promises that tensors on ``cuda:1`` work while ``cuda:0`` is current. Besides launching
under the tensors' device (``device_guard``), that needs every cache that ends in something
device-specific -- above all a compiled kernel, whose loaded function belongs to one device, and
the stream it is launched on -- to keep the two devices' entries apart. The GPU machine has had one
GPU, so this file checks each cache with device ids mocked:

* FakeTensors (``torch._subclasses.FakeTensorMode``) on ``cuda:0`` / ``cuda:1``, which a CPU build
  of torch can make: real device objects and indices, no memory. They drive the descriptor cache,
  the public ops' "checks passed" caches and ``device_guard``.
* Proxies of real CPU tensors whose ``get_device()`` / ``is_cuda`` say "cuda:<i>": they drive the
  Triton backend's plan and compiled-kernel caches with the compiler and the launcher replaced by
  recorders, so the test sees which compiled kernel is launched on which device's stream.

Caches and what keeps devices apart (read from the code):

* ``KVCacheDescriptor._cache``: key has ``key_cache.device`` (type and index) -> one descriptor per
  device. ``desc.key`` holds only the device TYPE (by design: it feeds selection and the attention
  plan, which depend on the platform, not on the index), and ``desc == other`` compares keys, so
  two devices' descriptors compare equal: no cache may key on the descriptor's hash / equality
  for device-specific state (the Triton write keys on ``id(desc)`` and the device).
* ``platform._platform_cached``: keyed by (device type, index): each GPU is detected on its own.
* ``Registry._selection``: (op, platform, desc.key, forced). Two GPUs of one model share an entry
  (correct: a Backend object holds no per-device state); two different GPUs do not.
* ``ops._WRITE_RECENT`` / ``ops._MLA_RECENT`` / ``ops._ATTN_RECENT``: each signature's C++ guard checks
  every tensor's device type and index.
* Triton write plans (they hold the compiled kernel and its device) live in the call signature's
  ``plans`` dict (``Backend.takes_plans``) under (alignment, size bucket, ``key_cache.get_device()``);
  the MLA write likewise ``kv_cache.get_device()``.
* Triton attention: its prepared launches (plan, compiled kernels) live in the call signature's
  ``AttentionArgs.plans`` dict (the public call's signature holds every tensor's device), under
  options that hold the device index again (``q.get_device()``), so even one dict shared by two
  devices keeps them apart; the direct launch takes that device's stream.

No cache was found whose key lacks the device where it matters, so there is no xfail here; the
negative controls show the harness WOULD catch a device-blind launch key.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kvdispatch as kvd
from kvdispatch import ops
from kvdispatch import platform as kplatform
from kvdispatch import registry as reg
from kvdispatch.descriptor import KVCacheDescriptor
from kvdispatch.platform import Platform
from kvbench.layouts import random_block_table

H100 = Platform(name="nvidia", device_type="cuda", arch="sm90", capability=(9, 0), multiprocessors=132,
                device_name="NVIDIA H100 (mocked)")
A100 = Platform(name="nvidia", device_type="cuda", arch="sm80", capability=(8, 0), multiprocessors=108,
                device_name="NVIDIA A100 (mocked)")

_FAKE = FakeTensorMode(allow_non_fake_inputs=True)
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def fake(*shape, device, dtype=torch.float16):
    """A FakeTensor on ``device`` (``cuda:1`` works on a CPU-only torch)."""
    with _FAKE:
        return torch.empty(*shape, dtype=dtype, device=device)


def fake_cache(device, nb=8, bs=16, h=2, d=32, dtype=torch.float16):
    return fake(nb, bs, h, d, device=device, dtype=dtype), fake(nb, bs, h, d, device=device, dtype=dtype)


@pytest.fixture
def fresh_descriptors(monkeypatch):
    monkeypatch.setattr(KVCacheDescriptor, "_cache", {})
    return KVCacheDescriptor._cache


# -- the descriptor cache -------------------------------------------------------------------------
def test_descriptor_cache_keeps_two_devices_apart(fresh_descriptors):
    k0, v0 = fake_cache(CUDA0)
    k1, v1 = fake_cache(CUDA1)
    d0 = KVCacheDescriptor.from_tensors(k0, v0)
    d1 = KVCacheDescriptor.from_tensors(k1, v1)
    assert d0 is not d1
    assert (d0.device, d1.device) == (CUDA0, CUDA1)
    assert len(fresh_descriptors) == 2
    assert {ck[3] for ck in fresh_descriptors} == {CUDA0, CUDA1}  # the cache key holds the full device
    # new tensors of the same metadata hit their own device's entry
    assert KVCacheDescriptor.from_tensors(*fake_cache(CUDA0)) is d0
    assert KVCacheDescriptor.from_tensors(*fake_cache(CUDA1)) is d1
    # by design desc.key has the device type only (selection and the attention plan depend on the
    # platform): equal keys, equal descriptors -> per-device state must not be keyed on a descriptor's
    # hash; the Triton write keys on id(desc) and the device (tested below)
    assert d0.key == d1.key and d0 == d1


def test_descriptor_cache_mla_and_fp8_scales_per_device(fresh_descriptors):
    m0 = KVCacheDescriptor.from_tensors(fake(8, 16, 576, device=CUDA0), None)
    m1 = KVCacheDescriptor.from_tensors(fake(8, 16, 576, device=CUDA1), None)
    assert m0 is not m1 and (m0.device, m1.device) == (CUDA0, CUDA1)
    # fp8: a scale on the other GPU is refused, naming the argument
    k1, v1 = fake_cache(CUDA1, dtype=torch.float8_e4m3fn)
    s0 = fake(1, device=CUDA0, dtype=torch.float32)
    s1 = fake(1, device=CUDA1, dtype=torch.float32)
    assert KVCacheDescriptor.from_tensors(k1, v1, "fp8", s1, s1).device == CUDA1
    with pytest.raises(ValueError, match="k_scale: expected a tensor on cuda:1"):
        KVCacheDescriptor.from_tensors(k1, v1, "fp8", s0, s1)


def test_descriptor_refuses_a_value_cache_on_another_device(fresh_descriptors):
    k0, _ = fake_cache(CUDA0)
    _, v1 = fake_cache(CUDA1)
    with pytest.raises(ValueError, match="value_cache: expected the key_cache's device cuda:0, got cuda:1"):
        KVCacheDescriptor.from_tensors(k0, v1)


# -- platform detection and the selection cache ----------------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    """torch "sees" CUDA: cuda:0 is an H100, cuda:1 an A100 (detection mocked, cache cleared around)."""
    detected = []

    def detect(index):
        detected.append(index)
        return (H100, A100)[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kplatform, "_detect_cuda", detect)
    kplatform._platform_cached.cache_clear()
    yield detected
    kplatform._platform_cached.cache_clear()


def test_platform_is_detected_per_device_index(two_gpus):
    assert kplatform.platform_of(CUDA0) is H100
    assert kplatform.platform_of(CUDA1) is A100
    assert kplatform.platform_of(fake(1, device=CUDA1)) is A100
    assert kplatform.platform_of("cuda:0") is H100
    assert two_gpus == [0, 1]  # once per index, then cached


class _Backend(kvd.Backend):
    def __init__(self, name, priority, arch=None):
        self.name, self.priority, self.platforms, self.ops, self._arch = name, priority, ("nvidia",), reg.OPS, arch

    def supports(self, op, desc, platform):
        return None if self._arch in (None, platform.arch) else f"needs {self._arch}"


class _Plugin:
    def __init__(self, *backends):
        self.backends = list(backends)

    @kvd.hookimpl
    def kvdispatch_backends(self):
        return self.backends


def test_selection_cache_keeps_different_gpus_apart(two_gpus, fresh_descriptors):
    r = reg.Registry(entry_point_group="kvdispatch-tests-multi-device-none")
    r.register(_Plugin(_Backend("sm90-only", 2000, arch="sm90"), _Backend("any-nvidia", 1000)), name="multi-device")
    d0 = KVCacheDescriptor.from_tensors(*fake_cache(CUDA0))
    d1 = KVCacheDescriptor.from_tensors(*fake_cache(CUDA1))
    op = "flash_attn_varlen_func"
    assert r.select(op, d0.platform, d0).name == "sm90-only"
    assert r.select(op, d1.platform, d1).name == "any-nvidia"   # the A100 is not served from the H100's entry
    assert r.select(op, d0.platform, d0).name == "sm90-only"    # and did not overwrite it
    assert len(r._selection) == 2


def test_selection_is_shared_by_two_gpus_of_one_model(fresh_descriptors):
    """cuda:0 and cuda:1 of one model: equal platforms, equal descriptor keys -> one selection entry.
    Correct: a Backend object is device-agnostic; the per-device state lives in the kernel caches."""
    r = reg.Registry(entry_point_group="kvdispatch-tests-multi-device-none")
    r.register(_Plugin(_Backend("any-nvidia", 1000)), name="multi-device")
    d0 = KVCacheDescriptor.from_tensors(*fake_cache(CUDA0))
    d1 = KVCacheDescriptor.from_tensors(*fake_cache(CUDA1))
    twin = Platform(**{f: getattr(H100, f) for f in ("name", "device_type", "arch", "capability",
                                                      "multiprocessors", "device_name")})
    assert r.select("reshape_and_cache_flash", H100, d0) is r.select("reshape_and_cache_flash", twin, d1)
    assert len(r._selection) == 1


# -- the public ops' "checks passed" caches --------------------------------------------------------
class _Recorder(kvd.Backend):
    name = "recorder"
    always_check_values = False

    def __init__(self):
        self.calls = []

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc):
        self.calls.append(("write", key_cache.device, desc))

    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc):
        self.calls.append(("mla", kv_cache.device, desc))

    def flash_attn_varlen_func(self, q, k, v, out, desc, args):
        self.calls.append(("attn", q.device, desc))


@pytest.fixture
def recorder(monkeypatch, fresh_descriptors):
    rec = _Recorder()
    monkeypatch.setattr(ops, "_WRITE_RECENT", [])
    monkeypatch.setattr(ops, "_MLA_RECENT", [])
    monkeypatch.setattr(ops, "_ATTN_RECENT", [])
    monkeypatch.setattr(type(ops.registry), "select", lambda self, op, platform, desc=None, dtype=None: rec)
    monkeypatch.delenv("KVDISPATCH_DEBUG", raising=False)
    return rec


def _ops_inputs(device):
    kc, vc = fake_cache(device)
    t = 5
    return dict(
        write=(fake(t, 2, 32, device=device), fake(t, 2, 32, device=device), kc, vc,
               fake(t, device=device, dtype=torch.int64)),
        mla=(fake(t, 512, device=device), fake(t, 64, device=device), fake(8, 16, 576, device=device),
             fake(t, device=device, dtype=torch.int64)),
        attn=(fake(3, 4, 32, device=device), kc, vc, 1, fake(4, device=device, dtype=torch.int32), 40),
        attn_kw=dict(seqused_k=fake(3, device=device, dtype=torch.int32),
                     block_table=fake(3, 3, device=device, dtype=torch.int32), causal=True,
                     out=fake(3, 4, 32, device=device)),
    )


def test_public_ops_keep_two_devices_apart(recorder):
    inputs = {dev: _ops_inputs(dev) for dev in (CUDA0, CUDA1)}
    for dev in (CUDA0, CUDA1, CUDA0, CUDA1):
        x = inputs[dev]
        kvd.reshape_and_cache_flash(*x["write"])
        kvd.concat_and_cache_mla(*x["mla"])
        kvd.flash_attn_varlen_func(*x["attn"], **x["attn_kw"])
    assert len(ops._WRITE_RECENT) == 2 and len(ops._MLA_RECENT) == 2 and len(ops._ATTN_RECENT) == 2
    for kind in ("write", "mla", "attn"):
        calls = [(dev, desc) for k, dev, desc in recorder.calls if k == kind]
        assert [dev for dev, _ in calls] == [CUDA0, CUDA1, CUDA0, CUDA1]
        assert [desc.device for _, desc in calls] == [CUDA0, CUDA1, CUDA0, CUDA1], kind
        assert calls[0][1] is calls[2][1] and calls[1][1] is calls[3][1] and calls[0][1] is not calls[1][1]


# -- device_guard: the Triton backend launches under the tensors' device ----------------------------
@pytest.fixture
def current_cuda(monkeypatch):
    """A mocked "current CUDA device" (0) that ``torch.cuda.device(i)`` switches, as the real one does."""
    state = {"current": 0, "switches": []}

    class device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.prev = state["current"]
            state["current"] = self.index
            state["switches"].append(self.index)

        def __exit__(self, *exc):
            state["current"] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_device_guard_switches_to_the_tensors_device(current_cuda):
    pytest.importorskip("triton")
    from kvdispatch.backends.triton.backend import device_guard
    with device_guard(fake(1, device=CUDA1)):
        assert current_cuda["current"] == 1
    assert current_cuda["current"] == 0
    with device_guard(fake(1, device=CUDA0)):  # already current: no switch
        assert current_cuda["current"] == 0
    with device_guard(torch.empty(1)):
        assert current_cuda["current"] == 0
    assert current_cuda["switches"] == [1]


def test_triton_backend_runs_each_op_under_the_tensors_device(current_cuda, monkeypatch):
    pytest.importorskip("triton")
    from kvdispatch.backends.triton import attention, write
    from kvdispatch.backends.triton.backend import TritonBackend
    seen = []
    monkeypatch.setattr(attention, "flash_attn_varlen_func", lambda *a: seen.append(("attn", current_cuda["current"])))
    monkeypatch.setattr(write, "reshape_and_cache_flash", lambda *a: seen.append(("write", current_cuda["current"])))
    monkeypatch.setattr(write, "concat_and_cache_mla", lambda *a: seen.append(("mla", current_cuda["current"])))
    b = TritonBackend()
    for dev in (CUDA1, CUDA0):
        x = _ops_inputs(dev)
        b.reshape_and_cache_flash(*x["write"], None)
        b.concat_and_cache_mla(*x["mla"], None)
        b.flash_attn_varlen_func(x["attn"][0], x["attn"][1], x["attn"][2], x["attn_kw"]["out"], None, None)
        assert current_cuda["current"] == 0  # restored after each call
    assert seen == [("write", 1), ("mla", 1), ("attn", 1), ("write", 0), ("mla", 0), ("attn", 0)]


# -- Triton plan / compiled-kernel caches ----------------------------------------------------------
class OnDevice:
    """A real CPU tensor that reports ``cuda:<index>`` to the Triton launch code (``get_device``,
    ``is_cuda``); everything else is the tensor's."""

    def __init__(self, t: torch.Tensor, index: int):
        self._t, self._index = t, index

    def get_device(self) -> int:
        return self._index

    @property
    def is_cuda(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._t, name)

    def __getitem__(self, item):
        return OnDevice(self._t[item], self._index)


def _on_platform(desc: KVCacheDescriptor, platform: Platform) -> KVCacheDescriptor:
    """A copy of ``desc`` that says it describes a cache on ``platform`` (the cached one is untouched)."""
    d = object.__new__(KVCacheDescriptor)
    for s in KVCacheDescriptor.__slots__:
        setattr(d, s, getattr(desc, s))
    d.platform = platform
    return d


class _Compiled:
    """Stands in for a compiled Triton kernel: remembers the device it was compiled for and records
    every direct launch with the stream it was given."""

    def __init__(self, log, name, device):
        self.log, self.name, self.device = log, name, device
        self.function, self.packed_metadata = object(), object()

    def run(self, *args):
        self.log.append(("direct", self.name, self.device, args[3]))


class _Jit:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args)`` "compiles" for the device of
    ``args[dst]`` (Triton compiles for the current device, which device_guard makes the tensors')."""

    def __init__(self, log, name, dst):
        self.log, self.name, self.dst, self.n = log, name, dst, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.n += 1
            dev = args[self.dst].get_device()
            c = _Compiled(self.log, f"{self.name}#{self.n}", dev)
            self.log.append(("jit", c.name, dev))
            return c
        return launch


@pytest.fixture
def triton_stubs(monkeypatch):
    """Fresh Triton caches; compiler, launcher and stream lookup replaced by recorders."""
    pytest.importorskip("triton")
    from kvdispatch.backends.triton import attention, write
    log = []
    monkeypatch.setattr(write, "_interpreting", lambda: False)
    monkeypatch.setattr(attention, "_interpreting", lambda: False)
    monkeypatch.setattr(write, "_no_launch_hooks", lambda: True)
    monkeypatch.setattr(attention, "_no_launch_hooks", lambda: True)
    monkeypatch.setattr(write, "_write_kv_kernel", _Jit(log, "write", dst=2))
    monkeypatch.setattr(attention, "_attention_kernel", _Jit(log, "attn", dst=0))
    monkeypatch.setattr(attention, "_merge_splits_kernel", _Jit(log, "merge", dst=2))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: f"stream:{device}", raising=False)
    return log


def _assert_each_kernel_runs_on_its_own_device(log, kernels: tuple):
    """Every launch made by a call on device d is for d: a compile for d, or a direct launch of a
    kernel compiled for d on d's stream; and each kernel was compiled once per device."""
    dev = None
    for ev in log:
        if ev[0] == "call":
            dev = ev[1]
        elif ev[0] == "jit":
            assert ev[2] == dev, f"a call on device {dev} compiled {ev[1]} for device {ev[2]}"
        else:
            _, name, compiled_for, stream = ev
            assert (compiled_for, stream) == (dev, f"stream:{dev}"), \
                f"a call on device {dev} launched {name}, compiled for device {compiled_for}, on {stream}"
    for k in kernels:
        jits = [ev[2] for ev in log if ev[0] == "jit" and ev[1].startswith(k + "#")]
        assert sorted(jits) == [0, 1], (k, log)


def _launches(log):
    return [ev[:2] for ev in log if ev[0] != "call"]


def _write_inputs(desc_platform=H100):
    kc = torch.zeros(8, 16, 2, 32, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    desc = _on_platform(KVCacheDescriptor.from_tensors(kc, vc), desc_platform)
    key = torch.zeros(5, 2, 32, dtype=torch.float16)
    slots = torch.arange(5, dtype=torch.int64)
    return key, kc, vc, slots, desc


def test_write_plan_key_holds_the_device(triton_stubs):
    from kvdispatch.backends.triton import write
    key, kc, vc, slots, desc = _write_inputs()
    plans = {}  # one dict for both devices (more than the public call ever shares)
    p0 = write.plan_for(key, key, OnDevice(kc, 0), OnDevice(vc, 0), slots, desc, plans)
    p1 = write.plan_for(key, key, OnDevice(kc, 1), OnDevice(vc, 1), slots, desc, plans)
    assert p0 is not p1  # one descriptor object, two devices: two plans (each holds its own compiled kernel)
    assert write.plan_for(key, key, OnDevice(kc, 0), OnDevice(vc, 0), slots, desc, plans) is p0
    assert write.plan_for(key, key, OnDevice(kc, 1), OnDevice(vc, 1), slots, desc, plans) is p1
    (k0, k1) = plans
    assert [i for i, (a, b) in enumerate(zip(k0, k1)) if a != b] == [2] and {k0[2], k1[2]} == {0, 1}
    assert {"kernel", "device"} <= set(write._Plan.__slots__)  # what makes the device part of the key needed


def test_write_compiled_kernel_runs_only_on_its_device(triton_stubs):
    from kvdispatch.backends.triton import write
    key, kc, vc, slots, desc = _write_inputs()
    plans = {}
    for dev in (0, 1, 0, 1):
        triton_stubs.append(("call", dev))
        write.reshape_and_cache_flash(key, key, OnDevice(kc, dev), OnDevice(vc, dev), slots, desc, plans)
    assert _launches(triton_stubs) == [("jit", "write#1"), ("jit", "write#2"), ("direct", "write#1"),
                                       ("direct", "write#2")], triton_stubs
    _assert_each_kernel_runs_on_its_own_device(triton_stubs, ("write",))


def test_mla_write_compiled_kernel_runs_only_on_its_device(triton_stubs):
    from kvdispatch.backends.triton import write
    cache = torch.zeros(8, 16, 576, dtype=torch.float16)
    desc = _on_platform(KVCacheDescriptor.from_tensors(cache, None), H100)
    kv_c, k_pe = torch.zeros(5, 512, dtype=torch.float16), torch.zeros(5, 64, dtype=torch.float16)
    slots = torch.arange(5, dtype=torch.int64)
    plans = {}
    for dev in (0, 1, 0, 1):
        triton_stubs.append(("call", dev))
        write.concat_and_cache_mla(kv_c, k_pe, OnDevice(cache, dev), slots, desc, plans)
    assert len(plans) == 2 and {ck[-1] for ck in plans} == {0, 1}
    assert _launches(triton_stubs) == [("jit", "write#1"), ("jit", "write#2"), ("direct", "write#1"),
                                       ("direct", "write#2")], triton_stubs
    _assert_each_kernel_runs_on_its_own_device(triton_stubs, ("write",))


def _attention_call(dev: int, desc, kc, vc, q, out, plans):
    from kvdispatch.backends.triton import attention
    lens = [300, 400, 500]  # longer than a key tile: num_splits=2 splits
    args = reg.AttentionArgs(
        cu_seqlens_q=torch.arange(4, dtype=torch.int32), max_seqlen_q=1, cu_seqlens_k=None,
        seqused_k=torch.tensor(lens, dtype=torch.int32), max_seqlen_k=max(lens),
        block_table=random_block_table(lens, kc.shape[0], kc.shape[1], generator=torch.Generator().manual_seed(0)),
        softmax_scale=32 ** -0.5, causal=True, window_left=-1, window_right=0, softcap=0.0,
        q_descale=None, k_descale=None, v_descale=None, num_splits=2,  # split: the merge kernel runs too
        plans=plans)
    attention.flash_attn_varlen_func(OnDevice(q, dev), kc, vc, OnDevice(out, dev), desc, args)


def _attention_inputs():
    kc = torch.zeros(80, 16, 2, 32, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    desc = _on_platform(KVCacheDescriptor.from_tensors(kc, vc), H100)
    q = torch.zeros(3, 4, 32, dtype=torch.float16)
    return desc, kc, vc, q, torch.empty_like(q)


def test_attention_compiled_kernels_run_only_on_their_device(triton_stubs):
    from kvdispatch.backends.triton import attention
    desc, kc, vc, q, out = _attention_inputs()
    plans = {}  # one dict for both devices (more than the public call ever shares)
    for dev in (0, 1, 0, 1):
        triton_stubs.append(("call", dev))
        _attention_call(dev, desc, kc, vc, q, out, plans)
    assert _launches(triton_stubs) == [
        ("jit", "attn#1"), ("jit", "merge#1"), ("jit", "attn#2"), ("jit", "merge#2"),
        ("direct", "attn#1"), ("direct", "merge#1"), ("direct", "attn#2"), ("direct", "merge#2")], triton_stubs
    _assert_each_kernel_runs_on_its_own_device(triton_stubs, ("attn", "merge"))
    preps = {opts: p for opts, p in plans.items() if opts is not None}
    assert sorted(opts[-1] for opts in preps) == [0, 1]  # one prepared launch per device
    for p in preps.values():
        # each kept (launch, head): here the stand-in's bound run method, whose object knows its device
        assert {launch.__self__.device for launch, _ in (*p.kernels.values(), *p.merges.values())} == {p.device}
    # a plan is constexprs, tile and config: nothing compiled
    assert set(attention.Plan._fields) == {"key", "tile", "constexprs", "v_factor", "k_factor", "q_factor", "config"}


def test_negative_control_a_device_blind_option_key_is_caught(triton_stubs, monkeypatch):
    """The harness above detects the bug it guards against: with the device dropped from the
    prepared launch's options, cuda:1's call launches the kernels compiled for cuda:0."""
    from kvdispatch.backends.triton import attention
    monkeypatch.setattr(attention, "_device_index", lambda t: 0)
    desc, kc, vc, q, out = _attention_inputs()
    plans = {}
    for dev in (0, 1):
        triton_stubs.append(("call", dev))
        _attention_call(dev, desc, kc, vc, q, out, plans)
    with pytest.raises(AssertionError, match="a call on device 1 launched (attn|merge)#1, compiled for device 0"):
        _assert_each_kernel_runs_on_its_own_device(triton_stubs, ("attn", "merge"))


def test_negative_control_a_device_blind_write_plan_is_caught(triton_stubs, monkeypatch):
    """Same for the write: with the plan looked up as if every cache were on device 0, cuda:1's call
    reuses cuda:0's plan and launches its compiled kernel on cuda:0's stream."""
    from kvdispatch.backends.triton import write
    real = write.plan_for
    monkeypatch.setattr(write, "plan_for", lambda k, v, kc, vc, *rest: real(k, v, OnDevice(kc._t, 0), vc, *rest))
    key, kc, vc, slots, desc = _write_inputs()
    plans = {}
    for dev in (0, 1):
        triton_stubs.append(("call", dev))
        write.reshape_and_cache_flash(key, key, OnDevice(kc, dev), OnDevice(vc, dev), slots, desc, plans)
    with pytest.raises(AssertionError, match="a call on device 1 launched write#1, compiled for device 0, on stream:0"):
        _assert_each_kernel_runs_on_its_own_device(triton_stubs, ("write",))
