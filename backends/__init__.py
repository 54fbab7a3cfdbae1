"""Device backends of kvdispatch, importable as ``kvdispatch.backends``.

One folder per implementation family; each registers through the ``kvdispatch`` entry-point group
exactly as a third-party package would:

* ``triton/``  - Triton kernels for NVIDIA and ROCm (and Intel's Triton XPU backend where present).
* ``xpu/``     - the SYCL/ESIMD C++ extension for Intel GPUs, and ``xpu/ipex.py``: IPEX's paged
  kernels as a low-priority XPU backend where ``intel_extension_for_pytorch`` is installed.

The benchmark adapters for vendor kernels live with the benchmark harness (``benchmarks/kvbench``).
"""
