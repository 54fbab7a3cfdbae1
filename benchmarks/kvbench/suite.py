"""The suite mode of ``kvdispatch bench``: kvdispatch's backends against every installed vendor
kernel on one device, each result checked against the reference BEFORE it is timed; and the
``--overhead-only`` mode (the dispatch-overhead table alone).

Rows report time, GB/s (and TFLOP/s for attention), the fraction of the device copy bandwidth
(and matmul peak) measured in the same run, and the ratio to the best vendor. Vendors that cannot
run a case are "unsupported"; those that compute something else are "WRONG" and never timed.
"""

from __future__ import annotations

import gc
import os
import platform as _py_platform
import subprocess
import sys
import time
from typing import Optional

import torch

__all__ = ["run_suite", "run_overhead", "bench_info", "device_of", "default_device"]


def _driver() -> Optional[str]:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except Exception:
        return None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", 0)
    return torch.device("cpu")


def device_of(args) -> torch.device:
    """``--device`` (default: cuda if present, else xpu, else cpu), with its index."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def bench_info(device: torch.device, platform, argv) -> dict:
    """What a result depends on: device, versions, timer, the command, the date."""
    from .info import versions
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


def _console():
    from rich.console import Console

    # logs of CI and device runs are not terminals: rich would wrap the tables at 80 columns
    return Console() if sys.stdout.isatty() else Console(width=200)


def _implementations(args, platform, extra_vendors=()):
    """(usable implementations, a row per implementation: available or why not, version)."""
    from .vendors import discover_vendors, kvdispatch_impls

    impls = kvdispatch_impls(platform, args.include_reference) + discover_vendors(extra_vendors)
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
    return usable, vendor_rows


def run_overhead(args, argv: list, console=None, extra_vendors=()) -> dict:
    """``--overhead-only``: the dispatch-overhead table alone (host time per public call, the
    backend method without checks or dispatch, CUDA-graph replays), with a decode step at a real
    size and a split-KV decode besides the tiny cases."""
    from kvdispatch.platform import platform_of

    from . import report
    from .runner import dispatch_overhead

    console = console or _console()
    device = device_of(args)
    platform = platform_of(device)
    usable, vendor_rows = _implementations(args, platform, extra_vendors)
    info = bench_info(device, platform, argv)
    console.print(f"[bold]kvdispatch bench --overhead-only[/bold] on {device} ({info.get('device_name', '')}, {platform})")
    overhead = dispatch_overhead(device, usable, quick=args.quick, more=True)
    report.print_tables(console, info, [], overhead)
    if args.json:
        report.write_json(args.json, info, vendor_rows, [], overhead)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(info, vendor_rows, [], overhead))
    return dict(info=info, implementations=vendor_rows, rows=[], overhead=overhead)


def run_suite(args, argv: list, console=None, extra_vendors=()) -> dict:
    """The suite; returns ``{"info", "implementations", "rows", "overhead"}``."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvdispatch.platform import platform_of

    from . import report
    from .cases import Workload, default_suite, quick_suite, select_cases
    from .runner import dispatch_overhead, finish_rows, run_case
    from .timing import copy_bandwidth, matmul_tflops

    console = console or _console()
    device = device_of(args)
    platform = platform_of(device)
    cases = select_cases(quick_suite() if args.quick else default_suite(), args.ops, args.layouts, args.dtypes,
                         args.sizes, args.tokens, args.decode, args.prefill)
    usable, vendor_rows = _implementations(args, platform, extra_vendors)

    info = bench_info(device, platform, argv)
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

