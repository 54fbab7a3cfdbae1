"""Small helpers shared by the vendor adapters."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import Unsupported


def base(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def ones(device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def require_4d(w) -> None:
    if w.key_cache.dim() != 4 or w.value_cache.dim() != 4:
        raise Unsupported("head-major (5-D) key cache")


def nhd_or_hnd(cache: torch.Tensor):
    """("NHD", cache) when the token stride exceeds the head stride, else ("HND", the
    [blocks, heads, block_size, dim] view): how kernels with a layout flag want a 4-D cache."""
    if cache.stride(1) >= cache.stride(2):
        return "NHD", cache
    return "HND", cache.permute(0, 2, 1, 3)


def uniform_descale(w):
    """fp8 attention: the one scalar k/v descale, or Unsupported for per-(sequence, head) descales."""
    if w.k_descale is None:
        return None, None
    k, v = w.k_descale, w.v_descale
    if bool((k != k.flatten()[0]).any()) or bool((v != v.flatten()[0]).any()):
        raise Unsupported("per-(sequence, kv head) k/v descales")
    return float(k.flatten()[0]), float(v.flatten()[0])


def cu_seqlens_k(w) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(w.seqused_k, 0, dtype=torch.int32), (1, 0))


def paged_kv_indptr(w, seqs=None):
    """FlashInfer-style page lists of sequences ``seqs`` (a range; all by default): (indptr int32
    [n+1], indices int32 [pages], last_page_len int32 [n])."""
    bs = w.case.block_size
    seqs = range(len(w.kv_lens)) if seqs is None else seqs
    pages = {b: -(-w.kv_lens[b] // bs) for b in seqs}
    indptr = [0]
    for b in seqs:
        indptr.append(indptr[-1] + pages[b])
    indices = torch.cat([w.block_table[b, :pages[b]] for b in seqs])
    last = [(w.kv_lens[b] - 1) % bs + 1 for b in seqs]
    dev = w.device
    return (torch.tensor(indptr, dtype=torch.int32, device=dev), indices.to(torch.int32),
            torch.tensor(last, dtype=torch.int32, device=dev))


class Part(NamedTuple):
    """Sequences ``seqs`` (a range) of a batch: their q rows and their own ``cu_seqlens_q`` (from 0)."""
    seqs: range
    rows: slice
    qo_indptr: torch.Tensor


def decode_prefill_split(w):
    """(prefills, decodes) as two :class:`Part` when the sequences of one query and the others each
    form one run (vLLM orders a batch decodes first; the suite's mixed case has its prefills first),
    as an engine splits a mixed batch between a prefill and a decode kernel; None otherwise."""
    one = [q == 1 for q in w.q_lens]
    n = len(one)
    k = one.index(not one[0]) if (not one[0]) in one else n
    if k == n or any(o == one[0] for o in one[k:]):
        return None  # one kind only, or the kinds interleave
    starts = [0]
    for q in w.q_lens:
        starts.append(starts[-1] + q)

    def part(a, b):
        cu = torch.tensor([s - starts[a] for s in starts[a:b + 1]], dtype=torch.int32, device=w.device)
        return Part(range(a, b), slice(starts[a], starts[b]), cu)
    first, second = part(0, k), part(k, n)
    return (second, first) if one[0] else (first, second)


def vllm_cache(cache: torch.Tensor) -> torch.Tensor:
    """vLLM's convention (which FlagGems follows): an fp8 cache is handed over as a uint8 view."""
    return cache.view(torch.uint8) if cache.element_size() == 1 and cache.dtype != torch.uint8 else cache


def vllm_write_args(w) -> tuple:
    """vLLM's ``reshape_and_cache_flash`` arguments for a write workload (FlagGems takes the same):
    4-D caches as given (fp8 as uint8 views), the scales always passed (ones for "auto")."""
    require_4d(w)
    one = ones(w.device)
    return (w.key, w.value, vllm_cache(w.key_cache), vllm_cache(w.value_cache), w.slot_mapping, w.kv_cache_dtype,
            one if w.k_scale is None else w.k_scale, one if w.v_scale is None else w.v_scale)


def vllm_mla_args(w) -> tuple:
    """vLLM's ``concat_and_cache_mla`` arguments for an MLA write workload."""
    return (w.kv_c, w.k_pe, vllm_cache(w.kv_cache), w.slot_mapping, w.kv_cache_dtype,
            ones(w.device) if w.scale is None else w.scale)
