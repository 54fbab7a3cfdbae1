"""kvdispatch against SGLang's own Triton attention kernels, on SGLang's own pools and metadata.

Everything SGLang-side is SGLang's real code, run on CPU tensors through ``TRITON_INTERPRET=1``:
the KV pool (``MHATokenToKVPool``: per layer ``[size + page_size, H, D]``), the request table
(``ReqToTokenPool``), the allocators that fill it (``TokenToKVPoolAllocator`` for page size 1,
``PagedTokenToKVPoolAllocator`` for page size 4, their free lists shuffled so pages are scattered),
its write (``set_kv_buffer``), its index builders (``KVIndexTranslator.pack_read_stream``, i.e. the
``create_flashinfer_kv_indices_triton`` kernel, and ``update_sliding_window_buffer`` for window
layers) and its kernels ``extend_attention_fwd`` / ``decode_attention_fwd``. kvdispatch runs over
the SAME pool tensors, as paged views, with the block table the adapter derives from the same
``req_to_token`` rows; both kvdispatch backends run (the pure-PyTorch reference and the Triton
kernels under the interpreter).

The adapter (``kvdispatch.integrations.sglang``) is driven with SGLang's real ``ForwardBatch``,
``RadixAttention``, pools, allocator and ``KVIndexTranslator`` (its plan bound to the batch as
SGLang's scheduler does); only the ModelRunner is a stand-in with the attributes a backend reads.

Shims (each one line of reason): SGLang's ``sglang.srt.configs`` package, imported by the pool and
batch modules, registers image processors (transformers requires torchvision for that) and
imports ``torchvision.transforms`` at module level; torchvision is not installable next to the CPU
torch here (PyPI's wheel links CUDA's libtorch). While those modules import, ``AutoImageProcessor``
gets a no-op ``register`` and ``torchvision`` resolves to a placeholder module; both are removed
again afterwards (nothing here touches images). SGLang's kernels need no patching on CPU.

bf16 is not compared: under the interpreter (numpy has no bfloat16) SGLang's kernels return
garbage for bf16 pools (~1e8), while fp16 and fp32 match; kvdispatch's bf16 is covered by its own
tests. Tolerance: max |kvdispatch - SGLang| / max |SGLang| per output dtype.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("SGLang's Triton kernels run on CPU tensors through TRITON_INTERPRET=1 here",
                allow_module_level=True)

extend_attention = pytest.importorskip("sglang.kernels.ops.attention.extend_attention")
decode_attention = pytest.importorskip("sglang.kernels.ops.attention.decode_attention")

import kvdispatch as kvd  # noqa: E402
from kvbench.compare import force_backend  # noqa: E402

pytestmark = [pytest.mark.engines, pytest.mark.interpret]

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
BACKENDS = ("reference", "triton")


# -- importing SGLang's pool / batch modules on a CPU-only machine ----------------------------------
@contextlib.contextmanager
def _configs_shim():
    """See the module docstring: only while SGLang's config package imports, and only if
    torchvision is missing."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    import sglang  # noqa: F401  (its HF patches re-import transformers: patch the one it leaves)
    import transformers

    transformers.utils.is_torchvision_available()  # cache "unavailable" before the placeholder exists

    class _Placeholder(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Placeholder(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    finder = _Finder()
    had = "AutoImageProcessor" in vars(transformers)
    old = vars(transformers).get("AutoImageProcessor")
    transformers.AutoImageProcessor = SimpleNamespace(register=lambda *a, **k: None)
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if had:
            transformers.AutoImageProcessor = old
        else:
            del transformers.AutoImageProcessor


try:
    with _configs_shim():
        from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.layers.attention.triton_backend import update_sliding_window_buffer
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
        import kvdispatch.integrations.sglang as kvd_sglang  # registers itself with SGLang
except ImportError as e:  # pragma: no cover - an SGLang whose modules do not import here
    pytest.skip(f"SGLang's pool / batch modules do not import: {e}", allow_module_level=True)


# -- registration ------------------------------------------------------------------------------------
def test_registered_for_attention_backend_flag():
    """Registered with SGLang's registry and its --attention-backend choices (idempotently), so
    the server's own argument parser takes ``--attention-backend kvdispatch``."""
    import argparse
    from importlib.metadata import entry_points

    kvd_sglang.register()
    kvd_sglang.register()
    assert ATTENTION_BACKENDS["kvdispatch"] is kvd_sglang.create_backend
    assert ATTENTION_BACKEND_CHOICES.count("kvdispatch") == 1
    with _configs_shim():
        from sglang.srt.server_args import ServerArgs
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--attention-backend", "kvdispatch",
                              "--decode-attention-backend", "kvdispatch"])
    assert args.attention_backend == args.decode_attention_backend == "kvdispatch"
    # the plugin SGLang's load_plugins() runs in each of its processes (where kvdispatch's metadata has it)
    for ep in entry_points(group="sglang.srt.plugins"):
        if ep.name == "kvdispatch":
            assert ep.load() is kvd_sglang.register


