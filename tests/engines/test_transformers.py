"""``paged|kvdispatch`` inside transformers' continuous batching, on tiny random-weight models.

Greedy ``generate_batch`` through kvdispatch must give the same token ids as eager
``model.generate`` run per prompt (the reference), and as transformers' own ``paged|sdpa``. The
cache is small (block size 16, 16 blocks) and ``max_batch_tokens=32`` splits the long prompts, so
the steps mix fresh prefills (write-only, no past), chunked-prefill continuations and decodes in
one batch. ``KVDISPATCH_DEBUG=1`` makes every derived block table be checked against
transformers' read indices position by position. Spies prove that kvdispatch's ops (and the
named backend behind them) ran once per layer per step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvdispatch as kvd  # noqa: E402
from kvdispatch.integrations import transformers as kvd_tf  # noqa: E402
from kvdispatch.platform import platform_of  # noqa: E402
from kvdispatch.registry import registry  # noqa: E402
from kvbench.compare import force_backend  # noqa: E402

try:
    kvd_tf._check_version(transformers.__version__)
except RuntimeError as e:  # the plug-in's own refusal is tested below with a faked version
    pytest.skip(str(e), allow_module_level=True)

from transformers import (ContinuousBatchingConfig, GenerationConfig, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

pytestmark = pytest.mark.engines

MAX_NEW = 8
PROMPT_LENS = (5, 17, 40, 1, 33)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=False)


def _prompts(lens, seed=1, shared_prefix=False):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in lens]
    if shared_prefix:  # two full blocks of the 40-token prompt, then its own tail: prefix sharing
        prompts.append(prompts[2][:32] + torch.randint(0, TINY["vocab_size"], (6,), generator=g).tolist())
    return prompts


def _gen_config(max_new=MAX_NEW):
    # no eos: every request generates exactly max_new tokens in both generate paths
    return GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None,
                            pad_token_id=0)


def _eager_reference(model, prompts, max_new=MAX_NEW):
    model.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_gen_config(max_new))
            out.append(gen[0, len(p):].tolist())
    return out


def _generate_batch(model, impl, prompts, max_new=MAX_NEW, block_size=16, num_blocks=16, max_batch_tokens=32,
                    **cb):
    model.set_attn_implementation(impl)
    cfg = ContinuousBatchingConfig(block_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                   **cb)
    results = model.generate_batch(prompts, generation_config=_gen_config(max_new), continuous_batching_config=cfg)
    outs = list(results.values())
    assert len(outs) == len(prompts), f"{impl}: {len(outs)} of {len(prompts)} requests came back"
    errors = [o.error for o in outs if o.error is not None]
    assert not errors, f"{impl}: {errors}"
    return [o.generated_tokens for o in outs]


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def llama():
    model = _llama()
    prompts = _prompts(PROMPT_LENS, shared_prefix=True)
    return model, prompts, _eager_reference(model, prompts)


class Spy:
    """Counts kvdispatch's op calls (paged or not), the backend's calls, and model steps."""

    def __init__(self, monkeypatch, model, backend: str):
        self.attn_paged = self.attn_dense = self.writes = self.backend_attn = self.backend_writes = 0
        self.steps = 0
        self.layers = model.config.num_hidden_layers
        fa, write = kvd.flash_attn_varlen_func, kvd.reshape_and_cache_flash

        def flash_attn_varlen_func(*args, **kwargs):
            if kwargs.get("block_table") is not None:
                self.attn_paged += 1
            else:
                self.attn_dense += 1
            return fa(*args, **kwargs)

        def reshape_and_cache_flash(*args, **kwargs):
            self.writes += 1
            return write(*args, **kwargs)

        monkeypatch.setattr(kvd, "flash_attn_varlen_func", flash_attn_varlen_func)
        monkeypatch.setattr(kvd, "reshape_and_cache_flash", reshape_and_cache_flash)
        b = registry.get(backend)
        b_fa, b_write = b.flash_attn_varlen_func, b.reshape_and_cache_flash

        def backend_attn(*args, **kwargs):
            self.backend_attn += 1
            return b_fa(*args, **kwargs)

        def backend_write(*args, **kwargs):
            self.backend_writes += 1
            return b_write(*args, **kwargs)

        monkeypatch.setattr(b, "flash_attn_varlen_func", backend_attn)
        monkeypatch.setattr(b, "reshape_and_cache_flash", backend_write)
        handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: self._step())
        self._handles = [handle]

    def _step(self):
        self.steps += 1

    def close(self):
        for h in self._handles:
            h.remove()

    def assert_every_layer_every_step(self, paged: int | None = None):
        calls = self.steps * self.layers
        assert self.steps > 0
        assert self.attn_paged + self.attn_dense == calls, (self.attn_paged, self.attn_dense, calls)
        assert self.writes == calls
        assert self.backend_attn == calls and self.backend_writes == calls
        if paged is not None:
            assert self.attn_paged == paged


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setenv("KVDISPATCH_DEBUG", "1")


def test_reference_backend_matches_eager_and_paged_sdpa(llama, monkeypatch, debug):
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    model, prompts, reference = llama
    shared = []
    search = PagedAttentionCache.search_prefix_match

    def search_prefix_match(self, request_id, prompt_ids):
        shared.append(search(self, request_id, prompt_ids))
        return shared[-1]

    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match", search_prefix_match)
    impl = kvd_tf.register()
    spy = Spy(monkeypatch, model, "reference")
    try:
        with force_backend("reference"):
            got = _generate_batch(model, impl, prompts)
    finally:
        spy.close()
    assert got == reference
    assert max(shared) > 0, "no request reused cached blocks"  # a block table with another request's blocks
    # full attention only: every call is ONE paged call through the derived block table
    spy.assert_every_layer_every_step(paged=spy.steps * spy.layers)
    # transformers' own paged attention on the same weights, cache and schedule
    assert _generate_batch(model, "paged|sdpa", prompts) == reference


@pytest.mark.interpret
def test_triton_kernels_match_eager(llama, monkeypatch, debug):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only through TRITON_INTERPRET=1 (set by tests/conftest.py)")
    pytest.importorskip("triton")
    reason = registry.get("triton").available(platform_of("cpu"))
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    model, prompts, reference = llama
    # tiny: 3 prompts, 4 new tokens; 24 tokens per batch still splits the 40-token prompt
    idx = (0, 1, 2)
    spy = Spy(monkeypatch, model, "triton")
    try:
        with force_backend("triton"):
            got = _generate_batch(model, kvd_tf.register(), [prompts[i] for i in idx], max_new=4,
                                  max_batch_tokens=24)
    finally:
        spy.close()
    assert got == [reference[i][:4] for i in idx]
    spy.assert_every_layer_every_step(paged=spy.steps * spy.layers)


def test_sliding_window_layers_fall_back_to_gathered_window(monkeypatch, debug):
    """A hybrid model (full + sliding-window layers, window 8 < the prompts): sliding layers are a
    rolling buffer, not a block table, and take the gathered non-paged call; full layers stay paged."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(sliding_window=8, use_sliding_window=True,
                                         layer_types=["full_attention", "sliding_attention"], **TINY)).eval()
    prompts = _prompts(PROMPT_LENS, seed=2)
    reference = _eager_reference(model, prompts)
    spy = Spy(monkeypatch, model, "reference")
    try:
        with force_backend("reference"):
            got = _generate_batch(model, kvd_tf.register(), prompts, block_size=4, num_blocks=64)
    finally:
        spy.close()
    assert got == reference
    spy.assert_every_layer_every_step(paged=spy.steps)  # one full layer of two
    assert spy.attn_dense == spy.steps


