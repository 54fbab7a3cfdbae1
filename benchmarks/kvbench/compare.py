"""The one check of an op's result against the reference backend, shared by the test matrix
(``tests/matrix.py``), ``kvdispatch check`` (``selfcheck.py``), the benchmark's check before timing
(``cases.Workload.check``) and the tuning sweeps (``tune_write.py``, ``tune_attention.py``).

The pieces, in the order a check uses them:

* :func:`force_backend`: run a call through one named backend (``"reference"`` for the truth);
* :func:`clone_views`: copies of cache views with the same strides (views of one buffer stay views
  of one buffer), optionally on another device, so the reference and the op under test each
  write their own caches from the same contents;
* :func:`cache_mismatch`: two WHOLE cache buffers (a write to a wrong place shows), bit-exact
  unless the write quantized to fp8: then codes may differ by one rounding step on rare ties;
* :func:`attention_mismatch`: an attention output (poisoned with NaN before the call) against the
  float32 reference by ``|out - ref| / |ref|`` (Frobenius norms), any NaN failing;
  :func:`lse_mismatch` the softmax LSE beside it.

The comparisons return ``None`` when the result is right, else what is wrong; each caller decides
what a wrong result is (a test assertion, a FAIL row, a WRONG row never timed).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

__all__ = ["force_backend", "base", "bases", "clone_views", "cache_mismatch", "caches_mismatch",
           "max_abs_error", "attention_mismatch", "lse_mismatch"]

# fp8 codes that differ by one (adjacent values: a rounding tie decided the other way) are
# accepted on fewer than this fraction of a buffer's elements
FP8_TIE_FRACTION = 0.02


@contextlib.contextmanager
def force_backend(name: Optional[str]):
    """Set ``KVDISPATCH_BACKEND`` for the duration (None: automatic selection)."""
    old = os.environ.get("KVDISPATCH_BACKEND")
    if name is None:
        os.environ.pop("KVDISPATCH_BACKEND", None)
    else:
        os.environ["KVDISPATCH_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KVDISPATCH_BACKEND", None)
        else:
            os.environ["KVDISPATCH_BACKEND"] = old


def base(t: torch.Tensor) -> torch.Tensor:
    """The buffer a view looks into (the tensor itself when it is not a view)."""
    return t if t._base is None else t._base


def bases(*views) -> list:
    """The distinct buffers under ``views``, in order of first appearance."""
    out = {}
    for v in views:
        if v is not None:
            out.setdefault(id(base(v)), base(v))
    return list(out.values())


def clone_views(*views, device=None) -> list:
    """Copies of ``views`` with the same shapes, strides and offsets into copies of their buffers
    (whole buffers, so what lies around a view is copied too); views of one buffer stay views of
    one new buffer. ``device``: where the copies live (default: where the views are)."""
    news = {}
    out = []
    for v in views:
        if v is None:
            out.append(None)
            continue
        b = base(v)
        if id(b) not in news:
            news[id(b)] = b.clone() if device is None else b.to(device, copy=True)
        nb = news[id(b)]
        out.append(nb.as_strided(v.shape, v.stride(), v.storage_offset() - b.storage_offset() + nb.storage_offset()))
    return out


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).to(torch.int16)


def _values(t: torch.Tensor, fp8_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """float32 values of a cache buffer; a uint8 buffer is read as ``fp8_dtype`` codes when given
    (else as the code numbers themselves: only equal codes are then equal values)."""
    t = t.contiguous()
    if t.dtype == torch.uint8 and fp8_dtype is not None:
        t = t.view(fp8_dtype)
    return t.float()


def cache_mismatch(got: torch.Tensor, want: torch.Tensor, fp8: bool = False,
                   fp8_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when cache buffer ``got`` holds what the reference buffer ``want`` holds, else what differs.

    Pass whole buffers (:func:`base` of the views). Not ``fp8`` (no quantizing write): every byte
    equal. ``fp8``: codes differing by one (a rounding tie) on fewer than 2% of the elements;
    codes further apart only where both values are equal (+0 / -0) or both below 1e-6. A uint8
    buffer is decoded as ``fp8_dtype`` (default: compared as codes).
    """
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{got.dtype}{tuple(got.shape)} vs the reference's {want.dtype}{tuple(want.shape)}"
    if not fp8:
        g, w = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
        diff = (g != w).flatten()
        n = int(diff.sum())
        if n:
            first = int(diff.to(torch.uint8).argmax())
            return f"{n} of {g.numel()} bytes differ from the reference, the first at byte {first}"
        return None
    diff = (_codes(got) - _codes(want)).abs()
    far = diff > 1
    if bool(far.any()):
        gv, wv = _values(got, fp8_dtype)[far], _values(want, fp8_dtype)[far]
        bad = (gv != wv) & ~((gv.abs() < 1e-6) & (wv.abs() < 1e-6))
        if bool(bad.any()):
            return f"{int(bad.sum())} fp8 values differ by more than one rounding step"
    frac = float((diff == 1).float().mean()) if diff.numel() else 0.0
    if frac >= FP8_TIE_FRACTION:
        return f"{frac:.1%} of fp8 values differ by one rounding step (expected rare ties)"
    return None


