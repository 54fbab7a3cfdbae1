"""kvdispatch as vLLM's attention backend, end to end, on a tiny random-weight Llama on the CPU.

The same greedy requests (token-id prompts of 1 to 150 tokens; ``max_num_batched_tokens=64``
splits the long one, so steps mix fresh prefills, chunked-prefill continuations and decodes) run
once through vLLM's own attention (CPU_ATTN, the only one vLLM's CPU platform selects) and once
per configuration through the plug-in (``attention_backend="CUSTOM"``): NHD and HND cache layouts
(``VLLM_KV_CACHE_LAYOUT``), block sizes 16 and 32, kvdispatch's reference backend and its Triton
kernels under the interpreter. CPU_ATTN and the reference runs generate the request set twice,
the second time over vLLM's prefix cache (cached blocks + a new tail: chunked-prefill attention
again); the interpreted Triton runs once, 4 tokens per request. Token ids must be identical to
the engine's own. Each engine runs in a subprocess (this file in worker mode); the plug-in's
counters, the layers' impl classes, the kvdispatch backend that served the calls and the cache
views' strides come back with the tokens, so a run that silently used CPU_ATTN fails.

Without an engine: registration and declarations, the CPU selector honouring CUSTOM, the import
without vLLM, and the impl's write + attention over vLLM-shaped caches (NHD, HND, a block-outer
cross-layer view) with sliding window, softcap, sinks, ALiBi and fp8 against float64 attention.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.engines

VOCAB = 320
PROMPT_LENS = (1, 6, 17, 33, 150)  # 150 > max_num_batched_tokens: chunked prefill
MAX_TOKENS = 8
ROUNDS = 2  # the second round hits the prefix cache
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=64,
              enable_chunked_prefill=True, max_num_seqs=8, seed=0, kv_cache_memory_bytes=32 << 20,
              disable_log_stats=True)
# name -> (attention: None = the engine's own, else the kvdispatch backend; VLLM_KV_CACHE_LAYOUT;
# block size; rounds; tokens generated per request). The interpreted Triton runs are kept short
# (one round, 4 tokens: still 3 chunked-prefill steps and decodes); greedy tokens of a request do
# not depend on what else is in the batch, so they are compared with the baseline's first 4.
# Slowest first: the pool of PARALLEL workers takes them in this order.
BASELINE = "cpu_attn-bs32"
CONFIGS = {
    "triton-NHD-bs32": ("triton", "NHD", 32, 1, 4),
    "triton-HND-bs16": ("triton", "HND", 16, 1, 4),
    BASELINE: (None, None, 32, ROUNDS, MAX_TOKENS),  # CPU_ATTN: head-major blocks (LBHNC), block sizes % 32
    "reference-NHD-bs16": ("reference", "NHD", 16, ROUNDS, MAX_TOKENS),
    "reference-HND-bs32": ("reference", "HND", 32, ROUNDS, MAX_TOKENS),
}
PARALLEL = 2
TIMEOUT_S = 300


def _prompts():
    import random

    r = random.Random(7)
    return [[r.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


def _make_model(path: str) -> None:
    """A 2-layer Llama (4 heads, 2 kv heads, head_dim 32) with random weights, and a word-level
    tokenizer over its vocabulary, saved to ``path``: nothing is downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      initializer_range=0.3,  # wide logits: greedy choices far from ties
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(path)


