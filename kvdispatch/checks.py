"""Value-range checks: they read tensor values (a device sync), so only the reference runs them
always; other backends run them when ``KVDISPATCH_DEBUG=1``. They raise before anything is written."""

from __future__ import annotations

import torch

from .descriptor import KVCacheDescriptor
from .registry import AttentionArgs


def check_slot_values(slot_mapping: torch.Tensor, desc: KVCacheDescriptor) -> None:
    if slot_mapping.numel():
        hi = int(slot_mapping.max())
        total = desc.num_blocks * desc.block_size
        if hi >= total:
            raise ValueError(
                f"slot_mapping: slot {hi} is out of range: the cache has {desc.num_blocks} blocks x "
                f"{desc.block_size} = {total} slots (negative slots mark padding)"
            )


def check_attention_values(args: AttentionArgs, desc: KVCacheDescriptor) -> None:
    """Value checks (reference always; other backends with KVDISPATCH_DEBUG=1). Syncs."""
    cu = args.cu_seqlens_q.long()
    if cu.numel() and (int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any())):
        raise ValueError("cu_seqlens_q: expected non-decreasing offsets starting at 0")
    if args.block_table is None:
        ck = args.cu_seqlens_k.long()
        if ck.numel() and (int(ck[0]) != 0 or bool((ck[1:] < ck[:-1]).any())):
            raise ValueError("cu_seqlens_k: expected non-decreasing offsets starting at 0")
        if int(ck[-1]) > desc.block_size:  # non-paged: the "cache" is one block of total_k tokens
            raise ValueError(f"cu_seqlens_k: last offset {int(ck[-1])} exceeds k's {desc.block_size} tokens")
        return
    used = args.seqused_k.long()
    capacity = args.block_table.shape[1] * desc.block_size
    if used.numel() and (int(used.min()) < 0 or int(used.max()) > capacity):
        raise ValueError(
            f"seqused_k: expected lengths in [0, {capacity}] (block_table's {args.block_table.shape[1]} "
            f"blocks x block_size {desc.block_size}), got range [{int(used.min())}, {int(used.max())}]"
        )
    nblk = (used + desc.block_size - 1) // desc.block_size
    cols = torch.arange(args.block_table.shape[1], device=used.device)
    live = cols[None, :] < nblk[:, None]
    ids = args.block_table.long()[live]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= desc.num_blocks):
        raise ValueError(
            f"block_table: block ids must be in [0, {desc.num_blocks}) for the blocks a sequence uses, "
            f"got range [{int(ids.min())}, {int(ids.max())}]"
        )
