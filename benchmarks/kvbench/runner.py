"""The benchmark loop: for each case, build the workload once, then for each implementation:
prepare -> run once on poisoned outputs / initial caches -> check against the reference ->
only if correct, time. Also the dispatch-overhead measurements."""

from __future__ import annotations

import gc
import statistics
import traceback
from typing import Callable

import torch

from .cases import ATTENTION_OPS, WRITE_OPS, Case, Workload
from .timing import empty_triton_launch, graph_replay_us, host_us_interleaved, host_us_per_call, sync, time_us
from .vendors import Unsupported, Vendor

__all__ = ["run_case", "finish_rows", "dispatch_overhead"]


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    if msg:
        return f"{type(e).__name__}: {msg[0][:200]}"
    # a bare `assert` says nothing: name where it fired instead
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}{where}"


def run_case(case: Case, w: Workload, impl: Vendor, copy_GBps: float, peak_TFLOPs: float,
             rep_ms: float = 100, debug: bool = False, graph: bool = False) -> dict:
    """One row: ``status`` is "ok" (timed), "unsupported", "WRONG" (ran, result differs from the
    reference: never timed) or "error" (raised while running)."""
    row = dict(op=case.op, layout=case.layout, dtype=case.dtype, size=case.size, shape=case.shape, case=case.id,
               impl=impl.label, kind=impl.kind, status=None, reason=None, us=None, GBps=None, TFLOPs=None,
               pct_copy=None, pct_peak=None, vs_best_vendor=None, graph_us=None, bytes=w.bytes, flops=w.flops)
    try:
        if case.op in ATTENTION_OPS and w.q_descale is not None and not impl.fp8_q:
            # checked here, not in every adapter: one written for bf16 q must never be handed an fp8 one
            raise Unsupported("fp8 q (q_descale)")
        with impl.context():
            if case.op in WRITE_OPS:
                w.reset()
            fn = impl.prepare(case.op, w)
            if case.op in WRITE_OPS:
                w.reset()  # prepare may have run it: check the first write from the initial caches
            result = fn()
            why = w.check(result)
            if why:
                row.update(status="WRONG", reason=why)
                return row
            if case.op in ATTENTION_OPS:
                row["rel_err"] = getattr(w, "last_error", None)
            us = time_us(fn, w.device, rep_ms=rep_ms)
            if case.op in ATTENTION_OPS:
                # timing must not have changed what the call computes (stale buffers, races)
                why = w.check(fn())
                if why:
                    row.update(status="WRONG", reason="after timing: " + why)
                    return row
    except Unsupported as e:
        row.update(status="unsupported", reason=str(e).splitlines()[0][:200] if str(e) else "unsupported")
        return row
    except Exception as e:  # a broken competitor must not stop the run
        row.update(status="error", reason=_short(e))
        if debug:
            traceback.print_exc()
        return row
    finally:
        sync(w.device)
    row.update(status="ok", us=us, GBps=w.bytes / us / 1e3)
    if w.device.type == "cuda" and graph:
        # device time alone: host work between launches (Python wrappers, argument checks)
        # cannot leave the GPU idle inside a graph replay. Inputs stay the same, so small
        # cases run from L2 here: compare graph times only with graph times.
        try:
            with impl.context():
                row["graph_us"] = graph_replay_us(fn, w.device, calls_per_graph=10, replays=10)
        except Exception as e:
            row["graph_us"] = None
            row["graph_error"] = _short(e)
        finally:
            sync(w.device)
    row["pct_copy"] = 100.0 * row["GBps"] / copy_GBps if copy_GBps else None
    if w.flops:
        row["TFLOPs"] = w.flops / us / 1e6
        row["pct_peak"] = 100.0 * row["TFLOPs"] / peak_TFLOPs if peak_TFLOPs else None
    return row


def finish_rows(rows: list) -> None:
    """Fill ``vs_best_vendor``: the best (fastest) correct vendor time of the same case divided by
    this row's time, so > 1 means faster than every vendor measured. Baselines (torch) and
    kvdispatch rows are not vendors."""
    best = {}
    for r in rows:
        if r["status"] == "ok" and r["kind"] == "vendor":
            best[r["case"]] = min(best.get(r["case"], float("inf")), r["us"])
    for r in rows:
        b = best.get(r["case"])
        r["best_vendor_us"] = b
        if r["status"] == "ok" and b:
            r["vs_best_vendor"] = b / r["us"]


def overhead_cases(quick: bool = False, more: bool = False) -> list:
    """The cases of the dispatch-overhead measurement: a 16-token write and a small decode (tiny
    inputs, the GPU is never the limit); ``more`` (``--overhead-only``) adds a decode step at a
    real size and one long sequence that takes the split-KV path (two launches)."""
    if quick:
        return [Case("write", num_kv_heads=2, head_size=64, block_size=16, tokens=8),
                Case("decode", num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, batch=2, kv_len=32)]
    cases = [Case("write", num_kv_heads=8, head_size=128, block_size=16, tokens=16),
             Case("decode", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, batch=4, kv_len=64)]
    if more:
        cases += [Case("decode", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, batch=32, kv_len=4096),
                  Case("decode", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, batch=1, kv_len=32768)]
    return cases


