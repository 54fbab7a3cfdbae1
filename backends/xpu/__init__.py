"""Intel XPU backend: SYCL kernels (``csrc/``) that take the cache's runtime strides.

Registered through the ``kvdispatch`` entry-point group like any third-party plugin. Two
backends share the kernel sources and launch plans (``kernels.py``): ``xpu-sycl`` runs them on XPU
from the ahead-of-time SyclExtension build, ``sycl-cpu`` compiles them at run time for the OpenCL
CPU device (the CI lane). See README.md for what builds what and what each needs.
"""

from kvdispatch.hookspecs import hookimpl


@hookimpl
def kvdispatch_backends():
    from .backend import SyclCpuBackend, XpuSyclBackend
    return [XpuSyclBackend(), SyclCpuBackend()]
