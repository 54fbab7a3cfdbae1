"""``kvdispatch bench --tune attention``: paged attention on one GPU, kvdispatch's Triton kernel
against torch SDPA on pre-gathered contiguous K/V (the "no paging" ceiling), FlagGems' paged
``flash_attn_varlen_func`` and the device copy bandwidth, all in the same process; and the tile
and split-count sweeps ``backends/triton/attention_configs.py`` was chosen from.

    kvdispatch bench --tune attention --json attention_h100.json [--sections ...] [--tiles ...]
    kvdispatch bench --tune attention --quick --device cpu     # smoke run (TRITON_INTERPRET=1)

writes every number as JSON and prints the tables (markdown). Every implementation's output is
checked against the reference backend (float32, ``compare.attention_mismatch``) before it is
timed. Times are in microseconds: "graph" is the GPU time per call with 10 calls captured in one
CUDA graph (no host time; how an engine runs decode steps), "do_bench" the
``triton.testing.do_bench`` median (L2 cleared before every call, CUDA events around the Python
call, so it includes host launch time whenever that exceeds the GPU time). Bandwidth and TFLOP/s
use the graph time. Decode bandwidth counts the K/V bytes that must be read (every key of every
kv head once); prefill TFLOP/s counts ``4 * Hq * D * (visible q-k pairs)``.

Sections: copy, host (per-call host time), decode (the issue's anchors), layouts, fp8, mla,
prefill, splits (split-count sweep), tiles (launch-config sweep).
"""

from __future__ import annotations

import json
import time

import torch

import kvdispatch as kvd
from kvdispatch.registry import registry

from .compare import attention_mismatch, bases, force_backend
from .layouts import device_fill, make_kv_cache, random_block_table
from .timing import copy_bandwidth, graph_replay_us, host_us_per_call, sync, time_us

HQ, HKV, D, BS = 32, 8, 128, 16
DEFAULT_SECTIONS = "copy,host,decode,layouts,fp8,mla,prefill,splits,tiles"
DEV = "cuda"
SMOKE = False  # --quick: tiny sizes (on the CPU through the Triton interpreter: checks the sweep)


def bench(fn, rep=50):
    """do_bench median, us (smoke: one host-timed call after a warm-up)."""
    return time_us(fn, DEV, warmup_ms=5, rep_ms=rep, min_calls=1 if SMOKE else 5)


def bench_graph(fn):
    """GPU time per call (us): 10 calls captured in one CUDA graph, replayed 10 times. No host
    time (an engine replays decode steps as graphs); the K/V of every decode case here is larger
    than the 50 MB L2, so back-to-back calls do not serve each other from it. None off CUDA."""
    if torch.device(DEV).type != "cuda":
        return None
    return graph_replay_us(fn, DEV, calls_per_graph=10, replays=10, repeats=1)


def host_overhead_us(kw, n=200):
    """Host time per call of the public op on a tiny decode step (host-bound: the per-call cost)."""
    return host_us_per_call(kvd_call(kw), DEV, n)


