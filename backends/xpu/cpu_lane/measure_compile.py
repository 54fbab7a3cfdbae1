"""Measures what the first-use compilation decision (README.md) rests on, on this machine:
run-time compile time of each kernel family through DPC++'s kernel compiler (OpenCL CPU target),
the first-call latency of an op (device open + compile + launch), and a warm call.

    python -m kvdispatch.backends.xpu.cpu_lane.measure_compile [--persistent-cache DIR]

Prints one JSON object. Run it twice with the same --persistent-cache directory to see whether
DPC++'s persistent cache (SYCL_CACHE_PERSISTENT) serves run-time compiled bundles.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persistent-cache", default=None)
    a = ap.parse_args()
    if a.persistent_cache:
        os.environ["SYCL_CACHE_PERSISTENT"] = "1"
        os.environ["SYCL_CACHE_DIR"] = a.persistent_cache
    import torch

    import kvdispatch as kvd
    from kvbench.layouts import make_kv_cache, random_block_table, random_slots

    from . import runtime as rt_mod

    res = {}
    t0 = time.perf_counter()
    rt = rt_mod.runtime()
    res["open_device_and_shim_s"] = time.perf_counter() - t0

    os.environ["KVDISPATCH_BACKEND"] = "sycl-cpu"
    kc, vc = make_kv_cache("HND", 64, 16, 8, 128)
    key = torch.randn(32, 8, 128, dtype=torch.bfloat16)
    slots = random_slots(32, 64, 16)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    write = lambda: kvd.reshape_and_cache_flash(key, key, kc, vc, slots)  # noqa: E731
    res["write_first_call_s"] = timed(write)
    res["write_warm_call_s"] = min(timed(write) for _ in range(5))

    ks = torch.tensor([0.5])
    kc8, vc8 = make_kv_cache("NHD", 64, 16, 8, 128, dtype=torch.float8_e4m3fn)
    res["write_fp8_first_call_s"] = timed(lambda: kvd.reshape_and_cache_flash(key, key, kc8, vc8, slots, "fp8", ks, ks))

    latent = torch.randn(16, 512, dtype=torch.bfloat16)
    mla = torch.empty(64, 16, 576, dtype=torch.bfloat16)
    res["mla_first_call_s"] = timed(lambda: kvd.concat_and_cache_mla(latent, latent[:, :64], mla, slots[:16]))

    for dk, dv in ((128, 128), (576, 512)):
        hkv = 8 if dk == 128 else 1
        buf = make_kv_cache("NHD" if dk == dv else "mla-slices", 64, 16, hkv, dk, dv)
        q = torch.randn(4, 16, dk, dtype=torch.bfloat16)
        lens = [100, 37, 300, 12]
        bt = random_block_table(lens, 64, 16)
        call = lambda: kvd.flash_attn_varlen_func(  # noqa: E731
            q, buf[0], buf[1], 1, torch.arange(5, dtype=torch.int32), max(lens),
            seqused_k=torch.tensor(lens, dtype=torch.int32), block_table=bt, causal=True)
        res[f"attention_d{dk}x{dv}_first_call_s"] = timed(call)
        res[f"attention_d{dk}x{dv}_warm_call_s"] = min(timed(call) for _ in range(3))

    res["compile_s_per_kernel"] = {k: round(v, 3) for k, v in rt.compile_seconds.items()}
    res["device"] = rt.device
    res["persistent_cache"] = a.persistent_cache
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
