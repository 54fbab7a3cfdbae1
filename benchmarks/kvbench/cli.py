"""The harness's commands: ``kvdispatch check`` and ``kvdispatch bench``.

The core CLI (``kvdispatch/cli.py``) finds them in the ``kvdispatch.commands`` entry-point group
(``pyproject.toml``) and calls them with the arguments after the command's name; ``python -m
kvbench ARGS`` is ``kvdispatch bench ARGS``. This module imports nothing heavy until a command runs.

``kvdispatch bench`` has three modes, one timing module (``timing.py``) and one check against the
reference (``compare.py``) between them:

* the suite (default): kvdispatch's backends against every installed vendor kernel (``suite.py``);
* ``--overhead-only``: the dispatch-overhead table alone (``suite.run_overhead``);
* ``--tune write`` / ``--tune attention``: the launch-config sweeps the Triton config tables
  (``backends/triton/*_configs.py``) were measured with (``tune_write.py``, ``tune_attention.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Optional

__all__ = ["check", "bench", "run_bench", "bench_parser"]

BENCH_USAGE = """\
  kvdispatch bench                                   # default device, standard suite
  kvdispatch bench --device cpu --quick --json out.json
  kvdispatch bench --ops write,decode --layouts NHD,HND --tokens 4096,32768 --plot out.png
  kvdispatch bench --overhead-only                   # host time per call, CUDA-graph replays
  kvdispatch bench --tune write --sections sweep --json w.json --markdown w.md
  kvdispatch bench --tune attention --sections decode,tiles --json a.json
"""


def check(argv: Optional[list] = None) -> int:
    """run each op through the selected backend against the reference"""
    p = argparse.ArgumentParser(prog="kvdispatch check",
                                description="Run each op on a device through the backend selection picks, "
                                            "against the reference on CPU copies of the same inputs.")
    p.add_argument("--device", default=None, help="default: cuda if present, else xpu, else cpu")
    p.add_argument("--quick", action="store_true", help="every other case")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from .selfcheck import main
    return main(args)


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvdispatch bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare kvdispatch's backends with every installed vendor kernel on one device, each result "
                    "checked against the reference BEFORE it is timed (benchmarks/README.md).\n\n" + BENCH_USAGE)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, xpu (default: cuda, else xpu, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (seconds on CPU); no vendor ceilings needed. With --tune attention: a smoke "
                        "run of the sweep (e.g. on the CPU through TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="PATH", help="write every row, the ceilings and versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: %% of ceiling per case and implementation")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--ops", help="comma list of: write, mla-write, decode, prefill, mixed")
    p.add_argument("--layouts", help="comma list, e.g. NHD,HND,combined,cross-layer,head-major,diffkv,MLA,mla-slices")
    p.add_argument("--dtypes", help="comma list of: bf16, fp16, fp8, fp8q (fp8 cache and fp8 q: attention only)")
    p.add_argument("--sizes", help="keep cases whose size label is listed, e.g. T4096,B32xL4096")
    p.add_argument("--tokens", help="write sizes (tokens) replacing the suite's, e.g. 256,4096,32768")
    p.add_argument("--decode", help="decode sizes BATCHxKVLEN replacing the suite's, e.g. 32x4096,128x4096")
    p.add_argument("--prefill", help="prefill sizes BATCHxLEN replacing the suite's, e.g. 8x2048")
    p.add_argument("--impls", help="comma list of substrings: only implementations whose name contains one")
    p.add_argument("--include-reference", action="store_true",
                   help="also time the reference backend where it is not what kvdispatch selects")
    p.add_argument("--no-overhead", action="store_true", help="skip the dispatch-overhead measurements")
    p.add_argument("--graph", action="store_true",
                   help="also time each correct row as CUDA-graph replays (device time without host gaps)")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per row (default 100, quick 20)")
    p.add_argument("--list", action="store_true", help="list implementations and cases, run nothing")
    p.add_argument("--debug", action="store_true", help="print tracebacks of implementations that raise")
    modes = p.add_argument_group("other modes")
    modes.add_argument("--overhead-only", action="store_true",
                       help="only the dispatch-overhead table: host us per public call, per backend call without "
                            "checks or dispatch, CUDA-graph replays; adds a B32xL4096 and a split-KV B1xL32768 decode")
    modes.add_argument("--tune", choices=("write", "attention"),
                       help="a launch-config sweep of the Triton kernels instead of the suite (CUDA GPU): the "
                            "measurements behind backends/triton/write_configs.py / attention_configs.py")
    modes.add_argument("--sections", help="--tune write: comma list of calibration, main, layouts, fp8, heads, mla, "
                                          "host, sweep (default all but sweep); --tune attention: copy, host, decode, "
                                          "layouts, fp8, mla, prefill, splits, tiles (default all)")
    modes.add_argument("--tiles", default="", help="--tune attention, tiles section: 'kind:bm,bn,warps,stages[,splits"
                                                   "[,fp16]] ...' (kind: decode, fp8, prefill, mla128) instead of "
                                                   "the default sweep")
    return p


def run_bench(argv: list, console=None, extra_vendors=()) -> dict:
    """Parse ``kvdispatch bench`` arguments and run the mode they name; returns its results
    (``{"info", "implementations", "rows", "overhead"}`` for the suite and ``--overhead-only``,
    ``{"info", "results"}`` for ``--tune``). ``extra_vendors``: adapters besides the discovered ones."""
    args = bench_parser().parse_args(argv)
    if args.tune == "write":
        from .tune_write import run_tune_write
        return run_tune_write(args, argv)
    if args.tune == "attention":
        from .tune_attention import run_tune_attention
        return run_tune_attention(args, argv)
    from .suite import run_overhead, run_suite
    if args.overhead_only:
        return run_overhead(args, argv, console, extra_vendors)
    return run_suite(args, argv, console, extra_vendors)


def bench(argv: Optional[list] = None) -> int:
    """compare backends and vendor kernels; tuning sweeps (--tune), dispatch overhead (--overhead-only)

    Exit status 1 when a kvdispatch backend's own result is WRONG or fails (suite), or a measurement
    failed (--overhead-only).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = bench_parser().parse_args(argv)
    if not args.tune and importlib.util.find_spec("rich") is None:
        print("kvdispatch bench needs the bench extra: pip install -e '.[bench]' (rich, numpy, matplotlib)",
              file=sys.stderr)
        return 2
    result = run_bench(argv)
    if args.tune:  # its tables are the result
        return 0
    bad = [r for r in result["rows"] if r["kind"] == "kvdispatch" and r["status"] in ("WRONG", "error")]
    if args.overhead_only:
        bad += [o for o in result["overhead"] if o["what"] == "error"]
    return 1 if bad else 0
