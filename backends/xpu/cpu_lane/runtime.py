"""Loads the host shim, compiles kernel specializations at run time, stages torch CPU tensors in
USM memory and launches on the OpenCL CPU device.

Where things come from:
* the SYCL prefix (``include/sycl/sycl.hpp``, ``lib/libsycl.so``, ``lib/libsycl-jit.so``,
  ``lib/libintelocl.so``): ``$KVDISPATCH_SYCL_ROOT``, else the running venv (``sys.prefix``), where
  ``ci/install_sycl.sh`` puts the wheels;
* the shim: ``shim.cpp`` compiled by ``$CXX`` (default g++) into ``$KVDISPATCH_CACHE`` (default
  ``~/.cache/kvdispatch``), named by a hash of its source and the SYCL prefix, so it is rebuilt
  only when either changes;
* kernels: compiled once per process and specialization (``Spec.name``), ~2-4 s each.

Tensors are copied into USM shared allocations (one per underlying storage, so K and V views of
one buffer stay one buffer), and outputs copied back: the lane tests kernels, not transfers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from ..kernels import CSRC, Launch, Spec

SHIM_SRC = Path(__file__).resolve().parent / "shim.cpp"
_ARG_KINDS = {"ptr": 0, "i64": 1, "i32": 2, "f32": 3}
_ERR = 1 << 16


class SyclUnavailable(RuntimeError):
    """The CPU lane cannot run here; the message says what is missing."""


def sycl_root() -> Path:
    return Path(os.environ.get("KVDISPATCH_SYCL_ROOT") or sys.prefix)


def missing() -> Optional[str]:
    """None when the lane's prerequisites are present (cheap file checks), else what is missing."""
    root = sycl_root()
    for rel in ("include/sycl/sycl.hpp", "lib/libsycl.so", "lib/libsycl-jit.so", "lib/libintelocl.so"):
        if not (root / rel).exists():
            return (f"{root / rel} not found: run ci/install_sycl.sh <venv> (intel-sycl-rt, intel-opencl-rt) "
                    "or set KVDISPATCH_SYCL_ROOT")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return f"no C++ compiler {os.environ.get('CXX', 'g++')!r} for the host shim"
    return None


