"""``paged|kvdispatch`` in transformers' continuous batching on a GPU, with CUDA graphs (markers ``gpu``
and ``engines``; run by ``benchmarks/gpu_check.sh``).

Regression test for a reported bug: a split-KV merge kernel compiled (and kept for direct launches)
for a float32 output was launched again for a bfloat16 output, which stored float32 bits into the
bf16 attention output: every generated token came out 0. Here ONE process runs the same tiny
random-weight Llama, the same prompts and the same continuous-batching config first in float32,
then (a fresh model cast) in bfloat16, so the bf16 run meets exactly the launch keys the fp32 run
left behind.

* CUDA graphs: ``ContinuousBatchingConfig(use_cuda_graph=True)`` (transformers 5.16-5.17 resolve it
  in ``initialization.decide_use_cuda_graphs``; ``paged|kvdispatch`` is not a flash implementation,
  so only the varlen path exists and it is captured). With graphs the inputs are padded: the query
  to ``q_padding_interval_size`` tokens (8 here, so decode steps of 3 requests, 8 x 2 query rows per
  kv head, take the Triton DECODE tile) and ``max_seqlen_k`` to a power of two >= 1024.
* Split-KV: 3 requests x 2 kv heads are far fewer programs than the H200's 132 multiprocessors and
  the keys are >= 1024 long, so the heuristic splits them (and merges) in prefill and decode steps;
  spies on the Triton backend's ``_splits`` / ``_merge`` assert that the decode
  tile ran split and that merges ran with an output of the model's dtype, in each run. Measured on
  an H200 (torch 2.11, triton 3.6): splits 2/4/5 in prefill and 2/4 in decode, 24 merges per dtype,
  6 graphs captured and 13 replays per run, bf16 36/36 tokens equal to eager; about 30 s cold.
  With the merge's direct-launch key ignoring the output's dtype (the bug) the bf16 run gave all 0;
  the compiled kernels now live in the prepared launch of each call signature (out's dtype in it).
* Truth: the same model's eager ``generate`` per prompt. float32: identical token ids. bfloat16
  (different kernels, bf16 rounding: an exact greedy match is not guaranteed): the eager model
  teacher-forced on the tokens continuous batching produced must rank each of them first at >= 90%
  of the positions and within a small logit margin of its own first choice at every position; and
  the tokens must not be all one id (the bug gave all 0).
* Spies prove that ``paged|kvdispatch`` ran (one paged call per layer for every traced step,
  through the Triton backend) and that CUDA graphs were captured and replayed.
  ``KVDISPATCH_DEBUG`` is unset (the debug checks sync, which a graph capture cannot do).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvdispatch as kvd  # noqa: E402
from kvdispatch.integrations import transformers as kvd_tf  # noqa: E402
from kvdispatch.registry import registry  # noqa: E402
from kvbench.compare import force_backend  # noqa: E402

try:
    kvd_tf._check_version(transformers.__version__)
except RuntimeError as e:
    pytest.skip(str(e), allow_module_level=True)

from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.continuous_batching import model_runner as cb_model_runner  # noqa: E402
from transformers.generation.continuous_batching import utils as cb_utils  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.engines]

LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, bos_token_id=None, eos_token_id=None,
             pad_token_id=None, tie_word_embeddings=False)
PROMPT_LENS = (700, 1100, 1500)
MAX_NEW = 12
# 160 blocks of 32 = 5120 cache slots (the 3 requests need 3336); 512-token batches split every prompt
# into chunked prefills; q padded to multiples of 8 (decode steps take the decode tile)
CB = dict(block_size=32, num_blocks=160, max_batch_tokens=512, q_padding_interval_size=8, use_cuda_graph=True)
BF16_MIN_AGREEMENT = 0.9
BF16_LOGIT_MARGIN = 0.05  # logits of this model spread ~0.2 (std); bf16 rounding moves them ~1e-3


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, LLAMA["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]


def _gen_config():
    # no eos: every request generates exactly MAX_NEW tokens in both generate paths
    return GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, eos_token_id=None,
                            pad_token_id=0)


def _llama(dtype: torch.dtype, device) -> LlamaForCausalLM:
    """The same random weights every call (built in float32 on the CPU, then cast and moved)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    return model.to(device=device, dtype=dtype)