def test_decode_fast_path_block_table(llama, monkeypatch, debug):
    """transformers turns its block-table decode path on only for flash implementations on
    CUDA/XPU; forced on here, decode steps arrive with a block_table and no cache indices."""
    from transformers.generation.continuous_batching import initialization

    model, prompts, reference = llama
    monkeypatch.setattr(initialization, "ensure_decode_fast_path_is_available", lambda *a, **k: None)
    fast = {"calls": 0}
    inner = kvd_tf._decode_fast_path

    def counted(*args, **kwargs):
        fast["calls"] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(kvd_tf, "_decode_fast_path", counted)
    spy = Spy(monkeypatch, model, "reference")
    try:
        with force_backend("reference"):
            got = _generate_batch(model, kvd_tf.register(), prompts, max_blocks_per_request=8)
    finally:
        spy.close()
    assert got == reference
    assert fast["calls"] > 0
    spy.assert_every_layer_every_step(paged=spy.steps * spy.layers)


def test_outside_continuous_batching_is_refused(llama):
    model, prompts, _ = llama
    kvd_tf.register()
    model.set_attn_implementation(kvd_tf.ATTN_IMPLEMENTATION)
    try:
        with pytest.raises(ValueError, match="without a paged attention cache"):
            with torch.no_grad():
                model(torch.tensor([prompts[0]]))
    finally:
        model.set_attn_implementation("eager")


@pytest.mark.parametrize("version", ["5.15.1", "5.18.0", "5.24.0", "4.57.1"])
def test_unsupported_transformers_versions_are_refused(monkeypatch, version):
    # register() reads the version of the transformers module it imports (sys.modules' entry)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(RuntimeError, match=f"transformers {version} is installed"):
        kvd_tf.register()


def test_import_does_not_import_transformers():
    code = ("import sys, kvdispatch.integrations.transformers as m; "
            "assert 'transformers' not in sys.modules, 'imported transformers'; print(m.ATTN_IMPLEMENTATION)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "paged|kvdispatch"
