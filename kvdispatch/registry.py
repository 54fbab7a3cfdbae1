"""The backend registry: pluggy plugins in, one cached selection per (op, platform, descriptor) out."""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Optional

import pluggy
import torch

from . import hookspecs
from .descriptor import KVCacheDescriptor
from .hookspecs import OPS, AttentionArgs, Backend
from .platform import Platform, getenv, platform_of

__all__ = ["OPS", "Backend", "AttentionArgs", "Registry", "NoBackendError", "registry",
           "select_backend", "list_backends"]

ENV_BACKEND = "KVDISPATCH_BACKEND"


class NoBackendError(RuntimeError):
    """No registered backend can serve the request; the message lists each one and why."""


class _BrokenPlugin(Backend):
    """Stands in for a plugin whose entry point failed to import, so `info` shows why."""

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self.error = f"plugin failed to load: {type(error).__name__}: {error}"

    def available(self, platform):
        return self.error


class Registry:
    def __init__(self, entry_point_group: str = hookspecs.PROJECT):
        self._group = entry_point_group
        self._lock = threading.RLock()
        self._pm: Optional[pluggy.PluginManager] = None
        self._backends: Optional[list] = None
        self._selection: dict = {}
        self._load_errors: list = []
        self.generation = 0

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        with self._lock:
            if self._pm is None:
                self._pm = self._load()
        return self._pm

    def _load(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        eps = {}
        for ep in importlib.metadata.entry_points(group=self._group):
            eps.setdefault(ep.name, ep)  # the first of a distribution found twice on sys.path
        for name, ep in eps.items():
            try:
                pm.register(ep.load(), name=name)
            except Exception as e:  # a broken plugin must not break kvdispatch
                self._load_errors.append(_BrokenPlugin(name, e))
        if "reference" not in eps:  # a source tree never installed: the embedded default, same hook
            from . import reference
            pm.register(reference, name="reference")
        return pm

    def register(self, plugin, name: Optional[str] = None) -> None:
        """Register a plugin object/module at run time (tests, notebooks); clears every cache."""
        with self._lock:
            self.plugin_manager.register(plugin, name=name)
            self._backends = None
            self.clear_selection()

    def unregister(self, plugin=None, name: Optional[str] = None) -> None:
        with self._lock:
            self.plugin_manager.unregister(plugin, name=name)
            self._backends = None
            self.clear_selection()

    def clear_selection(self) -> None:
        """Forget every selection made (also the ones the public calls remember per signature)."""
        self._selection.clear()
        self.generation += 1

    @property
    def backends(self) -> list:
        """Every backend, sorted by priority (highest first), broken plugins last."""
        if self._backends is None:
            with self._lock:
                found = [b for group in self.plugin_manager.hook.kvdispatch_backends() for b in group or ()]
                names = set()
                for b in found:
                    if not isinstance(b, Backend) or not b.name:
                        raise TypeError(f"kvdispatch_backends() returned {b!r}: expected a named Backend")
                    if b.name in names:
                        raise ValueError(f"two backends are named {b.name!r}")
                    names.add(b.name)
                found.sort(key=lambda b: -b.priority)
                self._backends = found + self._load_errors
        return self._backends

    def get(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise NoBackendError(f"{ENV_BACKEND}={name!r}: no such backend; "
                             f"registered: {[b.name for b in self.backends]}")

    def explain(self, op: str, platform: Platform, desc: Optional[KVCacheDescriptor] = None,
                forced: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> list:
        """[(backend, reason or None)] for every backend, in the order selection considers them.
        ``dtype``: q's (attention) or key's / kv_c's (writes), when known."""
        rows = []
        for b in self.backends:
            if forced is not None and b.name != forced:
                reason = f"{ENV_BACKEND}={forced} forces another backend"
            elif forced is None and "*" not in b.platforms and platform.name not in b.platforms:
                reason = f"not a backend for platform {platform.name!r} (serves {', '.join(b.platforms) or 'none'})"
            elif op not in b.ops:
                reason = f"does not implement {op}"
            elif (reason := b.available(platform)) is None:
                reason = _declined(b, op, desc, dtype) or b.supports(op, desc, platform)
            rows.append((b, reason))
        return rows

    def select(self, op: str, platform: Platform, desc: Optional[KVCacheDescriptor] = None,
               dtype: Optional[torch.dtype] = None) -> Backend:
        forced = getenv(b"KVDISPATCH_BACKEND") or None
        ck = (op, platform, None if desc is None else desc.key, forced, dtype)
        b = self._selection.get(ck)
        if b is not None:
            return b
        if op not in OPS:
            raise ValueError(f"op_name: expected one of {list(OPS)}, got {op!r}")
        with self._lock:
            if forced is not None:
                self.get(forced)  # unknown name -> clear error
            rows = self.explain(op, platform, desc, forced, dtype)
            for b, reason in rows:
                if reason is None:
                    self._selection[ck] = b
                    return b
        what = (f"{op} on {platform}" + (f" for {desc!r}" if desc is not None else "")
                + (f" with {dtype} inputs" if dtype is not None else ""))
        lines = "\n".join(f"  - {b.name}: {reason}" for b, reason in rows) or "  (no backends registered)"
        raise NoBackendError(f"no backend can run {what}. Considered:\n{lines}")


def _declined(b: Backend, op: str, desc, dtype) -> Optional[str]:
    """Why ``b``'s declarations (``Backend.dtypes`` ...) exclude this call, or None."""
    asked = [("dtypes", dtype)] + ([] if desc is None else [
        ("kv_cache_dtypes", desc.cache_dtype), ("block_sizes", desc.block_size), ("layouts", desc.layout),
        ("head_sizes", desc.head_size_k), ("head_sizes", None if desc.is_mla else desc.head_size_v)])
    for attr, value in asked:
        took = getattr(b, attr)
        took = took.get(op) if isinstance(took, dict) else took
        if value is not None and took is not None and value not in took:
            shown = (f"{took.start}..{took.stop - 1}" + (f" step {took.step}" if took.step != 1 else "")
                     if isinstance(took, range) else ", ".join(str(t).replace("torch.", "") for t in took))
            return f"declares {attr.replace('_', ' ')} {shown}: not {str(value).replace('torch.', '')}"
    return None


registry = Registry()


def select_backend(op_name: str, tensor_or_device) -> str:
    """Name of the backend that would run ``op_name`` (one of ``OPS``) for tensors on this device, running nothing;
    honours ``KVDISPATCH_BACKEND``. A backend may still decline a particular cache at call time (saying why)."""
    return registry.select(op_name, platform_of(tensor_or_device)).name


def list_backends() -> list:
    """Every registered backend's name, available or not, highest priority first (``kvdispatch info`` says why)."""
    return [b.name for b in registry.backends]
