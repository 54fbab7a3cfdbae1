"""Host time per public call (eager) of the cache write and of decode, plus a correctness pass
of the shared attention matrix at real sizes with every case run twice (the second call of a
plan takes the direct launch of the cached compiled kernel).

    python3 benchmarks/host_overhead.py            # on a GPU machine
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import kvdispatch as kvd  # noqa: E402
from kvdispatch.testing import make_kv_cache, random_block_table, random_slots  # noqa: E402
from matrix import attention_cases, run_attention_case  # noqa: E402


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    dev = "cuda"
    fails = 0
    for case in attention_cases(big=True):
        for rep in range(2):
            try:
                run_attention_case(case, "triton", dev, seed=rep, rel_tol=2e-2)
            except AssertionError as e:
                fails += 1
                print(f"FAIL rep{rep} {case.id}: {e}")
    print(f"attention matrix (big) x2: {fails} failures")
    k, v = make_kv_cache("NHD", 256, 16, 8, 128, device=dev)
    key = torch.randn(16, 8, 128, device=dev).bfloat16()
    slots = random_slots(16, 256, 16, device=dev)
    print(f"write T16 public API host us/call: {host_us(lambda: kvd.reshape_and_cache_flash(key, key, k, v, slots)):.1f}")
    for b, lk in ((4, 64), (32, 4096)):
        kc, vc = make_kv_cache("NHD", b * lk // 16 + 8, 16, 8, 128, device=dev)
        q = torch.randn(b, 32, 128, device=dev).bfloat16()
        cu = torch.arange(b + 1, dtype=torch.int32, device=dev)
        used = torch.full((b,), lk, dtype=torch.int32, device=dev)
        bt = random_block_table([lk] * b, b * lk // 16 + 8, 16, device=dev)
        out = torch.empty_like(q)
        f = lambda: kvd.flash_attn_varlen_func(q, kc, vc, 1, cu, lk, seqused_k=used, block_table=bt, out=out)  # noqa
        print(f"decode B{b}xL{lk} public API host us/call: {host_us(f, 500):.1f}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
