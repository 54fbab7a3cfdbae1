"""Timers and the two ceilings (device copy bandwidth, matrix-product rate), measured in-process.

GPU (cuda): ``triton.testing.do_bench`` with ``return_mode="median"``: it warms up, clears the L2
cache before EVERY timed call (so the inputs come from memory, never from L2) and brackets each
call with CUDA events. Without Triton the same thing is done by hand. Other devices (CPU, XPU
without events): host clock around a synchronized call, median of repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["sync", "time_us", "copy_bandwidth", "matmul_tflops", "graph_replay_us", "host_us_per_call",
           "host_us_interleaved", "empty_triton_launch"]


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def _cuda_events_median(fn: Callable, device, warmup_ms: float, rep_ms: float) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > L2 of any current GPU
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est_ms))):
        fn()
    n = max(5, min(1000, int(rep_ms / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_us(fn: Callable, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            min_calls: int = 5) -> float:
    """Median time of one call of ``fn`` in microseconds (device time on cuda, cold L2). Other
    devices: host time of synchronized calls, at least ``min_calls`` of them after one warm-up."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                import triton.testing
            except Exception:
                return _cuda_events_median(fn, device, warmup_ms, rep_ms)
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3
    fn()
    sync(device)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_calls or (time.perf_counter() < deadline and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def copy_bandwidth(device: torch.device, nbytes: int = 0) -> dict:
    """Device copy ``dst.copy_(src)`` of a large buffer (default 1 GiB on GPUs, 64 MiB on the CPU);
    bytes counted read + written. The ceiling every "% copy" column divides by."""
    device = torch.device(device)
    n = nbytes or ((1 << 30) if device.type in ("cuda", "xpu") else (64 << 20))
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device)
    del src, dst
    return {"bytes": 2 * n, "us": us, "GBps": 2 * n / us / 1e3}


def matmul_tflops(device: torch.device) -> dict:
    """A large matrix product's rate (bf16 on GPUs, fp32 on CPU): the compute ceiling for prefill."""
    device = torch.device(device)
    if device.type in ("cuda", "xpu"):
        m, dtype = 8192, torch.bfloat16
    else:
        m, dtype = 512, torch.float32
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    us = time_us(lambda: a @ b, device)
    return {"m": m, "dtype": str(dtype).replace("torch.", ""), "us": us, "TFLOPs": 2 * m ** 3 / us / 1e6}


def host_us_per_call(fn: Callable, device: torch.device, calls: int = 2000) -> float:
    """Host time per back-to-back call (a tiny op: the GPU never limits), microseconds."""
    for _ in range(50):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def host_us_interleaved(fns: dict, device: torch.device, calls: int = 3000, rounds: int = 9) -> dict:
    """Host us per call of each of ``fns`` (name -> callable), measured in ``rounds`` interleaved
    rounds of ``calls // rounds`` calls each (every function once per round, the order rotated),
    median over the rounds. A host's speed drifts within one process (clock ramp, other work);
    measured this way every function sees the same drift, so differences between them are fair."""
    per = max(calls // rounds, 20)
    names = list(fns)
    got = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            got[n].append(host_us_per_call(fns[n], device, per))
    return {n: statistics.median(v) for n, v in got.items()}


def graph_replay_us(fn, device: torch.device, calls_per_graph: int = 20, replays: int = 20,
                    repeats: int = 5) -> float:
    """Per-call device time (us) of calls captured back to back into one CUDA graph, replayed
    ``replays`` times; the median of ``repeats`` such timings. No host time between launches.

    ``fn``: one callable, or a list of them (one per input set, rotated so that the inputs are not
    served from L2), cycled to ``calls_per_graph`` calls (at least one of each).
    """
    device = torch.device(device)
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    calls = [fns[i % len(fns)] for i in range(max(calls_per_graph, len(fns)))]
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for c in (fns * 3)[:max(3, len(fns))]:  # warm-up (compiles, plans) outside the capture
            c()
    torch.cuda.current_stream(device).wait_stream(s)
    torch.cuda.synchronize(device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    del g
    return statistics.median(times)


def empty_triton_launch(device) -> Callable[[], None]:
    """A launch of an empty Triton kernel: the floor of any kernel's host and device time."""
    import triton

    @triton.jit
    def _empty(x):
        pass

    dummy = torch.empty(1, device=device)
    return lambda: _empty[(1,)](dummy)
