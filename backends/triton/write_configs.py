"""Launch configurations of the cache-write kernels, per platform.

The write kernels (``write.py``) are shared by every vendor; only these numbers differ. A write
is pure data movement (read each key/value row once, store it once), so a configuration says how
much data one program moves and with how many warps, and how small tiles may get so that a small
batch still spreads over the whole chip:

* ``num_warps``: warps (NVIDIA: 32 lanes; CDNA: 64-lane wavefronts) per program.
* ``tile_bytes``: bytes of input one program reads per tensor (K or V) at large batch sizes.
  Rows of the tile are whole head rows (or whole token rows on packed caches), rounded down to a
  power of two of them.
* ``min_programs_per_sm``: small batches shrink the tile (halving the rows) until there are at
  least this many programs per multiprocessor / compute unit, or one row per program.
* ``streaming``: mark the input loads evict-first and the cache stores streaming (``.cs``):
  neither is read again by this kernel, and keeping them out of L2 leaves it to the attention
  kernel that runs next.

Every entry says where its numbers come from: measured on which device (with the command that
measured them), or the vendor reference it follows when no such device was available to us.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from .tables import lookup

__all__ = ["WriteConfig", "NVIDIA", "ROCM", "INTERPRETER", "DEFAULT", "config_for"]


@dataclass(frozen=True)
class WriteConfig:
    num_warps: int
    tile_bytes: int
    min_programs_per_sm: int
    streaming: bool
    source: str
    # whole-token rows where the layout allows them (None: wherever it does; False: per-head rows)
    merge: Optional[bool] = None
    # the offset width (None: int32 where the descriptor and the inputs prove it fits; True: int64)
    offsets64: Optional[bool] = None

    def with_(self, **kw) -> "WriteConfig":
        return replace(self, **kw)


# NVIDIA, by compute capability ------------------------------------------------------------------
NVIDIA = {
    # H100 80GB HBM3 (sm90): measured. `kvdispatch bench --tune write --sections sweep` (2026-11-22, then
    # named benchmarks/write_perf.py; torch 2.11, triton 3.6; table in
    # benchmarks/results/write_h100_sweep.md): tiles of 2-32 KB with 4 or 8 warps all land within ~1.5%
    # of each other (93.1-95.0% of copy at 32768 tokens, 81-83% at 4096, 2.9 us at 256 in steady state); 4 KB x 8 warps is among the best for NHD (94.7%) and
    # HND (95.0%). Streaming hints gained nothing in steady state and cost ~2% cold.
    (9, 0): WriteConfig(num_warps=8, tile_bytes=4096, min_programs_per_sm=4, streaming=False,
                        source="measured: H100 80GB HBM3, kvdispatch bench --tune write --sections sweep (2026-11-22)"),
    # A100 (sm80): not measured here. NVIDIA's Ampere tuning guide gives the same advice for
    # memory-bound kernels as for Hopper (16-byte accesses, enough independent loads per SM to
    # cover the latency); the write is flat in the tile size on H100, so the H100 entry.
    (8, 0): WriteConfig(num_warps=8, tile_bytes=4096, min_programs_per_sm=4, streaming=False,
                        source="not measured; NVIDIA Ampere tuning guide (memory-bound), H100 entry"),
    # Ada (sm89, L40S / RTX 40xx): not measured here. GDDR6 at ~0.9 TB/s needs fewer bytes in flight
    # (Little's law); NVIDIA's Ada tuning guide keeps Ampere's memory-access advice: 4 warps.
    (8, 9): WriteConfig(num_warps=4, tile_bytes=4096, min_programs_per_sm=4, streaming=False,
                        source="not measured; NVIDIA Ada tuning guide (as Ampere), 4 warps for GDDR6"),
    # Blackwell (sm100, B200): not measured here. ~8 TB/s HBM3e: NVIDIA's Blackwell tuning guide asks
    # for more bytes in flight per SM than Hopper, so twice the H100 tile.
    (10, 0): WriteConfig(num_warps=8, tile_bytes=8192, min_programs_per_sm=4, streaming=False,
                         source="not measured; NVIDIA Blackwell tuning guide, twice the H100 tile"),
}

# ROCm (CDNA, wave64), by gfx arch ---------------------------------------------------------------
ROCM = {
    # MI200 (gfx90a): not measured here. AMD's CDNA2 ISA guide / ROCm performance guide: 64-lane
    # wavefronts, 4 waves (256 work-items) per workgroup for memory-bound kernels, 16-byte
    # global_load_dwordx4 per lane.
    "gfx90a": WriteConfig(num_warps=4, tile_bytes=8192, min_programs_per_sm=4, streaming=False,
                          source="not measured; AMD CDNA2 / ROCm tuning guide (wave64, 4 waves/WG)"),
    # MI300X (gfx942): not measured here. AMD's MI300X workload-optimisation guide: 304 CUs, wave64,
    # memory-bound kernels want 256-thread workgroups and ~16 KB in flight per workgroup.
    "gfx942": WriteConfig(num_warps=4, tile_bytes=16384, min_programs_per_sm=2, streaming=False,
                          source="not measured; AMD MI300X workload optimisation guide (wave64)"),
    # MI350 (gfx950): not measured here. Same CDNA guidance as MI300X (gfx950 keeps wave64 and 256
    # CUs); 8 TB/s HBM3E: twice the bytes in flight per workgroup.
    "gfx950": WriteConfig(num_warps=4, tile_bytes=32768, min_programs_per_sm=2, streaming=False,
                          source="not measured; AMD CDNA guidance as gfx942, twice the tile for HBM3E"),
}

# TRITON_INTERPRET=1 on CPU tensors: small tiles keep numpy's per-program work and the test lane
# fast while still giving several rows per program (so the row masks are exercised).
INTERPRETER = WriteConfig(num_warps=1, tile_bytes=512, min_programs_per_sm=1, streaming=False,
                          source="CPU interpreter: small tiles so the kernel tests stay fast")

# Anything not in the tables (a newer GPU, Intel XPU through Triton): the H100 numbers.
DEFAULT = NVIDIA[(9, 0)]


def config_for(platform, interpreting: bool = False) -> WriteConfig:
    """The write configuration for ``platform`` (a :class:`kvdispatch.Platform`)."""
    return lookup(platform, interpreting, NVIDIA, ROCM, ROCM["gfx942"], INTERPRETER, DEFAULT)
