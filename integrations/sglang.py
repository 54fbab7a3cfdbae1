"""An SGLang attention backend on kvdispatch: per layer and forward, ONE ``reshape_and_cache_flash``
(this step's K/V into SGLang's pool) and ONE ``flash_attn_varlen_func`` (attention through the
pool), for prefill, chunked prefill (extend over a cached prefix), mixed batches and decode.

Turning it on: ``--attention-backend kvdispatch`` (``attention_backend="kvdispatch"`` for
``sglang.Engine``). The registration comes from kvdispatch's entry point
``[project.entry-points."sglang.srt.plugins"] kvdispatch = "kvdispatch.integrations.sglang:register"``,
which SGLang's ``load_plugins()`` runs in every process it starts (``sglang serve`` /
``launch_server`` / ``Engine``, and each scheduler process) before it parses the server
arguments; ``SGLANG_PLUGINS``, when set, must name ``kvdispatch``. ``import
kvdispatch.integrations.sglang`` registers it in the importing process only (SGLang spawns its
scheduler processes, which do not inherit that), e.g. to build the backend from a ModelRunner.

What SGLang hands an attention backend (as read from SGLang 0.5.23's source, TritonAttnBackend /
FlashAttentionBackend / TorchNativeAttnBackend, and how it maps onto kvdispatch):

* The token-to-KV pool (``MHATokenToKVPool``, taken from the ModelRunner as SGLang's own backends
  do: the ForwardBatch no longer carries the pools) holds per layer K and V buffers of
  ``[size + page_size, H, D]`` (slot-major "nhd"; slot 0's page absorbs padded tokens), or
  ``[pages, H, page_size, D]`` with ``SGLANG_USE_HND_KVCACHE`` ("hnd"). kvdispatch sees them as
  paged caches ``[num_pages, page_size, H, D]``: a view of the nhd buffer, a permuted view of the
  hnd one. With page size 1 every slot is its own block (``[size + 1, 1, H, D]``).
* ``forward_batch.out_cache_loc`` holds each new token's slot (physical on every pool; the
  unified pool binds physical write ids to the batch, ``out_cache_loc_is_physical``): it is the
  slot mapping of the write, slot ``s`` = page ``s // P``, offset ``s % P``.
* ``req_to_token[req_pool_indices]`` rows list each request's token slots. With page size P > 1
  they are page-aligned: SGLang's ``PagedTokenToKVPoolAllocator`` gives a request whole pages
  and continues a request's last partial page before taking a new one, so the token at position
  ``i`` sits at offset ``i % P`` of its page (its debug mode asserts
  ``(last_loc + 1) % page_size == prefix_lens % page_size``), which is what SGLang's FA3 backend
  relies on too (``page_table[:, ::page_size] // page_size``). So the block table is
  ``req_to_token[req_pool_indices, ::P] // P``; with page size 1, the rows themselves.
  ``KVDISPATCH_DEBUG=1`` checks this alignment on every forward (a host sync). A translating
  (unified) pool's ``KVIndexTranslator.read_table`` gives a table of physical page ids instead,
  used as it comes.
* Extend: q lengths ``extend_seq_lens``, kv lengths ``seq_lens`` (prefix + new), causal
  bottom-right aligned (the new tokens see the whole prefix). Decode: q length 1.
* ``layer.scaling`` is the softmax scale, ``layer.logit_cap`` the softcap (tanh),
  ``layer.sliding_window_size`` W the window (``window_size=(W, 0)``, as SGLang's FA3 backend
  and its Triton extend kernel count it: a query sees itself and the W keys before it; models
  pass ``config.sliding_window - 1``; SGLang's own Triton decode path reads only the last W keys,
  one fewer than its extend kernel), ``sinks=`` (gpt-oss) the per-head sink logits
  (``s_aux``), GQA by head counts. FP8 pools (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``) are
  written with ``layer.k_scale`` / ``layer.v_scale`` (1.0 when the checkpoint has none) and read
  with the same scales as descales. ``return_lse=True`` returns ``(o, lse [tokens, heads])``.
* CUDA graphs (decode): ``init_cuda_graph_state`` allocates the metadata once;
  ``init_forward_metadata_out_graph`` (capture and replay, outside the graph) refills it in place,
  with the static ``max_seqlen_k`` of the context length.

Not served (a clear error rather than a wrong answer): MLA models, hybrid SWA pools (serve them
with ``--disable-hybrid-swa-memory``), quantized pools other than plain fp8 (fp4, mxfp8),
decode context parallelism, cross attention / encoder-decoder, speculative decoding's verify and
draft modes, dLLM, ``score_mod``, ``xai_temperature_len``.

kvdispatch's core never imports this module. Importing it imports SGLang only to register (when
SGLang is installed); the backend class is built on first use (:func:`backend_class`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

import kvdispatch as kvd

__all__ = ["BACKEND_NAME", "register", "create_backend", "backend_class", "block_table_from_rows"]

BACKEND_NAME = "kvdispatch"

_FP8_KINDS = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
if hasattr(torch, "float8_e4m3fnuz"):
    _FP8_KINDS[torch.float8_e4m3fnuz] = "fp8_e4m3"


def register() -> None:
    """Register the backend with SGLang as ``kvdispatch`` (``register_attention_backend``) and add
    it to the ``--attention-backend`` choices. Idempotent. The ``sglang.srt.plugins`` entry point."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_backend:
        register_attention_backend(BACKEND_NAME)(create_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def create_backend(model_runner):
    """The factory SGLang calls with its ModelRunner (``ATTENTION_BACKENDS["kvdispatch"]``)."""
    return backend_class()(model_runner)


def block_table_from_rows(rows: torch.Tensor, page_size: int, entry_page_size: int = 1) -> torch.Tensor:
    """kvdispatch's int32 block table ``[batch, pages]`` from per-request rows of SGLang ids:
    token slots (``entry_page_size`` 1: ``req_to_token`` rows, page-aligned) or physical pages
    (``entry_page_size == page_size``: a unified pool's read table). Entry ``j`` covers tokens
    ``[j * entry_page_size, (j + 1) * entry_page_size)``; the block of token ``t`` is
    ``(entry * entry_page_size + t % entry_page_size) // page_size``, read at ``t = k * page_size``."""
    if page_size % entry_page_size:
        raise ValueError(f"page_size {page_size} is not a multiple of the table's entry page size {entry_page_size}")
    step = page_size // entry_page_size
    if step > 1:
        rows = rows[:, ::step]
    if entry_page_size != page_size:
        rows = rows * entry_page_size // page_size if entry_page_size > 1 else rows // page_size
    return rows if rows.dtype == torch.int32 else rows.to(torch.int32)


@dataclass
class ForwardMetadata:
    """Per-forward kvdispatch arguments, shared by every layer of the forward."""

    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]
    seqused_k: torch.Tensor  # int32 [batch]: kv length (prefix + new tokens)
    block_table: torch.Tensor  # int32 [batch, pages]
    max_seqlen_q: int
    max_seqlen_k: int


