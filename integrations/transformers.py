"""kvdispatch as the paged attention of transformers' continuous batching (``paged|kvdispatch``).

Turn it on with one line, then generate as usual::

    from kvdispatch.integrations.transformers import register

    model.set_attn_implementation(register())      # registers and selects "paged|kvdispatch"
    outputs = model.generate_batch(prompts, generation_config=gen_cfg)   # or init_continuous_batching()

``register()`` adds ``"paged|kvdispatch"`` to transformers' ``AttentionInterface`` (idempotent) and
returns that name, so ``from_pretrained(..., attn_implementation=register())`` works as well.

Versions. This plugs into the continuous-batching interface of transformers **5.16.x and 5.17.x**
(tested on 5.17.0; 5.16.1 ships the same ``cache.py``, ``cache_manager.py``, ``input_outputs.py``,
``scheduler.py`` and ``model_runner.py``), where the paged attention function itself receives the
``PagedAttentionCache`` and per-layer-group ``write_index`` / ``read_index`` tensors and is
responsible for the cache write.
5.18 replaced the layer groups with per-attention-type ``cache_allocators`` (own trash indices and
cache tensors), 5.23 changed ``PagedAttentionCache.update`` to take the kwargs dict, and 5.24 moved
the cache write into the model (the attention module calls ``cache.update``); ``register()`` refuses every version outside 5.16-5.17 with a
``RuntimeError`` naming the installed one rather than writing into a cache it does not know.
transformers is imported only by ``register()``: importing this module never needs it.

How one attention call maps onto kvdispatch (transformers 5.16-5.17):

* Cache layout. Layers are grouped by attention type; layer ``l`` of group ``g`` owns
  ``cache.key_cache[j]`` / ``cache.value_cache[j]`` with ``(g, j) =
  cache.layer_index_to_group_indices[l]``, each ``[(num_blocks + 2) * block_size, num_kv_heads,
  head_dim]`` contiguous. Physical slot ``s`` is block ``s // block_size``, offset
  ``s % block_size``, so ``.view(num_blocks + 2, block_size, num_kv_heads, head_dim)`` is
  kvdispatch's NHD cache without a copy. Block ``num_blocks`` is the zeroed read trash (padding reads
  it), block ``num_blocks + 1`` the write trash (padding tokens write there); neither is ever
  allocated to a request.
* Write. This step's K/V go to ``write_index[g]`` (int64 physical slots) with
  ``kvdispatch.reshape_and_cache_flash``; the write-trash slot (padding tokens, and sliding-window
  tokens that fall out of the window) becomes -1, i.e. skipped, since kvdispatch takes a slot once.
* Read. For a full-attention group, the read indices of a request are its block list unrolled
  (``block[p // block_size] * block_size + p % block_size`` for every position ``p`` of the
  sequence), concatenated over the batch at the offsets ``cu_seq_lens_k``. The block table is
  therefore the read index at every ``block_size``-th position divided by ``block_size``;
  ``seqused_k`` is ``diff(cu_seq_lens_k)``. When no request has a past (``read_index`` empty, all
  fresh prefills) the write indices are the whole sequences and give the table the same way. Then
  ONE paged ``kvdispatch.flash_attn_varlen_func`` call (bottom-right causal, ``cu_seq_lens_q``)
  serves prefill, decode and chunked prefill alike. With ``KVDISPATCH_DEBUG=1`` every derived table
  is checked against the read indices position by position.
* Sliding-window groups are NOT a block table: transformers keeps them as a rolling buffer of
  ``sliding_window`` tokens whose read indices start mid-block and wrap around, with a sentinel
  index standing for each new token, and chunked prefill can overwrite slots that the same step
  still reads. Those layers therefore gather K/V through ``read_index`` first (as transformers' own
  paths do), then write with ``reshape_and_cache_flash``, then attend with one non-paged
  ``flash_attn_varlen_func`` call (``cu_seqlens_k``, ``window_size=(sliding_window - 1, 0)``).
* The decode fast path (a ``block_table`` kwarg, with no write/read indices filled) is only enabled
  by transformers 5.16-5.17 for flash-attention implementations on CUDA/XPU; should it arrive, the
  write slots are computed from that table and attention runs through it directly.
* Attention sinks (``module.sinks``) go to ``s_aux``; a ``softcap`` kwarg is honoured.
"""

from __future__ import annotations

from typing import Optional

import torch

import kvdispatch as kvd
from kvdispatch.platform import getenv

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_VERSIONS", "register", "paged_attention_forward"]

ATTN_IMPLEMENTATION = "paged|kvdispatch"
SUPPORTED_VERSIONS = ">=5.16,<5.18"
_MIN, _END = (5, 16), (5, 18)


