"""Vendor adapters for ``kvdispatch bench`` (and IPEX as a low-priority kvdispatch backend on XPU).

Registered through the ``kvdispatch`` entry-point group (``vendors = "kvdispatch.backends.vendors"``)
like any third-party plugin. Every adapter is listed whether or not its package is installed;
``Vendor.available()`` says which are usable here, and nothing is imported until then.

| adapter | package | ops |
| --- | --- | --- |
| flag_gems | flag_gems | write, mla-write, decode, prefill, mixed |
| vllm-C | vllm (``_custom_ops``, CUDA/HIP) | write, mla-write |
| vllm-triton | vllm (Triton ops) | write, decode, prefill, mixed |
| vllm-flash-attn | vllm (``vllm_flash_attn``) | decode, prefill, mixed |
| flashinfer | flashinfer | write, decode, prefill, mixed |
| flash-attn / flash-attn3 | flash_attn / flash_attn_interface | decode, prefill, mixed |
| ipex | intel_extension_for_pytorch (XPU) | write, decode, prefill, mixed |
| torch baselines | torch | naive write, SDPA / FlexAttention on pre-gathered contiguous K/V |
"""

from kvdispatch.hookspecs import hookimpl


@hookimpl
def kvdispatch_vendors():
    from .flaggems import FlagGems
    from .flash_attn import FlashAttn2, FlashAttn3
    from .flashinfer import FlashInfer
    from .ipex import IpexVendor
    from .torch_baselines import FlexAttentionGathered, SdpaGathered, TorchNaiveWrite
    from .vllm import VllmC, VllmFlashAttn, VllmTriton
    return [FlagGems(), VllmC(), VllmTriton(), VllmFlashAttn(), FlashInfer(), FlashAttn2(), FlashAttn3(),
            IpexVendor(), TorchNaiveWrite(), SdpaGathered(), FlexAttentionGathered()]


@hookimpl
def kvdispatch_backends():
    from .ipex import IpexBackend
    return [IpexBackend()]
