"""A/B on the H200: MLA decode B32x4096, 16 q heads / 1 kv head, 576/512, page 64, bf16: V from K's tile
(on/off) x tile (the decode_shared_kv tile / the decode table's tile). Graph-replay us.

    python3 benchmarks/mla_ab.py     # from the repository root, on a CUDA machine
"""
import dataclasses, sys
sys.path.insert(0, "benchmarks")
import torch
from kvdispatch.registry import registry
from kvdispatch.backends.triton import attention, attention_configs as ac
from kvbench import tune_attention as ta
kw = ta.make_case(32, 1, 4096, layout="mla-slices", hq=16, hkv=1, d=576, dv=512, bs=64)
ref = ta.reference(kw)
nbytes = ta.kv_bytes(kw)
orig_alias, orig_cfg = attention.v_aliases_k, attention.config_for
for alias in (True, False):
    for tile in ("new", "old"):
        attention.v_aliases_k = orig_alias if alias else (lambda d: False)
        def cfg(*a, **k):
            c = orig_cfg(*a, **k)
            return c if tile == "new" else dataclasses.replace(c, decode_shared_kv=())
        attention.config_for = cfg
        registry.clear_selection()
        fn = ta.kvd_call(kw)
        try:
            out = fn()
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            us = ta.bench_graph(fn)
            print(f"alias={alias} tile={tile}: {us:.1f} us graph, {nbytes / us / 1e3:.0f} GB/s, rel err {err:.1e}")
        except Exception as e:
            print(f"alias={alias} tile={tile}: {type(e).__name__}: {str(e)[:200]}")
attention.v_aliases_k, attention.config_for = orig_alias, orig_cfg