def _build_shim(root: Path) -> Path:
    cxx = os.environ.get("CXX", "g++")
    src = SHIM_SRC.read_bytes()
    tag = hashlib.sha1(src + str(root.resolve()).encode() + cxx.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("KVDISPATCH_CACHE") or Path.home() / ".cache" / "kvdispatch")
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"kvx_sycl_shim-{tag}.so"
    if lib.exists():
        return lib
    tmp = cache / f".{lib.name}.{os.getpid()}"
    lib_dir = (root / "lib").resolve()
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING",
           f"-I{root / 'include'}", str(SHIM_SRC), f"-L{lib_dir}", "-lsycl", f"-Wl,-rpath,{lib_dir}",
           "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SyclUnavailable(f"building the SYCL host shim failed:\n$ {' '.join(cmd)}\n{r.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: concurrent test processes never load a half-written file
    return lib


class Runtime:
    """One OpenCL CPU queue, the kernels compiled so far, and launch with USM staging."""

    def __init__(self):
        why = missing()
        if why:
            raise SyclUnavailable(why)
        root = sycl_root()
        # Intel's OpenCL CPU ICD from the wheel; read by the ICD loader at first platform query
        os.environ.setdefault("OCL_ICD_FILENAMES", str((root / "lib" / "libintelocl.so").resolve()))
        # DPC++ 2026.2's persistent cache crashes the run-time compiler (segfault in the first
        # build, empty cache or not; measure_compile.py --persistent-cache shows it): keep it off
        os.environ["SYCL_CACHE_PERSISTENT"] = "0"
        self.lib = ctypes.CDLL(str(_build_shim(root)))
        L = self.lib
        cp, vp, sz = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t
        L.kvx_init.argtypes = [cp, sz, cp, sz]
        L.kvx_build.argtypes = [cp, ctypes.POINTER(cp), ctypes.c_int, ctypes.POINTER(vp), cp, sz, cp, sz]
        L.kvx_kernel.argtypes = [vp, cp, ctypes.POINTER(vp), cp, sz]
        L.kvx_alloc.argtypes = [sz, ctypes.POINTER(vp), cp, sz]
        L.kvx_free.argtypes = [vp]
        L.kvx_launch.argtypes = [vp, sz, sz, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_double), cp, sz]
        dev = ctypes.create_string_buffer(256)
        self._check(lambda e: L.kvx_init(dev, 256, e, _ERR), "opening the OpenCL CPU device")
        self.device = dev.value.decode()
        self._kernels: dict = {}
        self._bundles: list = []
        self.compile_seconds: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _check(call, what: str) -> None:
        err = ctypes.create_string_buffer(_ERR)
        if call(err) != 0:
            raise RuntimeError(f"SYCL CPU lane: {what}: {err.value.decode(errors='replace')}")

    # -- compilation ------------------------------------------------------------------------------
    def build(self, source: str, options=()) -> ctypes.c_void_p:
        """Compile a translation unit (``-I csrc`` added); returns the bundle handle."""
        opts = [f"-I{CSRC}", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        bundle = ctypes.c_void_p()
        log = ctypes.create_string_buffer(1 << 20)
        err = ctypes.create_string_buffer(_ERR)
        if self.lib.kvx_build(source.encode(), arr, len(opts), ctypes.byref(bundle), log, 1 << 20, err, _ERR):
            raise RuntimeError(
                "SYCL CPU lane: the run-time compiler rejected the source:\n"
                f"{err.value.decode(errors='replace')}\n{log.value.decode(errors='replace')[-6000:]}"
            )
        self._bundles.append(bundle)
        return bundle

    def kernel(self, spec: Spec) -> ctypes.c_void_p:
        k = self._kernels.get(spec.name)
        if k is None:
            with self._lock:
                k = self._kernels.get(spec.name)
                if k is None:
                    t0 = time.perf_counter()
                    bundle = self.build(spec.free_function_source())
                    k = ctypes.c_void_p()
                    self._check(lambda e: self.lib.kvx_kernel(bundle, spec.name.encode(), ctypes.byref(k), e, _ERR),
                                f"looking up kernel {spec.name}")
                    self.compile_seconds[spec.name] = time.perf_counter() - t0
                    self._kernels[spec.name] = k
        return k

    # -- launch -----------------------------------------------------------------------------------
    def _alloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self._check(lambda e: self.lib.kvx_alloc(nbytes, ctypes.byref(p), e, _ERR), f"allocating {nbytes} bytes")
        return p.value

    def launch(self, launch: Launch) -> float:
        """Run ``launch`` on CPU tensors; returns the kernel's wall time in seconds."""
        kernel = self.kernel(launch.spec)
        staged = {}  # storage address -> (usm address, nbytes, storage, written?)
        values, kinds, keep = [], [], []
        try:
            for kind, value, is_out in launch.args:
                if kind == "ptr":
                    addr = 0
                    if value is not None:
                        if value.device.type != "cpu":
                            raise ValueError(f"the SYCL CPU lane runs CPU tensors, got one on {value.device}")
                        st = value.untyped_storage()
                        base, n = st.data_ptr(), st.nbytes()
                        if base not in staged:
                            usm = self._alloc(n)
                            ctypes.memmove(usm, base, n)
                            staged[base] = [usm, n, st, False]
                        staged[base][3] |= is_out
                        addr = staged[base][0] + (value.data_ptr() - base)
                    c = ctypes.c_void_p(addr)
                elif kind == "i64":
                    c = ctypes.c_int64(int(value))
                elif kind == "i32":
                    c = ctypes.c_int32(int(value))
                else:
                    c = ctypes.c_float(float(value))
                keep.append(c)
                kinds.append(_ARG_KINDS[kind])
                values.append(ctypes.cast(ctypes.pointer(c), ctypes.c_void_p))
            n = len(values)
            secs = ctypes.c_double(0.0)
            if launch.groups > 0:
                self._check(lambda e: self.lib.kvx_launch(
                    kernel, launch.groups * launch.local, launch.local, n, (ctypes.c_int * n)(*kinds),
                    (ctypes.c_void_p * n)(*values), ctypes.byref(secs), e, _ERR), f"launching {launch.spec.name}")
            for base, (usm, nbytes, _st, out) in staged.items():
                if out:
                    ctypes.memmove(base, usm, nbytes)
            return secs.value
        finally:
            for usm, *_ in staged.values():
                self.lib.kvx_free(usm)


_runtime: Optional[Runtime] = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime (the shim is built and the device opened on first use)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime()
    return _runtime
