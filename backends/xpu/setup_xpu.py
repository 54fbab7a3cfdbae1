"""Opt-in ahead-of-time build of the XPU SYCL kernels as a torch SyclExtension.

    # needs: torch >= 2.8 built with XPU, oneAPI DPC++ (icpx on PATH, `source setvars.sh`)
    cd <repo root>
    TORCH_XPU_ARCH_LIST=bmg,pvc python backends/xpu/setup_xpu.py build_ext --inplace

It writes ``backends/xpu/_C.*.so`` next to this file (importable as ``kvdispatch.backends.xpu._C``
from an editable install), which registers ``torch.ops.kvdispatch_xpu.launch`` for the XPU dispatch
key. kvdispatch loads it lazily on the first XPU call; until it exists the ``xpu-sycl`` backend is
unavailable and ``kvdispatch info`` says why.

Which instantiations get compiled: ``kernels.aot_specs()`` (every write variant; attention for the
head-size pairs in ``KVDISPATCH_XPU_HEAD_SIZES``, default ``kernels.DEFAULT_AOT_HEAD_SIZES``), written
to ``build/kvx_xpu/kvx_aot_kernels.inc``. ``TORCH_XPU_ARCH_LIST`` picks the GPU targets (torch's
SyclExtension turns it into ``-fsycl-targets=spir64_gen -Xs "-device ..."``); fewer targets and
head sizes build faster.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _kernels_module():
    # kernels.py imports only torch and kvdispatch core; load it by path so this script works
    # from a source tree whether or not kvdispatch is installed
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("kvx_kernels", HERE / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def head_sizes(kernels) -> tuple:
    env = os.environ.get("KVDISPATCH_XPU_HEAD_SIZES")
    if not env:
        return kernels.DEFAULT_AOT_HEAD_SIZES
    return tuple(tuple(int(n) for n in pair.split("x")) for pair in env.split(",") if pair)


def write_table(out_dir: Path) -> int:
    kernels = _kernels_module()
    specs = kernels.aot_specs(head_sizes(kernels))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kvx_aot_kernels.inc"
    text = kernels.aot_table(specs)
    if not path.exists() or path.read_text() != text:  # unchanged table: no rebuild
        path.write_text(text)
    return len(specs)


def main() -> None:
    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, SyclExtension

    if not (hasattr(torch, "xpu") and torch.version.xpu):
        sys.exit("setup_xpu.py: this torch has no XPU support (torch.version.xpu is None)")
    gen = ROOT / "build" / "kvx_xpu"
    n = write_table(gen)
    print(f"setup_xpu.py: {n} kernel instantiations -> {gen / 'kvx_aot_kernels.inc'}")
    os.chdir(ROOT)
    setup(
        name="kvdispatch-xpu-kernels",
        package_dir={"kvdispatch.backends": "backends"},
        ext_modules=[SyclExtension(
            "kvdispatch.backends.xpu._C",
            ["backends/xpu/csrc/xpu_ops.sycl"],
            include_dirs=[str(HERE / "csrc"), str(gen)],
            # icpx defaults to -fp-model=fast, which assumes no infinities or NaNs; attention
            # relies on them (-inf running max, -inf LSE of a row that sees nothing, NaN
            # propagation), so they are honoured again while the other fast-math rules stay
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "sycl": ["-O3", "-fno-finite-math-only"]},
        )],
        cmdclass={"build_ext": BuildExtension},
        script_args=sys.argv[1:] or ["build_ext", "--inplace"],
    )


if __name__ == "__main__":
    main()
