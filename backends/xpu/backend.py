"""The backend objects of the SYCL kernels.

* ``xpu-sycl`` (platform xpu): the kernels compiled ahead of time by the SyclExtension build
  (``setup_xpu.py``), launched on torch's current XPU queue; with ``KVDISPATCH_XPU_JIT=1`` also
  instantiations compiled at first use (``jit.py``). Unavailable, with the reason ``kvdispatch
  info`` shows, where neither can run or torch sees no XPU device; routing then falls to the
  Triton backend (if Intel's Triton XPU backend is installed), else the reference.
* ``sycl-cpu`` (no platform: only when forced with ``KVDISPATCH_BACKEND=sycl-cpu``): the same kernel
  sources compiled at run time by DPC++'s kernel compiler and run on Intel's OpenCL CPU device,
  on CPU tensors. This is how CI tests the kernels without an Intel GPU.

Both build their launches with ``kernels.py``, so what the CPU lane verifies is what XPU runs:
the same sources, template arguments and argument lists.
"""

from __future__ import annotations

from typing import Optional

from kvdispatch.platform import getenv
from kvdispatch.registry import OPS, Backend

from . import kernels


_ELEMENTS = tuple(kernels.PLAIN) + tuple(kernels.FP8)


class _SyclKernels(Backend):
    """Ops in terms of ``kernels.py`` launches; subclasses say where a launch runs."""

    ops = OPS
    esimd = False  # may this backend launch ESIMD variants (Intel GPUs only)
    # attention reads q and the cache as float/half/bf16 or fp8 (out is float/half/bf16, as the public
    # call checks); writes copy any 1/2/4-byte element (supports) or quantize float/half/bf16 to fp8
    dtypes = kv_cache_dtypes = {"flash_attn_varlen_func": _ELEMENTS}

    def _run(self, launch: kernels.Launch) -> None:
        raise NotImplementedError

    def supports(self, op, desc, platform) -> Optional[str]:
        if desc is not None and op != "flash_attn_varlen_func" and desc.cache_dtype.itemsize not in kernels.RAW:
            return f"no {desc.cache_dtype.itemsize}-byte element copy"
        return None

    def reshape_and_cache_flash(self, key, value, key_cache, value_cache, slot_mapping, desc) -> None:
        self._run(kernels.cache_write_launch(key, value, key_cache, value_cache, slot_mapping, desc,
                                             esimd=self.esimd))

    def concat_and_cache_mla(self, kv_c, k_pe, kv_cache, slot_mapping, desc) -> None:
        self._run(kernels.mla_write_launch(kv_c, k_pe, kv_cache, slot_mapping, desc))

    def flash_attn_varlen_func(self, q, k, v, out, desc, args) -> None:
        self._run(kernels.attention_launch(q, k, v, out, desc, args))


class SyclCpuBackend(_SyclKernels):
    name = "sycl-cpu"
    priority = 0
    platforms = ()  # a test lane: chosen only through KVDISPATCH_BACKEND=sycl-cpu
    description = ("the XPU backend's SYCL kernels compiled at run time by DPC++ and run on the "
                   "OpenCL CPU device (the CI lane of the XPU kernels)")
    # Out-of-range slots would write outside the staged buffers of this process: the public call
    # always runs the value checks first (kvdispatch.checks.checks_values).
    always_check_values = True

    def available(self, platform) -> Optional[str]:
        if platform.name != "cpu":
            return f"runs CPU tensors only (the OpenCL CPU device), not {platform.name!r} ones"
        from .cpu_lane.runtime import missing
        return missing()

    def versions(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version
        out = {}
        for pkg in ("intel-sycl-rt", "intel-opencl-rt"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
        return out

    def _run(self, launch) -> None:
        from .cpu_lane.runtime import runtime
        runtime().launch(launch)


class XpuSyclBackend(_SyclKernels):
    name = "xpu-sycl"
    priority = 200  # above triton (100): on XPU our own kernels win when built
    platforms = ("xpu",)
    description = "SYCL kernels compiled ahead of time for Intel GPUs (SyclExtension, setup_xpu.py)"

    @property
    def esimd(self) -> bool:
        # opt-in until the ESIMD twins are measured against the plain kernels on an Intel GPU
        return getenv(kernels.ESIMD_ENV.encode()) not in (None, "", "0")

    def available(self, platform) -> Optional[str]:
        from . import extension, jit
        aot = extension.load_error()
        if aot is None:
            return None
        first_use = jit.unavailable()
        return None if first_use is None else f"{aot}; {first_use}"

    def supports(self, op, desc, platform) -> Optional[str]:
        why = super().supports(op, desc, platform)
        if why is None and desc is not None:
            from . import extension, jit
            if extension.load_error() is None and jit.unavailable() is not None:
                why = extension.aot_support(op, desc)
        return why

    def versions(self) -> dict:
        from . import extension
        return extension.versions()

    def _run(self, launch) -> None:
        from . import extension, jit
        if extension.has_kernel(launch.spec.name):
            extension.launch(launch)
        elif jit.unavailable() is None:
            jit.launch(launch)  # not in the AOT table (or no AOT build): compile at first use
        else:
            extension.launch(launch)  # raises, naming the missing instantiation
