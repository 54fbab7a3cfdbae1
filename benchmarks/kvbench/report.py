"""Benchmark output: rich tables, JSON, markdown, and the PNG plot."""

from __future__ import annotations

import json
from collections import OrderedDict

__all__ = ["print_tables", "write_json", "markdown", "plot"]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _status_cell(r, rich=True):
    if r["status"] == "ok":
        return "ok"
    text = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
    if not rich:
        return text
    color = {"WRONG": "bold red", "error": "red", "unsupported": "dim"}.get(r["status"], "")
    return f"[{color}]{_escape(text)}[/{color}]" if color else _escape(text)


def _escape(s: str) -> str:
    from rich.markup import escape
    return escape(s)


def _by_op(rows):
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(r["op"], []).append(r)
    return groups


def print_tables(console, info: dict, rows: list, overhead: list) -> None:
    from rich.table import Table

    for op, group in _by_op(rows).items():
        attn = op not in ("write", "mla-write")
        t = Table(title=f"{op}  (copy {info['copy']['GBps']:.0f} GB/s"
                        + (f", matmul {info['matmul']['TFLOPs']:.0f} TFLOP/s" if attn else "") + ")",
                  show_lines=False)
        graphs = any(r.get("graph_us") for r in group)
        for col in ("layout", "dtype", "size", "implementation", "time us", "GB/s", "% copy") + \
                (("TFLOP/s", "% mm peak") if attn else ()) + ("vs best vendor",) + \
                (("graph us",) if graphs else ()) + ("result",):
            t.add_column(col, justify="right" if col not in ("layout", "dtype", "size", "implementation", "result") else "left",
                         overflow="fold")
        last = None
        for r in group:
            if last is not None and r["case"] != last:
                t.add_section()
            last = r["case"]
            cells = [r["layout"], r["dtype"], r["size"], _escape(r["impl"]), _fmt(r["us"], ".1f"),
                     _fmt(r["GBps"], ".0f"), _fmt(r["pct_copy"], ".0f")]
            if attn:
                cells += [_fmt(r["TFLOPs"], ".1f"), _fmt(r["pct_peak"], ".0f")]
            cells.append(_fmt(r["vs_best_vendor"], ".2f") + ("x" if r["vs_best_vendor"] else ""))
            if graphs:
                cells.append(_fmt(r.get("graph_us"), ".1f"))
            cells.append(_status_cell(r))
            t.add_row(*cells)
        console.print(t)
    if overhead:
        t = Table(title="dispatch overhead (tiny inputs)")
        for col in ("implementation", "op", "size", "measure", "us", "over floor"):
            t.add_column(col)
        for o in overhead:
            t.add_row(_escape(o["impl"]), o["op"], o["size"],
                      _escape(o["what"] + (f" ({o['reason']})" if o.get("reason") else "")), _fmt(o["us"], ".2f"),
                      _fmt(o.get("over_floor"), "+.2f"))
        console.print(t)


def write_json(path: str, info: dict, vendors: list, rows: list, overhead: list) -> None:
    with open(path, "w") as f:
        json.dump(dict(info=info, implementations=vendors, rows=rows, overhead=overhead), f, indent=1, default=str)


