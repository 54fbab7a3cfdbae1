"""Mixed batch and paged prefill on one GPU: the prefill tile (head 128) and the short-sequence path of a
prefill launch (``SMALL_M``: the config's ``mixed`` tile, attention.py) as the knobs, one line per variant.

Cases (32 q heads / 8 kv heads, D128, bf16, page 16, causal): "mixed", 60 decodes + 4 chunked prefills
of 512 queries, every sequence 4096 keys (the suite's B64xL4096+4x512q); "prefill", 8 x 2048. Every
variant is checked against the reference first. Times: graph replay (us); TFLOP/s counts
``4 * Hq * D`` per visible (query, key) pair; "tile" is the tile that ran (the launcher drops a stage
when ptxas fails on a pipeline).

    python3 benchmarks/mixed_ab.py [--quick]                  # from the repository root, on a CUDA machine
    python3 benchmarks/mixed_ab.py --tiles 128:32:4:3:off,128:128:8:3:on
"""
import dataclasses
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

from kvdispatch.backends.triton import attention  # noqa: E402
from kvdispatch.registry import registry  # noqa: E402
from kvbench import tune_attention as ta  # noqa: E402
from kvbench.layouts import device_fill, make_kv_cache, random_block_table  # noqa: E402
from kvbench.compare import bases, force_backend  # noqa: E402

QUICK = "--quick" in sys.argv
ARGS = {a: b for a, b in zip(sys.argv[1:], sys.argv[2:]) if a in ("--tiles", "--device")}
# block_m, block_n, warps, stages, the short-sequence path: "on" (the config's mixed tile), "on64" (its key
# tile 64 wide), "off"
TILES = [(128, 32, 4, 3, "off"), (128, 32, 4, 3, "on"), (128, 32, 4, 2, "off"), (128, 32, 4, 2, "on"),
         (128, 32, 4, 2, "on64"), (64, 64, 4, 2, "off"), (64, 64, 4, 2, "on"), (64, 64, 4, 2, "on64"),
         (128, 64, 4, 2, "on"), (128, 128, 8, 2, "on"), (128, 128, 8, 3, "on")]
if "--tiles" in ARGS:  # block_m:block_n:warps:stages:small, comma separated
    TILES = [tuple(int(x) for x in t.split(":")[:4]) + (t.split(":")[4],) for t in ARGS["--tiles"].split(",")]
if QUICK:
    TILES = TILES[:2]
DEV = ta.DEV = ARGS.get("--device", "cuda")  # cpu: a smoke run through the interpreter (no timing)
HQ, HKV, D, BS = 32, 8, 128, 16


def varlen_case(q_lens, k_len, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    k_lens = [k_len] * len(q_lens)
    nb = sum(-(-k // BS) for k in k_lens) + 8
    k, v = make_kv_cache("NHD", nb, BS, HKV, D, None, dtype=torch.bfloat16, device=DEV, fill=False)
    for b in bases(k, v):
        device_fill(b)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    q = torch.randn(sum(q_lens), HQ, D, dtype=torch.bfloat16, device=DEV)
    return dict(q=q, k=k, v=v, max_seqlen_q=max(q_lens), cu_seqlens_q=cu, max_seqlen_k=k_len,
                seqused_k=torch.tensor(k_lens, dtype=torch.int32, device=DEV),
                block_table=random_block_table(k_lens, nb, BS, device=DEV, generator=gen), causal=True,
                out=torch.empty(sum(q_lens), HQ, D, dtype=torch.bfloat16, device=DEV))


def flops(q_lens, k_len):
    # bottom-right causal: query i of a q_len-long chunk sees k_len - q_len + i + 1 keys
    pairs = sum(lq * (k_len - lq) + lq * (lq + 1) // 2 for lq in q_lens)
    return 4 * HQ * D * pairs


orig_cfg, orig_plan, orig_launch = attention.config_for, attention.plan_for, attention._launch
ran = {}


def launch(prep, *a, **k):
    orig_launch(prep, *a, **k)
    t = prep.plan.tile
    c = prep.plan.constexprs
    ran["tile"] = f"{t.block_m}x{t.block_n}/{t.num_warps}w/{t.num_stages}s small {c['SMALL_M']}x{c['SMALL_N']}"


attention._launch = launch


def patch(tile):
    bm, bn, w, s, small = tile

    def cfg(*a, **k):
        c = orig_cfg(*a, **k)
        pre = tuple(dataclasses.replace(t, block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                    if t.max_head_size == 128 else t for t in c.prefill)
        return dataclasses.replace(c, prefill=pre)

    def plan(*a, **k):
        p = orig_plan(*a, **k)
        if small == "off":
            p.constexprs.update(SMALL_M=0, SMALL_N=0, SMALL_STAGES=0)
        elif small == "on64" and p.constexprs["SMALL_M"]:
            p.constexprs.update(SMALL_N=64)
        return p
    attention.config_for, attention.plan_for = cfg, plan
    registry.clear_selection()


def _forced(f):
    with force_backend("triton"):
        return f()


cases = {"mixed": ([512] * 4 + [1] * 60, 4096), "prefill": ([2048] * 8, 2048)}
if QUICK:
    cases = {"mixed": ([64] * 2 + [1] * 6, 256), "prefill": ([256] * 2, 256)}
print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else DEV}; torch {torch.__version__}", flush=True)
for name, (q_lens, k_len) in cases.items():
    kw = varlen_case(q_lens, k_len)
    ref = ta.reference(kw).float()
    for tile in TILES:
        patch(tile)
        label = f"{name} tile {tile[0]}x{tile[1]}/{tile[2]}w/{tile[3]}s small {tile[4]}"
        fn = ta.kvd_call(kw)
        if DEV == "cpu":  # the CPU's default is the reference: the interpreter runs the kernel
            fn = (lambda f: lambda: _forced(f))(fn)
        try:
            out = fn()
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            if not err < 2e-2:
                print(f"{label}: WRONG rel err {err:.2e}", flush=True)
                continue
            g = ta.bench_graph(fn) or float("nan")
            print(f"{label}: graph {g:.1f} us, {flops(q_lens, k_len) / g / 1e6:.0f} TFLOP/s, rel err {err:.1e}"
                  f" (ran {ran.get('tile')})", flush=True)
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
attention.config_for, attention.plan_for, attention._launch = orig_cfg, orig_plan, orig_launch
