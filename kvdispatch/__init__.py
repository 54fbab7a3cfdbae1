"""kvdispatch: one call per paged-KV-cache operation, routed by the tensors' device: NVIDIA/ROCm ``cuda``
tensors to Triton kernels, Intel ``xpu`` to the SYCL extension, everything else to the PyTorch reference
(``KVDISPATCH_BACKEND=<name>`` forces a backend). README.md shows the calls."""

from .hookspecs import hookimpl
from .platform import Platform, platform_of
from .descriptor import CacheStrides, KVCacheDescriptor
from .registry import AttentionArgs, Backend, NoBackendError, list_backends, select_backend
from .ops import concat_and_cache_mla, flash_attn_varlen_func, reshape_and_cache_flash

__version__ = "0.1.0"

__all__ = ["reshape_and_cache_flash", "concat_and_cache_mla", "flash_attn_varlen_func", "KVCacheDescriptor",
           "CacheStrides", "select_backend", "list_backends", "Backend", "AttentionArgs", "NoBackendError",
           "Platform", "platform_of", "hookimpl"]
