"""``kvdispatch`` command line: ``info``, and the subcommands other packages declare in the
``kvdispatch.commands`` entry-point group (``check`` and ``bench`` are the benchmark harness's,
``benchmarks/kvbench``); the core never imports them."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform as _py_platform
import sys
import time
from typing import Optional

import torch

from . import __version__
from .platform import platform_of
from .registry import OPS, registry

COMMANDS = "kvdispatch.commands"
_SHORT = {"reshape_and_cache_flash": "write", "concat_and_cache_mla": "mla-write",
          "flash_attn_varlen_func": "attention"}


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
    v.update({k: val for k, val in (("cuda", torch.version.cuda), ("hip", torch.version.hip)) if val})
    for mod in ("triton", "pluggy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = "not installed"
    return v


def table(title: Optional[str], columns, rows) -> str:
    """A plain-text table: the core prints without any rendering library."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths]] + rows
    return "\n".join([title] * bool(title) + ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                                               for cells in lines]) + "\n"


def cmd_info(args) -> int:
    print(f"kvdispatch {__version__}  " + "  ".join(f"{k} {val}" for k, val in versions().items()
                                                    if k != "kvdispatch"))
    devs = visible_devices()
    plats = {d: platform_of(d) for d in devs}
    forced = os.environ.get("KVDISPATCH_BACKEND") or None
    print(table("Devices", ("device", "platform", "arch", "name", "multiprocessors", "fp8 e4m3 type"),
                [(d, p.name, p.arch or "-", p.device_name or "-", p.multiprocessors or "-",
                  str(p.fp8_e4m3_dtype).replace("torch.", "")) for d, p in plats.items()]))
    rows = [(b.name, b.priority, ", ".join(b.platforms) or "-", ", ".join(_SHORT.get(o, o) for o in b.ops) or "-",
             *["available" if (why := b.available(plats[d])) is None else why for d in devs])
            for b in registry.backends]
    print(table("Backends (highest priority first)",
                ("backend", "priority", "platforms", "ops", *[f"on {d}" for d in devs]), rows))
    rows = []
    for op in OPS:
        rows.append([op])
        for d in devs:
            try:
                rows[-1].append(registry.select(op, plats[d]).name)
            except Exception as e:
                rows[-1].append(f"none: {str(e).splitlines()[0]}")
    print(table("Selected backend per op and device" + (" (KVDISPATCH_BACKEND set)" if forced else ""),
                ("op", *map(str, devs)), rows))
    for d in devs if args.verbose else ():
        for op in OPS:
            print(f"{op} on {d}")
            for b, reason in registry.explain(op, plats[d], forced=forced):
                print(f"  {b.name}: {reason or 'would serve'}")
    return 0


def _help(ep) -> str:
    try:
        return (ep.load().__doc__ or "").strip().splitlines()[0]
    except Exception as e:  # a broken plugin must not break `kvdispatch --help`
        return f"({ep.value}: {type(e).__name__})"


def main(argv: Optional[list] = None) -> int:
    """``kvdispatch``: a subcommand declared in ``kvdispatch.commands`` (a function ``(argv) -> exit
    status`` whose docstring's first line is its help, imported only when it runs), or ``info``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {ep.name: ep for ep in importlib.metadata.entry_points(group=COMMANDS) if ep.name != "info"}
    if argv and argv[0] in commands:
        return commands[argv[0]].load()(argv[1:])
    p = argparse.ArgumentParser(prog="kvdispatch", description="kvdispatch: one call per paged-KV-cache "
                                "operation, routed by the device of the tensors you pass.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="platform, versions, every backend and which one each op would use")
    pi.add_argument("-v", "--verbose", action="store_true", help="explain every selection")
    if argv[:1] != ["info"]:  # `kvdispatch --help` or an unknown command: list every command
        for name, ep in commands.items():
            sub.add_parser(name, help=_help(ep))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = cmd_info(args)
    if args.verbose:
        print(f"({time.perf_counter() - t0:.2f} s)")
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