def dispatch_overhead(device: torch.device, impls: list, quick: bool = False, more: bool = False) -> list:
    """Per-call host time of the public API (plain and vLLM's call pattern) and of the backend
    method alone, each measured interleaved with a bare launch of an empty Triton kernel (the
    floor) in the same rounds (:func:`host_us_interleaved`), and the CUDA-graph replay time of the
    public call (cuda only), for :func:`overhead_cases`.

    Rows: op, what, us (host microseconds per call, or device microseconds per graph replay), and
    for host rows ``over_floor`` (us minus the floor measured in the same rounds).
    """
    import kvdispatch as kvd

    out = []
    device = torch.device(device)
    calls = 300 if quick else 3000
    floor = None
    if device.type == "cuda":
        try:
            floor = empty_triton_launch(device)
        except Exception as e:
            out.append(dict(impl="(floor)", op="-", size="-", what="error", us=None, reason=_short(e)))
    floors = []
    for impl in impls:
        if impl.kind != "kvdispatch":
            continue
        backend = impl.backend
        for case in overhead_cases(quick, more):
            try:
                w = Workload.build(case, device, _fp8_type(device))
                with impl.context():
                    desc = kvd.KVCacheDescriptor.from_tensors(w.key_cache, w.value_cache)
                    if case.op == "write":
                        a = (w.key, w.value, w.key_cache, w.value_cache, w.slot_mapping)
                        public: Callable = lambda a=a: kvd.reshape_and_cache_flash(*a)
                        # vLLM's call: the layer's scale tensors are always passed, also with "auto"
                        ks = torch.ones(1, device=device)
                        engine: Callable = lambda a=a, ks=ks: kvd.reshape_and_cache_flash(*a, "auto", ks, ks)
                        # with a plans dict of its own where the backend keeps launch state there
                        pk = {"plans": {}} if backend.takes_plans else {}
                        bare: Callable = lambda a=a, d=desc, pk=pk: backend.reshape_and_cache_flash(*a, d, **pk)
                    else:
                        o = w.new_out()
                        kw = w.public_attention_kwargs(o)
                        public = lambda kw=kw: kvd.flash_attn_varlen_func(**kw)
                        # vLLM's FlashAttentionImpl call: every keyword spelled out, FA3 hints included
                        ekw = dict(kw, causal=True, window_size=None, softcap=0.0, alibi_slopes=None,
                                   scheduler_metadata=None, fa_version=3, num_splits=0, s_aux=None,
                                   q_descale=None, k_descale=None, v_descale=None)
                        engine = lambda ekw=ekw: kvd.flash_attn_varlen_func(**ekw)
                        args = _attention_args(kvd, w)
                        bare = lambda o=o, d=desc, args=args: backend.flash_attn_varlen_func(
                            w.q, w.key_cache, w.value_cache, o, d, args)
                    fns = {"public API, host us/call": public,
                           "public API, vLLM's call pattern, host us/call": engine,
                           "backend method (no checks, no dispatch), host us/call": bare}
                    if floor is not None:
                        fns["floor"] = floor
                    us = host_us_interleaved(fns, device, calls)
                    f = us.pop("floor", None)
                    if f is not None:
                        floors.append(f)
                    for what, v in us.items():
                        out.append(dict(impl=impl.label, op=case.op, size=case.size, what=what, us=v,
                                        over_floor=None if f is None else v - f))
                    if device.type == "cuda":
                        out.append(dict(impl=impl.label, op=case.op, size=case.size,
                                        what="CUDA graph replay of the public call, device us/call",
                                        us=graph_replay_us(public, device)))
            except Exception as e:
                out.append(dict(impl=impl.label, op=case.op, size=case.size, what="error", us=None, reason=_short(e)))
            finally:
                gc.collect()
    if floor is not None:
        us = statistics.median(floors) if floors else host_us_per_call(floor, device, calls)
        out.append(dict(impl="(floor)", op="-", size="-", us=us, over_floor=0.0,
                        what="empty Triton kernel launch, host us/call (median of the rounds above)"))
    return out


def _fp8_type(device):
    from kvdispatch.platform import platform_of
    return platform_of(torch.device(device)).fp8_e4m3_dtype


def _attention_args(kvd, w: Workload):
    from kvdispatch.registry import AttentionArgs
    return AttentionArgs(cu_seqlens_q=w.cu_seqlens_q, max_seqlen_q=w.max_seqlen_q, cu_seqlens_k=None,
                         seqused_k=w.seqused_k, max_seqlen_k=w.max_seqlen_k, block_table=w.block_table,
                         softmax_scale=w.softmax_scale, causal=False, window_left=-1, window_right=-1,
                         softcap=0.0, q_descale=None, k_descale=None, v_descale=None,
                         plans={})  # the backend keeps its prepared launch here, as the public call's signature does