# -- worker: one engine, one configuration (run as `python test_vllm.py MODEL_DIR CONFIG`) --------
def _worker(model_dir: str, name: str) -> dict:
    from vllm import LLM, SamplingParams

    import kvdispatch.integrations.vllm as kvd_vllm

    attention, _layout, block_size, n_rounds, max_tokens = CONFIGS[name]
    kw = dict(ENGINE, block_size=block_size)
    if attention is not None:
        kw["attention_backend"] = "CUSTOM"
    t0 = time.time()
    llm = LLM(model=model_dir, **kw)
    t1 = time.time()
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    requests = [{"prompt_token_ids": p} for p in _prompts()]
    rounds, margins = [], []
    for _ in range(n_rounds):
        outs = llm.generate(requests, sp, use_tqdm=False)
        rounds.append([list(o.outputs[0].token_ids) for o in outs])
        for o in outs:  # top-1 minus top-2 logprob per generated token: how far from a tie
            for step in o.outputs[0].logprobs or ():
                lp = sorted((v.logprob for v in step.values()), reverse=True)
                if len(lp) > 1:
                    margins.append(lp[0] - lp[1])
    t2 = time.time()
    vcfg = llm.llm_engine.vllm_config
    layers = vcfg.compilation_config.static_forward_context
    attn = {n: m for n, m in layers.items() if hasattr(m, "impl") and hasattr(m, "kv_cache")}
    kv = next(iter(attn.values())).kv_cache
    kv = kv[0] if isinstance(kv, (list, tuple)) else kv
    return dict(
        tokens=rounds, min_margin=min(margins) if margins else None,
        stats=kvd_vllm.stats(),
        impls=sorted({type(m.impl).__name__ for m in attn.values()}),
        backends=sorted({m.attn_backend.get_name() for m in attn.values()}),
        layout=vcfg.cache_config.kv_cache_layout,
        kv_shape=list(kv.shape), kv_stride=list(kv.stride()),
        init_s=round(t1 - t0, 1), generate_s=round(t2 - t1, 1),
    )


if __name__ == "__main__" and len(sys.argv) == 3:
    print("KVD_RESULT " + json.dumps(_worker(sys.argv[1], sys.argv[2])), flush=True)
    sys.exit(0)


# -- the tests ----------------------------------------------------------------------------------
def _env(name: str, cpu) -> dict:
    attention, layout = CONFIGS[name][:2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "KVDISPATCH_BACKEND", "VLLM_KV_CACHE_LAYOUT", "VLLM_ATTENTION_BACKEND")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine core in the worker process: stats readable
               KVDISPATCH_VLLM_STATS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false")
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)  # engines running side by side: a core each
    if layout is not None:
        env["VLLM_KV_CACHE_LAYOUT"] = layout
    if attention is not None:
        env["KVDISPATCH_BACKEND"] = attention
    if attention == "triton":
        env["TRITON_INTERPRET"] = "1"
    return env


