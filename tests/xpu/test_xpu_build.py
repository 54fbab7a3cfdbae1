"""Compile checks of what cannot run here.

The AOT extension (csrc/xpu_ops.sycl) needs icpx and a torch with XPU, neither of which exists on
this machine. g++ compiles its host side against the wheel's SYCL headers and torch's headers:
that type-checks the launcher table, the argument unpacking, the op registration AND every kernel
template instantiation of the table (the host compiler instantiates each kernel lambda's body).
It does not generate device code: icpx's device compilation and XPU execution stay unverified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvdispatch.backends.xpu import kernels
from kvdispatch.backends.xpu.cpu_lane.runtime import missing, sycl_root

pytestmark = [pytest.mark.sycl, pytest.mark.skipif(missing() is not None, reason=f"SYCL headers: {missing()}")]

TORCH_INCLUDE = Path(torch.__file__).parent / "include"


def _gxx_syntax(source: Path, include_dirs, tmp_path: Path, defines=()):
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-x", "c++", "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING",
           *[f"-D{d}" for d in defines], *[f"-I{d}" for d in include_dirs], str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"$ {' '.join(cmd)}\n{r.stderr[-8000:]}"


@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "xpu" / "XPUStream.h").exists(),
                    reason="this torch ships no c10/xpu headers")
def test_aot_extension_host_side_compiles(tmp_path):
    # every write instantiation and attention at two head-size pairs (the rest differ only in
    # the integer template arguments); ~15 s of g++
    specs = kernels.aot_specs(((64, 64), (576, 512)))
    (tmp_path / "kvx_aot_kernels.inc").write_text(kernels.aot_table(specs))
    # a CPU torch lacks this generated header of XPU builds; its one macro only matters for linking
    impl = tmp_path / "c10" / "xpu" / "impl"
    impl.mkdir(parents=True)
    (impl / "xpu_cmake_macros.h").write_text("#define C10_XPU_BUILD_SHARED_LIBS\n")
    _gxx_syntax(kernels.CSRC / "xpu_ops.sycl",
                [sycl_root() / "include", TORCH_INCLUDE, TORCH_INCLUDE / "torch/csrc/api/include",
                 kernels.CSRC, tmp_path], tmp_path, defines=["KVX_HOST_SYNTAX_CHECK"])


@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "xpu" / "XPUStream.h").exists(),
                    reason="this torch ships no c10/xpu headers")
def test_first_use_module_host_side_compiles(tmp_path):
    """csrc/jit_ops.cpp is what jit.py builds with torch.utils.cpp_extension on an XPU machine."""
    import sysconfig
    impl = tmp_path / "c10" / "xpu" / "impl"
    impl.mkdir(parents=True)
    (impl / "xpu_cmake_macros.h").write_text("#define C10_XPU_BUILD_SHARED_LIBS\n")
    _gxx_syntax(kernels.CSRC / "jit_ops.cpp",
                [sycl_root() / "include", TORCH_INCLUDE, TORCH_INCLUDE / "torch/csrc/api/include",
                 sysconfig.get_paths()["include"], tmp_path], tmp_path,
                defines=["TORCH_EXTENSION_NAME=kvdispatch_xpu_jit"])


def test_setup_xpu_table_generation(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("setup_xpu", kernels.CSRC.parent / "setup_xpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("KVDISPATCH_XPU_HEAD_SIZES", "128x128,576x512")
    n = mod.write_table(tmp_path)
    text = (tmp_path / "kvx_aot_kernels.inc").read_text()
    entries = [line for line in text.splitlines() if line.startswith('{"')]
    assert n == len(entries) == len(kernels.aot_specs(((128, 128), (576, 512))))
    assert "_d576x512_" in text and "_d64x64_" not in text


def test_esimd_kernels_compile_with_the_runtime_compiler():
    """Every ESIMD instantiation of the AOT table, in one translation unit, through DPC++'s
    run-time compiler front end (parse, template instantiation, ESIMD semantic checks). The
    OpenCL CPU device has no ESIMD target, so the bundle holds no runnable ESIMD kernel: this
    checks the source, not the generated GPU code."""
    from kvdispatch.backends.xpu.cpu_lane.runtime import runtime
    specs = [s for s in kernels.aot_specs() if s.is_esimd]
    assert len(specs) >= 8
    header = kernels.FAMILIES["cache_write_esimd"][0]
    body = "".join(s.free_function_source().replace(f'#include "{header}"\n', "") for s in specs)
    runtime().build(f'#include "{header}"\n' + body)


def test_esimd_only_where_block_messages_apply():
    import kvdispatch as kvd
    from kvbench.layouts import make_kv_cache
    key = torch.randn(4, 2, 64, dtype=torch.bfloat16)
    slots = torch.arange(4)
    for layout, expect in (("NHD", True), ("HND", True), ("cross-layer", True), ("head-major", False)):
        kc, vc = make_kv_cache(layout, 2, 16, 2, 64)
        desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
        launch = kernels.cache_write_launch(key, key, kc, vc, slots, desc, esimd=True)
        assert launch.spec.is_esimd is expect, layout
        assert not kernels.cache_write_launch(key, key, kc, vc, slots, desc).spec.is_esimd
    kc, vc = make_kv_cache("NHD", 2, 16, 2, 64)
    odd = torch.randn(4, 2, 65, dtype=torch.bfloat16)[..., 1:]  # rows not 16-byte aligned
    desc = kvd.KVCacheDescriptor.from_tensors(kc, vc)
    assert not kernels.cache_write_launch(odd, odd, kc, vc, slots, desc, esimd=True).spec.is_esimd
    kc8, vc8 = make_kv_cache("NHD", 2, 16, 2, 64, dtype=torch.float8_e4m3fn)
    fp8 = kvd.KVCacheDescriptor.from_tensors(kc8, vc8, kv_cache_dtype="fp8", k_scale=torch.ones(1),
                                             v_scale=torch.ones(1))
    assert not kernels.cache_write_launch(key, key, kc8, vc8, slots, fp8, esimd=True).spec.is_esimd
