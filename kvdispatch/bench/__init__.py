"""``kvdispatch bench``: compare kvdispatch's backends with every installed vendor kernel on one
device, with each result checked against the reference BEFORE it is timed.

    kvdispatch bench                                  # default device, standard suite
    kvdispatch bench --device cpu --quick --json out.json
    kvdispatch bench --ops write,decode --layouts NHD,HND --tokens 4096,32768 --plot out.png

Rows report time, GB/s (and TFLOP/s for attention), the fraction of the device copy bandwidth
(and matmul peak) measured in the same run, and the ratio to the best vendor. Vendors that cannot
run a case are "unsupported"; those that compute something else are "WRONG" and never timed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform as _py_platform
import subprocess
import sys
import time
from typing import Optional

import torch

from ..cli import default_device

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvdispatch bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, xpu (default: cuda, else xpu, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds on CPU); no vendor ceilings needed")
    p.add_argument("--json", metavar="PATH", help="write every row, the ceilings and versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: %% of ceiling per case and implementation")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    p.add_argument("--ops", help="comma list of: write, mla-write, decode, prefill, mixed")
    p.add_argument("--layouts", help="comma list, e.g. NHD,HND,combined,cross-layer,head-major,diffkv,MLA,mla-slices")
    p.add_argument("--dtypes", help="comma list of: bf16, fp16, fp8")
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
    return p


def _driver() -> Optional[str]:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except Exception:
        return None


def _info(device: torch.device, platform, argv) -> dict:
    from ..cli import versions
    v = versions()
    info = dict(device=str(device), platform=str(platform), versions=v,
                timer="median of CUDA-event-timed calls, L2 cleared before each (triton.testing.do_bench)"
                if device.type == "cuda" else "median host time of synchronized calls",
                command="kvdispatch bench " + " ".join(argv),
                invoked_by=os.environ.get("KVDISPATCH_BENCH_INVOKED_BY"),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, multiprocessors=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", None), memory_bytes=props.total_memory,
                    driver=_driver())
    elif device.type == "xpu":
        info.update(device_name=torch.xpu.get_device_name(device))
    else:
        info.update(device_name=_py_platform.processor() or _py_platform.machine())
    return info


def run(argv: list, console=None) -> dict:
    """Run the benchmark; returns ``{"info", "implementations", "rows", "overhead"}``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..platform import platform_of
    from . import report
    from .cases import Workload, default_suite, quick_suite, select_cases
    from .runner import dispatch_overhead, finish_rows, run_case
    from .timing import copy_bandwidth, matmul_tflops
    from .vendors import discover_vendors, kvdispatch_impls

    args = _parser().parse_args(argv)
    if console is None:
        # logs of CI and device runs are not terminals: rich would wrap the tables at 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=200)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    platform = platform_of(device)
    cases = select_cases(quick_suite() if args.quick else default_suite(), args.ops, args.layouts, args.dtypes,
                         args.sizes, args.tokens, args.decode, args.prefill)
    impls = kvdispatch_impls(platform, args.include_reference) + discover_vendors()
    if args.impls:
        keep = [s.strip() for s in args.impls.split(",") if s.strip()]
        impls = [i for i in impls if any(k in i.name for k in keep)]
    vendor_rows = []
    usable = []
    for impl in impls:
        why = impl.available(platform)
        vendor_rows.append(dict(name=impl.name, kind=impl.kind, available=why is None, reason=why,
                                version=impl.version() if why is None else None))
        if why is None:
            usable.append(impl)

    info = _info(device, platform, argv)
    for vr in vendor_rows:
        if vr["available"] and vr["kind"] == "vendor":
            info["versions"][vr["name"]] = vr["version"]
    if args.list:
        for vr in vendor_rows:
            console.print(escape(f"{vr['name']:<40} {vr['kind']:<10} "
                                 + ((vr["version"] or "") if vr["available"] else f"unavailable: {vr['reason']}")))
        for c in cases:
            console.print(escape(c.id))
        return dict(info=info, implementations=vendor_rows, rows=[], overhead=[])

    console.print(f"[bold]kvdispatch bench[/bold] on {device} ({info.get('device_name', '')}, {platform}): "
                  f"{len(cases)} cases x {len(usable)} implementations")
    info["copy"] = copy_bandwidth(device)
    info["matmul"] = matmul_tflops(device)
    console.print(f"ceilings: copy {info['copy']['GBps']:.0f} GB/s, {info['matmul']['dtype']} matmul "
                  f"{info['matmul']['TFLOPs']:.1f} TFLOP/s")
    rep_ms = args.rep_ms or (20 if args.quick else 100)
    fp8_dtype = platform.fp8_e4m3_dtype
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        task = prog.add_task("benchmarking", total=len(cases) * len(usable))
        for case in cases:
            prog.update(task, description=f"{case.op} {case.layout} {case.dtype} {case.size}: building")
            try:
                w = Workload.build(case, device, fp8_dtype)
            except Exception as e:
                for impl in usable:
                    rows.append(dict(op=case.op, layout=case.layout, dtype=case.dtype, size=case.size,
                                     shape=case.shape, case=case.id, impl=impl.label, kind=impl.kind,
                                     status="error", reason=f"workload: {type(e).__name__}: {e}"[:200],
                                     us=None, GBps=None, TFLOPs=None, pct_copy=None, pct_peak=None,
                                     vs_best_vendor=None, bytes=None, flops=None))
                    prog.advance(task)
                continue
            for impl in usable:
                prog.update(task, description=escape(f"{case.op} {case.layout} {case.dtype} {case.size}: {impl.label}"))
                if case.op not in impl.ops:
                    prog.advance(task)
                    continue
                rows.append(run_case(case, w, impl, info["copy"]["GBps"], info["matmul"]["TFLOPs"], rep_ms,
                                     debug=args.debug, graph=args.graph))
                prog.advance(task)
            del w
            gc.collect()
            if args.json:  # a run cut short (device time limits) still leaves its rows
                finish_rows(rows)
                report.write_json(args.json, info, vendor_rows, rows, [])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finish_rows(rows)
    overhead = [] if args.no_overhead else dispatch_overhead(device, usable, quick=args.quick)
    report.print_tables(console, info, rows, overhead)
    if args.json:
        report.write_json(args.json, info, vendor_rows, rows, overhead)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(info, vendor_rows, rows, overhead))
    if args.plot and rows:
        report.plot(args.plot, info, rows)
    bad = [r for r in rows if r["kind"] == "kvdispatch" and r["status"] in ("WRONG", "error")]
    if bad:
        console.print(f"[bold red]{len(bad)} kvdispatch rows are WRONG or failed[/bold red]")
    return dict(info=info, implementations=vendor_rows, rows=rows, overhead=overhead)


def main(argv: Optional[list] = None) -> int:
    """Entry of ``kvdispatch bench ARGS``. Exit status 1 when a kvdispatch backend is WRONG or fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    result = run(argv)
    bad = [r for r in result["rows"] if r["kind"] == "kvdispatch" and r["status"] in ("WRONG", "error")]
    return 1 if bad else 0