def markdown(info: dict, vendors: list, rows: list, overhead: list) -> str:
    """The results as a markdown page (benchmarks/results/<device>.md)."""
    v = info.get("versions", {})
    lines = [f"# kvdispatch bench: {info.get('device_name', info['device'])}", "",
             (f"Produced by: `{info['invoked_by']}`  " if info.get("invoked_by") else "")
             + f"Command: `{info.get('command', '')}`  ", f"Date: {info.get('date', '')}  ",
             f"Device: {info['device']} = {info.get('device_name', '')} ({info.get('platform', '')})"
             + (f", driver {info['driver']}" if info.get("driver") else "") + "  ",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  ",
             (f"Ceilings measured in the same run: device copy {info['copy']['GBps']:.0f} GB/s "
              f"(read+write of a {info['copy']['bytes'] >> 20} MiB copy), {info['matmul']['dtype']} matmul "
              f"{info['matmul']['m']}^3 {info['matmul']['TFLOPs']:.0f} TFLOP/s." if "copy" in info else
              "Dispatch overhead only (`--overhead-only`): no ceilings, no cases."), "",
             "Every implementation's result was checked against kvdispatch's reference backend (whole cache "
             "buffers for writes; NaN-poisoned output vs float32 reference for attention) before it was timed; "
             "`WRONG` rows were never timed. Times: " + info.get("timer", "") + ". `vs best vendor` = fastest correct vendor time / this time "
             "(> 1: faster than every vendor measured; torch baselines are not vendors). "
             "`graph replay` (GPUs): device time per call of 10 calls captured in a CUDA graph, same inputs "
             "(small cases then run from L2): no host time between launches.", "",
             "## Implementations", "", "| implementation | kind | version / status |", "| --- | --- | --- |"]
    for x in vendors:
        lines.append(f"| {x['name']} | {x['kind']} | {x['version'] if x['available'] else 'unavailable: ' + x['reason']} |")
    for op, group in _by_op(rows).items():
        attn = op not in ("write", "mla-write")
        lines += ["", f"## {op}", ""]
        head = ["layout", "dtype", "size", "shape", "implementation", "time (us)", "GB/s", "% copy BW"]
        if attn:
            head += ["TFLOP/s", "% matmul peak"]
        graphs = any(r.get("graph_us") for r in group)
        head += ["vs best vendor"] + (["graph replay (us)"] if graphs else []) + ["result"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in group:
            cells = [r["layout"], r["dtype"], r["size"], r["shape"], r["impl"], _fmt(r["us"], ".1f"),
                     _fmt(r["GBps"], ".0f"), _fmt(r["pct_copy"], ".0f")]
            if attn:
                cells += [_fmt(r["TFLOPs"], ".1f"), _fmt(r["pct_peak"], ".0f")]
            cells.append((_fmt(r["vs_best_vendor"], ".2f") + "x") if r["vs_best_vendor"] else "-")
            if graphs:
                cells.append(_fmt(r.get("graph_us"), ".1f"))
            cells.append(_status_cell(r, rich=False).replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
    if overhead:
        lines += ["", "## Dispatch overhead (tiny inputs)", "", "| implementation | op | size | measure | us | over floor |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for o in overhead:
            lines.append(f"| {o['impl']} | {o['op']} | {o['size']} | {o['what']}"
                         f"{' (' + o['reason'] + ')' if o.get('reason') else ''} | {_fmt(o['us'], '.2f')} "
                         f"| {_fmt(o.get('over_floor'), '+.2f')} |")
    return "\n".join(lines) + "\n"


def plot(path: str, info: dict, rows: list) -> None:
    """Fraction of the ceiling per case for every implementation, one panel per op: % of copy
    bandwidth for writes, decode and mixed batches; % of matmul peak for prefill. WRONG rows are
    drawn as a red x at zero, unsupported as nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_op(rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(14, 3.6 * len(groups)), squeeze=False)
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    for ax, (op, group) in zip(axes[:, 0], groups.items()):
        metric = "pct_peak" if op == "prefill" else "pct_copy"
        cases = list(OrderedDict.fromkeys(r["case"] for r in group))
        # implementations with something to draw here (a bar or a red x; not only "unsupported")
        present = [i for i in impls if any(r["impl"] == i and (r["status"] in ("WRONG", "error") or
                                                               (r["status"] == "ok" and r.get(metric) is not None))
                                           for r in group)]
        width = 0.8 / max(1, len(present))
        for j, name in enumerate(present):
            xs, ys, bad = [], [], []
            for r in group:
                if r["impl"] != name:
                    continue
                x = cases.index(r["case"]) + (j - (len(present) - 1) / 2) * width
                if r["status"] == "ok" and r.get(metric) is not None:
                    xs.append(x)
                    ys.append(r[metric])
                elif r["status"] in ("WRONG", "error"):
                    bad.append(x)
            ax.bar(xs, ys, width, label=name, color=colors[name])
            if bad:
                ax.scatter(bad, [0] * len(bad), marker="x", color="red", zorder=3)
        ax.set_xticks(range(len(cases)))
        # layout, dtype, size and the page size (cases of one size may differ only there)
        ax.set_xticklabels([" ".join(c.split()[1:4] + [w for w in c.split()[4:] if w.startswith("bs")])
                            for c in cases], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("% of matmul peak" if metric == "pct_peak" else "% of copy bandwidth")
        ax.set_title(op)
        ax.grid(axis="y", alpha=0.3)
        # headroom above the tallest bar: the legend sits there, not over the bars
        top = max([r[metric] for r in group if r["status"] == "ok" and r.get(metric) is not None] or [1.0])
        ax.set_ylim(0, top * 1.3)
        ax.legend(fontsize=7, loc="upper left", ncol=min(5, max(1, len(present))))
    fig.suptitle(f"kvdispatch bench on {info.get('device_name', info['device'])} "
                 f"(copy {info['copy']['GBps']:.0f} GB/s; red x = WRONG/error)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
