"""The backend registry: pluggy plugins in, one cached selection per (op, platform, descriptor) out."""

from __future__ import annotations

import importlib.metadata
import threading
from typing import NamedTuple, Optional

import pluggy
import torch

from . import hookspecs
from .descriptor import KVCacheDescriptor
from .platform import Platform, getenv, platform_of

__all__ = [
    "OPS", "Backend", "AttentionArgs", "Registry", "NoBackendError", "registry",
    "select_backend", "list_backends",
]

OPS = ("reshape_and_cache_flash", "concat_and_cache_mla", "flash_attn_varlen_func")
ENV_BACKEND = "KVDISPATCH_BACKEND"


class NoBackendError(RuntimeError):
    """No registered backend can serve the request; the message lists each one and why."""


class AttentionArgs(NamedTuple):
    """Everything about one ``flash_attn_varlen_func`` call except q/k/v/out, resolved.

    ``window_left`` / ``window_right`` are -1 for unbounded; ``causal`` is already folded into
    ``window_right = 0`` (bottom-right aligned). ``block_table`` is None for non-paged calls, where
    ``cu_seqlens_k`` gives the key ranges; paged calls give ``seqused_k``.
    """

    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    cu_seqlens_k: Optional[torch.Tensor]
    seqused_k: Optional[torch.Tensor]
    max_seqlen_k: int
    block_table: Optional[torch.Tensor]
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    q_descale: Optional[torch.Tensor]
    k_descale: Optional[torch.Tensor]
    v_descale: Optional[torch.Tensor]
    # ALiBi slopes, float32 ``[num_q_heads]`` or ``[batch, num_q_heads]`` (any strides): the score
    # of query position p (bottom-right aligned) and key j gets ``-slope * |p - j|`` after softcap.
    alibi_slopes: Optional[torch.Tensor] = None
    # attention sinks, ``[num_q_heads]`` (float32, or the model's 16-bit dtype): one logit per
    # query head in the softmax denominator (natural-log units, like the scaled scores), no value.
    s_aux: Optional[torch.Tensor] = None
    # float32 ``[num_q_heads, total_q]`` (any strides) to receive the natural-log LSE of each row's
    # softmax denominator (sink included; -inf for a row that sees no key and has no sink), or None.
    softmax_lse: Optional[torch.Tensor] = None
    # split-KV: 0 = the backend chooses, 1 = never split, n = at most n splits
    num_splits: int = 0
    # A dict the backend may keep launch state in (plans, compiled kernels) for this call's
    # signature: the public call passes one per signature (every tensor's dtype, device, strides,
    # and shape up to the token count and batch), so what a backend stores there under its options
    # (scalars, device) holds for every later call that gets the same dict. None: nothing is kept.
    plans: Optional[dict] = None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def paged(self) -> bool:
        return self.block_table is not None


class Backend:
    """Base class of every backend. Subclasses set the class attributes and implement the ops.

    * ``name``: what ``KVDISPATCH_BACKEND`` and ``select_backend`` use.
    * ``priority``: higher wins among the backends that can serve a request.
    * ``platforms``: platform names (``kvdispatch.platform``) this backend is chosen for
      automatically; ``"*"`` means any. ``KVDISPATCH_BACKEND`` may force it elsewhere, where
      ``available()`` still decides.
    * ``ops``: the public op names it implements.
    * What it takes, checked by selection before ``supports()``; None (the default) takes anything,
      a container is asked ``in`` (tuple, frozenset, range), a dict maps op names to containers:
      ``dtypes`` (q's / key's / kv_c's dtype), ``kv_cache_dtypes`` (``desc.cache_dtype``),
      ``block_sizes``, ``head_sizes`` (K's and V's), ``layouts`` (``desc.layout``).

    Op methods receive validated arguments and the descriptor; they write into the given caches /
    ``out`` and return None. They must not re-check what the public API already checked.
    """

    name: str = ""
    priority: int = 0
    platforms: tuple = ()
    ops: tuple = ()
    description: str = ""
    # the public call runs the value checks (kvdispatch.checks) before every call of this backend,
    # not only under KVDISPATCH_DEBUG=1: the reference, and lanes that would write outside buffers
    always_check_values: bool = False
    dtypes = kv_cache_dtypes = block_sizes = head_sizes = layouts = None

    def available(self, platform: Platform) -> Optional[str]:
        """None when this backend can run on ``platform`` now, else the reason it cannot."""
        return None

    def supports(self, op: str, desc: Optional[KVCacheDescriptor], platform: Platform) -> Optional[str]:
        """None when ``op`` on a cache described by ``desc`` is supported, else why not.

        ``desc`` is None when the question is asked without a cache (``select_backend``).
        Called once per (op, platform, descriptor key): results are cached.
        """
        return None

    def versions(self) -> dict:
        """Versions of what this backend runs on, for ``kvdispatch info`` and benchmark records."""
        return {}

    # op implementations ------------------------------------------------------------------------
    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping,
                                desc: KVCacheDescriptor) -> None:
        raise NotImplementedError

    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc: KVCacheDescriptor) -> None:
        raise NotImplementedError

    def flash_attn_varlen_func(self, q, k, v, out, desc: KVCacheDescriptor, args: AttentionArgs) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"


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

    # -- plugins ----------------------------------------------------------------------------------
    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            with self._lock:
                if self._pm is None:
                    self._pm = self._load()
        return self._pm

    def _load(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        seen = set()
        for ep in importlib.metadata.entry_points(group=self._group):
            if ep.name in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as e:  # a broken plugin must not break kvdispatch
                self._load_errors.append(_BrokenPlugin(ep.name, e))
        if "reference" not in seen:
            # Running from a source tree that was never installed: the embedded default still
            # exists, registered through the same hook as everything else.
            from . import reference
            pm.register(reference, name="reference")
        return pm

    def register(self, plugin, name: Optional[str] = None) -> None:
        """Register a plugin object/module at run time (tests, notebooks); clears every cache."""
        with self._lock:
            self.plugin_manager.register(plugin, name=name)
            self._invalidate()

    def unregister(self, plugin=None, name: Optional[str] = None) -> None:
        with self._lock:
            self.plugin_manager.unregister(plugin, name=name)
            self._invalidate()

    def _invalidate(self) -> None:
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
                found = []
                for group in self.plugin_manager.hook.kvdispatch_backends():
                    found.extend(group or ())
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
        raise NoBackendError(
            f"{ENV_BACKEND}={name!r}: no such backend; registered: {[b.name for b in self.backends]}"
        )

    # -- selection --------------------------------------------------------------------------------
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
            else:
                reason = b.available(platform)
                if reason is None:
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
    """Name of the backend that would run ``op_name`` for tensors on this device.

    ``op_name`` is a public function name (``"reshape_and_cache_flash"``, ``"concat_and_cache_mla"``,
    ``"flash_attn_varlen_func"``). Answers without running anything; honours ``KVDISPATCH_BACKEND``.
    A backend may still decline a particular cache layout at call time (the error then says why).
    """
    return registry.select(op_name, platform_of(tensor_or_device)).name


def list_backends() -> list:
    """Names of every registered backend, available or not, highest priority first.

    ``kvdispatch info`` (or ``registry.explain``) says which are available and why not.
    """
    return [b.name for b in registry.backends]

