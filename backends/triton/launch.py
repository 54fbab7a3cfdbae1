"""Direct launches of compiled Triton kernels: the one place that reaches past Triton's per-call
binding (``kernel[grid](...)`` costs tens of microseconds of host time for a kernel with many
arguments). The callers key each compiled kernel by everything it was specialized on (see
``attention._Prepared`` and ``write._Plan``); this module only launches it."""

from __future__ import annotations

import functools

import torch
import triton

_RUNTIME = triton.knobs.runtime


def no_launch_hooks() -> bool:
    """No profiler hook is installed (triton >= 3.5 keeps an empty HookChain, older ones None):
    a direct launch may skip the launch metadata the hooks would receive."""
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    # a HookChain answers with its list of hooks, a hook set the older way (a function) with itself
    return not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


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


@functools.lru_cache(maxsize=None)
def gatherer(params: str, pointers: tuple):
    """A function of ``params`` returning the raw pointers of a direct launch, or None when one is
    not 16-byte aligned (the compiled kernels assume it: such a call takes Triton's own launch).
    ``pointers``: per pointer argument of the kernel, the expression of a tensor in ``params``
    (``"out"``, ``"a.block_table"``), or None for an argument the kernel never reads in this
    specialization (passed as 0). Generated once per combination, as Triton binds its own
    launches: one ``data_ptr()`` per tensor and one test, where a loop over optional arguments
    costs about 1 us per call."""
    names = [f"x{i}" for i, e in enumerate(pointers) if e is not None]
    body = [f"    {n} = {e}.data_ptr()" for n, e in zip(names, (e for e in pointers if e is not None))]
    body.append(f"    if ({' | '.join(names) or '0'}) & 15:\n        return None")
    ptrs = ", ".join("0" if e is None else f"x{i}" for i, e in enumerate(pointers))
    body.append(f"    return ({ptrs},)")
    scope: dict = {}
    exec(f"def gather({params}):\n" + "\n".join(body), scope)  # noqa: S102 - our own fixed expressions
    return scope["gather"]
