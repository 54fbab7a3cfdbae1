"""Tensor-parallel check of kvdispatch: transformers' continuous batching with ``paged|kvdispatch`` on
a tiny random-weight Llama sharded over the ranks (issue 14, item 2).

    torchrun --nproc-per-node 2 benchmarks/tp_engine.py                     # GPUs (NCCL), one per rank
    torchrun --nproc-per-node 2 benchmarks/tp_engine.py --device cpu        # CPU, gloo (the CI lane)
    torchrun --nproc-per-node 2 benchmarks/tp_engine.py --backend-gloo      # GPUs, gloo instead of NCCL
    torchrun --nproc-per-node 2 benchmarks/tp_engine.py --mode ops          # kvdispatch's ops only (no transformers)

Use the torchrun of the venv that has transformers 5.16/5.17 (``.venv-engines``) for ``--mode engine``
(the default); ``--mode ops`` needs only torch and kvdispatch (``.venv`` works). The last line of
rank 0's output is ``PASS ...`` or ``FAIL ...``; every rank exits 0 on PASS and 1 on FAIL.

Can transformers 5.17 combine tensor parallelism with its paged continuous batching? Yes. Read in
``transformers/generation/continuous_batching`` (5.17.0): ``ContinuousBatchingManager`` builds a
``DistributedHelper`` from ``model._device_mesh`` (set by ``from_pretrained`` with a TP plan); TP rank 0
is the "TP driver" that owns the request queue and broadcasts new requests / cancellations / stop
states to the other ranks over a dedicated gloo CPU group every step (``_update_tp_group_state``), so
every rank schedules the same batches; ``PagedAttentionCache.__init__`` divides ``num_key_value_heads``
by ``tp_size`` when ``k_proj`` and ``v_proj`` are in the model's TP plan (Llama's ``base_model_tp_plan``
has them colwise) and all-reduces ``max_batch_tokens`` / ``num_blocks`` to their minimum over the TP
group. So each rank's attention function -- here ``paged|kvdispatch`` -- gets this rank's query
heads (``num_attention_heads / tp``) and kv heads (``num_key_value_heads / tp``) and a cache of
``num_key_value_heads / tp`` heads, and runs kvdispatch's write and paged attention on the rank's own
device. No fallback is needed; ``--mode ops`` is kept as the engine-free variant of the same split.

What ``--mode engine`` does:

1. Rank 0 builds a seeded random-weight Llama (float32; 4 query heads, 2 kv heads, 2 layers), saves
   it with ``save_pretrained`` to a temporary directory and, on its own device (cuda:0 or the CPU),
   without tensor parallelism, computes the reference: greedy ``generate_batch`` through
   ``paged|kvdispatch`` (and, as a sanity check, eager ``model.generate`` per prompt).
2. Barrier; every rank loads the saved model with ``distributed_config=DistributedConfig(tp_plan="auto",
   tp_size=world_size)`` (what ``tp_plan="auto"`` means in 5.17, without its deprecation warning) and
   runs the same ``generate_batch`` through ``paged|kvdispatch``: mixed prefill, chunked prefill and
   decode steps (block size 16, 16 blocks, 32-token batches, 6 prompts with a shared prefix).
3. Spies on ``kvdispatch.flash_attn_varlen_func`` / ``reshape_and_cache_flash`` record, per rank, the
   number of calls, the query heads and kv-cache heads seen, the tensors' device and the backend
   kvdispatch selects for it. Rank 0 gathers everything and prints PASS when the tensor-parallel
   tokens of every rank equal the single-device tokens (and eager's), every rank ran kvdispatch
   with ``heads / world_size`` query and kv heads on its own device.

What ``--mode ops`` does (the fallback the issue describes, engine-free): every rank builds the same
random batch (decodes, prefills and chunked prefills; 8 query heads over 4 kv heads, paged NHD cache,
random block table), keeps its tensor-parallel share of the heads (kv heads ``[r*Hk/W, (r+1)*Hk/W)``
and the query heads of those groups, as colwise q/k/v projections split them), writes its own cache
with ``reshape_and_cache_flash``, attends with ``flash_attn_varlen_func``, and the outputs are
all-gathered along heads and compared with rank 0's full-heads single-device run. On GPUs, ranks
other than 0 make their kvdispatch calls with cuda:0 current and the tensors on cuda:<rank>, which
exercises the "launch under the tensors' device" promise.

GPU notes: NCCL's NVLink multicast (NVLS) is kept off (``NCCL_NVLS_ENABLE=0`` is set before the
process group starts unless the environment already sets it), and ``NCCL_GRAPH_MIXING_SUPPORT=0``
as transformers' continuous batching asks under TP. ``--cuda-graph`` turns on continuous batching's
CUDA graphs (off by default). ``--device cpu`` hides the GPUs (``CUDA_VISIBLE_DEVICES=""``) so that
transformers builds a CPU mesh; the CPU run uses gloo and kvdispatch's reference backend (set
``KVDISPATCH_BACKEND`` to force another, e.g. ``KVDISPATCH_BACKEND=triton TRITON_INTERPRET=1`` runs the
Triton kernels through the interpreter). ``--backend-gloo`` on GPUs has not been run: gloo may lack
collectives that DTensor uses on CUDA tensors.

transformers gates ``tp_plan`` behind ``accelerate`` (see ``_accelerate_gate``): install it
(``pip install accelerate``) to load exactly as transformers expects; without it this script lifts
that one check and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# Before torch initializes CUDA / NCCL: these must be in the environment of every rank.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the lent machines need it off)
os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")  # transformers CB under TP asks for it


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda: one GPU per rank (default when a GPU is visible); cpu: gloo on the CPU")
    p.add_argument("--backend-gloo", action="store_true", help="use gloo even on GPUs (default there: nccl)")
    p.add_argument("--mode", choices=("engine", "ops"), default="engine",
                   help="engine: transformers continuous batching with tp_plan (default); ops: kvdispatch's ops")
    p.add_argument("--max-new", type=int, default=8, help="greedy tokens per request (engine mode)")
    p.add_argument("--cuda-graph", action="store_true", help="continuous batching with CUDA graphs (GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    return p.parse_args(argv)


ARGS = _parse()
if ARGS.device == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # transformers picks the mesh's device type itself

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import kvdispatch as kvd  # noqa: E402  (installed: pip install -e . ; kvdispatch.integrations needs it)

# -- the model and the workload (engine mode) ------------------------------------------------------
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)
PROMPT_LENS = (5, 17, 40, 1, 33)
CB = dict(block_size=16, num_blocks=16, max_batch_tokens=32)


def log(msg: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"[rank {rank}] {msg}", flush=True)


def _prompts():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]
    # two full blocks of the 40-token prompt, then its own tail: prefix sharing across requests
    prompts.append(prompts[2][:32] + torch.randint(0, TINY["vocab_size"], (6,), generator=g).tolist())
    return prompts


def _gen_config(max_new: int):
    from transformers import GenerationConfig
    # no eos: every request generates exactly max_new tokens
    return GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None,
                            pad_token_id=0)


def _cb_config(cuda_graph: bool):
    from transformers import ContinuousBatchingConfig
    return ContinuousBatchingConfig(**CB, use_cuda_graph=bool(cuda_graph))


class Spy:
    """Records every kvdispatch op call made by ``paged|kvdispatch`` in this process."""

    def __init__(self):
        self.attn = self.writes = 0
        self.q_heads, self.kv_heads, self.devices, self.backends = set(), set(), set(), set()
        self._orig = kvd.flash_attn_varlen_func, kvd.reshape_and_cache_flash
        fa, write = self._orig

        def flash_attn_varlen_func(q, k, v, *args, **kwargs):
            self.attn += 1
            self.q_heads.add(int(q.shape[1]))
            self.kv_heads.add(int(k.shape[-2]))
            self.devices.add(str(q.device))
            self.backends.add(kvd.select_backend("flash_attn_varlen_func", q))
            return fa(q, k, v, *args, **kwargs)

        def reshape_and_cache_flash(key, value, key_cache, *args, **kwargs):
            self.writes += 1
            self.kv_heads.add(int(key_cache.shape[2]))
            self.devices.add(str(key_cache.device))
            return write(key, value, key_cache, *args, **kwargs)

        kvd.flash_attn_varlen_func, kvd.reshape_and_cache_flash = flash_attn_varlen_func, reshape_and_cache_flash

    def close(self) -> dict:
        kvd.flash_attn_varlen_func, kvd.reshape_and_cache_flash = self._orig
        return dict(attn=self.attn, writes=self.writes, q_heads=sorted(self.q_heads), kv_heads=sorted(self.kv_heads),
                    devices=sorted(self.devices), backends=sorted(self.backends))


def _generate_batch(model, prompts, max_new: int, cuda_graph: bool):
    """Greedy ``generate_batch`` through ``paged|kvdispatch``; token lists in prompt order (None on a
    rank that received no results), the errors, and the spy's record."""
    from kvdispatch.integrations.transformers import register
    model.set_attn_implementation(register())
    spy = Spy()
    try:
        results = model.generate_batch(prompts, generation_config=_gen_config(max_new),
                                       continuous_batching_config=_cb_config(cuda_graph))
    finally:
        seen = spy.close()
    outs = list(results.values())
    errors = [str(o.error) for o in outs if o.error is not None]
    tokens = [list(o.generated_tokens) for o in outs] if len(outs) == len(prompts) else None
    return tokens, errors, seen


