"""The plugin interface (pluggy project ``"kvdispatch"``): the one hook, the :class:`Backend` it returns and the
:class:`AttentionArgs` a backend receives. Plugins (modules or objects with ``@kvdispatch.hookimpl`` functions) are
found through the ``kvdispatch`` entry-point group, the built-in backends exactly like a third-party one (README.md,
"Writing a backend plugin", has a complete example). Selection is NOT a hook: the registry filters the declared
backends itself, so ``select_backend()`` and ``kvdispatch info`` can explain every choice before anything runs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import pluggy
import torch

from .descriptor import KVCacheDescriptor
from .platform import Platform

PROJECT = "kvdispatch"
OPS = ("reshape_and_cache_flash", "concat_and_cache_mla", "flash_attn_varlen_func")

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvdispatch_backends():
    """Return every :class:`kvdispatch.Backend` this plugin knows, available on this machine or not
    (``Backend.available()`` says which, and why not). Called once, when the registry first loads its plugins
    (the first public call, ``list_backends()`` or ``kvdispatch info``)."""


class AttentionArgs(NamedTuple):
    """Everything about one ``flash_attn_varlen_func`` call except q/k/v/out, resolved. Windows are -1 for
    unbounded, ``causal`` already folded into ``window_right = 0`` (bottom-right aligned); ``block_table`` None:
    not paged, ``cu_seqlens_k`` gives the key ranges (paged: ``seqused_k``)."""

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
    # float32 [num_q_heads] or [batch, num_q_heads], any strides: -slope * |p - j| after softcap
    alibi_slopes: Optional[torch.Tensor] = None
    # [num_q_heads], float32 or the model's dtype: one sink logit per query head in the softmax denominator
    s_aux: Optional[torch.Tensor] = None
    # float32 [num_q_heads, total_q], any strides: each row's natural-log LSE (-inf with neither key nor sink)
    softmax_lse: Optional[torch.Tensor] = None
    num_splits: int = 0  # split-KV: 0 = the backend chooses, 1 = never split, n = at most n splits
    # where the backend may keep launch state (plans, compiled kernels): the public call passes one dict
    # per call signature (dtypes, devices, strides, shapes up to the token count and batch)
    plans: Optional[dict] = None

    batch = property(lambda self: self.cu_seqlens_q.shape[0] - 1)
    paged = property(lambda self: self.block_table is not None)


class Backend:
    """Base class of every backend: subclasses set the class attributes and implement their ops.

    * ``name``: what ``KVDISPATCH_BACKEND`` and ``select_backend`` say; ``priority``: the highest wins; ``ops``: the
      op names it implements; ``description``: one line of free text about it.
    * ``platforms``: the platform names it is chosen for automatically (``"*"``: any); where ``KVDISPATCH_BACKEND``
      forces it, ``available()`` still decides.
    * ``always_check_values``: the value checks run before every call, not only under ``KVDISPATCH_DEBUG=1``.
    * ``takes_plans``: the public writes pass ``plans=``, the call signature's dict for launch state (attention gets
      it as ``AttentionArgs.plans``).
    * Declarations, checked by selection before ``supports()``: None takes anything, a container is asked ``in``, a
      dict maps op names to containers: ``dtypes`` (q's / key's / kv_c's), ``kv_cache_dtypes`` (``desc.cache_dtype``),
      ``block_sizes``, ``head_sizes`` (K's and V's), ``layouts`` (``desc.layout``).

    Op methods receive validated arguments and the descriptor, write into the given caches / ``out`` and return
    None; they must not re-check what the public API checked."""

    name: str = ""
    priority: int = 0
    platforms: tuple = ()
    ops: tuple = ()
    description: str = ""
    always_check_values: bool = False
    takes_plans: bool = False
    dtypes = kv_cache_dtypes = block_sizes = head_sizes = layouts = None

    def available(self, platform: Platform) -> Optional[str]:
        """None when this backend can run on ``platform`` now, else the reason it cannot."""
        return None

    def supports(self, op: str, desc: Optional[KVCacheDescriptor], platform: Platform) -> Optional[str]:
        """None when ``op`` on a cache described by ``desc`` is supported, else why not. ``desc`` is
        None when asked without a cache (``select_backend``). Cached per (op, platform, descriptor key)."""
        return None

    def versions(self) -> dict:
        """Versions of what this backend runs on, for benchmark records."""
        return {}

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping,
                                desc: KVCacheDescriptor) -> None:
        raise NotImplementedError

    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc: KVCacheDescriptor) -> None:
        raise NotImplementedError

    def flash_attn_varlen_func(self, q, k, v, out, desc: KVCacheDescriptor, args: AttentionArgs) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} priority={self.priority}>"
