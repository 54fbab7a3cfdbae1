"""``kvdispatch`` command line: a thin dispatcher. Its subcommands are declared in the
``kvdispatch.commands`` entry-point group (``info``, ``check`` and ``bench`` by the harness,
``benchmarks/kvbench``, installed with kvdispatch) and imported only when they run."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from typing import Optional

COMMANDS = "kvdispatch.commands"


def _help(ep) -> str:
    try:
        return (ep.load().__doc__ or "").strip().splitlines()[0]
    except Exception as e:  # a broken plugin must not break `kvdispatch --help`
        return f"({ep.value}: {type(e).__name__})"


def main(argv: Optional[list] = None) -> int:
    """``kvdispatch COMMAND ARGS``: COMMAND's ``kvdispatch.commands`` function ``(argv) -> exit status`` on ARGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {ep.name: ep for ep in importlib.metadata.entry_points(group=COMMANDS)}
    if argv and argv[0] in commands:
        return commands[argv[0]].load()(argv[1:])
    p = argparse.ArgumentParser(prog="kvdispatch", description="kvdispatch: one call per paged-KV-cache operation, "
                                "routed by the device of the tensors you pass." + ("" if commands else " No command is "
                                "registered: the harness's (info, check, bench) come with `pip install -e .`."))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, ep in sorted(commands.items()):
        sub.add_parser(name, help=_help(ep))
    p.parse_args(argv)  # exits: help, or an unknown command
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
