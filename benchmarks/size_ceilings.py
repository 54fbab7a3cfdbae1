"""Where the remaining memory-bound rows stop, on one GPU: ceilings at the case's own size, and the split
decode's time per kernel.

1. Writes (8 kv heads x 128, bf16, page 16, random slots): kvdispatch's ``reshape_and_cache_flash``
   against ``dst.copy_(src)`` of the same bytes (K and V read, the cache written) and an empty Triton
   kernel, each timed as ``kvdispatch bench`` times a row (``time_us``: CUDA events around each call,
   L2 cleared before it) and as CUDA-graph replay. "% copy" in the suite divides by a 2 GiB copy; a
   small write also pays what every kernel pays per call.
2. Decode (32q/8kv, D128, page 16; fp8 e4m3 with per-(sequence, head) descales; MLA 16q/1kv 576/512
   page 64): the public call's kernels under ``torch.profiler``, device time per kernel and call (the
   split-KV partials and their merge), against a same-size copy of the K/V bytes (read + written).

    python3 benchmarks/size_ceilings.py [--quick]   # from the repository root, on a CUDA machine
    python3 benchmarks/size_ceilings.py --quick --device cpu   # smoke run (host times, no graphs or profile)
"""
import collections
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

import kvdispatch as kvd  # noqa: E402
from kvbench import tune_attention as ta  # noqa: E402
from kvbench.compare import bases  # noqa: E402
from kvbench.layouts import device_fill, make_kv_cache, random_slots  # noqa: E402
from kvbench.timing import copy_bandwidth, empty_triton_launch, graph_replay_us, time_us  # noqa: E402

QUICK = "--quick" in sys.argv
DEV = ta.DEV = "cpu" if "cpu" in sys.argv[1:] else "cuda"
ta.SMOKE = DEV == "cpu"
H, D, BS = 8, 128, 16


def graph(fn):
    return graph_replay_us(fn, DEV, calls_per_graph=10, replays=10, repeats=3) if DEV == "cuda" else float("nan")


def both(fn):
    return time_us(fn, DEV), graph(fn)


def copy_of(nbytes):
    """``dst.copy_(src)`` moving ``nbytes`` in all: nbytes / 2 read, nbytes / 2 written."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=DEV).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else DEV}; torch {torch.__version__}", flush=True)
big = copy_bandwidth(torch.device(DEV), (2 << 30) if DEV == "cuda" else (64 << 20))["GBps"]
print(f"2 GiB copy: {big:.0f} GB/s (read + write): the suite's ceiling", flush=True)
if DEV == "cuda":
    floor = both(empty_triton_launch(torch.device(DEV)))
    print(f"empty Triton kernel: time_us {floor[0]:.1f} us, graph {floor[1]:.2f} us", flush=True)

for t in ((64,) if DEV == "cpu" else (4096,) if QUICK else (4096, 32768)):
    nb = 2 * t // BS + 64
    kc, vc = make_kv_cache("NHD", nb, BS, H, D, None, dtype=torch.bfloat16, device=DEV, fill=False)
    for b_ in bases(kc, vc):
        device_fill(b_)
    key = torch.randn(t, H, D, device=DEV, dtype=torch.bfloat16)
    val = torch.randn_like(key)
    slots = random_slots(t, nb, BS, dtype=torch.int64).to(DEV)
    nbytes = 2 * key.numel() * 2 * 2  # K and V, read and written
    w = both(lambda a=(key, val, kc, vc, slots): kvd.reshape_and_cache_flash(*a, "auto"))
    c = both(copy_of(nbytes))
    print(f"write T{t}: time_us {w[0]:.1f} us ({nbytes / w[0] / 1e3 / big:.0%} of the 2 GiB copy), graph {w[1]:.1f};"
          f" same-bytes copy_ time_us {c[0]:.1f} ({nbytes / c[0] / 1e3 / big:.0%}), graph {c[1]:.1f};"
          f" write / same-bytes copy (time_us): {c[0] / w[0]:.0%}", flush=True)
    del kc, vc, key, val


def kernel_times(fn, calls=20):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / calls
    return per


cases = [("B1xL32768", dict(batch=1, k_len=32768)), ("B32xL4096 fp8", dict(batch=32, k_len=4096, fp8=True)),
         ("B32xL4096 MLA", dict(batch=32, k_len=4096, mla=True))]
for label, c in cases[:1] if QUICK else cases:
    if c.get("mla"):
        kw = ta.make_case(c["batch"], 1, c["k_len"], layout="mla-slices", hq=16, hkv=1, d=576, dv=512, bs=64)
        kv_bytes = c["batch"] * c["k_len"] * 576 * 2
    else:
        kw = ta.make_case(c["batch"], 1, c["k_len"], fp8=torch.float8_e4m3fn if c.get("fp8") else None)
        if c.get("fp8"):
            kw["k_descale"] = torch.rand(c["batch"], ta.HKV, device=DEV) * 0.02 + 0.01
            kw["v_descale"] = torch.rand(c["batch"], ta.HKV, device=DEV) * 0.02 + 0.01
        kv_bytes = c["batch"] * c["k_len"] * ta.HKV * ta.D * 2 * (1 if c.get("fp8") else 2)
    fn = ta.kvd_call(kw)
    g = graph(fn)
    per = kernel_times(fn) if DEV == "cuda" else {"(no profile on the CPU)": fn() is not None and float("nan")}
    cp = both(copy_of(2 * kv_bytes))[1] / 2  # a read-only pass over kv_bytes costs about half a copy of them
    parts = "; ".join(f"{n[:40]} {us:.1f} us" for n, us in sorted(per.items(), key=lambda x: -x[1]))
    print(f"decode {label}: graph {g:.1f} us ({kv_bytes / g / 1e3 / big:.0%} of the 2 GiB copy's rate);"
          f" kernels per call: {parts}; half a same-size copy (graph) {cp:.1f} us", flush=True)
