"""kvdispatch: one call per paged-KV-cache operation, routed by the tensors' device.

    import kvdispatch as kvd
    kvd.reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping)
    out = kvd.flash_attn_varlen_func(q, key_cache, value_cache, max_seqlen_q, cu_seqlens_q,
                                     max_seqlen_k, seqused_k=seqused_k, block_table=block_table)

Routing: NVIDIA/ROCm ``cuda`` tensors -> Triton kernels, Intel ``xpu`` -> the SYCL extension,
everything else -> the PyTorch reference. ``KVDISPATCH_BACKEND=<name>`` forces a backend.
"""

from .hookspecs import hookimpl
from .platform import Platform, platform_of
from .descriptor import CacheStrides, KVCacheDescriptor
from .registry import AttentionArgs, Backend, NoBackendError, list_backends, select_backend
from .ops import concat_and_cache_mla, flash_attn_varlen_func, reshape_and_cache_flash

__version__ = "0.1.0"

__all__ = [
    "reshape_and_cache_flash", "concat_and_cache_mla", "flash_attn_varlen_func",
    "KVCacheDescriptor", "CacheStrides", "select_backend", "list_backends",
    "Backend", "AttentionArgs", "NoBackendError", "Platform", "platform_of", "hookimpl",
]
