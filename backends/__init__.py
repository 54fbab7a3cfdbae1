"""Device backends of kvdispatch, importable as ``kvdispatch.backends``.

One folder per implementation family; each registers through the ``kvdispatch`` entry-point group
exactly as a third-party package would:

* ``triton/``  - Triton kernels for NVIDIA and ROCm (and Intel's Triton XPU backend where present).
* ``xpu/``     - the SYCL/ESIMD C++ extension for Intel GPUs.
* ``vendors/`` - adapters for vendor kernels (vLLM, FlashInfer, flash-attn, FlagGems, IPEX), used by
  ``kvdispatch bench`` and as lower-priority backends where their packages are installed.
"""