def _eager_generate(model, prompts) -> list:
    model.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_gen_config())
            out.append(gen[0, len(p):].tolist())
    return out


def _eager_logits(model, prompts, generated) -> list:
    """Eager logits (float32) at the positions that predict each generated token, teacher-forced on them."""
    model.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for p, g in zip(prompts, generated):
            ids = torch.tensor([p + g[:-1]], device=model.device)
            logits = model(ids).logits[0, len(p) - 1:].float()
            assert logits.shape[0] == len(g)
            out.append(logits)
    return out


def _generate_batch(model, impl, prompts, **cb) -> list:
    model.set_attn_implementation(impl)
    cfg = ContinuousBatchingConfig(**{**CB, **cb})
    results = model.generate_batch(prompts, generation_config=_gen_config(), continuous_batching_config=cfg)
    outs = list(results.values())
    assert len(outs) == len(prompts), f"{impl}: {len(outs)} of {len(prompts)} requests came back"
    errors = [o.error for o in outs if o.error is not None]
    assert not errors, f"{impl}: {errors}"
    return [list(o.generated_tokens) for o in outs]


class Spy:
    """Counts kvdispatch's calls (and the Triton backend's), the split-KV merges by output dtype,
    CUDA-graph captures and replays. Python runs only on eager steps and captures: replays
    launch the recorded kernels without calling any of this."""

    def __init__(self, monkeypatch):
        from kvdispatch.backends.triton import attention as tri_attn

        self.paged = self.dense = self.writes = self.backend_attn = 0
        self.merges: dict = {}  # out dtype -> count
        self.q_dtypes: set = set()
        self.captures = self.replays = 0
        fa, write = kvd.flash_attn_varlen_func, kvd.reshape_and_cache_flash

        def flash_attn_varlen_func(q, *args, **kwargs):
            if kwargs.get("block_table") is not None:
                self.paged += 1
            else:
                self.dense += 1
            self.q_dtypes.add(q.dtype)
            return fa(q, *args, **kwargs)

        def reshape_and_cache_flash(*args, **kwargs):
            self.writes += 1
            return write(*args, **kwargs)

        monkeypatch.setattr(kvd, "flash_attn_varlen_func", flash_attn_varlen_func)
        monkeypatch.setattr(kvd, "reshape_and_cache_flash", reshape_and_cache_flash)

        backend = registry.get("triton")
        b_fa = backend.flash_attn_varlen_func

        def backend_attn(*args, **kwargs):
            self.backend_attn += 1
            return b_fa(*args, **kwargs)

        monkeypatch.setattr(backend, "flash_attn_varlen_func", backend_attn)

        merge = tri_attn._merge

        def counted_merge(prep, ws_o, ws_ml, out, *args, **kwargs):
            self.merges[out.dtype] = self.merges.get(out.dtype, 0) + 1
            return merge(prep, ws_o, ws_ml, out, *args, **kwargs)

        monkeypatch.setattr(tri_attn, "_merge", counted_merge)

        # (decode tile?, split count) of every Triton attention launch: _splits(prep, args, batch, q_tiles)
        # runs once per launch, its prepared launch says which tile it takes
        self.launches: list = []
        splits = tri_attn._splits

        def spied_splits(prep, *args, **kwargs):
            n, keys = splits(prep, *args, **kwargs)
            self.launches.append((prep.decode, n))
            return n, keys

        monkeypatch.setattr(tri_attn, "_splits", spied_splits)

        capture = cb_model_runner.ModelRunner._capture_graph

        def counted_capture(runner, *args, **kwargs):
            self.captures += 1
            return capture(runner, *args, **kwargs)

        monkeypatch.setattr(cb_model_runner.ModelRunner, "_capture_graph", counted_capture)

        get_graph = cb_utils.CudaGraphBuffer.get_graph

        def counted_get_graph(buf, key):
            graph = get_graph(buf, key)
            if graph is not None:
                self.replays += 1
            return graph

        monkeypatch.setattr(cb_utils.CudaGraphBuffer, "get_graph", counted_get_graph)


