"""Where the host time of one decode call (and one write) goes, layer by layer, on a GPU host.

    python3 benchmarks/host_breakdown.py        # from the repository root, kvdispatch installed

Times (host us per call, interleaved with the empty Triton launch: ``kvbench.timing.host_us_interleaved``)
each layer of kvdispatch's path for decode B4 x L64 (bf16, 32 q / 8 kv heads, head 128, page 16) and a
16-token write: Triton's C launcher alone with the call's arguments already prepared, the Triton
attention module's function, the backend method, the public call (plain, and with vLLM's keywords).
The first row reaches into the Triton backend's private prepared launch (``_Prepared``): a diagnostic
of this repository's code, not an API. ``kvdispatch bench --overhead-only`` is the user-facing table."""
import sys, torch
sys.path.insert(0, "benchmarks")
import kvdispatch as kvd
from kvdispatch import ops
from kvbench.timing import host_us_interleaved, empty_triton_launch
dev = torch.device("cuda")
bf = torch.bfloat16
B, L, hq, hkv, D, bs = 4, 64, 32, 8, 128, 16
nb = B * L // bs + 8
kc = torch.randn(nb, bs, hkv, D, device=dev, dtype=bf); vc = torch.randn_like(kc)
q = torch.randn(B, hq, D, device=dev, dtype=bf); out = torch.empty_like(q)
cu = torch.arange(B + 1, dtype=torch.int32, device=dev); su = torch.full((B,), L, dtype=torch.int32, device=dev)
bt = torch.randperm(nb, device=dev)[: B * (L // bs)].to(torch.int32).view(B, -1)
key = torch.randn(16, hkv, D, device=dev, dtype=bf); val = torch.randn_like(key)
sm = torch.randperm(nb * bs, device=dev)[:16]; ks = torch.ones(1, device=dev)
def att(): kvd.flash_attn_varlen_func(q, kc, vc, 1, cu, L, seqused_k=su, block_table=bt, out=out, causal=True, softmax_scale=0.088)
def attv(): kvd.flash_attn_varlen_func(q=q, k=kc, v=vc, max_seqlen_q=1, cu_seqlens_q=cu, max_seqlen_k=L, seqused_k=su,
        softmax_scale=0.088, causal=True, alibi_slopes=None, window_size=None, block_table=bt, softcap=0.0,
        scheduler_metadata=None, out=out, fa_version=3, q_descale=None, k_descale=None, v_descale=None,
        num_splits=0, s_aux=None)
def wr(): kvd.reshape_and_cache_flash(key, val, kc, vc, sm)
def wrv(): kvd.reshape_and_cache_flash(key, val, kc, vc, sm, "auto", ks, ks)
got = []
att(); wr()
call = ops._ATTN_RECENT[0][1]
be = call.select("flash_attn_varlen_func", q.dtype)
cls = type(be)
orig = cls.flash_attn_varlen_func
cls.flash_attn_varlen_func = lambda self, *a: (got.append(a), orig(self, *a))[1]
att()
cls.flash_attn_varlen_func = orig
_, _, _, _, desc, args = got[0]
from kvdispatch.backends.triton import attention as A
prep = [p for k, p in call.plans.items() if k is not None][0]
launch, head = prep.kernels[False]
ptrs = prep.gathers[False](q, kc, vc, out, out, out, args)
stream = torch._C._cuda_getCurrentRawStream(0)
fixed = (1, B * hkv, 1, stream, *head, *ptrs, args.softmax_scale * prep.scale_factor, 0.0, prep.plan.v_factor,
         -1, 0, B, prep.kv_limit, 64, *prep.tails[False])
print("launch args:", len(fixed))
def raw(): launch(*fixed)
def mod(): A.flash_attn_varlen_func(q, kc, vc, out, desc, args)
def meth(): be.flash_attn_varlen_func(q, kc, vc, out, desc, args)
wcall = ops._WRITE_RECENT[0][1]
wbe = wcall.select("reshape_and_cache_flash", key.dtype)
wdesc = wcall.desc
def wmeth(): wbe.reshape_and_cache_flash(key, val, kc, vc, sm, wdesc, plans=wcall.plans)
fl = empty_triton_launch(dev)
fns = {"floor (empty Triton launch)": fl, "decode: compiled launch alone (arguments prepared)": raw,
       "decode: triton attention module fn": mod, "decode: backend method": meth, "decode: public plain": att,
       "decode: public vLLM keywords": attv, "write: backend method": wmeth, "write: public plain": wr,
       "write: public vLLM pattern": wrv}
for rep in range(2):
    us = host_us_interleaved(fns, dev, calls=4000, rounds=9)
    f = us["floor (empty Triton launch)"]
    print(f"-- run {rep}")
    for n, v in us.items():
        print(f"{n:55s} {v:7.2f} us  {v - f:+6.2f}")
