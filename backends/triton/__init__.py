"""Triton backend for NVIDIA and ROCm (``cuda`` device type), registered through the
``kvdispatch`` entry-point group like any third-party plugin.

Kernels live in ``write.py`` (cache writes) and ``attention.py`` (paged attention); launch-config
tables in ``write_configs.py`` / ``attention_configs.py``. The kernels are shared by every vendor:
only the tables differ.
"""

from kvdispatch.hookspecs import hookimpl


@hookimpl
def kvdispatch_backends():
    from .backend import TritonBackend
    return [TritonBackend()]