def _run_cb(model, prompts, **cb):
    """generate_batch through paged|kvdispatch on the Triton backend, spied (spies removed after)."""
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        with force_backend("triton"):
            got = _generate_batch(model, kvd_tf.register(), prompts, **cb)
    return got, spy


def _check_spy(spy: Spy, dtype: torch.dtype, layers: int):
    assert spy.paged > 0, "paged|kvdispatch never called kvdispatch"
    assert spy.dense == 0, f"{spy.dense} non-paged calls on a full-attention model"
    assert spy.paged % layers == 0 and spy.writes == spy.paged, (spy.paged, spy.writes)
    assert spy.backend_attn == spy.paged, f"{spy.backend_attn} Triton calls of {spy.paged}: not the Triton backend"
    assert spy.q_dtypes == {dtype}, spy.q_dtypes
    assert spy.merges.get(dtype, 0) > 0, f"no split-KV merge with a {dtype} output: {spy.merges}"
    split_decode = sum(1 for decode, n in spy.launches if decode and n > 1)
    assert split_decode > 0, f"the decode tile never ran split-KV: (decode, splits) {sorted(set(spy.launches))}"
    assert spy.captures > 0, "no CUDA graph was captured"
    assert spy.replays > 0, "no CUDA graph was replayed"
    print(f"{dtype}: {spy.paged} traced paged calls, (decode, splits) {sorted(set(spy.launches))}, "
          f"merges {spy.merges}, {spy.captures} graphs captured, {spy.replays} replayed")


def _assert_not_degenerate(tokens: list, what: str):
    flat = [t for seq in tokens for t in seq]
    assert len(set(flat)) > 1, f"{what}: every token is {flat[0]}: {tokens}"


def test_cuda_graphs_split_kv_fp32_then_bf16(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    from kvdispatch.platform import platform_of

    reason = registry.get("triton").available(platform_of("cuda"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    monkeypatch.delenv("KVDISPATCH_DEBUG", raising=False)
    monkeypatch.delenv("KVDISPATCH_BACKEND", raising=False)
    device = torch.device("cuda")
    prompts = _prompts()
    layers = LLAMA["num_hidden_layers"]

    # float32: identical token ids to eager generate
    model = _llama(torch.float32, device)
    ref32 = _eager_generate(model, prompts)
    _assert_not_degenerate(ref32, "eager fp32 (the reference itself)")
    got32, spy32 = _run_cb(model, prompts)
    assert got32 == ref32, f"fp32 continuous batching with CUDA graphs:\n{got32}\n!= eager\n{ref32}"
    _check_spy(spy32, torch.float32, layers)
    del model
    torch.cuda.synchronize()

    # bfloat16, same process, same shapes: the launch keys the fp32 run left behind
    model = _llama(torch.bfloat16, device)
    ref16 = _eager_generate(model, prompts)
    got16, spy16 = _run_cb(model, prompts)
    _check_spy(spy16, torch.bfloat16, layers)
    assert all(len(g) == MAX_NEW for g in got16), got16
    _assert_not_degenerate(got16, "bf16 continuous batching")
    assert any(t != 0 for seq in got16 for t in seq), f"bf16: every token is 0 (the fp32 merge kernel bug): {got16}"

    logits = _eager_logits(model, prompts, got16)
    agree = total = 0
    worst = 0.0
    for seq, lg in zip(got16, logits):
        tok = torch.tensor(seq, device=lg.device)
        top = lg.max(dim=-1).values
        mine = lg.gather(1, tok[:, None])[:, 0]
        agree += int((lg.argmax(dim=-1) == tok).sum())
        total += len(seq)
        worst = max(worst, float((top - mine).max()))
    prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(g)) for g, r in zip(got16, ref16)]
    info = (f"bf16: {agree}/{total} tokens are the eager model's first choice (teacher-forced), worst logit gap "
            f"{worst:.4f}; greedy prefix equal to eager bf16 generate: {prefix} of {MAX_NEW}\n"
            f"continuous batching {got16}\neager {ref16}")
    print(info.splitlines()[0])  # in the log of a passing run too (pytest -rA)
    assert agree >= BF16_MIN_AGREEMENT * total, info
    assert worst <= BF16_LOGIT_MARGIN, info