def caches_mismatch(got_views, want_views, fp8: bool = False,
                    fp8_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """:func:`cache_mismatch` over the buffers under two lists of corresponding views (e.g. the key
    and value caches an op wrote, and the reference's :func:`clone_views` of them); the op's
    buffers are compared where the reference's are."""
    for i, (g, w) in enumerate(zip(bases(*got_views), bases(*want_views))):
        why = cache_mismatch(g.to(w.device), w, fp8, fp8_dtype)
        if why:
            return f"cache buffer {i}: {why}"
    return None


def max_abs_error(got: torch.Tensor, want: torch.Tensor, fp8_dtype: Optional[torch.dtype] = None) -> float:
    """Largest ``|got - want|`` of two cache buffers, in the values they hold (a number to show)."""
    if not got.numel():
        return 0.0
    return float((_values(got.cpu(), fp8_dtype) - _values(want.cpu(), fp8_dtype)).abs().max())


def attention_mismatch(out: torch.Tensor, ref: torch.Tensor, tol: float):
    """``(None, relative error)`` when the attention output ``out`` matches the float32 reference
    ``ref`` (same shape, no NaN, ``|out - ref| / |ref| < tol``), else ``(what is wrong, error)``."""
    if tuple(out.shape) != tuple(ref.shape):
        return f"output shape {tuple(out.shape)}, expected {tuple(ref.shape)}", float("nan")
    out, ref = out.float(), ref.float().to(out.device)
    if bool(torch.isnan(ref).any()):
        return "the reference produced NaN", float("nan")
    nan = torch.isnan(out)
    if bool(nan.any()):
        return f"{int(nan.sum())} output elements are NaN (unwritten or invalid)", float("nan")
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-6))
    if not rel < tol:
        return f"relative error {rel:.2e} >= {tol:.0e}", rel
    return None, rel


def lse_mismatch(lse: torch.Tensor, ref: torch.Tensor, tol: float) -> Optional[str]:
    """None when a softmax LSE ``[Hq, rows]`` matches the reference's: no NaN, the same -inf rows
    (rows that see no key and no sink), elsewhere ``|lse - ref| < tol``; else what differs."""
    if bool(torch.isnan(lse).any()):
        return "lse has NaN (unwritten rows?)"
    empty = torch.isinf(ref)
    if not torch.equal(torch.isinf(lse), empty):
        return "lse -inf rows differ from the reference's"
    if bool((~empty).any()):
        err = float((lse - ref)[~empty].abs().max())
        if not err < tol:
            return f"lse error {err:.2e}"
    return None
