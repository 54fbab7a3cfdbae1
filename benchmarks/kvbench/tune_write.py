"""``kvdispatch bench --tune write``: cache-write bandwidth on one GPU, kvdispatch's Triton kernels
against the device copy, FlagGems and a naive torch write, all in the same process, and the sweep
of launch configs ``backends/triton/write_configs.py`` was chosen from.

    kvdispatch bench --tune write --json write_h100.json --markdown write_h100.md [--sections main,...,sweep]

writes every number as JSON and the tables as markdown. Each implementation's result is checked
against the reference backend (whole caches, ``compare.py``) before it is timed. Cold times are
``timing.time_us`` medians (``triton.testing.do_bench``: it clears L2 before every call and times
the call alone with CUDA events: GPU times of cold-cache writes); steady times are CUDA-graph
replays over rotated inputs (``timing.graph_replay_us``). Bandwidth counts the bytes that must
move: every key/value element read once and written once (fp8 caches: written as 1 byte).

Sections: calibration (empty kernel, contiguous copies of the same bytes); main: bf16 NHD write
at 256/4096/32768 tokens (kvdispatch public op, FlagGems ``reshape_and_cache_flash``, torch
``index_copy_``); layouts; fp8; heads; mla; host (overhead per call); with ``sweep`` in
``--sections``, the launch-config variants.
"""

from __future__ import annotations

import contextlib
import json
import time

import torch

import kvdispatch as kvd

from .compare import bases, cache_mismatch, caches_mismatch, clone_views, force_backend
from .layouts import device_fill, make_kv_cache, make_mla_cache
from .timing import copy_bandwidth, empty_triton_launch, graph_replay_us, host_us_per_call, time_us

H, D, BS = 8, 128, 16
SIZES = (256, 4096, 32768)
DEFAULT_SECTIONS = "calibration,main,layouts,fp8,heads,mla,host"
L2_ROTATE_BYTES = 160 << 20  # rotate inputs over >3x the H100's 50 MB L2


def bench(fn, rep=100):
    """Cold time of one call, us."""
    return time_us(fn, "cuda", warmup_ms=10, rep_ms=rep)


