"""``kvdispatch`` command line: ``info``, ``check``, ``bench``."""

from __future__ import annotations

import argparse
import platform as _py_platform
import sys
import time
from typing import Optional

import torch

from . import __version__
from .platform import platform_of
from .registry import OPS, registry


_SHORT = {"reshape_and_cache_flash": "write", "concat_and_cache_mla": "mla-write",
          "flash_attn_varlen_func": "attention"}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", 0)
    return torch.device("cpu")


def visible_devices() -> list:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        devs += [torch.device("xpu", i) for i in range(torch.xpu.device_count())]
    return devs


def versions() -> dict:
    """Versions of everything a result depends on (info, check, bench records)."""
    v = {"kvdispatch": __version__, "python": _py_platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    if torch.version.hip:
        v["hip"] = torch.version.hip
    for mod in ("triton", "pluggy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = "not installed"
    return v


def _console():
    from rich.console import Console
    return Console()


def cmd_info(args) -> int:
    from rich.table import Table

    con = _console()
    con.print(f"[bold]kvdispatch {__version__}[/bold]  " +
              "  ".join(f"{k} {val}" for k, val in versions().items() if k != "kvdispatch"))
    devs = visible_devices()
    plats = {d: platform_of(d) for d in devs}

    t = Table(title="Devices")
    for col in ("device", "platform", "arch", "name", "multiprocessors", "fp8 e4m3 type"):
        t.add_column(col)
    for d, p in plats.items():
        t.add_row(str(d), p.name, p.arch or "-", p.device_name or "-", str(p.multiprocessors or "-"),
                  str(p.fp8_e4m3_dtype).replace("torch.", ""))
    con.print(t)

    t = Table(title="Backends (highest priority first)")
    for col in ("backend", "priority", "platforms", "ops", *[f"on {d}" for d in devs]):
        t.add_column(col, overflow="fold")
    for b in registry.backends:
        cells = []
        for d in devs:
            reason = b.available(plats[d])
            cells.append("[green]available[/green]" if reason is None else f"[dim]{reason}[/dim]")
        t.add_row(b.name, str(b.priority), ", ".join(b.platforms) or "-",
                  ", ".join(_SHORT.get(o, o) for o in b.ops) or "-", *cells)
    con.print(t)

    t = Table(title="Selected backend per op and device" + (" (KVDISPATCH_BACKEND set)" if _forced() else ""))
    t.add_column("op")
    for d in devs:
        t.add_column(str(d), overflow="fold")
    for op in OPS:
        row = []
        for d in devs:
            try:
                row.append(registry.select(op, plats[d]).name)
            except Exception as e:
                row.append(f"[red]none[/red]: {str(e).splitlines()[0]}")
        t.add_row(op, *row)
    con.print(t)
    if args.verbose:
        for d in devs:
            for op in OPS:
                con.print(f"[bold]{op} on {d}[/bold]")
                for b, reason in registry.explain(op, plats[d], forced=_forced()):
                    con.print(f"  {b.name}: {reason or 'would serve'}")
    return 0


def _forced() -> Optional[str]:
    import os
    return os.environ.get("KVDISPATCH_BACKEND") or None


def cmd_check(args) -> int:
    from rich.table import Table

    from .selfcheck import run_checks

    dev = torch.device(args.device) if args.device else default_device()
    con = _console()
    con.print(f"checking every op on [bold]{dev}[/bold] ({platform_of(dev)}) against the reference on cpu")
    t = Table()
    for col in ("op", "case", "backend", "result", "max |err|", "time"):
        t.add_column(col)
    failed = 0
    for r in run_checks(dev, quick=args.quick):
        ok = r["ok"]
        failed += not ok
        t.add_row(r["op"], r["case"], r["backend"], "[green]pass[/green]" if ok else f"[red]FAIL[/red] {r['error']}",
                  f"{r['max_err']:.3g}" if r["max_err"] is not None else "-", f"{r['seconds'] * 1e3:.1f} ms")
    con.print(t)
    con.print(f"[bold]{'all passed' if not failed else f'{failed} failed'}[/bold]")
    return 1 if failed else 0


def cmd_bench(argv) -> int:
    try:
        from .bench import main as bench_main
    except ImportError as e:  # pragma: no cover
        print(f"kvdispatch bench is unavailable: {e}", file=sys.stderr)
        return 2
    return bench_main(argv)


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    p = argparse.ArgumentParser(prog="kvdispatch", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="platform, versions, every backend and which one each op would use")
    pi.add_argument("-v", "--verbose", action="store_true", help="explain every selection")
    pc = sub.add_parser("check", help="run each op through the selected backend against the reference")
    pc.add_argument("--device", default=None, help="default: cuda if present, else xpu, else cpu")
    pc.add_argument("--quick", action="store_true")
    sub.add_parser("bench", help="compare backends and vendor kernels (kvdispatch bench --help)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = {"info": cmd_info, "check": cmd_check}[args.cmd](args)
    if getattr(args, "verbose", False):
        print(f"({time.perf_counter() - t0:.2f} s)")
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