def _check_version(version: str) -> None:
    from packaging.version import Version

    v = Version(version)
    if not (_MIN <= (v.major, v.minor) < _END):
        raise RuntimeError(
            f"kvdispatch's paged|kvdispatch supports transformers {SUPPORTED_VERSIONS} (the continuous-batching "
            f"cache of 5.16-5.17), but transformers {version} is installed: its paged cache is laid out and "
            "updated differently (5.18 per-attention-type allocators, 5.23 update(kwargs), 5.24 the write in "
            "the model). Install transformers>=5.16,<5.18 or use transformers' own paged|sdpa / paged|flash_*."
        )


def register() -> str:
    """Register ``paged|kvdispatch`` in transformers' ``AttentionInterface``; returns the name.

    Raises ImportError without transformers, RuntimeError for a version outside 5.16-5.17.
    """
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError(
            f"kvdispatch.integrations.transformers needs transformers {SUPPORTED_VERSIONS} "
            f"(pip install 'transformers{SUPPORTED_VERSIONS}'): {e}"
        ) from e
    _check_version(transformers.__version__)
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION


# -- the attention function ------------------------------------------------------------------------
def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple:
    """transformers' attention-function signature for continuous batching.

    query ``(1, num_heads, total_q, head_dim)``; key, value ``(1, num_kv_heads, total_q, head_dim)``:
    this step's packed tokens. The kwargs are continuous batching's ``PagedAttentionArgs`` (``cache``,
    ``write_index``, ``read_index``, ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_seqlen_q``,
    ``max_seqlen_k``, ``block_table``). ``attention_mask`` is not used (none is built for this
    implementation: masking is causal + window inside the kernel). Returns
    ``((1, total_q, num_heads, head_dim), None)``.
    """
    cache = kwargs.get("cache")
    if cache is None:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} was called without a paged attention cache: it only runs inside "
            "transformers' continuous batching (generate_batch / init_continuous_batching)"
        )
    layer = module.layer_idx
    group, in_group = cache.layer_index_to_group_indices[layer]
    window = cache.sliding_windows[layer]  # 1 = full attention
    sliding = window != 1
    block_size = cache.block_size
    k_flat, v_flat = cache.key_cache[in_group], cache.value_cache[in_group]
    k_cache = k_flat.view(-1, block_size, k_flat.shape[1], k_flat.shape[2])
    v_cache = v_flat.view(-1, block_size, v_flat.shape[1], v_flat.shape[2])

    q = query[0].transpose(0, 1)  # (total_q, num_heads, head_dim), views throughout
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k, max_k = kwargs["cu_seq_lens_k"], kwargs["max_seqlen_k"]
    if isinstance(cu_k, dict):  # models with full and sliding layers: one entry per layer type
        layer_type = "sliding_attention" if sliding else "full_attention"
        cu_k, max_k = cu_k[layer_type], max_k[layer_type]
    cu_q = cu_q if cu_q.dtype == torch.int32 else cu_q.to(torch.int32)
    cu_k = cu_k if cu_k.dtype == torch.int32 else cu_k.to(torch.int32)
    max_q = int(kwargs["max_seqlen_q"])

    softcap = kwargs.get("softcap") or 0.0
    s_aux = kwargs.get("s_aux")
    if s_aux is None:
        s_aux = getattr(module, "sinks", None)
    attn = dict(softmax_scale=scaling, causal=True, softcap=float(softcap), s_aux=s_aux)
    if sliding:
        attn["window_size"] = (window - 1, 0)

    block_table = kwargs.get("block_table")
    if block_table is not None:
        out = _decode_fast_path(q, k_new, v_new, k_cache, v_cache, cu_q, cu_k, max_q,
                                block_table[group], block_size, attn)
        return out.unsqueeze(0), None
    read_index, write_index = kwargs["read_index"][group], kwargs["write_index"][group]
    # transformers points padding tokens (and, in sliding groups, tokens that fall out of the
    # window) at its one write-trash slot; kvdispatch takes each slot once and skips s < 0
    write_slots = write_index.masked_fill(write_index == cache.write_trash_index, -1)
    if sliding:
        out = _rolling_buffer(q, k_new, v_new, k_flat, v_flat, k_cache, v_cache, cu_q, cu_k, max_q, int(max_k),
                              read_index, write_slots, cache.sentinel_index, attn)
    else:
        kvd.reshape_and_cache_flash(k_new, v_new, k_cache, v_cache, write_slots)
        # all fresh prefills (no past anywhere): the write indices are the whole sequences
        slots = read_index if read_index.numel() else write_index
        table = block_table_from_slots(slots, cu_k, int(max_k), block_size)
        if _debug():
            check_block_table(table, slots, cu_k, block_size)
        out = kvd.flash_attn_varlen_func(q, k_cache, v_cache, max_q, cu_q, int(max_k), seqused_k=cu_k[1:] - cu_k[:-1],
                                         block_table=table, **attn)
    return out.unsqueeze(0), None


