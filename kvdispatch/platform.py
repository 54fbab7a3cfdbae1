"""The one place that answers "what is this device?": read from torch alone (no subprocess, no vendor
CLI), once per device. Kernels and backends ask a :class:`Platform` (ROCm? which fp8 type? converted in
hardware? interpreted?) instead of looking at ``torch.version.hip`` themselves."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

__all__ = ["Platform", "platform_of", "getenv", "env_bytes", "interpreting"]

# os.environ.get encodes the key and decodes the value on every call (~1 us); on POSIX CPython os.environ keeps
# a bytes dict it updates on every assignment: the same values at dict speed. env_bytes: a per-call flag's raw
# value (bytes or None), that dict's own get (a C call) where it exists.
_ENV_BYTES = getattr(os.environ, "_data", None)
_FAST = isinstance(_ENV_BYTES, dict) and all(isinstance(k, bytes) for k in list(_ENV_BYTES)[:1])
env_bytes = (_ENV_BYTES.get if _FAST else
             lambda name: None if (v := os.environ.get(name.decode())) is None else v.encode())


def getenv(name: bytes) -> "str | None":
    """``os.environ.get`` for the per-call flags (``KVDISPATCH_BACKEND``, ``KVDISPATCH_DEBUG``)."""
    return None if (v := env_bytes(name)) is None else v.decode()


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is set: Triton kernels run on CPU tensors through its interpreter."""
    return getenv(b"TRITON_INTERPRET") not in (None, "", "0")


NVIDIA, ROCM, XPU = "nvidia", "rocm", "xpu"  # as backends declare them in Backend.platforms
# fp8 hardware per gfx arch as Triton lowers casts (triton-lang/triton, third_party/amd/lib/TritonAMDGPUToLLVM/
# ConvertFpCastOpToLLVM.cpp): fnuz on CDNA3 (MI300), OCP e4m3fn / e5m2 on CDNA4 (gfx950) and gfx1250, else emulated.
_FNUZ_ARCHS, _OCP_FP8_ARCHS = ("gfx940", "gfx941", "gfx942"), ("gfx950", "gfx1250")
_FNUZ, _OCP = (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz), (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Platform:
    """What kvdispatch needs to know about one device. ``name`` is the routing key: ``"cpu"``, ``"nvidia"``,
    ``"rocm"``, ``"xpu"``, or the raw torch device type for anything else (``"mps"``, ``"meta"``, ...), which the
    reference backend serves. ``arch``: ``"sm90"``-style for NVIDIA, the gfx name for ROCm, the device name for XPU.
    ``extra``: free-form facts (warp size, ...) kept out of hashing and equality."""

    name: str
    device_type: str
    arch: str | None = None
    capability: tuple[int, int] | None = None
    multiprocessors: int | None = None
    device_name: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):  # hashed on every selection-cache lookup: once
        object.__setattr__(self, "_hash", hash((self.name, self.device_type, self.arch, self.capability,
                                                self.multiprocessors, self.device_name)))

    def __hash__(self) -> int:
        return self._hash

    is_rocm = property(lambda self: self.name == ROCM)
    is_nvidia = property(lambda self: self.name == NVIDIA)
    gfx = property(lambda self: (self.arch or "").split(":")[0] if self.name == ROCM else None)
    fnuz = property(lambda self: self.gfx in _FNUZ_ARCHS, doc='MI300: its fp8 is "fnuz" (no -0, bias 8).')
    fp8_e4m3_dtype = property(lambda self: self.fp8_dtype("e4m3"))
    warp_size = property(lambda self: int(self.extra.get("warp_size", 64 if self.name == ROCM else 32)))
    interpreting = staticmethod(interpreting)

    def fp8_dtype(self, kind: str) -> torch.dtype:
        """``kind``'s fp8 type ("e4m3", "fp8_e5m2"...): e4m3 (``kv_cache_dtype="fp8"``) is fnuz on MI300, e5m2 never."""
        e4m3 = torch.float8_e4m3fnuz if self.fnuz else torch.float8_e4m3fn
        return torch.float8_e5m2 if kind.endswith("e5m2") else e4m3

    def native_fp8(self, dtype: torch.dtype) -> bool:
        """Does the hardware convert fp8 ``dtype`` (one instruction in Triton's lowering; elsewhere
        Triton emulates the cast, or has no such type: e4m3fnuz on NVIDIA)?"""
        if self.name == NVIDIA:
            return dtype in _OCP and (self.capability or (0, 0)) >= (8, 9)
        return dtype in _FNUZ if self.fnuz else self.gfx in _OCP_FP8_ARCHS and dtype in _OCP

    def __str__(self) -> str:
        return " ".join(p for p in (self.name, self.arch, self.device_name and f"({self.device_name})") if p)


def _detect_cuda(index: int) -> Platform:
    props = torch.cuda.get_device_properties(index)
    common = dict(device_type="cuda", capability=(props.major, props.minor),
                  multiprocessors=props.multi_processor_count, device_name=props.name)
    if torch.version.hip:
        return Platform(name=ROCM, arch=(getattr(props, "gcnArchName", None) or "gfx").split(":")[0],
                        extra={"warp_size": getattr(props, "warp_size", 64)}, **common)
    return Platform(name=NVIDIA, arch=f"sm{props.major}{props.minor}", **common)


@functools.lru_cache(maxsize=None)
def _platform_cached(device_type: str, index: int | None) -> Platform:
    if device_type == "cuda" and torch.cuda.is_available():
        return _detect_cuda(index)  # platform_of resolved None to the current device
    if device_type == "xpu":
        try:
            props = torch.xpu.get_device_properties(index or 0)
        except Exception:  # torch built without XPU: the device type is still routable
            props = None
        name = getattr(props, "name", None)
        units = getattr(props, "gpu_subslice_count", None) or getattr(props, "max_compute_units", None)
        return Platform(name=XPU, device_type="xpu", arch=name, multiprocessors=units, device_name=name)
    return Platform(name=device_type, device_type=device_type)  # "cpu", and others the reference serves


def platform_of(tensor_or_device) -> Platform:
    """The platform of a tensor, a ``torch.device`` or a device string; detected once per (type, index)."""
    dev = tensor_or_device.device if isinstance(tensor_or_device, torch.Tensor) else torch.device(tensor_or_device)
    index = dev.index
    if index is None and dev.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return _platform_cached(dev.type, index)