# -- SGLang's side of a batch ------------------------------------------------------------------------
class World:
    """One layer's pool, the request table and an allocator, as an SGLang scheduler holds them;
    requests get a cached prefix (an earlier prefill) and then an extend and decode steps."""

    def __init__(self, page_size: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int, seed: int,
                 size: int = 256, rows=(3, 1, 6, 2)):
        self.P, self.hkv, self.d = page_size, num_kv_heads, head_dim
        self.dtype = torch.float32 if dtype in FP8 else dtype  # activations (q, k, v)
        self.g = torch.Generator().manual_seed(seed)
        self.pool = MHATokenToKVPool(size=size, page_size=page_size, dtype=dtype, head_num=num_kv_heads,
                                     head_dim=head_dim, layer_num=1, device="cpu", enable_memory_saver=False)
        for buf in self.pool.get_kv_buffer(0):  # never zeros: stale slots show (fp8: the fp8 views)
            buf.copy_(self.randn(buf.shape))
        self.r2t = ReqToTokenPool(size=8, max_context_len=96, device="cpu", enable_memory_saver=False)
        if page_size == 1:
            self.alloc = TokenToKVPoolAllocator(size=size, dtype=dtype, device="cpu", kvcache=self.pool,
                                                need_sort=False)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(size=size, page_size=page_size, dtype=dtype, device="cpu",
                                                     kvcache=self.pool, need_sort=False)
        self.alloc.free_pages = self.alloc.free_pages[torch.randperm(self.alloc.free_pages.numel(), generator=self.g)]
        self.translator = KVIndexTranslator(req_to_token=self.r2t.req_to_token, token_to_kv_pool_allocator=self.alloc,
                                            token_to_kv_pool=self.pool, page_size=page_size, device="cpu")
        self.rows = torch.tensor(rows)
        self.lens = [0] * len(rows)

    def randn(self, shape, dtype=None):
        return torch.randn(shape, generator=self.g).to(dtype or self.dtype)

    def allocate(self, new):
        """Slots for ``new[i]`` more tokens of request i, through SGLang's allocator (its extend
        path, or its decode path when every request grows by one); fills req_to_token."""
        pre = torch.tensor(self.lens)
        seq = pre + torch.tensor(new)
        last = torch.tensor([int(self.r2t.req_to_token[r, p - 1]) if p else -1
                             for r, p in zip(self.rows.tolist(), self.lens)])
        if self.P == 1:
            locs = self.alloc.alloc(int(sum(new)))
        elif all(n == 1 for n in new) and all(self.lens):
            locs = self.alloc.alloc_decode(seq, seq, last)
        else:
            locs = self.alloc.alloc_extend(pre, pre, seq, seq, last, int(sum(new)))
        off = 0
        for i, (r, p, n) in enumerate(zip(self.rows.tolist(), self.lens, new)):
            self.r2t.req_to_token[r, p:p + n] = locs[off:off + n].to(torch.int32)
            off += n
            self.lens[i] = p + n
        return locs

    def prefill_cached(self, prefix):
        """A cached prefix: allocated and written by an earlier forward (SGLang's write)."""
        locs = self.allocate(prefix)
        n = locs.numel()
        self.pool.set_kv_buffer(None, KVWriteLoc(locs), self.randn((n, self.hkv, self.d)),
                                self.randn((n, self.hkv, self.d)), layer_id_override=0)

    def kv_stream(self, lens):
        """SGLang's CSR kv metadata (kv_indptr, kv_indices) over the first ``lens`` tokens."""
        lens_t = torch.tensor(lens, dtype=torch.int32)
        indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(lens_t, 0)
        indices = torch.empty(int(sum(lens)), dtype=torch.int64)
        self.translator.pack_read_stream(None, req_pool_indices=self.rows, seq_lens=lens_t, indptr=indptr,
                                         out=indices)
        return indptr, indices

    def window_stream(self, lens, window):
        """The window rail SGLang's Triton backend builds for sliding-window layers."""
        indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        indptr, indices, _, _ = update_sliding_window_buffer(
            indptr, self.translator, None, self.rows, window, torch.tensor(lens, dtype=torch.int32), len(lens),
            "cpu", self.pool)
        return indptr, indices

    def caches(self):
        """The pool buffers as kvdispatch paged caches, as the adapter views them."""
        P = self.P
        kb, vb = self.pool.get_key_buffer(0), self.pool.get_value_buffer(0)
        n = kb.shape[0] // P
        return kb[: n * P].unflatten(0, (n, P)), vb[: n * P].unflatten(0, (n, P))

    def block_table(self):
        width = -(-max(self.lens) // self.P) * self.P
        return kvd_sglang.block_table_from_rows(self.r2t.req_to_token[self.rows, :width], self.P)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "kvdispatch left NaN in its output"
    assert not torch.isnan(want).any(), "SGLang left NaN in its output"
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


CASES = {
    # name: (q heads, kv heads, head dim, dtype, softcap, sinks, window)
    "gqa-fp32": (4, 2, 32, torch.float32, 0.0, False, -1),
    "mha-fp16": (2, 2, 64, torch.float16, 0.0, False, -1),
    "mqa-softcap-sinks": (4, 1, 32, torch.float32, 5.0, True, -1),
    "gqa-window": (4, 2, 32, torch.float32, 0.0, False, 6),
}
PREFIX = (0, 5, 17, 12)
EXTEND = (7, 3, 9, 1)  # a fresh prefill, chunked prefills, a decode-like row (mixed batch)


# -- the write ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("page_size", [1, 4])
def test_write_matches_set_kv_buffer(page_size, dtype):
    """kvdispatch's write into the pool views equals SGLang's set_kv_buffer, bit for bit."""
    w = World(page_size, dtype, 2, 32, seed=1)
    w.prefill_cached(PREFIX)
    locs = w.allocate(EXTEND)
    k, v = w.randn((locs.numel(), 2, 32)), w.randn((locs.numel(), 2, 32))
    before = [b.clone() for b in (w.pool.k_buffer[0], w.pool.v_buffer[0])]
    w.pool.set_kv_buffer(None, KVWriteLoc(locs), k, v, layer_id_override=0)
    want = [b.clone() for b in (w.pool.k_buffer[0], w.pool.v_buffer[0])]
    for be in BACKENDS:
        w.pool.k_buffer[0].copy_(before[0])
        w.pool.v_buffer[0].copy_(before[1])
        with force_backend(be):
            kvd.reshape_and_cache_flash(k, v, *w.caches(), locs)
        assert torch.equal(w.pool.k_buffer[0], want[0]) and torch.equal(w.pool.v_buffer[0], want[1]), be


# -- the kernels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_matches_extend_attention_fwd(page_size, case):
    """Extend (prefill over a cached prefix, mixed lengths) against SGLang's extend kernel."""
    hq, hkv, d, dtype, softcap, with_sinks, window = CASES[case]
    w = World(page_size, dtype, hkv, d, seed=2)
    w.prefill_cached(PREFIX)
    locs = w.allocate(EXTEND)
    T = locs.numel()
    q, k, v = w.randn((T, hq, d)), w.randn((T, hkv, d)), w.randn((T, hkv, d))
    sinks = w.randn((hq,), torch.float32) if with_sinks else None
    scale = 0.7 / d ** 0.5
    w.pool.set_kv_buffer(None, KVWriteLoc(locs), k, v, layer_id_override=0)  # as SGLang's backend does first

    # SGLang: prefix through kv_indptr/kv_indices (the window rail for a window layer), new tokens as k/v
    ext = torch.tensor(EXTEND)
    qo_indptr = torch.zeros(len(EXTEND) + 1, dtype=torch.int64)
    qo_indptr[1:] = torch.cumsum(ext, 0)
    kv_indptr, kv_indices = w.window_stream(PREFIX, window) if window > 0 else w.kv_stream(PREFIX)
    want = nan_like((T, hq, d), dtype)
    extend_attention.extend_attention_fwd(
        q, k, v, want, w.pool.get_key_buffer(0), w.pool.get_value_buffer(0), qo_indptr, kv_indptr, kv_indices,
        None, True, None, max(EXTEND), 1.0, 1.0, sm_scale=scale, logit_cap=softcap, sliding_window_size=window,
        sinks=sinks, page_size=page_size)

    # kvdispatch: one paged call over the pool, q lengths = extend lengths, kv lengths = seq lengths
    cu_q = torch.zeros(len(EXTEND) + 1, dtype=torch.int32)
    cu_q[1:] = torch.cumsum(ext, 0)
    seq = torch.tensor(w.lens, dtype=torch.int32)
    for be in BACKENDS:
        got = nan_like((T, hq, d), dtype)
        with force_backend(be):
            kvd.flash_attn_varlen_func(q, *w.caches(), max(EXTEND), cu_q, max(w.lens), seqused_k=seq,
                                       softmax_scale=scale, causal=True, window_size=(window, 0), softcap=softcap,
                                       block_table=w.block_table(), out=got, s_aux=sinks)
        assert rel_err(got, want) < TOL[dtype], be


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_matches_decode_attention_fwd(page_size, case):
    """Decode (one token per request over its whole sequence) against SGLang's decode kernel."""
    hq, hkv, d, dtype, softcap, with_sinks, window = CASES[case]
    w = World(page_size, dtype, hkv, d, seed=3)
    w.prefill_cached(tuple(p + e for p, e in zip(PREFIX, EXTEND)))
    locs = w.allocate([1] * len(PREFIX))
    B = locs.numel()
    q, k, v = w.randn((B, hq, d)), w.randn((B, hkv, d)), w.randn((B, hkv, d))
    sinks = w.randn((hq,), torch.float32) if with_sinks else None
    scale = 0.7 / d ** 0.5
    w.pool.set_kv_buffer(None, KVWriteLoc(locs), k, v, layer_id_override=0)

    # SGLang's decode metadata; num_kv_splits mixes 1 .. max (SGLang fills max_kv_splits without a core count)
    kv_indptr, kv_indices = w.window_stream(w.lens, window) if window > 0 else w.kv_stream(w.lens)
    max_splits = 8
    splits = torch.tensor([1, 3, 8, 2], dtype=torch.int32)
    logits = torch.empty((B, hq, max_splits, d), dtype=torch.float32)
    lse = torch.empty((B, hq, max_splits), dtype=torch.float32)
    want = nan_like((B, hq, d), dtype)
    decode_attention.decode_attention_fwd(
        q, w.pool.get_key_buffer(0), w.pool.get_value_buffer(0), want, kv_indptr, kv_indices, logits, lse,
        splits, max_splits, scale, 1.0, 1.0, logit_cap=softcap, sinks=sinks, page_size=page_size)

    # SGLang's Triton decode reads the last W keys of a window layer (its rail), one fewer than its
    # extend kernel's mask: kvdispatch's (W - 1, 0) is that; the adapter follows the extend/FA3 count.
    win = (window - 1, 0) if window > 0 else (-1, -1)
    seq = torch.tensor(w.lens, dtype=torch.int32)
    for be in BACKENDS:
        got = nan_like((B, hq, d), dtype)
        with force_backend(be):
            kvd.flash_attn_varlen_func(q, *w.caches(), 1, torch.arange(B + 1, dtype=torch.int32), max(w.lens),
                                       seqused_k=seq, softmax_scale=scale, causal=True, window_size=win,
                                       softcap=softcap, block_table=w.block_table(), out=got, s_aux=sinks)
        assert rel_err(got, want) < TOL[dtype], be


# -- the adapter -----------------------------------------------------------------------------------------
def runner_for(w: World, context_len: int = 96):
    """The ModelRunner attributes an SGLang attention backend reads (as TritonAttnBackend does)."""
    return SimpleNamespace(
        device="cpu", req_to_token_pool=w.r2t, token_to_kv_pool=w.pool, token_to_kv_pool_allocator=w.alloc,
        page_size=w.P, kv_index_translator=w.translator, use_mla_backend=False, sliding_window_size=None,
        model_config=SimpleNamespace(context_len=context_len, is_encoder_decoder=False))


def batch_for(w: World, mode, locs, new):
    """SGLang's ForwardBatch of this step, bound to its KVLocPlan as the scheduler binds it."""
    bs = len(new)
    seq = torch.tensor(w.lens)
    kw = {}
    if mode != ForwardMode.DECODE:
        ext = torch.tensor(new)
        kw = dict(extend_seq_lens=ext, extend_prefix_lens=seq - ext, extend_seq_lens_cpu=list(new),
                  extend_prefix_lens_cpu=(seq - ext).tolist(), extend_num_tokens=int(ext.sum()),
                  extend_start_loc=torch.cumsum(ext, 0) - ext)
    fb = ForwardBatch(forward_mode=mode, batch_size=bs, input_ids=torch.zeros(int(sum(new)), dtype=torch.int64),
                      req_pool_indices=w.rows, seq_lens=seq, out_cache_loc=locs, seq_lens_sum=int(seq.sum()),
                      seq_lens_cpu=seq.clone(), **kw)
    w.translator.bind_own_plan(fb)
    return fb


ADAPTER_CASES = {
    "gqa": dict(hq=4, hkv=2, d=32, logit_cap=0.0, window=-1, sinks=False),
    "gqa-window-softcap-sinks": dict(hq=4, hkv=2, d=32, logit_cap=4.0, window=5, sinks=True),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
@pytest.mark.parametrize("page_size", [1, 4])
def test_adapter_extend_then_decode(page_size, case):
    """The registered backend through SGLang's ForwardBatch: an extend over cached prefixes (a
    mixed batch), then a decode step; pool contents and outputs against SGLang's write and kernels
    on a twin world (same seed), under both kvdispatch backends and the CUDA-graph metadata path."""
    c = ADAPTER_CASES[case]
    hq, hkv, d, W = c["hq"], c["hkv"], c["d"], c["window"]
    assert kvd_sglang.BACKEND_NAME in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKENDS["kvdispatch"] is kvd_sglang.create_backend
    scale = 0.6 / d ** 0.5
    layer = RadixAttention(hq, d, scale, hkv, layer_id=0, logit_cap=c["logit_cap"], sliding_window_size=W)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(9)) if c["sinks"] else None
    kw = {"sinks": sinks} if sinks is not None else {}

    for be in BACKENDS:
        ours, twin = World(page_size, torch.float32, hkv, d, seed=4), World(page_size, torch.float32, hkv, d, seed=4)
        backend = ATTENTION_BACKENDS["kvdispatch"](runner_for(ours))
        for w in (ours, twin):
            w.prefill_cached(PREFIX)
        # extend step
        locs, locs_t = ours.allocate(EXTEND), twin.allocate(EXTEND)
        assert torch.equal(locs, locs_t)
        T = locs.numel()
        q, k, v = ours.randn((T, hq * d)), ours.randn((T, hkv * d)), ours.randn((T, hkv * d))
        fb = batch_for(ours, ForwardMode.EXTEND, locs, EXTEND)
        with force_backend(be):
            backend.init_forward_metadata(fb)
            out = backend.forward(q, k, v, layer, fb, **kw)
        assert out.shape == (T, hq * d)
        twin.pool.set_kv_buffer(layer, KVWriteLoc(locs), k.view(T, hkv, d), v.view(T, hkv, d))
        assert torch.equal(ours.pool.k_buffer[0], twin.pool.k_buffer[0]), be
        assert torch.equal(ours.pool.v_buffer[0], twin.pool.v_buffer[0]), be
        ext = torch.tensor(EXTEND)
        qo = torch.zeros(len(EXTEND) + 1, dtype=torch.int64)
        qo[1:] = torch.cumsum(ext, 0)
        kv_indptr, kv_indices = twin.window_stream(PREFIX, W) if W > 0 else twin.kv_stream(PREFIX)
        want = nan_like((T, hq, d), torch.float32)
        extend_attention.extend_attention_fwd(
            q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d), want, twin.pool.get_key_buffer(0),
            twin.pool.get_value_buffer(0), qo, kv_indptr, kv_indices, None, True, None, max(EXTEND), 1.0, 1.0,
            sm_scale=scale, logit_cap=c["logit_cap"], sliding_window_size=W, sinks=sinks, page_size=page_size)
        assert rel_err(out.view(T, hq, d), want) < TOL[torch.float32], be

        # decode step: eager metadata, then the CUDA-graph metadata path (static buffers, static max_seqlen_k)
        new = [1] * len(PREFIX)
        locs, locs_t = ours.allocate(new), twin.allocate(new)
        assert torch.equal(locs, locs_t)
        B = locs.numel()
        q, k, v = ours.randn((B, hq * d)), ours.randn((B, hkv * d)), ours.randn((B, hkv * d))
        twin.pool.set_kv_buffer(layer, KVWriteLoc(locs), k.view(B, hkv, d), v.view(B, hkv, d))
        # the decode kernel over the rail of W + 1 keys: what the extend kernel's window mask sees
        kv_indptr, kv_indices = twin.window_stream(twin.lens, W + 1) if W > 0 else twin.kv_stream(twin.lens)
        want = nan_like((B, hq, d), torch.float32)
        logits = torch.empty((B, hq, 4, d), dtype=torch.float32)
        lse = torch.empty((B, hq, 4), dtype=torch.float32)
        decode_attention.decode_attention_fwd(
            q.view(B, hq, d), twin.pool.get_key_buffer(0), twin.pool.get_value_buffer(0), want, kv_indptr,
            kv_indices, logits, lse, torch.full((B,), 4, dtype=torch.int32), 4, scale, 1.0, 1.0,
            logit_cap=c["logit_cap"], sinks=sinks, page_size=page_size)
        fb = batch_for(ours, ForwardMode.DECODE, locs, new)
        with force_backend(be):
            backend.init_forward_metadata(fb)
            eager = backend.forward(q, k, v, layer, fb, **kw).clone()
            backend.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
            backend.init_forward_metadata_out_graph(fb, in_capture=True)
            graphed = backend.forward(q, k, v, layer, fb, save_kv_cache=False, **kw)
        assert torch.equal(ours.pool.k_buffer[0], twin.pool.k_buffer[0]), be
        assert rel_err(eager.view(B, hq, d), want) < TOL[torch.float32], be
        assert rel_err(graphed.view(B, hq, d), want) < TOL[torch.float32], be


