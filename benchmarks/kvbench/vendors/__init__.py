"""The one small interface every benchmarked implementation has: kvdispatch's own backends and
vendor adapters (FlagGems, vLLM, FlashInfer, flash-attn, IPEX, torch baselines) alike.

An implementation turns a :class:`~kvbench.cases.Workload` into a zero-argument callable
(``prepare``), or raises :class:`Unsupported` saying why it cannot run that case. The callable
performs the op on the workload's tensors: writes update the workload's caches, attention returns
its output. Anything an adapter must precompute (plans, gathered K/V, converted tables) happens in
``prepare``, outside the timed region, and is stated in the adapter's docstring.

The built-in adapters are the modules of this package; every one is listed whether or not its
package is installed (``Vendor.available()`` says which are usable here, and nothing is imported
until then). A third-party package adds its own through the ``kvbench.vendors`` entry-point group
(the entry point names a Vendor class, an instance, or a function returning a list of them).

| adapter | package | ops |
| --- | --- | --- |
| flag_gems | flag_gems | write, mla-write, decode, prefill, mixed |
| vllm-C | vllm (``_custom_ops``, CUDA/HIP) | write, mla-write |
| vllm-triton | vllm (Triton ops) | write, decode, prefill, mixed |
| vllm-flash-attn | vllm (``vllm_flash_attn``) | decode, prefill, mixed |
| flashinfer | flashinfer | write, decode, prefill, mixed |
| flashinfer-tc | flashinfer (tensor-core decode; a mixed batch split between the prefill and the decode wrapper) | decode, mixed |
| flash-attn / flash-attn3 | flash_attn / flash_attn_interface | decode, prefill, mixed |
| ipex | intel_extension_for_pytorch (XPU) | write, decode, prefill, mixed |
| torch baselines | torch | naive write, SDPA / FlexAttention on pre-gathered contiguous K/V |
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from typing import Callable, Optional

from kvdispatch.platform import Platform

from ..cases import PUBLIC_OP, Workload
from ..compare import force_backend

__all__ = ["Unsupported", "Vendor", "KvdispatchImpl", "discover_vendors", "kvdispatch_impls", "ENTRY_POINTS"]

ENTRY_POINTS = "kvbench.vendors"


class Unsupported(Exception):
    """Raised by ``prepare`` when an implementation cannot run a case (layout, dtype, size)."""


class Vendor:
    """Base class of a benchmark adapter.

    * ``name``: label in tables (e.g. ``"flag_gems"``); ``kind`` is ``"vendor"`` (counts for
      "best vendor") or ``"baseline"`` (torch reference points, shown but not counted as a vendor).
    * ``requires``: importable module names; the adapter is unavailable unless all import.
    * ``distribution``: the pip distribution whose version is reported.
    * ``platforms``: platform names it runs on (``"*"``: any).
    * ``ops``: bench op names (``"write"``, ``"mla-write"``, ``"decode"``, ``"prefill"``, ``"mixed"``).
    * ``fp8_q``: takes an fp8 q with a per-tensor ``q_descale`` (attention cases of dtype "fp8q").
      The runner reports such a case "unsupported" for an adapter without it before ``prepare``,
      so an adapter written for bf16 q never sees an fp8 one (it would raise or compute garbage).
    """

    name: str = ""
    kind: str = "vendor"
    requires: tuple = ()
    distribution: Optional[str] = None
    platforms: tuple = ("nvidia", "rocm")
    ops: tuple = ()
    fp8_q: bool = False

    def available(self, platform: Platform) -> Optional[str]:
        """None when usable on ``platform``, else why not (not installed, wrong platform)."""
        if "*" not in self.platforms and platform.name not in self.platforms:
            return f"runs on {', '.join(self.platforms)}, not {platform.name}"
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except Exception as e:
                return f"{mod} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        return None

    def version(self) -> str:
        if self.distribution:
            try:
                return importlib.metadata.version(self.distribution)
            except importlib.metadata.PackageNotFoundError:
                pass
        for mod in self.requires[:1]:
            try:
                return str(getattr(importlib.import_module(mod), "__version__", "?"))
            except Exception:
                return "?"
        return ""

    def context(self):
        """Entered around checking and timing (e.g. to force a kvdispatch backend)."""
        return contextlib.nullcontext()

    def prepare(self, op: str, w: Workload) -> Callable[[], object]:
        raise Unsupported(f"{self.name} does not implement {op}")

    @property
    def label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class KvdispatchImpl(Vendor):
    """One kvdispatch backend, called through the PUBLIC API with ``KVDISPATCH_BACKEND`` forced,
    so the timings include validation, descriptor lookup and dispatch, as users see them."""

    kind = "kvdispatch"
    platforms = ("*",)
    ops = tuple(PUBLIC_OP)
    fp8_q = True  # the public API takes q_descale; a backend that declines fp8 q is unsupported at prepare

    def __init__(self, backend):
        self.backend = backend
        self.name = f"kvdispatch[{backend.name}]"

    def available(self, platform):
        return self.backend.available(platform)

    def version(self) -> str:
        from kvdispatch import __version__
        extra = self.backend.versions()
        return __version__ + ("".join(f" {k} {v}" for k, v in extra.items()) if extra else "")

    def context(self):
        return force_backend(self.backend.name)

    def prepare(self, op, w):
        import kvdispatch as kvd
        from kvdispatch.registry import NoBackendError

        public = PUBLIC_OP[op]
        if public not in self.backend.ops:
            raise Unsupported(f"backend {self.backend.name} does not implement {public}")
        if op == "write":
            a = (w.key, w.value, w.key_cache, w.value_cache, w.slot_mapping, w.kv_cache_dtype, w.k_scale, w.v_scale)
            fn = lambda: kvd.reshape_and_cache_flash(*a)  # noqa: E731
        elif op == "mla-write":
            a = (w.kv_c, w.k_pe, w.kv_cache, w.slot_mapping, w.kv_cache_dtype, w.scale)
            fn = lambda: kvd.concat_and_cache_mla(*a)  # noqa: E731
        else:
            out = w.new_out()
            kw = w.public_attention_kwargs(out)
            fn = lambda: kvd.flash_attn_varlen_func(**kw)  # noqa: E731
        # a backend that declines at call time (its own checks) is unsupported, not broken
        try:
            with self.context():
                fn()
        except (NoBackendError, NotImplementedError) as e:
            raise Unsupported(str(e).splitlines()[0]) from None
        if op not in ("write", "mla-write"):
            out.fill_(float("nan"))  # the checked call must write every element again
        return fn


def kvdispatch_impls(platform: Platform, include_reference: bool = False) -> list:
    """Every registered kvdispatch backend that serves ``platform`` and is available there.

    The reference backend is always the truth; it is also timed on platforms where it is what
    kvdispatch selects (CPU), or when ``include_reference``.
    """
    from kvdispatch.registry import registry

    out = []
    for b in registry.backends:
        if not b.name or getattr(b, "error", None):
            continue
        serves = "*" in b.platforms or platform.name in b.platforms
        if not serves:
            continue
        if b.name == "reference" and not include_reference:
            try:
                chosen = registry.select("reshape_and_cache_flash", platform).name
            except Exception:
                chosen = None
            if chosen != "reference":
                continue
        out.append(KvdispatchImpl(b))
    return out


def builtin_vendors() -> list:
    """One instance of every adapter in this package."""
    from .flaggems import FlagGems
    from .flash_attn import FlashAttn2, FlashAttn3
    from .flashinfer import FlashInfer, FlashInferTC
    from .ipex import IpexVendor
    from .torch_baselines import FlexAttentionGathered, SdpaGathered, TorchNaiveWrite
    from .vllm import VllmC, VllmFlashAttn, VllmTriton
    return [FlagGems(), VllmC(), VllmTriton(), VllmFlashAttn(), FlashInfer(), FlashInferTC(), FlashAttn2(),
            FlashAttn3(), IpexVendor(), TorchNaiveWrite(), SdpaGathered(), FlexAttentionGathered()]


def _entry_point_vendors() -> list:
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        obj = ep.load()
        if isinstance(obj, type):
            obj = obj()
        found += [obj] if isinstance(obj, Vendor) else list(obj())
    return found


def discover_vendors(extra=()) -> list:
    """The built-in adapters, then those of the ``kvbench.vendors`` entry points, then ``extra``
    (installed or not: ``available()`` says)."""
    found, names = [], set()
    for v in builtin_vendors() + _entry_point_vendors() + list(extra):
        if not isinstance(v, Vendor) or not v.name:
            raise TypeError(f"{v!r} is not a named kvbench Vendor")
        if v.name in names:
            raise ValueError(f"two benchmark vendors are named {v.name!r}")
        names.add(v.name)
        found.append(v)
    return found