def _debug() -> bool:
    """``KVDISPATCH_DEBUG=1`` (kvdispatch's switch for value checks that sync)."""
    return os.environ.get("KVDISPATCH_DEBUG") not in (None, "", "0")


def _sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


@functools.lru_cache(maxsize=None)
def backend_class():
    """The backend class, a subclass of SGLang's ``AttentionBackend`` (built on first use: this
    module imports, and registers nothing, where SGLang is not installed)."""
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.radix_attention import AttentionType

    class KVDispatchAttnBackend(AttentionBackend):
        """SGLang attention through kvdispatch (see the module docstring)."""

        def __init__(self, model_runner):
            super().__init__()
            if getattr(model_runner, "use_mla_backend", False):
                raise NotImplementedError(
                    "kvdispatch's SGLang backend serves MHA/GQA pools; MLA models are not supported")
            self.device = torch.device(model_runner.device)
            self.req_to_token_pool = model_runner.req_to_token_pool
            self.req_to_token = model_runner.req_to_token_pool.req_to_token
            self.token_to_kv_pool = pool = model_runner.token_to_kv_pool
            self.page_size = int(getattr(model_runner, "page_size", 1) or 1)
            self.kv_index_translator = getattr(model_runner, "kv_index_translator", None)
            self.max_context_len = int(model_runner.model_config.context_len)
            self._check_pool(pool)
            self.kv_cache_dtype = getattr(pool, "dtype", None)
            self._fp8 = _FP8_KINDS.get(self.kv_cache_dtype)
            self._unit_scale = torch.ones(1, dtype=torch.float32, device=self.device) if self._fp8 else None
            self._causal_exempt = (AttentionType.ENCODER_ONLY, AttentionType.DECODER_BIDIRECTIONAL)
            self._graph = None  # decode CUDA-graph buffers (init_cuda_graph_state)
            self.forward_metadata: Optional[ForwardMetadata] = None

        def _check_pool(self, pool) -> None:
            try:
                from sglang.srt.mem_cache.base_swa_memory_pool import BaseSWAKVPool
            except ImportError:  # an SGLang without hybrid SWA pools
                BaseSWAKVPool = ()
            if BaseSWAKVPool and isinstance(pool, BaseSWAKVPool):
                raise NotImplementedError(
                    "kvdispatch's SGLang backend does not serve hybrid SWA pools (separate sliding-window "
                    "sub-pool); start SGLang with --disable-hybrid-swa-memory (sliding-window layers are "
                    "then masked by kvdispatch's window_size)")
            if getattr(pool, "is_quantized_kv_cache", False):
                raise NotImplementedError(
                    f"kvdispatch's SGLang backend: quantized KV pools ({type(pool.quant_method).__name__}) "
                    "are not supported; plain fp8 (--kv-cache-dtype fp8_e4m3 / fp8_e5m2) is")
            layout = getattr(pool, "kv_cache_layout", "nhd")
            if layout not in ("nhd", "hnd"):
                raise NotImplementedError(f"kvdispatch's SGLang backend: KV layout {layout!r} is not supported "
                                          "(nhd and hnd are)")
            try:
                from sglang.srt.runtime_context import get_parallel

                dcp = get_parallel().attn_dcp_size
            except Exception:  # no runtime context (tests, tools): no decode context parallelism
                dcp = 1
            if dcp > 1:
                raise NotImplementedError("kvdispatch's SGLang backend: decode context parallelism is not supported")

        # -- metadata ---------------------------------------------------------------------------
        def _rows(self, forward_batch, bs: int, max_seqlen_k: int) -> torch.Tensor:
            """The block table of the batch's first ``bs`` requests, wide enough for ``max_seqlen_k``."""
            P = self.page_size
            pages = -(-max(max_seqlen_k, 1) // P)
            tr, plan = self.kv_index_translator, getattr(forward_batch, "kv_loc_plan", None)
            if tr is not None and plan is not None and getattr(tr, "is_translating", False):
                # unified pool: the plan's table of physical ids (req_to_token holds virtual ones)
                table = tr.read_table(plan, rows=bs)
                eps = table.entry_page_size
                ids = table.ids[table.row_ids[:bs]] if table.row_ids is not None else table.ids[:bs]
                return block_table_from_rows(ids[:, : -(-pages * P // eps)], P, eps)
            rows = self.req_to_token[forward_batch.req_pool_indices[:bs], : pages * P]
            bt = block_table_from_rows(rows, P)
            if _debug():
                self._check_alignment(rows, forward_batch.seq_lens[:bs])
            return bt

        def _check_alignment(self, rows: torch.Tensor, seq_lens: torch.Tensor) -> None:
            """KVDISPATCH_DEBUG=1: every used slot of each row is on the page of the row's page-start
            entry, at offset position % P (the allocator's invariant the block table relies on)."""
            P = self.page_size
            if P == 1:
                return
            pos = torch.arange(rows.shape[1], device=rows.device)
            used = pos[None, :] < seq_lens[:, None].to(pos.device)
            first = rows[:, ::P].repeat_interleave(P, dim=1)[:, : rows.shape[1]]
            want = first // P * P + (pos % P)[None, :]
            bad = used & (rows != want)
            if bool(bad.any()):
                r, c = (int(x) for x in bad.nonzero()[0])
                raise ValueError(
                    f"req_to_token: request row {r} is not page-aligned at position {c} (slot "
                    f"{int(rows[r, c])}, page size {P}): the block table would read the wrong slots")

        @staticmethod
        def _max_host(cpu_vals, dev_vals: torch.Tensor, bs: int) -> int:
            """max of the batch's first ``bs`` lengths, from the host mirror when there is one (else a
            device sync, as SGLang's Triton backend falls back to)."""
            if bs == 0:
                return 0
            if cpu_vals is not None and len(cpu_vals) >= bs:
                vals = cpu_vals[:bs]
                return int(vals.max()) if isinstance(vals, torch.Tensor) else int(max(vals))
            return int(dev_vals[:bs].max())

        def init_forward_metadata(self, forward_batch):
            """Eager: fresh metadata for this forward (decode, extend, mixed)."""
            mode = forward_batch.forward_mode
            self._check_mode(forward_batch)
            bs = forward_batch.batch_size
            dev = self.device
            seq_lens = forward_batch.seq_lens[:bs]
            max_k = self._max_host(getattr(forward_batch, "seq_lens_cpu", None), seq_lens, bs)
            if mode.is_decode_or_idle():
                cu_q = torch.arange(bs + 1, dtype=torch.int32, device=dev)
                max_q = 1 if bs else 0
            else:
                ext = forward_batch.extend_seq_lens[:bs]
                cu_q = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
                cu_q[1:] = torch.cumsum(ext, 0)
                max_q = self._max_host(forward_batch.extend_seq_lens_cpu, ext, bs)
            self.forward_metadata = ForwardMetadata(
                cu_seqlens_q=cu_q,
                seqused_k=seq_lens.to(torch.int32),
                block_table=self._rows(forward_batch, bs, max_k),
                max_seqlen_q=max_q,
                max_seqlen_k=max_k,
            )

        def _check_mode(self, forward_batch) -> None:
            mode = forward_batch.forward_mode
            if getattr(forward_batch, "spec_info", None) is not None or mode.is_target_verify() \
                    or mode.is_draft_extend_v2() or mode.is_dllm_extend() or mode.is_prebuilt():
                raise NotImplementedError(
                    f"kvdispatch's SGLang backend: forward mode {mode.name} (speculative decoding / dLLM / "
                    "prebuilt) is not supported")
            if getattr(forward_batch, "encoder_lens", None) is not None:
                raise NotImplementedError("kvdispatch's SGLang backend: encoder-decoder batches are not supported")

        # -- CUDA graphs (decode) -----------------------------------------------------------------
        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs):
            pages = -(-self.max_context_len // self.page_size)
            dev = self.device
            self._graph = dict(
                cu_seqlens_q=torch.arange(max_bs + 1, dtype=torch.int32, device=dev),
                seqused_k=torch.ones(max_bs, dtype=torch.int32, device=dev),
                block_table=torch.zeros((max_bs, pages), dtype=torch.int32, device=dev),
            )

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            """Capture and replay of a decode graph: refill the graph's buffers in place (outside
            the graph; the captured kernels read them), ``max_seqlen_k`` static (context length)."""
            if self._graph is None:
                raise RuntimeError("init_forward_metadata_out_graph before init_cuda_graph_state")
            mode = forward_batch.forward_mode
            self._check_mode(forward_batch)
            if not mode.is_decode_or_idle():
                raise NotImplementedError(f"kvdispatch's SGLang backend: no CUDA graph for forward mode {mode.name}")
            g = self._graph
            bs = forward_batch.batch_size
            g["seqused_k"][:bs].copy_(forward_batch.seq_lens[:bs])
            bt = self._rows(forward_batch, bs, self.max_context_len)
            g["block_table"][:bs, : bt.shape[1]].copy_(bt)
            self.forward_metadata = ForwardMetadata(
                cu_seqlens_q=g["cu_seqlens_q"][: bs + 1],
                seqused_k=g["seqused_k"][:bs],
                block_table=g["block_table"][:bs],
                max_seqlen_q=1,
                max_seqlen_k=self.max_context_len,
            )

        def get_cuda_graph_seq_len_fill_value(self):
            return 1

        # -- forward ------------------------------------------------------------------------------
        def _caches(self, layer_id: int):
            """The layer's K/V buffers as kvdispatch paged caches [pages, P, H, D] (views)."""
            P = self.page_size
            out = []
            for buf in (self.token_to_kv_pool.get_key_buffer(layer_id),
                        self.token_to_kv_pool.get_value_buffer(layer_id)):
                if buf.dim() == 3:  # nhd [slots, H, D]
                    n = buf.shape[0] // P
                    out.append(buf[: n * P].unflatten(0, (n, P)))
                elif buf.dim() == 4:  # hnd [pages, H, P, D]
                    out.append(buf.permute(0, 2, 1, 3))
                else:
                    raise NotImplementedError(f"kvdispatch's SGLang backend: KV buffer of shape {tuple(buf.shape)}")
            return out

        def _scales(self, layer):
            if self._fp8 is None:
                return None, None
            ks, vs = layer.k_scale, layer.v_scale
            if ks is None or vs is None:
                return self._unit_scale, self._unit_scale
            # SGLang keeps them as float32 parameters; anything else is converted (per call)
            return ks if ks.dtype == torch.float32 else ks.float(), vs if vs.dtype == torch.float32 else vs.float()

        def _run(self, q, k, v, layer, forward_batch, save_kv_cache, decode, kwargs):
            sinks = kwargs.pop("sinks", None)
            return_lse = bool(kwargs.pop("return_lse", False))
            for name in ("score_mod", "aux_tensors"):
                if kwargs.pop(name, None) is not None:
                    raise NotImplementedError(f"kvdispatch's SGLang backend: {name} is not supported")
            if kwargs:
                raise NotImplementedError(f"kvdispatch's SGLang backend: unsupported arguments {sorted(kwargs)}")
            if layer.is_cross_attention:
                raise NotImplementedError("kvdispatch's SGLang backend: cross attention is not supported")
            if getattr(layer, "xai_temperature_len", -1) > 0:
                raise NotImplementedError("kvdispatch's SGLang backend: xai_temperature_len is not supported")
            softcap = float(layer.logit_cap or 0.0)
            if softcap > 0 and layer.logit_capping_method != "tanh":
                raise NotImplementedError(f"kvdispatch's SGLang backend: logit capping "
                                          f"{layer.logit_capping_method!r} (only tanh)")
            hq, hkv, dk, dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
            kc, vc = self._caches(layer.layer_id)
            k_scale, v_scale = self._scales(layer)

            if save_kv_cache and k is not None and v is not None:
                pool = self.token_to_kv_pool
                if getattr(pool, "requires_physical_write_loc", False) and \
                        not getattr(forward_batch, "out_cache_loc_is_physical", False):
                    raise ValueError("out_cache_loc: the unified pool takes physical write ids; this batch is "
                                     "not bound to a plan (KVLocPlan.bind)")
                k = k.view(-1, hkv, dk)
                v = v.view(-1, hkv, dv)
                if self._fp8 is None and k.dtype != kc.dtype:
                    k, v = k.to(kc.dtype), v.to(vc.dtype)
                kvd.reshape_and_cache_flash(k, v, kc, vc, forward_batch.out_cache_loc,
                                            self._fp8 or "auto", k_scale, v_scale)

            q3 = q.reshape(-1, hq, dk)
            attn_out = getattr(forward_batch, "_attn_output", None)
            o = attn_out if attn_out is not None else q.new_empty((q3.shape[0], hq * dv))
            o3 = o.view(-1, hq, dv)
            # decode: one query at the end of its sequence, causal or not it sees every key
            causal = decode or layer.attn_type not in self._causal_exempt
            w = layer.sliding_window_size
            window = (w, 0 if causal else w) if w is not None and w > -1 else (-1, -1)
            md = self.forward_metadata
            res = kvd.flash_attn_varlen_func(
                q3, kc, vc, md.max_seqlen_q, md.cu_seqlens_q, md.max_seqlen_k,
                seqused_k=md.seqused_k, softmax_scale=layer.scaling, causal=causal,
                window_size=window, softcap=softcap, block_table=md.block_table,
                out=o3, k_descale=k_scale, v_descale=v_scale, s_aux=sinks, return_softmax_lse=return_lse)
            if return_lse:
                return o, res[1].T.contiguous()
            return o

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
            return self._run(q, k, v, layer, forward_batch, save_kv_cache, False, kwargs)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
            return self._run(q, k, v, layer, forward_batch, save_kv_cache, True, kwargs)

    return KVDispatchAttnBackend


def __getattr__(name: str) -> Any:
    if name == "KVDispatchAttnBackend":
        return backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _sglang_available():
    try:
        register()
    except ImportError:  # an SGLang whose registry cannot be imported here: register() says why later
        pass
