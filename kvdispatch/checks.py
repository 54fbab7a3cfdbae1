"""Value checks: they read tensor values (a device sync) and raise before anything is written. Their one
policy, :func:`checks_values`: before a backend that sets ``always_check_values`` (the reference; a test
lane that would write outside its buffers), and before every backend under ``KVDISPATCH_DEBUG=1``."""

from __future__ import annotations

from typing import Optional

import torch

from .descriptor import KVCacheDescriptor
from .hookspecs import AttentionArgs
from .platform import env_bytes


def debug() -> bool:
    """``KVDISPATCH_DEBUG=1``: every backend gets the value checks (and the duplicate-slot check)."""
    return env_bytes(b"KVDISPATCH_DEBUG") not in (None, b"", b"0")


def checks_values(backend) -> bool:
    """Does the public call run the value checks before ``backend``? The one policy."""
    return backend.always_check_values or debug()


def check_slot_values(slot_mapping: torch.Tensor, desc: KVCacheDescriptor) -> None:
    """Slots in range; under ``KVDISPATCH_DEBUG=1`` also no slot named twice (engines never repeat a slot
    in one call, so a repeat is a caller bug: the reference keeps the last token, GPU kernels any)."""
    if slot_mapping.numel():
        hi, total = int(slot_mapping.max()), desc.num_blocks * desc.block_size
        if hi >= total:
            raise ValueError(f"slot_mapping: slot {hi} is out of range: the cache has {desc.num_blocks} blocks x "
                             f"{desc.block_size} = {total} slots (negative slots mark padding)")
        if debug():
            valid = slot_mapping[slot_mapping >= 0]
            if repeats := valid.numel() - torch.unique(valid).numel():
                raise ValueError(f"slot_mapping: {repeats} slot(s) named more than once "
                                 "(each slot takes one token per call)")


def _lengths(cu: torch.Tensor, name: str, total: Optional[int]) -> torch.Tensor:
    """The lengths of offsets ``cu`` (``cu_seqlens_q`` / ``_k``), checked, and their end against ``total`` tokens."""
    cu = cu.long()
    if cu.numel() and (int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any())):
        raise ValueError(f"{name}: expected non-decreasing offsets starting at 0")
    if cu.numel() and total is not None and int(cu[-1]) > total:
        raise ValueError(f"{name}: last offset {int(cu[-1])} exceeds {name[-1]}'s {total} tokens")
    return cu[1:] - cu[:-1]


def _check_max(lens: torch.Tensor, limit: int, name: str, what: str, unit: str) -> None:
    longest = int(lens.max()) if lens.numel() else 0
    if longest > limit:
        raise ValueError(f"{name}: {limit} is below the longest {what} ({longest} {unit})")


def check_attention_values(args: AttentionArgs, desc: KVCacheDescriptor, total_q: Optional[int] = None) -> None:
    """Offsets, lengths against the max_seqlen and block-table capacity, live block ids in the cache."""
    lens = _lengths(args.cu_seqlens_q, "cu_seqlens_q", total_q)
    _check_max(lens, args.max_seqlen_q, "max_seqlen_q", "query", "tokens")
    if args.block_table is None:  # non-paged: the "cache" is one block of total_k tokens
        lens = _lengths(args.cu_seqlens_k, "cu_seqlens_k", desc.block_size)
        if args.seqused_k is not None and lens.numel():
            lens = torch.minimum(lens, args.seqused_k.long())
        return _check_max(lens, args.max_seqlen_k, "max_seqlen_k", "kv sequence", "keys")
    used, width = args.seqused_k.long(), args.block_table.shape[1]
    capacity = width * desc.block_size
    if used.numel() and (int(used.min()) < 0 or int(used.max()) > capacity):
        raise ValueError(f"seqused_k: expected lengths in [0, {capacity}] (block_table's {width} blocks x block_size "
                         f"{desc.block_size}), got range [{int(used.min())}, {int(used.max())}]")
    _check_max(used, args.max_seqlen_k, "max_seqlen_k", "kv sequence", "keys")
    live = torch.arange(width, device=used.device)[None, :] * desc.block_size < used[:, None]  # the blocks in use
    ids = args.block_table.long()[live]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= desc.num_blocks):
        raise ValueError(f"block_table: block ids must be in [0, {desc.num_blocks}) for the blocks a sequence uses, "
                         f"got range [{int(ids.min())}, {int(ids.max())}]")
