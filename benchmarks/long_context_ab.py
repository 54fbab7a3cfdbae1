"""Long-context decode on one GPU: B1 x 32768 keys, 32 q heads / 8 kv heads, D128, bf16, page 16, NHD
and HND; the split-KV count (automatic and forced) and the decode tile (key tile, warps, stages) as the
knobs. Every variant is checked against the reference first. Prints one line per variant: graph-replay
us, do_bench us (cold L2), % of the copy bandwidth measured in the same run.

    python3 benchmarks/long_context_ab.py [--quick]    # from the repository root, on a CUDA machine
    python3 benchmarks/long_context_ab.py --tiles 128:4:1,64:4:1 --splits 32,64   # each tile x each split count
"""
import dataclasses
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402

from kvdispatch.backends.triton import attention, attention_configs as ac  # noqa: E402
from kvdispatch.registry import registry  # noqa: E402
from kvbench import tune_attention as ta  # noqa: E402
from kvbench.timing import copy_bandwidth  # noqa: E402

QUICK = "--quick" in sys.argv
ARGS = dict(zip(sys.argv[1::2], sys.argv[2::2]))
SPLITS = (None, 16, 32, 48, 64) if QUICK else (None, 8, 16, 24, 32, 48, 64, 96, 128)
TILES = ((64, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 2), (256, 8, 3))
TILE_SPLITS = (None,)
if QUICK:
    TILES = TILES[:2]
if "--tiles" in ARGS:  # key tile : warps : stages, comma separated; then only those, at each --splits count
    TILES = tuple(tuple(int(x) for x in t.split(":")) for t in ARGS["--tiles"].split(","))
    SPLITS = ()
    TILE_SPLITS = tuple(int(x) or None for x in ARGS.get("--splits", "0").split(","))
copy = copy_bandwidth("cuda")["GBps"]
print(f"copy bandwidth {copy:.0f} GB/s (read + write); device {torch.cuda.get_device_name()}; "
      f"torch {torch.__version__}", flush=True)
orig_cfg = attention.config_for


def with_tile(bn, w, s):
    def cfg(*a, **k):
        c = orig_cfg(*a, **k)
        dec = tuple(dataclasses.replace(t, block_n=bn, num_warps=w, num_stages=s) if t.max_head_size == 128 else t
                    for t in c.decode)
        return dataclasses.replace(c, decode=dec)
    return cfg


def run(label, kw, ref, nbytes, splits=None):
    kw = kw if splits is None else dict(kw, num_splits=splits)  # the public knob: at most n splits
    fn = ta.kvd_call(kw)
    try:
        out = fn()
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        if not err < 2e-2:
            print(f"{label}: WRONG rel err {err:.2e}", flush=True)
            return
        g, cold = ta.bench_graph(fn), ta.bench(fn)
        print(f"{label}: graph {g:.1f} us ({nbytes / g / 1e3 / copy * 100:.1f}% of copy), "
              f"do_bench {cold:.1f} us ({nbytes / cold / 1e3 / copy * 100:.1f}%), rel err {err:.1e}", flush=True)
    except Exception as e:
        print(f"{label}: {type(e).__name__}: {str(e)[:200]}", flush=True)


for layout in ("NHD", "HND"):
    kw = ta.make_case(1, 1, 32768, layout=layout)
    ref = ta.reference(kw)
    nbytes = ta.kv_bytes(kw)
    for sp in SPLITS:
        run(f"{layout} B1x32768 default tile, splits {sp or 'auto'}", kw, ref, nbytes, sp)
    for bn, w, s in TILES:
        attention.config_for = with_tile(bn, w, s)
        registry.clear_selection()
        for sp in TILE_SPLITS:
            run(f"{layout} B1x32768 tile 16x{bn} {w} warps {s} stages, splits {sp or 'auto'}", kw, ref, nbytes, sp)
    attention.config_for = orig_cfg
    registry.clear_selection()