def _eager(model, prompts, max_new: int):
    model.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_gen_config(max_new))
            out.append(gen[0, len(p):].tolist())
    return out


def _accelerate_gate():
    """transformers 5.17's ``from_pretrained`` refuses a ``tp_plan`` (any ``device_map``) unless
    ``accelerate`` is importable: ``integrations.accelerate.check_and_set_device_map`` raises
    "Using a `device_map`, `tp_plan`, ... requires `accelerate`". For a TP plan with one device per
    rank nothing else on the load path needs accelerate (its other uses -- hooks, offload, dispatch
    over several devices, unwrapping -- are behind ``is_accelerate_available()`` branches that were
    decided at import time or do not run here), so when accelerate is missing this run lifts that one
    gate, the module global read at call time, and says so. Returns the note, or None."""
    import importlib.util
    if importlib.util.find_spec("accelerate") is not None:
        return None
    import transformers.integrations.accelerate as tf_accelerate
    tf_accelerate.is_accelerate_available = lambda *a, **k: True
    return ("note: accelerate is not installed; transformers' check_and_set_device_map gate for tp_plan was "
            "lifted for this run (pip install accelerate to load exactly as transformers expects)")


def run_engine(device: torch.device, rank: int, world: int) -> tuple[bool, list]:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvdispatch.integrations import transformers as kvd_tf
    kvd_tf._check_version(transformers.__version__)  # RuntimeError outside 5.16-5.17, naming the version
    if TINY["num_key_value_heads"] % world or TINY["num_attention_heads"] % world:
        raise ValueError(f"the tiny model's heads ({TINY['num_attention_heads']} q, {TINY['num_key_value_heads']} kv) "
                         f"do not split over {world} ranks")
    prompts = _prompts()
    holder = [None, None]
    if rank == 0:
        path = tempfile.mkdtemp(prefix="kvd_tp_engine_")
        try:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
            model.save_pretrained(path)
            model = model.to(device)
            t = time.perf_counter()
            ref, errors, seen = _generate_batch(model, prompts, ARGS.max_new, ARGS.cuda_graph)
            eager = _eager(model, prompts, ARGS.max_new)
            log(f"single-device reference on {device}: {time.perf_counter() - t:.1f} s, kvdispatch calls {seen}")
            holder = [path, dict(ref=ref, eager=eager, errors=errors, seen=seen)]
            del model
        except Exception as e:  # the other ranks wait in the broadcast below: tell them, then fail
            import traceback
            traceback.print_exc()
            shutil.rmtree(path, ignore_errors=True)
            holder = [None, f"single-device reference failed: {type(e).__name__}: {e}"]
    dist.broadcast_object_list(holder, src=0)
    path, single = holder
    if path is None:
        return False, [str(single)]
    try:
        return _run_tp(path, single, prompts, device, rank, world)
    finally:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)


