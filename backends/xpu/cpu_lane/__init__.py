"""The CPU test lane of the XPU kernels: the plain-SYCL kernels of ``../csrc`` compiled at run
time by DPC++'s kernel compiler and run on Intel's OpenCL CPU device, on torch CPU tensors.

Needs the ``intel-sycl-rt`` and ``intel-opencl-rt`` wheels (``ci/install_sycl.sh``) and g++ for the
host shim (``shim.cpp``, built once and cached). See ``runtime.py``.
"""
