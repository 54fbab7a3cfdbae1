"""FP8 attention on one GPU: an e4m3 q over an e4m3 cache (QK^T on the fp8 tensor cores, ``FP8_DOT`` in
attention.py) against a bf16 q over the same cache (K/V decoded to fp16) and the bf16 cache, per tile, one
line per variant.

Cases (32 q heads / 8 kv heads, D128, page 16, causal, e4m3 cache with per-(sequence, head) descales):
"prefill" 8 x 2048, "decode" 32 x 4096, "mixed" 4 chunks of 512 queries + 60 decodes over 4096 keys each
(the suite's mixed batch). The fp8 q is quantized with a per-tensor ``q_descale``, as vLLM
does for FA3. ``--tiles`` replaces the head-128 prefill tiles (the bf16 table's and the fp8 one's).
Every variant is checked against the reference backend first (relative Frobenius error, printed).
Times: graph replay (us); prefill TFLOP/s counts ``4 * Hq * D`` per visible (query, key) pair, decode
GB/s the fp8 K/V bytes.

    python3 benchmarks/fp8_ab.py [--quick] [--tiles 128:64:4:2,128:128:4:2] [--cases prefill,decode,mixed]
    python3 benchmarks/fp8_ab.py --quick --device cpu

The first run (benchmarks/results/h200_fp8_ab.txt) also timed P in fp8 for PV ("dot 2"), since removed:
fp8 wgmma wants V key-contiguous in shared memory, which Triton 3.6 builds through registers.
"""
import dataclasses
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

from kvdispatch.backends.triton import attention  # noqa: E402
from kvdispatch.registry import registry  # noqa: E402
from kvbench import tune_attention as ta  # noqa: E402
from kvbench.compare import attention_mismatch, force_backend  # noqa: E402

QUICK = "--quick" in sys.argv
ARGS = {a: b for a, b in zip(sys.argv[1:], sys.argv[2:]) if a in ("--tiles", "--device", "--cases")}
TILES = [(128, 64, 4, 2), (64, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 32, 4, 2), (128, 128, 8, 2)]
if "--tiles" in ARGS:
    TILES = [tuple(int(x) for x in t.split(":")) for t in ARGS["--tiles"].split(",")]
if QUICK:
    TILES = TILES[:1]
DEV = ta.DEV = ARGS.get("--device", "cuda")
ta.SMOKE = QUICK and DEV == "cpu"
orig_cfg = attention.config_for


def patch(kind, tile):
    def cfg(*a, **k):
        c = orig_cfg(*a, **k)
        if tile is None:
            return c
        bm, bn, w, s = tile
        kinds = ("prefill", "prefill_fp8") if kind == "prefill" else (kind,)
        return dataclasses.replace(c, **{n: tuple(dataclasses.replace(t, block_m=bm, block_n=bn, num_warps=w,
                                                                      num_stages=s)
                                                  if t.max_head_size == 128 else t for t in getattr(c, n))
                                         for n in kinds})
    attention.config_for = cfg
    registry.clear_selection()


def fp8_q(kw):
    q = kw["q"].float()
    qs = q.abs().amax().clamp_min(1e-6) / 448.0
    return dict(kw, q=(q / qs).to(torch.float8_e4m3fn), q_descale=qs.reshape(1).float())


def run(label, kw, ref, metric):
    fn = ta.kvd_call(kw)
    if DEV == "cpu":
        fn = (lambda f: lambda: _forced(f))(fn)
    try:
        kw["out"].fill_(float("nan"))
        out = fn()
        why, err = attention_mismatch(out.float(), ref, 6e-2)
        if why:
            print(f"{label}: WRONG {why}", flush=True)
            return
        g = ta.bench_graph(fn) or float("nan")
        print(f"{label}: graph {g:.1f} us, {metric(g)}, rel err {err:.1e}", flush=True)
    except Exception as e:
        print(f"{label}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _forced(f):
    with force_backend("triton"):
        return f()


def flops(b, lq, lk):
    return 4 * ta.HQ * ta.D * b * (lq * (lk - lq) + lq * (lq + 1) // 2)


cases = {"prefill": (8, 2048, 2048), "decode": (32, 1, 4096), "mixed": (64, 1, 4096)}
if QUICK:
    cases = {"prefill": (2, 64, 64), "decode": (4, 1, 100), "mixed": (4, 1, 64)}
if "--cases" in ARGS:
    cases = {k: v for k, v in cases.items() if k in ARGS["--cases"].split(",")}


def as_mixed(kw, chunk):
    """The batch's first 4 sequences as chunks of ``chunk`` queries (the rest decodes), keys unchanged."""
    b = kw["cu_seqlens_q"].shape[0] - 1
    q_lens = [chunk] * min(4, b - 1) + [1] * (b - min(4, b - 1))
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    q = torch.randn(sum(q_lens), ta.HQ, ta.D, dtype=torch.bfloat16, device=DEV)
    return dict(kw, q=q, cu_seqlens_q=cu, max_seqlen_q=chunk, out=torch.empty_like(q))


print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else DEV}; torch {torch.__version__}", flush=True)
for name, (b, lq, lk) in cases.items():
    if name == "prefill":
        def metric(g, b=b, lq=lq, lk=lk):
            return f"{flops(b, lq, lk) / g / 1e6:.0f} TFLOP/s"
    elif name == "decode":
        def metric(g, b=b, lk=lk):
            return f"{b * lk * ta.HKV * ta.D * 2 / g / 1e3:.0f} GB/s (fp8 K/V bytes)"
    else:
        def metric(g):
            return "mixed batch"
    tiles = [None] if name == "decode" else TILES
    for t in tiles:
        patch("decode" if name == "decode" else "prefill", t)
        kw16 = ta.make_case(b, lq, lk)
        if name == "mixed":
            kw16 = as_mixed(kw16, min(512, lk // 2))
        run(f"{name} tile {t} bf16 cache", kw16, ta.reference(kw16).float(), metric)
        kw = ta.make_case(b, lq, lk, fp8=torch.float8_e4m3fn)
        if name == "mixed":
            kw = as_mixed(kw, min(512, lk // 2))
        nb = kw["cu_seqlens_q"].shape[0] - 1  # (a smoke run shrinks the batch)
        kw["k_descale"] = torch.rand(nb, ta.HKV, device=DEV) * 0.02 + 0.01
        kw["v_descale"] = torch.rand(nb, ta.HKV, device=DEV) * 0.02 + 0.01
        run(f"{name} tile {t} fp8 cache q bf16", kw, ta.reference(kw).float(), metric)
        kq = fp8_q(kw)
        run(f"{name} tile {t} fp8 cache q fp8", kq, ta.reference(kq).float(), metric)
        del kw16, kw, kq
        torch.cuda.empty_cache() if DEV == "cuda" else None
attention.config_for = orig_cfg