def _run_tp(path: str, single: dict, prompts: list, device: torch.device, rank: int, world: int) -> tuple[bool, list]:
    import transformers
    from transformers import LlamaForCausalLM
    dist.barrier()

    from transformers.distributed import DistributedConfig
    note = _accelerate_gate()
    if note and rank == 0:
        log(note)
    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto", tp_size=world)).eval()
    mesh = getattr(model, "_device_mesh", None)
    wq = model.model.layers[0].self_attn.q_proj.weight
    log(f"loaded with tp_plan='auto' in {time.perf_counter() - t:.1f} s: mesh {mesh}, q_proj weight "
        f"{type(wq).__name__} local shape {tuple(getattr(wq, 'to_local', lambda: wq)().shape)} on {wq.device}")
    t = time.perf_counter()
    tokens, errors, seen = _generate_batch(model, prompts, ARGS.max_new, ARGS.cuda_graph)
    log(f"tensor-parallel generate_batch: {time.perf_counter() - t:.1f} s, kvdispatch calls {seen}")
    mine = dict(rank=rank, device=str(device), tokens=tokens, errors=errors, seen=seen)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    dist.barrier()
    if rank != 0:
        return True, []

    problems = []
    ref, eager = single["ref"], single["eager"]
    if single["errors"] or ref is None:
        problems.append(f"single-device run: {single['errors'] or 'missing results'}")
    elif ref != eager:
        problems.append(f"single-device paged|kvdispatch != eager generate: {ref} vs {eager}")
    if single["seen"]["attn"] == 0:
        problems.append("single-device run made no kvdispatch attention call")
    want_q = TINY["num_attention_heads"] // world
    want_kv = TINY["num_key_value_heads"] // world
    driver = gathered[0]["tokens"]
    for g in gathered:
        r = g["rank"]
        if g["errors"]:
            problems.append(f"rank {r}: request errors {g['errors']}")
        if g["tokens"] is not None and g["tokens"] != (driver if driver is not None else g["tokens"]):
            problems.append(f"rank {r}: tokens differ from TP rank 0's")
        s = g["seen"]
        if s["attn"] == 0 or s["writes"] == 0:
            problems.append(f"rank {r}: paged|kvdispatch made no kvdispatch call ({s})")
        if s["q_heads"] != [want_q] or s["kv_heads"] != [want_kv]:
            problems.append(f"rank {r}: kvdispatch saw q heads {s['q_heads']} / kv heads {s['kv_heads']}, "
                            f"expected [{want_q}] / [{want_kv}] (heads / world_size)")
        if s["devices"] != [g["device"]]:
            problems.append(f"rank {r}: kvdispatch ran on {s['devices']}, expected the rank's {g['device']}")
    if driver is None:
        problems.append("TP rank 0 got no results")
    elif ref is not None and driver != ref:
        diff = [i for i, (a, b) in enumerate(zip(driver, ref)) if a != b]
        problems.append(f"tensor-parallel tokens differ from the single-device run in requests {diff}: "
                        f"{[driver[i] for i in diff]} vs {[ref[i] for i in diff]}")
    n_tok = sum(len(t) for t in driver or [])
    with_results = [g["rank"] for g in gathered if g["tokens"] is not None]
    if driver is not None:
        print(f"  tensor-parallel tokens (request 0): {driver[0]}; single-device: {ref[0] if ref else None}; "
              f"ranks that returned results: {with_results}", flush=True)
    summary = (f"transformers {transformers.__version__} continuous batching, paged|kvdispatch, tp_plan='auto' over "
               f"{world} ranks ({gathered[0]['device']}...{gathered[-1]['device']}, {dist.get_backend()}): "
               f"{len(prompts)} requests, {n_tok} greedy tokens; per rank {want_q} q / {want_kv} kv heads, "
               f"backends {sorted({b for g in gathered for b in g['seen']['backends']})}")
    return not problems, [summary] + problems