def make_case(batch, q_len, k_len, layout="NHD", dtype=torch.bfloat16, fp8=None, hq=HQ, hkv=HKV, d=D,
              dv=None, bs=BS, causal=True, seed=0):
    if SMOKE:
        batch, q_len, k_len = min(batch, 2), min(q_len, 8), min(k_len, 40)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    k_lens = [k_len] * batch
    nb = sum(-(-k // bs) for k in k_lens) + 8
    k, v = make_kv_cache(layout, nb, bs, hkv, d, dv, dtype=fp8 or dtype, device=DEV, fill=False)
    for b in bases(k, v):
        device_fill(b)
    q = torch.randn(batch * q_len, hq, d, dtype=dtype, device=DEV)
    kw = dict(q=q, k=k, v=v, max_seqlen_q=q_len,
              cu_seqlens_q=torch.arange(0, batch + 1, dtype=torch.int32, device=DEV) * q_len,
              max_seqlen_k=k_len, seqused_k=torch.tensor(k_lens, dtype=torch.int32, device=DEV),
              block_table=random_block_table(k_lens, nb, bs, device=DEV, generator=gen), causal=causal)
    if fp8 is not None:
        kw["k_descale"] = torch.full((1,), 0.05, device=DEV)
        kw["v_descale"] = torch.full((1,), 0.05, device=DEV)
    kw["out"] = torch.empty(batch * q_len, hq, dv or d, dtype=dtype, device=DEV)
    return kw


def gathered(kw):
    """K/V gathered per sequence into contiguous [B, H, L, D] (the SDPA ceiling's inputs)."""
    b = kw["cu_seqlens_q"].shape[0] - 1
    L = kw["max_seqlen_k"]
    bs = kw["k"].shape[1]
    pos = torch.arange(L, device=DEV)
    blk = kw["block_table"].long()[:, pos // bs]  # [B, L]
    k = kw["k"][blk, pos % bs].transpose(1, 2).contiguous()  # [B, H, L, D]
    v = kw["v"][blk, pos % bs].transpose(1, 2).contiguous()
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        k = (k.float() * kw["k_descale"]).to(torch.bfloat16)
        v = (v.float() * kw["v_descale"]).to(torch.bfloat16)
    lq = kw["max_seqlen_q"]
    q = kw["q"].view(b, lq, kw["q"].shape[1], -1).transpose(1, 2).contiguous()
    return q, k, v


def reference(kw):
    out = torch.empty(kw["out"].shape, dtype=torch.float32, device=DEV)
    with force_backend("reference"):
        return kvd.flash_attn_varlen_func(**{**kw, "out": out})


def measure(results, section, name, fn, ref, check, extra=None):
    """Check ``fn()``'s output (``check(out) -> tensor like ref``) then time ``fn``."""
    row = dict(section=section, name=name)
    try:
        out = fn()
        sync(DEV)
        why, row["rel_err"] = attention_mismatch(check(out), ref, 3e-2)
        if why:
            row["error"] = f"wrong result: {why}"
        else:
            row["us_bench"] = bench(fn)
            try:
                g = bench_graph(fn)
            except Exception as e:  # not capturable: keep the do_bench time
                g, row["graph_error"] = None, f"{type(e).__name__}: {str(e)[:120]}"
            row["us"] = row["us_bench"] if g is None else g
    except Exception as e:  # a competitor that cannot run this case is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if extra:
        row.update(extra(row))
    results.append(row)
    print(json.dumps(row), flush=True)
    return row


def kvd_call(kw, num_splits=None):
    if num_splits is None:
        return lambda: kvd.flash_attn_varlen_func(**kw)
    from kvdispatch.backends.triton import attention
    orig = attention.choose_splits

    def run():
        attention.choose_splits = lambda *a, **k: num_splits
        try:
            return kvd.flash_attn_varlen_func(**kw)
        finally:
            attention.choose_splits = orig
    return run


def flag_gems_call(kw):
    def fail(e):
        def f():
            raise e
        return f
    try:
        from flag_gems.ops.attention import flash_attn_varlen_func as fg
    except Exception as e:  # reported in the row, the rest of the run goes on
        return fail(e)
    q = kw["q"]
    return lambda: fg(q, kw["k"], kw["v"], kw["max_seqlen_q"], kw["cu_seqlens_q"], kw["max_seqlen_k"],
                      seqused_k=kw["seqused_k"], causal=kw["causal"], block_table=kw["block_table"])


def sdpa_call(kw):
    q, k, v = gathered(kw)
    causal = kw["causal"] and kw["max_seqlen_q"] > 1
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(q, k, v, is_causal=causal, enable_gqa=True)


def sdpa_check(kw):
    b = kw["cu_seqlens_q"].shape[0] - 1
    return lambda o: o.transpose(1, 2).reshape(b * kw["max_seqlen_q"], o.shape[1], -1)


def kv_bytes(kw):
    lens = kw["seqused_k"].sum().item()
    k, v = kw["k"], kw["v"]
    # V read through K's first columns (MLA's latent cache): its bytes are K's
    dims = k.shape[3] if v.data_ptr() == k.data_ptr() and v.stride() == k.stride() else k.shape[3] + v.shape[3]
    return lens * k.shape[2] * dims * k.element_size()


def decode_rows(results, section, kw, label, copy_bw, with_competitors=True, splits=(None, 1)):
    ref = reference(kw)
    nbytes = kv_bytes(kw)

    def bw(row):
        if "us" not in row:
            return {}
        gbs = nbytes / (row["us"] * 1e-6) / 1e9
        return {"GB/s": round(gbs, 1), "of_copy": round(gbs / copy_bw, 3)}

    rows = {}
    for i, s in enumerate(splits):
        nm = f"kvdispatch {label}" + ("" if s is None else f" splits={s}")
        if splits[:i].count(s):
            nm += f" (repeat {splits[:i].count(s) + 1})"  # the few-sequence cases vary run to run
        rows[nm] = measure(results, section, nm, kvd_call(kw, s), ref, lambda o: o, bw)
    if with_competitors:
        rows["sdpa"] = measure(results, section, f"torch SDPA contiguous {label}", sdpa_call(kw), ref,
                               sdpa_check(kw), bw)
        rows["fg"] = measure(results, section, f"FlagGems paged {label}", flag_gems_call(kw), ref,
                             lambda o: o, bw)
    return rows


def prefill_flops(kw):
    lq, lk = kw["max_seqlen_q"], kw["max_seqlen_k"]
    b = kw["cu_seqlens_q"].shape[0] - 1
    pairs = sum(min(max(i + lk - lq + 1, 0), lk) for i in range(lq)) if kw["causal"] else lq * lk
    return 2 * kw["q"].shape[1] * (kw["q"].shape[2] + kw["out"].shape[2]) * pairs * b  # QK^T + PV


def run_tune_attention(args, argv) -> dict:
    """``kvdispatch bench --tune attention [--sections ...] [--tiles ...] [--json PATH] [--quick]``."""
    global DEV, SMOKE
    from .suite import default_device

    DEV = str(torch.device(args.device) if args.device else default_device())
    SMOKE = bool(args.quick)
    sections = set((args.sections or DEFAULT_SECTIONS).split(","))
    results = []
    name = torch.cuda.get_device_name(DEV) if DEV.startswith("cuda") else DEV
    info = dict(device=name + (" (smoke)" if SMOKE else ""), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command=" ".join(["kvdispatch bench"] + list(argv)))
    import triton
    info["triton"] = triton.__version__
    try:
        import flag_gems
        info["flag_gems"] = getattr(flag_gems, "__version__", "?")
    except Exception as e:
        info["flag_gems"] = f"unavailable: {type(e).__name__}: {e}"
    print(json.dumps(info), flush=True)
    copy_bw = copy_bandwidth(DEV, (1 << 20) if SMOKE else 0)["GBps"]
    info["copy_GBps"] = round(copy_bw, 1)
    print(json.dumps({"copy_GBps": copy_bw}), flush=True)

    if "host" in sections:
        kw = make_case(1, 1, 16)
        info["host_us_per_call"] = round(host_overhead_us(kw), 1)
        kw2 = make_case(1, 1, 32768)  # takes the split-KV path: two launches
        info["host_us_per_call_split"] = round(host_overhead_us(kw2), 1)
        print(json.dumps({k: info[k] for k in ("host_us_per_call", "host_us_per_call_split")}), flush=True)
    if "decode" in sections:
        for batch, L in ((32, 4096), (128, 4096), (1, 32768), (4, 32768)):
            kw = make_case(batch, 1, L)
            decode_rows(results, "decode", kw, f"decode b{batch}x{L}", copy_bw,
                        splits=(None, 1) if batch >= 32 else (None, None, None, 1))
            del kw
    if "layouts" in sections:
        for layout in ("NHD", "HND", "combined", "combined-HND", "cross-layer"):
            kw = make_case(32, 1, 4096, layout=layout)
            decode_rows(results, "layouts", kw, f"decode b32x4096 {layout}", copy_bw, with_competitors=False,
                        splits=(None,))
        for layout in ("NHD", "HND"):  # long context: split-KV, where the page order matters most
            kw = make_case(1, 1, 32768, layout=layout)
            decode_rows(results, "layouts", kw, f"decode b1x32768 {layout}", copy_bw, with_competitors=False,
                        splits=(None,))
    if "fp8" in sections:
        for batch, L in ((32, 4096), (128, 4096), (4, 32768)):
            kw = make_case(batch, 1, L, fp8=torch.float8_e4m3fn)
            decode_rows(results, "fp8", kw, f"fp8 e4m3 decode b{batch}x{L}", copy_bw, with_competitors=False,
                        splits=(None,))
    if "mla" in sections:
        for batch, L, hq in ((32, 4096, 16), (4, 16384, 128)):
            kw = make_case(batch, 1, L, layout="mla-slices", hq=hq, hkv=1, d=576, dv=512)
            decode_rows(results, "mla", kw, f"MLA 576/512 decode b{batch}x{L} H{hq}", copy_bw,
                        with_competitors=False, splits=(None,))
    if "prefill" in sections:
        kw = make_case(8, 2048, 2048)
        ref = reference(kw)
        fl = prefill_flops(kw)

        def tf(row):
            return {"TFLOP/s": round(fl / (row["us"] * 1e-6) / 1e12, 1)} if "us" in row else {}
        measure(results, "prefill", "kvdispatch paged prefill 8x2048 causal", kvd_call(kw), ref, lambda o: o, tf)
        measure(results, "prefill", "torch SDPA contiguous prefill 8x2048 causal", sdpa_call(kw), ref,
                sdpa_check(kw), tf)
        measure(results, "prefill", "FlagGems paged prefill 8x2048 causal", flag_gems_call(kw), ref, lambda o: o, tf)
    if "splits" in sections:
        for batch, L in ((1, 32768), (2, 16384), (4, 32768), (8, 8192), (16, 4096)):
            kw = make_case(batch, 1, L)
            decode_rows(results, "splits", kw, f"decode b{batch}x{L}", copy_bw, with_competitors=False,
                        splits=(None, 1, 2, 4, 8, 16, 32, 64))
    if "tiles" in sections:
        # launch-config sweep: each variant replaces the platform's whole table (one tile for every
        # head size and batch shape), so the kind's case runs with exactly that tile
        from kvdispatch.backends.triton import attention, attention_configs as ac
        base = ac.config_for(kvd.KVCacheDescriptor.from_tensors(*make_kv_cache(
            "NHD", 1, 16, 1, 128, device=DEV, fill=False)).platform)
        orig = attention.config_for
        cases = {
            "decode": make_case(32, 1, 4096),
            "fp8": make_case(32, 1, 4096, fp8=torch.float8_e4m3fn),
            "prefill": make_case(8, 2048, 2048),
            "mla128": make_case(4, 1, 16384, layout="mla-slices", hq=128, hkv=1, d=576, dv=512),
            "mla16": make_case(32, 1, 4096, layout="mla-slices", hq=16, hkv=1, d=576, dv=512, bs=64),
        }
        refs = {k: reference(kw) for k, kw in cases.items()}
        T = ac.TileConfig
        if args.tiles:  # kind:bm,bn,warps,stages[,splits[,fp16]] separated by spaces
            variants = []
            for item in args.tiles.split():
                kind, nums = item.split(":")
                v = nums.split(",")
                sp = int(v[4]) if len(v) > 4 and v[4] != "auto" else None
                variants.append((kind, T(1024, *map(int, v[:4])), sp, len(v) < 6 or v[5] != "0"))
        else:
            variants = [("decode", T(1024, 16, 128, 4, 2), 1, True)]
            variants += [("fp8", T(1024, 16, bn, w, st), sp, f16) for bn, w, st, sp, f16 in
                         ((128, 4, 2, 1, False), (128, 4, 2, 2, False), (128, 4, 2, 1, True), (128, 4, 2, 2, True),
                          (128, 4, 2, 4, True), (128, 8, 2, 1, True), (128, 4, 3, 1, True), (256, 4, 2, 1, True),
                          (256, 8, 2, 2, True), (64, 4, 3, 2, True))]
            variants += [("prefill", T(1024, bm, bn, w, st), None, True) for bm, bn, w, st in
                         ((128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                          (128, 32, 4, 3), (64, 128, 4, 2))]
            variants += [("mla128", T(1024, bm, bn, w, st), None, True) for bm, bn, w, st in
                         ((32, 32, 8, 1), (64, 32, 8, 1), (64, 16, 4, 1), (64, 32, 4, 2), (128, 16, 8, 1),
                          (32, 64, 8, 2), (64, 64, 8, 1))]
        for kind, tile, splits, f16 in variants:
            cfg = ac.AttentionConfig(decode=(tile,), prefill=(tile,),
                                     split_programs_per_sm=base.split_programs_per_sm,
                                     split_min_keys=base.split_min_keys, source="sweep")
            attention.config_for = lambda *a_, **k_: cfg
            if not f16:
                continue  # fp8 K/V with bf16 q always computes in fp16 now (no switch in the kernel API)
            registry.clear_selection()  # the prepared launches hold their plans (and tiles)
            kw, ref = cases[kind], refs[kind]
            nm = (f"{kind} bm{tile.block_m} bn{tile.block_n} w{tile.num_warps} s{tile.num_stages}"
                  f" splits={splits or 'auto'}" + ("" if kind != "fp8" else f" fp16={f16}"))
            if kind in ("prefill", "mla128"):  # compute-bound: TFLOP/s
                fl = prefill_flops(kw)
                extra = (lambda r, fl=fl: {"TFLOP/s": round(fl / (r["us"] * 1e-6) / 1e12, 1)} if "us" in r else {})
            else:
                extra = (lambda r, kw=kw: {"GB/s": round(kv_bytes(kw) / (r["us"] * 1e-6) / 1e9, 1)}
                         if "us" in r else {})
            measure(results, "tiles", nm, kvd_call(kw, splits), ref, lambda o: o, extra)
        attention.config_for = orig
        registry.clear_selection()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)
    table = ["| section | name | us (graph) | us (do_bench) | GB/s | of copy | TFLOP/s | rel err | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        us = f"{r['us']:.1f}" if "us" in r else ""
        ub = f"{r['us_bench']:.1f}" if "us_bench" in r else ""
        err = r.get("error", "") or r.get("graph_error", "")
        table.append(f"| {r['section']} | {r['name']} | {us} | {ub} | {r.get('GB/s', '')} | {r.get('of_copy', '')} | "
                     f"{r.get('TFLOP/s', '')} | {r.get('rel_err', float('nan')):.1e} | {err} |")
    print("\n" + "\n".join(table))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join([f"# Attention tuning: {info['device']}", "", f"Command: `{info['command']}`  ",
                                f"Date: {info['date']}", ""] + table) + "\n")
    return dict(info=info, results=results)