def _run(model_dir: str, name: str, cpus: "queue.Queue") -> dict:
    t = time.time()
    cpu = cpus.get()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), model_dir, name], env=_env(name, cpu),
                           cwd=model_dir, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return dict(error=f"timed out after {TIMEOUT_S}s", log=out[-6000:])
    finally:
        cpus.put(cpu)
    log = p.stdout + p.stderr
    for line in p.stdout.splitlines():
        if line.startswith("KVD_RESULT "):
            res = json.loads(line[len("KVD_RESULT "):])
            res.update(wall_s=round(time.time() - t, 1), log=log)
            return res
    return dict(error=f"worker exited with {p.returncode} and no result", log=log[-6000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the engine comparison runs on vLLM's CPU platform (CPU_ATTN is the baseline)")
    model_dir = str(tmp_path_factory.mktemp("tiny-llama"))
    _make_model(model_dir)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    parallel = PARALLEL if len(affinity) >= PARALLEL else 1
    cpus: queue.Queue = queue.Queue()
    for c in (affinity[:parallel] if parallel > 1 else [None]):
        cpus.put(c)
    with ThreadPoolExecutor(parallel) as pool:
        futures = {n: pool.submit(_run, model_dir, n, cpus) for n in CONFIGS}
        results = {n: f.result() for n, f in futures.items()}
    for n, r in results.items():  # shown with -s / -rA
        print(f"{n}: " + (r["error"] if "error" in r else
                          f"wall {r['wall_s']}s (engine init {r['init_s']}s, generate {r['generate_s']}s), "
                          f"smallest top-2 logprob gap {r['min_margin']:.3g}, stats {r['stats']}"))
    return results


def _ok(res: dict, name: str) -> dict:
    if "error" in res:
        pytest.fail(f"{name}: {res['error']}\n{res['log']}")
    return res


def test_baseline_is_vllm_own_attention(runs):
    base = _ok(runs[BASELINE], BASELINE)
    assert base["impls"] == ["CPUAttentionBackendImpl"] and base["backends"] == ["CPU_ATTN"], base["impls"]
    assert not base["stats"].get("forward") and not base["stats"].get("kv_update"), base["stats"]
    assert len(base["tokens"]) == ROUNDS and all(len(t) == MAX_TOKENS for r in base["tokens"] for t in r)
    assert base["tokens"][0] == base["tokens"][1], "vLLM's own attention changed its answer over the prefix cache"


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != BASELINE])
def test_plugin_matches_engine(runs, name):
    base = _ok(runs[BASELINE], BASELINE)
    res = _ok(runs[name], name)
    attention, layout, block_size, n_rounds, max_tokens = CONFIGS[name]
    # it really was the plug-in: impl class, the enum member, the log line, kvdispatch's counters
    assert res["impls"] == ["KVDispatchAttentionImpl"] and res["backends"] == ["CUSTOM"], res["impls"]
    assert "Using CUSTOM attention backend (kvdispatch)" in res["log"]
    st = res["stats"]
    assert st.get(f"kvdispatch_backend:{attention}") == 2, st  # both layers served by the named backend
    assert st.get("forward", 0) == 2 * st.get("steps", -1) > 0 and st.get("kv_update") == st["forward"], st
    assert st.get("chunked_prefill_steps", 0) > 0 and st.get("decode_steps", 0) > 0, st
    # the layout vLLM resolved reached the backend: per-layer view [blocks, H, block_size, 2 * D]
    assert res["layout"] == {"NHD": "LBNHC", "HND": "LBHNC"}[layout], res["layout"]
    _, heads, bs, width = res["kv_shape"]
    s_block, s_head, s_token, s_dim = res["kv_stride"]
    assert (bs, width, s_dim) == (block_size, 64, 1), res
    if layout == "NHD":
        assert (s_head, s_token) == (width, heads * width), res["kv_stride"]
    else:
        assert (s_head, s_token) == (bs * width, width), res["kv_stride"]
    # and it gives the engine's tokens, on fresh and on prefix-cached requests
    want = [t[:max_tokens] for t in base["tokens"][0]]
    assert len(res["tokens"]) == n_rounds
    for r in range(n_rounds):
        assert res["tokens"][r] == want, (
            f"{name} round {r}: token ids differ from CPU_ATTN (smallest top-2 logprob gap: "
            f"{name} {res['min_margin']}, CPU_ATTN {base['min_margin']})\n"
            f"kvdispatch: {res['tokens'][r]}\nCPU_ATTN:   {want}")


# -- the plug-in without an engine: registration, declarations, features Llama does not use -------
def test_import_without_vllm_fails_only_when_used():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import kvdispatch.integrations.vllm as m\n"
            "for f in (m.register, lambda: m.KVDispatchAttentionBackend):\n"
            "    try:\n        f()\n    except ImportError as e:\n        assert 'needs vLLM' in str(e), e\n"
            "    else:\n        raise SystemExit('no ImportError')\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout + p.stderr


def test_registration_and_declarations():
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig
    from vllm.v1.kv_cache_interface import KVCacheLayout

    import kvdispatch.integrations.vllm as kvd_vllm

    kvd_vllm.register()
    kvd_vllm.register()  # vLLM may load general plugins more than once
    B = kvd_vllm.KVDispatchAttentionBackend
    assert AttentionBackendEnum.CUSTOM.get_class() is B
    assert AttentionBackendEnum[B.get_name()] is AttentionBackendEnum.CUSTOM
    assert B.forward_includes_kv_cache_update is False
    assert set(B.supported_dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert B.supported_kv_cache_dtypes == ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
    assert B.supported_kv_cache_layouts()[:2] == (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC)
    assert set(B.supported_kv_cache_layouts()) == set(KVCacheLayout)
    assert all(B.supports_block_size(bs) for bs in (1, 16, 32, 48, 128))
    assert kvd_vllm.KVDispatchMetadataBuilder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_BATCH
    cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=16,
                                  has_sink=True, has_sliding_window=True, use_per_head_quant_scales=True)
    assert B.validate_configuration(device_capability=None, **cfg._asdict()) == []
    assert B.validate_configuration(device_capability=None, **cfg._replace(use_mla=True)._asdict())
    if current_platform.is_cpu():  # the CPU selector honours an explicit CUSTOM, nothing else changes
        plat = type(current_platform)
        assert plat.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg) == kvd_vllm.BACKEND_PATH
        assert plat.get_attn_backend_cls(None, cfg) == AttentionBackendEnum.CPU_ATTN.get_path()
        with pytest.raises(ValueError, match="CUSTOM"):
            plat.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, cfg._replace(head_size=2048))