# -- ops mode: kvdispatch's ops per rank, heads split as tensor-parallel attention splits them -----
HQ, HK, D, BS, NB = 8, 4, 64, 16, 64
Q_LENS = (1, 1, 7, 19, 1, 5)      # decodes, prefills (q == k) and chunked prefills (q < k)
K_LENS = (33, 130, 7, 60, 1, 21)


def _ops_case(device: torch.device, heads: slice, kv_heads: slice, dtype=torch.float32):
    """Output ``(total_q, hq_share, D)`` of one write + one paged attention call for a head share."""
    g = torch.Generator().manual_seed(1234)
    total_new = sum(K_LENS)
    k_all = torch.randn(total_new, HK, D, generator=g, dtype=dtype)
    v_all = torch.randn(total_new, HK, D, generator=g, dtype=dtype)
    q = torch.randn(sum(Q_LENS), HQ, D, generator=g, dtype=dtype)
    from kvbench.layouts import random_block_table
    table = random_block_table(K_LENS, NB, BS, generator=g)
    slots = torch.cat([table[i, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
                       for i, n in enumerate(K_LENS)])
    hk = kv_heads.stop - kv_heads.start
    kc = torch.zeros(NB, BS, hk, D, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    dev = dict(device=device)
    cu_q = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32, **dev)
    used = torch.tensor(K_LENS, dtype=torch.int32, **dev)
    kk = k_all[:, kv_heads].to(device)  # a strided view's copy: each rank's own share
    vv = v_all[:, kv_heads].to(device)
    qq = q[:, heads].contiguous().to(device)
    guard = torch.cuda.device(0) if device.type == "cuda" and device.index else None
    if guard is not None:  # tensors on cuda:<rank> while cuda:0 is current: kvdispatch must switch
        guard.__enter__()
    try:
        kvd.reshape_and_cache_flash(kk, vv, kc, vc, slots.to(device))
        out = kvd.flash_attn_varlen_func(qq, kc, vc, max(Q_LENS), cu_q, max(K_LENS), seqused_k=used,
                                         block_table=table.to(device), causal=True)
        backend = kvd.select_backend("flash_attn_varlen_func", qq)
    finally:
        if guard is not None:
            guard.__exit__(None, None, None)
    return out, backend


def run_ops(device: torch.device, rank: int, world: int) -> tuple[bool, list]:
    if HK % world:
        raise ValueError(f"{HK} kv heads do not split over {world} ranks")
    hk, hq = HK // world, HQ // world  # GQA groups are contiguous: kv head j serves q heads j*G..(j+1)*G-1
    out, backend = _ops_case(device, slice(rank * hq, (rank + 1) * hq), slice(rank * hk, (rank + 1) * hk))
    log(f"ops: my share q heads [{rank * hq}, {(rank + 1) * hq}) kv heads [{rank * hk}, {(rank + 1) * hk}) on "
        f"{out.device} (current device {torch.cuda.current_device() if device.type == 'cuda' else 'cpu'}), "
        f"backend {backend}")
    comm = out.contiguous() if dist.get_backend() != "gloo" or out.device.type == "cpu" else out.cpu().contiguous()
    parts = [torch.empty_like(comm) for _ in range(world)]
    dist.all_gather(parts, comm)
    tp_out = torch.cat(parts, dim=1).cpu()
    backends = [None] * world
    dist.all_gather_object(backends, backend)
    if rank != 0:
        return True, []
    full, full_backend = _ops_case(device, slice(0, HQ), slice(0, HK))
    err = (tp_out - full.cpu()).abs().max().item()
    ok = err <= 1e-5 and torch.isfinite(tp_out).all().item()
    summary = (f"kvdispatch ops per rank over {world} ranks ({dist.get_backend()}, backends {backends}): "
               f"write + paged attention of {len(Q_LENS)} sequences, {HQ // world} q / {HK // world} kv heads each, "
               f"all-gathered along heads vs the full-heads single-device run ({full_backend}): max |diff| {err:.3g}")
    return ok, [summary] + ([] if ok else [f"max |diff| {err:.3g} > 1e-5"])


def main() -> int:
    torch.set_num_threads(max(1, ARGS.threads))
    if "RANK" not in os.environ:
        print("run under torchrun: torchrun --nproc-per-node 2 benchmarks/tp_engine.py [--device cpu]", file=sys.stderr)
        return 2
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = ARGS.device == "cuda" or (ARGS.device is None and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            print(f"[rank {rank}] needs cuda:{local}, torch sees {torch.cuda.device_count()} GPU(s)", file=sys.stderr)
            return 2
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "gloo" if ARGS.backend_gloo else "nccl"
        dist.init_process_group(backend, device_id=None if ARGS.backend_gloo else device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    log(f"{world} ranks, {dist.get_backend()}, device {device}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}, "
        f"torch {torch.__version__}, mode {ARGS.mode}")
    ok, lines = False, []
    try:
        ok, lines = (run_engine if ARGS.mode == "engine" else run_ops)(device, rank, world)
    except Exception as e:  # every rank must still reach the verdict broadcast
        import traceback
        traceback.print_exc()
        ok, lines = False, [f"rank {rank}: {type(e).__name__}: {e}"]
    verdict = [ok and rank == 0, lines]
    dist.broadcast_object_list(verdict, src=0)
    ok_all = torch.tensor([int(ok)])
    dist.all_reduce(ok_all, op=dist.ReduceOp.MIN, group=dist.new_group(backend="gloo"))
    ok = bool(verdict[0]) and bool(ok_all.item())
    if rank == 0:
        for line in lines[1:]:
            print(f"  - {line}", flush=True)
        print(f"{'PASS' if ok else 'FAIL'} {lines[0] if lines else ''}", flush=True)
    dist.barrier()  # rank 0 has printed the verdict before any rank exits (torchrun ends the rest on a failure)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
