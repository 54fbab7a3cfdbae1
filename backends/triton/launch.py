"""Direct launches of compiled Triton kernels: the one place that reaches past Triton's per-call
binding (``kernel[grid](...)`` costs tens of microseconds of host time for a kernel with many
arguments). The callers key each compiled kernel by everything it was specialized on (see
``attention._Prepared`` and ``write._Plan``); this module only launches it."""

from __future__ import annotations

import torch
import triton


def no_launch_hooks() -> bool:
    """No profiler hook is installed (triton >= 3.5 keeps an empty HookChain, older ones None):
    a direct launch may skip the launch metadata the hooks would receive."""
    knobs = triton.knobs.runtime
    for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def direct(compiled) -> tuple:
    """``(launch, head)`` for a compiled kernel: ``launch(gx, gy, gz, stream, *head, *args)`` runs it
    with ``args`` in its signature's order (constexpr slots included, ignored). Where the launcher
    is Triton 3.x's ``CudaLauncher`` with no scratch memory to allocate, its C entry point is called
    without the Python wrapper (about 1 us per call); anything else goes through ``compiled.run``."""
    run = compiled.run
    raw = getattr(run, "launch", None)
    if (raw is not None and type(run).__name__ == "CudaLauncher" and not getattr(run, "global_scratch_size", 1)
            and not getattr(run, "profile_scratch_size", 1) and hasattr(run, "launch_pdl")):
        return raw, (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                     compiled.packed_metadata, None, None, None)
    return run, (compiled.function, compiled.packed_metadata, None, None, None)


def keep(cache: dict, key, compiled) -> None:
    """Remember ``compiled`` under ``key`` as ``(launch, head)`` when this Triton returns a compiled
    kernel that can be launched directly (the interpreter does not)."""
    if hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
        cache[key] = direct(compiled)


def stream(device: int):
    """The current stream of ``device`` as the raw handle launches take."""
    return torch._C._cuda_getCurrentRawStream(device)