def _debug() -> bool:
    # value checks sync; never inside a compiled graph (continuous batching may compile the step)
    return not torch.compiler.is_compiling() and getenv(b"KVDISPATCH_DEBUG") not in (None, "", "0")


def block_table_from_slots(slots: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int,
                           block_size: int) -> torch.Tensor:
    """int32 ``(batch, ceil(max_seqlen_k / block_size))`` block table of a full-attention group.

    ``slots``: the physical slots of every sequence's positions ``0 .. len - 1``, concatenated at the
    offsets ``cu_seqlens_k`` (transformers' read indices). Block ``b`` of sequence ``i`` is the slot of
    position ``b * block_size`` divided by ``block_size``. Entries past a sequence's length hold
    whatever valid slot the clamp lands on; attention never reads them (``seqused_k``). No host sync.
    """
    batch = cu_seqlens_k.shape[0] - 1
    num_cols = max(1, -(-max_seqlen_k // block_size))
    if slots.numel() == 0:
        return torch.zeros(batch, num_cols, dtype=torch.int32, device=slots.device)
    cols = torch.arange(num_cols, device=slots.device, dtype=torch.int64) * block_size
    pos = (cu_seqlens_k[:-1].to(torch.int64)[:, None] + cols[None, :]).clamp_(max=slots.numel() - 1)
    return torch.div(slots[pos], block_size, rounding_mode="floor").to(torch.int32)


def check_block_table(table: torch.Tensor, slots: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      block_size: int) -> None:
    """Raise unless ``table`` addresses exactly ``slots`` at every position of every sequence (syncs)."""
    cu = cu_seqlens_k.to(torch.int64)
    total = int(cu[-1])
    pos = torch.arange(total, device=slots.device)
    seq = torch.searchsorted(cu[1:], pos, right=True)
    local = pos - cu[:-1][seq]
    expect = table.to(torch.int64)[seq, local // block_size] * block_size + local % block_size
    bad = (expect != slots[:total].to(torch.int64)).nonzero()
    if bad.numel():
        p = int(bad[0])
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION}: transformers' cache indices are not a block table: position {int(local[p])} "
            f"of sequence {int(seq[p])} is at slot {int(slots[p])}, the derived table gives {int(expect[p])}"
        )


def _rolling_buffer(q, k_new, v_new, k_flat, v_flat, k_cache, v_cache, cu_q, cu_k, max_q, max_k,
                    read_index, write_slots, sentinel_index, attn):
    """Sliding-window group: gather (cached window + new tokens), write, one non-paged call."""
    if read_index.numel():
        # read before writing: a chunk may overwrite slots of the window this step still reads
        mask = (read_index == sentinel_index)[:, None, None]
        k_all = k_flat.index_select(0, read_index).masked_scatter_(mask, k_new)
        v_all = v_flat.index_select(0, read_index).masked_scatter_(mask, v_new)
    else:  # fresh prefills only: the window is the new tokens
        k_all, v_all = k_new, v_new
    kvd.reshape_and_cache_flash(k_new, v_new, k_cache, v_cache, write_slots)
    return kvd.flash_attn_varlen_func(q, k_all, v_all, max_q, cu_q, max_k, cu_seqlens_k=cu_k, **attn)


def _decode_fast_path(q, k_new, v_new, k_cache, v_cache, cu_q, cu_k, max_q, table, block_size, attn):
    """transformers' block-table path: no indices are filled, the table says where everything is.
    ``diff(cu_k)`` is each sequence's length with this step's tokens."""
    seqused_k = cu_k[1:] - cu_k[:-1]
    q_lens = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
    batch, total = table.shape[0], q.shape[0]
    tok = torch.arange(total, device=q.device)
    cu64 = cu_q.to(torch.int64)
    seq = torch.searchsorted(cu64[1:], tok, right=True).clamp_(max=max(batch - 1, 0))
    pos = seqused_k.to(torch.int64)[seq] - q_lens[seq] + (tok - cu64[seq])
    pos = pos.clamp_(0, table.shape[1] * block_size - 1)  # padding rows (dropped below) stay in range
    table = table.clamp(min=0)  # unallocated entries are -1; never read past seqused_k
    slots = table.to(torch.int64)[seq, pos // block_size] * block_size + pos % block_size
    slots = torch.where(tok < cu64[-1], slots, torch.full_like(slots, -1))  # padding rows: skipped
    kvd.reshape_and_cache_flash(k_new, v_new, k_cache, v_cache, slots)
    max_k = table.shape[1] * block_size  # transformers passes 1 here; an upper bound is what is asked
    return kvd.flash_attn_varlen_func(q, k_cache, v_cache, max(max_q, 1), cu_q, max_k, seqused_k=seqused_k,
                                      block_table=table, **attn)