def test_adapter_lse_and_refusals():
    """``return_lse`` gives SGLang's ``[tokens, heads]`` natural-log LSE; what the backend does not
    serve fails at once with a reason."""
    w = World(4, torch.float32, 2, 32, seed=5)
    w.prefill_cached(PREFIX)
    locs = w.allocate(EXTEND)
    backend = kvd_sglang.create_backend(runner_for(w))
    layer = RadixAttention(4, 32, 0.2, 2, layer_id=0)
    T = locs.numel()
    q, k, v = w.randn((T, 4 * 32)), w.randn((T, 2 * 32)), w.randn((T, 2 * 32))
    fb = batch_for(w, ForwardMode.EXTEND, locs, EXTEND)
    backend.init_forward_metadata(fb)
    out, lse = backend.forward(q, k, v, layer, fb, return_lse=True)
    # the LSE of the last token of request 0 (7 new tokens, no prefix) by hand
    kc, _ = w.caches()
    slots = w.r2t.req_to_token[int(w.rows[0]), :7].long()
    keys = kc.flatten(0, 1)[slots]  # [7, 2, 32]
    s = (q.view(T, 4, 32)[6] * keys[:, torch.arange(4) // 2]).sum(-1) * 0.2  # [7, 4]
    assert torch.allclose(lse[6], torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)
    assert lse.shape == (T, 4) and out.shape == (T, 4 * 32)

    with pytest.raises(NotImplementedError, match="MLA"):
        kvd_sglang.create_backend(SimpleNamespace(**{**vars(runner_for(w)), "use_mla_backend": True}))
    fb.forward_mode = ForwardMode.TARGET_VERIFY
    with pytest.raises(NotImplementedError, match="TARGET_VERIFY"):
        backend.init_forward_metadata(fb)
    fb.forward_mode = ForwardMode.EXTEND
    with pytest.raises(NotImplementedError, match="score_mod"):
        backend.forward(q, k, v, layer, fb, score_mod=lambda *a: a[0])


def test_adapter_debug_checks_page_alignment(monkeypatch):
    """KVDISPATCH_DEBUG=1: a req_to_token row that breaks the allocator's page alignment (the block
    table's assumption) is refused instead of read from the wrong slots."""
    w = World(4, torch.float32, 2, 32, seed=6)
    w.prefill_cached(PREFIX)
    locs = w.allocate(EXTEND)
    backend = kvd_sglang.create_backend(runner_for(w))
    fb = batch_for(w, ForwardMode.EXTEND, locs, EXTEND)
    monkeypatch.setenv("KVDISPATCH_DEBUG", "1")
    backend.init_forward_metadata(fb)  # SGLang's allocator keeps the rows aligned
    r = int(w.rows[2])
    w.r2t.req_to_token[r, 5] += 1  # position 5 moved off offset 1 of its page
    with pytest.raises(ValueError, match="not page-aligned"):
        backend.init_forward_metadata(fb)


def test_adapter_hnd_pool(monkeypatch):
    """SGLANG_USE_HND_KVCACHE=1 pools ([pages, H, P, D] per layer): kvdispatch writes what SGLang's
    HND set_kv_buffer writes and attends through the permuted view as over the NHD pool."""
    hq, hkv, d, P = 4, 2, 32, 4
    layer = RadixAttention(hq, d, 0.2, hkv, layer_id=0)
    nhd = World(P, torch.float32, hkv, d, seed=8)
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    ours, twin = World(P, torch.float32, hkv, d, seed=8), World(P, torch.float32, hkv, d, seed=8)
    monkeypatch.delenv("SGLANG_USE_HND_KVCACHE")
    assert ours.pool.kv_cache_layout == "hnd" and ours.pool.k_buffer[0].dim() == 4
    for w in (nhd, ours, twin):
        w.prefill_cached(PREFIX)
        locs = w.allocate(EXTEND)
    T = locs.numel()
    q, k, v = ours.randn((T, hq * d)), ours.randn((T, hkv * d)), ours.randn((T, hkv * d))
    backend = kvd_sglang.create_backend(runner_for(ours))
    fb = batch_for(ours, ForwardMode.EXTEND, locs, EXTEND)
    backend.init_forward_metadata(fb)
    out = backend.forward(q, k, v, layer, fb)
    twin.pool.set_kv_buffer(layer, KVWriteLoc(locs), k.view(T, hkv, d), v.view(T, hkv, d))
    assert torch.equal(ours.pool.k_buffer[0], twin.pool.k_buffer[0])
    assert torch.equal(ours.pool.v_buffer[0], twin.pool.v_buffer[0])
    nhd.pool.set_kv_buffer(layer, KVWriteLoc(locs), k.view(T, hkv, d), v.view(T, hkv, d))
    ext = torch.tensor(EXTEND)
    qo = torch.zeros(len(EXTEND) + 1, dtype=torch.int64)
    qo[1:] = torch.cumsum(ext, 0)
    kv_indptr, kv_indices = nhd.kv_stream(PREFIX)
    want = nan_like((T, hq, d), torch.float32)
    extend_attention.extend_attention_fwd(
        q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d), want, nhd.pool.get_key_buffer(0),
        nhd.pool.get_value_buffer(0), qo, kv_indptr, kv_indices, None, True, None, max(EXTEND), 1.0, 1.0,
        sm_scale=0.2, page_size=P)
    assert rel_err(out.view(T, hq, d), want) < TOL[torch.float32]


@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_adapter_fp8_pool(fp8):
    """--kv-cache-dtype fp8: kvdispatch stores what SGLang's set_kv_buffer stores with the layer's
    k_scale / v_scale (byte for byte), and attends with them as descales."""
    hq, hkv, d, P = 4, 2, 32, 4
    layer = RadixAttention(hq, d, 0.2, hkv, layer_id=0)
    layer.k_scale, layer.v_scale = torch.tensor(0.5), torch.tensor(2.0)
    layer.k_scale_float, layer.v_scale_float = 0.5, 2.0
    for be in BACKENDS:
        ours, twin = World(P, fp8, hkv, d, seed=10), World(P, fp8, hkv, d, seed=10)
        for w in (ours, twin):
            w.prefill_cached(PREFIX)
            locs = w.allocate(EXTEND)
        T = locs.numel()
        q, k, v = ours.randn((T, hq * d)), ours.randn((T, hkv * d)), ours.randn((T, hkv * d))
        backend = kvd_sglang.create_backend(runner_for(ours))
        fb = batch_for(ours, ForwardMode.EXTEND, locs, EXTEND)
        with force_backend(be):
            backend.init_forward_metadata(fb)
            out = backend.forward(q, k, v, layer, fb)
        twin.pool.set_kv_buffer(layer, KVWriteLoc(locs), k.view(T, hkv, d).clone(), v.view(T, hkv, d).clone(),
                                layer.k_scale, layer.v_scale)
        assert ours.pool.k_buffer[0].dtype == torch.uint8  # SGLang stores fp8 as uint8
        assert torch.equal(ours.pool.k_buffer[0], twin.pool.k_buffer[0]), be
        assert torch.equal(ours.pool.v_buffer[0], twin.pool.v_buffer[0]), be
        kc, vc = ours.caches()
        cu_q = torch.zeros(len(EXTEND) + 1, dtype=torch.int32)
        cu_q[1:] = torch.cumsum(torch.tensor(EXTEND), 0)
        want = nan_like((T, hq, d), torch.float32)
        with force_backend("reference"):  # over the decoded caches, in float32
            kvd.flash_attn_varlen_func(q.view(T, hq, d), kc.float() * 0.5, vc.float() * 2.0, max(EXTEND), cu_q,
                                       max(ours.lens), seqused_k=torch.tensor(ours.lens, dtype=torch.int32),
                                       softmax_scale=0.2, causal=True, block_table=ours.block_table(), out=want)
        assert rel_err(out.view(T, hq, d), want) < 1e-3, be