def bench_graph(calls):
    """Steady-state GPU time per call: ``calls`` (one per rotated input set) captured back to back
    in one CUDA graph, at least 16 calls, replayed 20 times; median of 3."""
    return graph_replay_us(calls, "cuda", calls_per_graph=len(calls) * max(1, -(-16 // len(calls))),
                           replays=20, repeats=3)


def _slots(total, n, sequential):
    """Random distinct slots (as an engine hands them out), or one run of consecutive slots at a
    random start (the diagnostic: what the scatter itself costs)."""
    if not sequential:
        return torch.randperm(total, device="cuda")[:n]
    start = int(torch.randint(0, total - n + 1, ()))
    return torch.arange(start, start + n, device="cuda")


class Writer:
    """Inputs + caches for one write configuration; ``check(fn)`` then ``time(fn)``."""

    def __init__(self, layout="NHD", n=4096, h=H, d=D, dv=None, bs=BS, dtype=torch.bfloat16,
                 kind="auto", storage=None, scale="tensor", num_blocks=None, sequential=False):
        self.n, self.h, self.d, self.dv = n, h, d, dv or d
        nb = num_blocks or max(2 * n // bs + 8, 32768 * 16 // bs // 4)
        cache_dtype = storage or dtype
        self.kc, self.vc = make_kv_cache(layout, nb, bs, h, d, dv, dtype=cache_dtype, device="cuda", fill=False)
        for b in bases(self.kc, self.vc):
            device_fill(b)
        in_bytes = n * h * (d + self.dv) * torch.empty((), dtype=dtype).element_size()
        self.sets = []
        for _ in range(max(2, min(64, -(-L2_ROTATE_BYTES // in_bytes)))):
            self.sets.append((torch.randn(n, h, d, device="cuda", dtype=dtype),
                              torch.randn(n, h, self.dv, device="cuda", dtype=dtype),
                              _slots(nb * bs, n, sequential)))
        self.key, self.value, self.slots = self.sets[0]
        self.kind = kind
        if kind == "auto":
            self.ks = self.vs = None
        else:
            m = h if scale == "head" else 1
            self.ks = torch.rand(m, device="cuda") * 0.02 + 0.01
            self.vs = torch.rand(m, device="cuda") * 0.02 + 0.01
        self.fp8 = kind != "auto"
        self.fp8_codes = torch.float8_e4m3fn if cache_dtype == torch.uint8 else None  # a uint8 view holds e4m3
        in_size = torch.empty((), dtype=dtype).element_size()
        out_size = torch.empty((), dtype=cache_dtype).element_size()
        self.bytes = n * h * (d + self.dv) * (in_size + out_size)

    def args(self, kc=None, vc=None):
        return (self.key, self.value, self.kc if kc is None else kc, self.vc if vc is None else vc,
                self.slots, self.kind, self.ks, self.vs)

    def check(self, fn):
        """Run ``fn(key, value, kc, vc, slots, kind, ks, vs)`` on copies; compare with the reference."""
        rk, rv = clone_views(self.kc, self.vc)
        gk, gv = clone_views(self.kc, self.vc)
        with force_backend("reference"):
            kvd.reshape_and_cache_flash(*self.args(rk, rv))
        fn(*self.args(gk, gv))
        torch.cuda.synchronize()
        return caches_mismatch([gk, gv], [rk, rv], self.fp8, self.fp8_codes) is None

    def time(self, fn, rep=100):
        a = self.args()
        return bench(lambda: fn(*a), rep)

    def time_graph(self, fn):
        calls = []
        for key, value, slots in self.sets:
            a = (key, value, self.kc, self.vc, slots, self.kind, self.ks, self.vs)
            calls.append(lambda a=a: fn(*a))
        return bench_graph(calls)


def kvd_write(*a):
    kvd.reshape_and_cache_flash(*a)


def torch_index_copy(key, value, kc, vc, slots, kind, ks, vs):
    """What a framework writes without a kernel: one index_copy_ per cache (NHD packed only)."""
    kc.view(-1, key.shape[1], key.shape[2]).index_copy_(0, slots, key)
    vc.view(-1, value.shape[1], value.shape[2]).index_copy_(0, slots, value)


def flag_gems_write(key, value, kc, vc, slots, kind, ks, vs):
    import flag_gems
    one = _ONE.setdefault(key.device, torch.ones(1, device=key.device))
    flag_gems.reshape_and_cache_flash(key, value, kc, vc, slots, kind, one if ks is None else ks,
                                      one if vs is None else vs)


_ONE: dict = {}


def measure(results, section, label, w: Writer, fn, copy_bw, rep=100, **extra):
    row = dict(section=section, label=label, tokens=w.n, bytes=w.bytes, **extra)
    try:
        ok = w.check(fn)
        row["correct"] = ok
        if ok:
            us = w.time(fn, rep)
            row["us"] = us
            row["GBps"] = w.bytes / us / 1e3
            row["pct_copy"] = 100.0 * row["GBps"] / copy_bw
            gus = w.time_graph(fn)
            row["graph_us"] = gus
            row["graph_pct_copy"] = 100.0 * w.bytes / gus / 1e3 / copy_bw
    except Exception as e:  # an unavailable competitor must not stop the run
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    results.append(row)
    _print_row(row)
    return row


def _print_row(row):
    if "us" in row:
        us = (f"{row['us']:8.2f} us {row['GBps']:6.0f} GB/s {row['pct_copy']:5.1f}% | graph "
              f"{row.get('graph_us', float('nan')):8.2f} us {row.get('graph_pct_copy', float('nan')):5.1f}%")
    else:
        us = row.get("error", "WRONG RESULT")
    print(f"[{row['section']}] {row['label']:<32} T={row['tokens']:<6} {us}", flush=True)


def calibration(results, copy_bw):
    """What the GPU does for the same bytes without any indexing: a contiguous copy of the
    key+value bytes of each size (both timings), and an empty kernel (the floor of a launch)."""
    empty = empty_triton_launch("cuda")
    results.append(dict(section="calibration", label="empty Triton kernel", tokens=0, bytes=0,
                        us=bench(empty), graph_us=bench_graph([empty])))
    _print_row(dict(results[-1], GBps=0, pct_copy=0, graph_pct_copy=0))
    for n in SIZES:
        elems = n * H * 2 * D
        sets = max(2, min(64, -(-L2_ROTATE_BYTES // (elems * 2))))
        srcs = [torch.randn(elems, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        dst = torch.empty(elems * 4, device="cuda", dtype=torch.bfloat16)[elems:2 * elems]
        nbytes = elems * 2 * 2
        us = bench(lambda: dst.copy_(srcs[0]))
        gus = bench_graph([lambda s=s: dst.copy_(s) for s in srcs])
        row = dict(section="calibration", label="contiguous copy of the K+V bytes", tokens=n, bytes=nbytes,
                   us=us, GBps=nbytes / us / 1e3, pct_copy=100 * nbytes / us / 1e3 / copy_bw, graph_us=gus,
                   graph_pct_copy=100 * nbytes / gus / 1e3 / copy_bw)
        results.append(row)
        _print_row(row)
        del srcs, dst


def host_overhead(results):
    """CPU time per call at 256 tokens, back-to-back calls (no L2 flush, GPU never the bottleneck)."""
    from kvdispatch.backends.triton import write
    w = Writer("NHD", 256)
    desc = kvd.KVCacheDescriptor.from_tensors(w.kc, w.vc)
    a = w.args()
    fns = {
        "kvdispatch public op": lambda: kvd.reshape_and_cache_flash(*a),
        "triton backend write() (no checks)": lambda plans={}: write.reshape_and_cache_flash(*a[:5], desc, plans),
        "torch.ops.kvdispatch (custom op)": lambda: torch.ops.kvdispatch.reshape_and_cache_flash(*a),
    }
    try:
        import flag_gems  # noqa: F401
        fns["flag_gems.reshape_and_cache_flash"] = lambda: flag_gems_write(*a)
    except Exception:
        pass
    for label, fn in fns.items():
        us = host_us_per_call(fn, "cuda", 2000)
        results.append(dict(section="host", label=label, tokens=256, us_per_call=us))
        print(f"[host] {label:<40} {us:6.2f} us/call", flush=True)
    # GPU time of the same write replayed from a CUDA graph (no launch overhead at all)
    us = graph_replay_us(lambda: kvd.reshape_and_cache_flash(*a), "cuda", calls_per_graph=1)
    results.append(dict(section="host", label="CUDA graph replay", tokens=256, us=us))
    print(f"[host] {'CUDA graph replay':<40} {us:6.2f} us", flush=True)


def _variants(layout):
    """(label, config overrides, merge) of the launch-config sweep."""
    out = []
    for tile in (2048, 4096, 8192, 16384, 32768):
        for nw in (4, 8):
            out.append((f"tile{tile // 1024}K w{nw}", dict(tile_bytes=tile, num_warps=nw), None))
    for tile in (8192, 16384):
        out.append((f"tile{tile // 1024}K w4 streaming", dict(tile_bytes=tile, num_warps=4, streaming=True), None))
    for mp in (1, 2, 8):
        out.append((f"tile8K w4 min{mp}/SM", dict(tile_bytes=8192, num_warps=4, min_programs_per_sm=mp), None))
    if layout == "NHD":
        for tile in (4096, 8192, 16384):
            out.append((f"tile{tile // 1024}K w4 rows=head", dict(tile_bytes=tile, num_warps=4), False))
    return out


@contextlib.contextmanager
def write_table(cfg):
    """The Triton write uses ``cfg`` for every platform inside (plans made inside come from it; the
    public calls' plans live in their signatures' dicts, cleared before and after)."""
    from kvdispatch.registry import registry
    from kvdispatch.backends.triton import write
    real = write.config_for
    write.config_for = lambda *a, **k: cfg
    registry.clear_selection()
    try:
        yield
    finally:
        write.config_for = real
        registry.clear_selection()


def sweep(results, copy_bw, save):
    from kvdispatch.backends.triton import write
    from kvdispatch.backends.triton.write_configs import DEFAULT
    for layout in ("NHD", "HND"):
        for n in SIZES:
            if layout == "HND" and n == 256:
                continue
            w = Writer(layout, n)
            desc = kvd.KVCacheDescriptor.from_tensors(w.kc, w.vc)
            for label, over, merge in _variants(layout):
                cfg = DEFAULT.with_(**{"streaming": False, "min_programs_per_sm": 4, "merge": merge, **over})

                plans: dict = {}  # this variant's plans (compiled once, then launched directly)

                def fn(k, v, kc, vc, s, kind, ks, vs, plans=plans):
                    write.reshape_and_cache_flash(k, v, kc, vc, s, desc, plans)

                with write_table(cfg):  # the variant as the platform's table entry
                    plan = write.plan_for(w.key, w.value, w.kc, w.vc, w.slots, desc, plans)
                    measure(results, f"sweep-{layout}", label, w, fn, copy_bw, rep=40, rows=plan.rows,
                            merged=plan.constexprs["MERGED"], plan_warps=plan.num_warps, **over)
            del w
            torch.cuda.empty_cache()
            save()


def run_tune_write(args, argv) -> dict:
    """``kvdispatch bench --tune write [--sections ...] [--json PATH] [--markdown PATH]``."""
    if not torch.cuda.is_available():
        raise SystemExit("kvdispatch bench --tune write needs a CUDA GPU")
    import triton
    info = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                command=" ".join(["kvdispatch bench"] + list(argv)),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import flag_gems
        info["flag_gems"] = getattr(flag_gems, "__version__", "?")
    except Exception as e:
        info["flag_gems"] = f"unavailable: {type(e).__name__}: {e}"
    print(info, flush=True)
    results = []
    copy = copy_bandwidth("cuda")
    copy_bw, copy_us = copy["GBps"], copy["us"]
    info["copy_GBps"] = copy_bw
    print(f"device copy: {copy_bw:.0f} GB/s (1 GiB bf16, {copy_us:.1f} us)", flush=True)

    def save():  # after every section: a run cut short still leaves its rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(info=info, results=results), f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(info, results))

    sections = set((args.sections or DEFAULT_SECTIONS).split(","))
    if "calibration" in sections:
        calibration(results, copy_bw)
    # 1. the headline: bf16 NHD, 8 kv heads x 128, block 16, random slots
    for n in SIZES if "main" in sections else ():
        w = Writer("NHD", n)
        measure(results, "main", "kvdispatch (triton)", w, kvd_write, copy_bw)
        measure(results, "main", "flag_gems 5.0.2", w, flag_gems_write, copy_bw)
        measure(results, "main", "torch index_copy_", w, torch_index_copy, copy_bw)
        del w
        if n >= 4096:  # diagnostic: the same write to consecutive slots (no scatter)
            w = Writer("NHD", n, sequential=True)
            measure(results, "main", "kvdispatch, consecutive slots", w, kvd_write, copy_bw)
            del w
    save()
    # 2. every layout at 4096 and 32768 tokens
    for n in (4096, 32768) if "layouts" in sections else ():
        for layout in ("NHD", "HND", "combined", "combined-HND", "cross-layer", "diffkv", "head-major"):
            w = Writer(layout, n, dv=64 if layout == "diffkv" else None)
            measure(results, "layouts", layout + (" (Dk 128, Dv 64)" if layout == "diffkv" else ""), w,
                    kvd_write, copy_bw, layout=layout)
            del w
            torch.cuda.empty_cache()
    save()
    # 3. fp8 (bf16 in, 1-byte cache)
    fp8_cases = [("NHD", "fp8", torch.float8_e4m3fn, "tensor"), ("NHD", "fp8", torch.float8_e4m3fn, "head"),
                 ("NHD", "fp8_e5m2", torch.float8_e5m2, "tensor"), ("NHD", "fp8", torch.uint8, "tensor"),
                 ("HND", "fp8", torch.float8_e4m3fn, "head"), ("NHD", "fp8", torch.float8_e4m3fnuz, "tensor")]
    for n in (4096, 32768) if "fp8" in sections else ():
        for layout, kind, storage, scale in fp8_cases:
            w = Writer(layout, n, kind=kind, storage=storage, scale=scale)
            label = f"{layout} {str(storage).replace('torch.', '')} {scale}-scale"
            measure(results, "fp8", label, w, kvd_write, copy_bw, layout=layout)
            del w
            torch.cuda.empty_cache()
    save()
    # 4. head sizes (NHD and HND, 32768 tokens)
    if "heads" in sections:
        for d in (64, 80, 96, 112, 192, 256):
            for layout in ("NHD", "HND"):
                w = Writer(layout, 32768 if d <= 128 else 16384, d=d)
                measure(results, "head sizes", f"{layout} D={d}", w, kvd_write, copy_bw, layout=layout)
                del w
                torch.cuda.empty_cache()
        save()
    # 5. MLA 512 + 64
    for n in SIZES if "mla" in sections else ():
        mla_bench(results, n, copy_bw)
    save()
    if "host" in sections:
        host_overhead(results)
        save()
    if "sweep" in sections:
        sweep(results, copy_bw, save)
    print(markdown(info, results), flush=True)
    return dict(info=info, results=results)


def mla_bench(results, n, copy_bw):
    rank, rope = 512, 64
    nb = max(2 * n // BS + 8, 8192)
    cache = make_mla_cache(nb, BS, rank, rope, device="cuda", fill=False)
    cache.copy_(torch.randn(cache.shape, device="cuda", dtype=cache.dtype))
    nbytes = n * (rank + rope) * 2 * 2
    sets = [(torch.randn(n, rank, device="cuda", dtype=torch.bfloat16),
             torch.randn(n, rope, device="cuda", dtype=torch.bfloat16),
             torch.randperm(nb * BS, device="cuda")[:n])
            for _ in range(max(2, min(64, -(-L2_ROTATE_BYTES // (nbytes // 2)))))]
    one = torch.ones(1, device="cuda")

    def ours(c, kv_c, k_pe, slots):
        kvd.concat_and_cache_mla(kv_c, k_pe, c, slots)

    def gems(c, kv_c, k_pe, slots):
        import flag_gems
        flag_gems.concat_and_cache_mla(kv_c, k_pe, c, slots, "auto", one)

    def naive(c, kv_c, k_pe, slots):
        c.view(-1, rank + rope).index_copy_(0, slots, torch.cat([kv_c, k_pe], dim=-1))

    pristine = cache.clone()  # timing writes into `cache`: every check starts from this state
    ref = cache.clone()
    with force_backend("reference"):
        kvd.concat_and_cache_mla(*sets[0][:2], ref, sets[0][2])
    for label, fn in (("kvdispatch (triton)", ours), ("flag_gems 5.0.2", gems), ("torch cat + index_copy_", naive)):
        row = dict(section="mla", label=label, tokens=n, bytes=nbytes)
        try:
            got = pristine.clone()
            fn(got, *sets[0])
            torch.cuda.synchronize()
            row["correct"] = cache_mismatch(got, ref) is None
            del got
            if row["correct"]:
                row["us"] = bench(lambda: fn(cache, *sets[0]))
                row["GBps"] = nbytes / row["us"] / 1e3
                row["pct_copy"] = 100 * row["GBps"] / copy_bw
                row["graph_us"] = bench_graph([lambda a=a: fn(cache, *a) for a in sets])
                row["graph_pct_copy"] = 100 * nbytes / row["graph_us"] / 1e3 / copy_bw
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(row)
        _print_row(row)


def markdown(info, results):
    out = [f"# Cache-write bandwidth: {info['device']}", "",
           f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, FlagGems {info['flag_gems']}; "
           f"{info['date']}", "", f"Command: `{info['command']}`", "",
           f"Device copy (1 GiB bf16 `dst.copy_(src)`, read + write): **{info.get('copy_GBps', 0):.0f} GB/s**", ""]
    sections = []
    for r in results:
        if r["section"] not in sections:
            sections.append(r["section"])
    for s in sections:
        rows = [r for r in results if r["section"] == s]
        out.append(f"## {s}")
        out.append("")
        if s == "host":
            out += ["| what (256 tokens) | us |", "| --- | --- |"]
            for r in rows:
                out.append(f"| {r['label']} | {r.get('us_per_call', r.get('us')):.2f} |")
        else:
            out += ["| what | tokens | cold us (do_bench) | GB/s | % of copy | steady us (graph) | % of copy |",
                    "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                if "us" in r and r.get("bytes"):
                    out.append(f"| {r['label']} | {r['tokens']} | {r['us']:.2f} | {r['GBps']:.0f} | "
                               f"{r['pct_copy']:.1f} | {r.get('graph_us', float('nan')):.2f} | "
                               f"{r.get('graph_pct_copy', float('nan')):.1f} |")
                elif "us" in r:
                    out.append(f"| {r['label']} | {r['tokens']} | {r['us']:.2f} | | | {r.get('graph_us', 0):.2f} | |")
                else:
                    out.append(f"| {r['label']} | {r['tokens']} | {r.get('error', 'WRONG RESULT')} | | | | |")
        out.append("")
    return "\n".join(out)

