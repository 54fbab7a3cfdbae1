"""The one lookup of a tuned table by platform (write and attention configs use it)."""

from __future__ import annotations


def lookup(platform, interpreting: bool, nvidia: dict, rocm: dict, rocm_default, interpreter, default):
    """``interpreter`` under TRITON_INTERPRET / on CPU; NVIDIA: the exact compute capability, else
    the closest lower one of the same major (sm86 -> sm80), else the closest lower one (sm100 ->
    sm90), else ``default``; ROCm: the gfx arch, else ``rocm_default``; anything else ``default``."""
    if interpreting or platform.name == "cpu":
        return interpreter
    if platform.name == "nvidia" and platform.capability is not None:
        cap = tuple(platform.capability)
        if cap in nvidia:
            return nvidia[cap]
        lower = [c for c in nvidia if c[0] == cap[0] and c <= cap] or [c for c in nvidia if c <= cap]
        return nvidia[max(lower)] if lower else default
    if platform.name == "rocm":
        return rocm.get((platform.arch or "").split(":")[0], rocm_default)
    return default
