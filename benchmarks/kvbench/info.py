"""``kvdispatch info``: versions, the devices torch sees with their platform facts, every registered
backend (available on each device, or why not) and which one each op would use; ``-v`` explains every
selection (``Registry.explain``). Also ``versions()`` and ``table()``, which the check and the bench use."""

from __future__ import annotations

import argparse
import os
import platform as _py_platform
from typing import Optional

import torch

from kvdispatch import __version__
from kvdispatch.platform import platform_of
from kvdispatch.registry import OPS, registry

_SHORT = {"reshape_and_cache_flash": "write", "concat_and_cache_mla": "mla-write",
          "flash_attn_varlen_func": "attention"}


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
    rows = [list(columns)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    rows.insert(1, ["-" * w for w in widths])
    return "\n".join([title] * bool(title) + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                               for r in rows]) + "\n"


def _selected(op: str, plat) -> str:
    try:
        return registry.select(op, plat).name
    except Exception as e:
        return f"none: {str(e).splitlines()[0]}"


def cmd_info(verbose: bool) -> int:
    """The report, printed."""
    print(f"kvdispatch {__version__}  " + "  ".join(f"{k} {v}" for k, v in versions().items() if k != "kvdispatch"))
    devs = [torch.device("cpu")]
    for kind in ("cuda", "xpu"):
        mod = getattr(torch, kind, None)
        if mod is not None and mod.is_available():
            devs += [torch.device(kind, i) for i in range(mod.device_count())]
    plats = {d: platform_of(d) for d in devs}
    print(table("Devices", ("device", "platform", "arch", "name", "multiprocessors", "fp8 e4m3 type"),
                [(d, p.name, p.arch or "-", p.device_name or "-", p.multiprocessors or "-",
                  str(p.fp8_e4m3_dtype).replace("torch.", "")) for d, p in plats.items()]))
    print(table("Backends (highest priority first)", ("backend", "priority", "platforms", "ops",
                                                      *[f"on {d}" for d in devs]),
                [(b.name, b.priority, ", ".join(b.platforms) or "-", ", ".join(_SHORT.get(o, o) for o in b.ops) or "-",
                  *[b.available(plats[d]) or "available" for d in devs]) for b in registry.backends]))
    forced = os.environ.get("KVDISPATCH_BACKEND") or None
    print(table("Selected backend per op and device" + (" (KVDISPATCH_BACKEND set)" if forced else ""),
                ("op", *map(str, devs)), [(op, *[_selected(op, plats[d]) for d in devs]) for op in OPS]))
    for d in devs if verbose else ():
        for op in OPS:
            print(f"{op} on {d}\n" + "\n".join(f"  {b.name}: {why or 'would serve'}"
                                               for b, why in registry.explain(op, plats[d], forced=forced)))
    return 0


def info(argv: Optional[list] = None) -> int:
    """platform, versions, every backend and which one each op would use"""
    p = argparse.ArgumentParser(prog="kvdispatch info", description=__doc__.split("Also")[0].strip())
    p.add_argument("-v", "--verbose", action="store_true", help="explain every selection")
    return cmd_info(p.parse_args(argv).verbose)