def _naive_attention(q, k, v, scale, window_left, softcap, alibi, sinks):
    """float64 truth for one sequence: q [lq, Hq, D], k/v [lk, Hkv, D], bottom-right causal."""
    import torch

    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    pos = torch.arange(lq, dtype=torch.float64)[:, None] + lk - lq
    j = torch.arange(lk, dtype=torch.float64)[None, :]
    seen = j <= pos
    if window_left >= 0:
        seen &= j >= pos - window_left
    out = torch.empty(lq, hq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        s = (q[:, h].double() @ k[:, kh].double().T) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if alibi is not None:
            s = s - float(alibi[h]) * (pos - j).abs()
        s = s.masked_fill(~seen, float("-inf"))
        m = s.max(-1, keepdim=True).values
        if sinks is not None:
            m = torch.maximum(m, torch.tensor(float(sinks[h]), dtype=torch.float64))
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True) + (torch.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
        out[:, h] = (p @ v[:, kh].double()) / denom
    return out


FEATURES = {
    "plain": {},
    "window-softcap": dict(sliding_window=5, logits_soft_cap=8.0),
    "sinks-alibi": dict(sinks=True, alibi=True),
    "fp8-per-head": dict(kv_cache_dtype="fp8_e4m3", per_head=True),
    "fp8_e5m2": dict(kv_cache_dtype="fp8_e5m2"),
}


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("layout", ["NHD", "HND", "BLNHC"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_impl_one_call_per_op(feature, layout, backend):
    """The impl's write + attention over vLLM's per-layer cache view, a mixed batch (a decode, a
    chunked-prefill continuation, a fresh prefill) plus CUDA-graph padding rows, against float64
    attention; sliding window, softcap, sinks, ALiBi and fp8 (descales) go through vLLM's
    arguments. Exactly one kvdispatch write and one kvdispatch attention call per step."""
    import torch
    from types import SimpleNamespace
    from unittest import mock

    import kvdispatch as kvd
    import kvdispatch.integrations.vllm as kvd_vllm
    from kvbench.compare import force_backend
    from kvbench.layouts import random_fill
    from vllm.v1.attention.backend import CommonAttentionMetadata

    f = FEATURES[feature]
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs, nb = 4, 2, 32, 16, 12
    cache_dtype = f.get("kv_cache_dtype", "auto")
    fp8 = cache_dtype != "auto"
    ctx = [19, 7, 0]  # keys already cached: decode, chunked prefill, fresh prefill
    new = [1, 5, 9]
    seq = [c + n for c, n in zip(ctx, new)]
    pad = 2  # CUDA-graph style padding rows after the real tokens
    storage = torch.uint8 if fp8 else torch.float32
    # vLLM's per-layer view is [blocks, H, block_size, 2 * D] (logical) in the layout's memory order
    if layout == "NHD":  # LBNHC
        kv_cache = torch.empty(nb, bs, hkv, 2 * d, dtype=storage).permute(0, 2, 1, 3)
    elif layout == "HND":  # LBHNC
        kv_cache = torch.empty(nb, hkv, bs, 2 * d, dtype=storage)
    else:  # BLNHC: block-outer cross-layer buffer [blocks, layers, bs, H, 2D], layer 1 of 3
        kv_cache = torch.empty(nb, 3, bs, hkv, 2 * d, dtype=storage)[:, 1].permute(0, 2, 1, 3)
    random_fill(kv_cache, g)  # random finite data (fp8 bit patterns for uint8), never zeros
    perm = torch.randperm(nb, generator=g).tolist()
    block_table = torch.tensor([perm[0:2], perm[2:4], perm[4:6]], dtype=torch.int32)
    scale_shape = (hkv,) if f.get("per_head") else ()
    k_scale = (torch.rand(scale_shape, generator=g) * 0.5 + 0.25) if fp8 else torch.tensor(1.0)
    v_scale = (torch.rand(scale_shape, generator=g) * 0.5 + 0.25) if fp8 else torch.tensor(1.0)
    layer = SimpleNamespace(_k_scale=k_scale.float(), _v_scale=v_scale.float())
    sinks = torch.randn(hq, generator=g) if f.get("sinks") else None
    alibi = [0.5 ** (i + 1) for i in range(hq)] if f.get("alibi") else None
    impl = kvd_vllm.KVDispatchAttentionImpl(
        hq, d, d ** -0.5, hkv, alibi, f.get("sliding_window"), cache_dtype,
        logits_soft_cap=f.get("logits_soft_cap"), sinks=sinks)

    def slots(b, positions):
        return [int(block_table[b, p // bs]) * bs + p % bs for p in positions]

    keys = [torch.randn(s, hkv, d, generator=g) for s in seq]
    vals = [torch.randn(s, hkv, d, generator=g) for s in seq]
    with force_backend(backend):
        # the cached context, written by an earlier step
        old = [b for b in range(3) if ctx[b]]
        impl.do_kv_cache_update(layer, torch.cat([keys[b][:ctx[b]] for b in old]),
                                torch.cat([vals[b][:ctx[b]] for b in old]), kv_cache,
                                torch.tensor(sum((slots(b, range(ctx[b])) for b in old), [])))
        n = sum(new)
        q = torch.randn(n + pad, hq, d, generator=g)
        key = torch.cat([*(keys[b][ctx[b]:] for b in range(3)), torch.randn(pad, hkv, d, generator=g)])
        val = torch.cat([*(vals[b][ctx[b]:] for b in range(3)), torch.randn(pad, hkv, d, generator=g)])
        slot_mapping = torch.tensor(sum((slots(b, range(ctx[b], seq[b])) for b in range(3)), []))
        qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=3, num_actual_tokens=n, max_query_len=max(new), max_seq_len=max(seq),
            block_table_tensor=block_table, slot_mapping=slot_mapping)
        md = kvd_vllm.KVDispatchMetadataBuilder(None, [], None, torch.device("cpu")).build(0, cm)
        out = torch.full((n + pad, hq, d), float("nan"))
        with mock.patch.object(kvd, "reshape_and_cache_flash", wraps=kvd.reshape_and_cache_flash) as w, \
                mock.patch.object(kvd, "flash_attn_varlen_func", wraps=kvd.flash_attn_varlen_func) as a:
            impl.do_kv_cache_update(layer, key, val, kv_cache, slot_mapping)
            impl.forward(layer, q, key, val, kv_cache, md, out)
        assert w.call_count == 1 and a.call_count == 1
    assert torch.isnan(out[n:]).all(), "padding rows were written"

    def stored(x, s):  # what an fp8 cache holds, decoded
        if not fp8:
            return x
        t = torch.float8_e4m3fn if cache_dtype == "fp8_e4m3" else torch.float8_e5m2
        s = s.view(1, -1, 1) if s.dim() else s
        return (x / s).to(t).float() * s

    window = f["sliding_window"] - 1 if f.get("sliding_window") else -1
    tol = 2e-2 if fp8 else 1e-4
    for b in range(3):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        truth = _naive_attention(q[rows], stored(keys[b], k_scale), stored(vals[b], v_scale), d ** -0.5, window,
                                 f.get("logits_soft_cap", 0.0), alibi, sinks)
        err = (out[rows].double() - truth).abs().max().item()
        assert err <= tol * max(1.0, truth.abs().max().item()), f"sequence {b}: max error {err}"
