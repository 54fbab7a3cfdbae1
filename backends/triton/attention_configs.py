"""Launch configurations of the paged attention kernels, per platform.

The kernel (``attention.py``) is shared by every vendor; only these numbers differ. One program
owns ``block_m`` *rows* (a row is one (query token, query head) pair of one kv head, so the query
heads that share a kv head are packed into one tile) and walks the keys ``block_n`` at a time.

* ``decode`` tiles serve calls whose longest sequence has at most ``block_m`` rows (every q_len
  times the GQA group fits one tile: decode, small speculative steps); ``prefill`` tiles serve the
  rest (prefill and chunked-prefill batches). Each is a tuple of :class:`TileConfig` keyed by the
  largest head size it serves, so wide heads (192, 256, MLA's 576) take smaller tiles.
* ``split_programs_per_sm``: split-KV (flash-decoding) splits each sequence's keys until there are
  about this many programs per multiprocessor; ``split_min_keys``: no split is shorter than this
  (a split's fixed cost, the partial-result round trip and the reduction, must stay small).

Every entry says where its numbers come from: measured on which device (with the command that
measured them), or the vendor guidance it follows when no such device was available to us.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tables import lookup

__all__ = ["TileConfig", "AttentionConfig", "NVIDIA", "ROCM", "INTERPRETER", "DEFAULT", "config_for"]


@dataclass(frozen=True)
class TileConfig:
    max_head_size: int  # serves head sizes (max of Dk, Dv) up to this
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # split-KV fill target for this tile (0: the config's split_programs_per_sm); set where one
    # program takes a whole multiprocessor's shared memory or registers
    programs_per_sm: int = 0


@dataclass(frozen=True)
class AttentionConfig:
    decode: tuple
    prefill: tuple
    split_programs_per_sm: int
    split_min_keys: int
    source: str
    # decode tiles where V is read from K's tile (MLA's latent cache as both, ``v_aliases_k``): only
    # K's tile takes shared memory there; empty: the decode tiles
    decode_shared_kv: tuple = ()
    # tiles for the short sequences (at most block_m rows: the decodes of a mixed batch) of a prefill
    # launch; their buffers come on top of the prefill tile's (shared memory). Empty: none, the
    # prefill tile serves every sequence (platforms where the sum was not measured to fit)
    mixed: tuple = ()
    # prefill tiles over fp8 caches (their K/V tiles take half the shared memory); a head size none
    # of them serves takes the prefill tiles
    prefill_fp8: tuple = ()

    def tile(self, kind: str, head_size: int) -> TileConfig:
        tiles = getattr(self, kind)
        for t in tiles:
            if head_size <= t.max_head_size:
                return t
        if kind == "prefill_fp8":
            return self.tile("prefill", head_size)
        return tiles[-1] if tiles else self.tile("decode", head_size)


# NVIDIA, by compute capability ------------------------------------------------------------------
# H100 (sm90), measured with `kvdispatch bench --tune attention` (2026-11-22/23, then named
# benchmarks/attention_perf.py; torch 2.11, triton 3.6; the numbers and sweeps are in
# benchmarks/results/attention_h100.md). Decode: 128-key tiles, 4 warps, 2 stages (194 us at batch
# 32 x 4096 vs 200 us for 64-key tiles and 201-208 us for 256;
# fp8 e4m3 b32: 108 us, vs 114-178 us for 8 warps, 3 stages, 256-key tiles or 2-4 splits).
# Prefill head 128: 64x64, 4 warps, 2 stages, with the mixed tile below, measured on an H200
# (2026-12-02, `python3 benchmarks/mixed_ab.py`, benchmarks/results/h200_mixed_ab.txt): 8 x 2048
# causal 323 TFLOP/s (the H100 sweep's 128x32/4 warps/3 stages: 316 in the same run, 302 with the
# mixed tile; 128x64/4/2 317, 128x128/8/2-3 287-297); the suite's mixed batch (60 decodes + 4 x 512
# chunks, 4096 keys each) 548.9 us, against 570.5-694.0 for those tiles and 829.3 without the mixed
# tile (the kernel before the flat prefill grid and the mixed tile: 852.4 us, prefill 303 TFLOP/s).
# ptxas of triton 3.6 crashes (SIGSEGV) on some 3-stage kernels: the launcher retries with fewer stages.
# Head 64: not swept, the earlier 128x64 tile. Wide heads (MLA 576/512, also many-head MLA decode,
# whose 128 query rows per latent head take prefill tiles): 64x64, 8 warps, 1 stage, one program
# per SM when splitting (b4 x 16384, 128 heads: 122 us with 16 splits, 140 us with 32, 267 us for
# the earlier 32x32 tile; 2 stages do not fit in shared memory). Split-KV: whole waves of
# 2 programs per SM, >= 512 keys per split (the best split count of every swept case).
# Checked again on an H200 (2026-12-02, `python3 benchmarks/long_context_ab.py`, results in
# benchmarks/results/h200_long_context_ab.txt): B1 x 32768, 8 kv heads: the automatic count (32; 40.3-42.6 us,
# NHD and HND alike) is the best of 8-128 forced splits (40.2-79.9 us) and of 16x32..16x256 tiles with 2-8 warps and
# 1-3 stages (41.1 us and up).
# MLA decode (V read from K's tile): 16x64, 4 warps, 2 stages, measured on an H200 (2026-12-02,
# `kvdispatch bench --tune attention --sections copy,mla,tiles --tiles "mla16:..."`, results in
# benchmarks/results/h200_mla_tiles.md): B32 x 4096, 16 q heads, page 64: 70.3 us (graph), against
# 123.1 for the decode table's 16x32/8 warps/2 stages, 76.5 for 16x32/4/2, 85-93 for 64- and
# 128-key tiles with 8 warps, 71.1 with 3 stages; automatic splits (8) beat 4 and 16.
# Mixed (a decode inside a prefill launch): the decode tiles, wide heads at one stage (the prefill
# tile's pipeline already takes most of the shared memory there). H200, same run as the prefill tile:
# 16x128 gives the mixed batch 548.9 us against 648.6 for 16x64 (and 766.3 without).
# Prefill over fp8 caches, head 128: 128x64, 4 warps, 2 stages, measured on an H200 (2026-12-02,
# `python3 benchmarks/fp8_ab.py`, benchmarks/results/h200_fp8_ab.txt), 8 x 2048 causal, e4m3 cache: bf16 q
# 302 TFLOP/s, fp8 q (QK^T on the fp8 tensor cores) 458, against 250 / 351 for the bf16 table's 64x64/4/2
# and 231-281 / 312-387 for 128x64/8/2, 128x128/8/2, 64x128/4/2, 128x32/4/3; the mixed batch over an e4m3 cache
# 599.9 / 471.5 us against 693.9 / 557.6 with 64x64 (benchmarks/results/h200_fp8_mixed.txt).
_H100 = AttentionConfig(
    decode=(
        TileConfig(128, block_m=16, block_n=128, num_warps=4, num_stages=2),
        TileConfig(256, block_m=16, block_n=64, num_warps=4, num_stages=2),
        TileConfig(1024, block_m=16, block_n=32, num_warps=8, num_stages=2),
    ),
    prefill=(
        TileConfig(64, block_m=128, block_n=64, num_warps=8, num_stages=2),
        TileConfig(128, block_m=64, block_n=64, num_warps=4, num_stages=2),
        TileConfig(256, block_m=64, block_n=32, num_warps=4, num_stages=2),
        TileConfig(1024, block_m=64, block_n=64, num_warps=8, num_stages=1, programs_per_sm=1),
    ),
    split_programs_per_sm=2,
    split_min_keys=512,
    source="H100 80GB HBM3 (sm90): kvdispatch bench --tune attention, see benchmarks/results/attention_h100.md; "
           "MLA decode tile: H200, benchmarks/results/h200_mla_tiles.md; head-128 prefill and mixed tiles: H200, "
           "benchmarks/results/h200_mixed_ab.txt; fp8 prefill tile: H200, benchmarks/results/h200_fp8_tiles.txt",
    decode_shared_kv=(TileConfig(1024, block_m=16, block_n=64, num_warps=4, num_stages=2),),
    mixed=(
        TileConfig(128, block_m=16, block_n=128, num_warps=4, num_stages=2),
        TileConfig(256, block_m=16, block_n=64, num_warps=4, num_stages=2),
        TileConfig(1024, block_m=16, block_n=32, num_warps=4, num_stages=1),
    ),
    prefill_fp8=(TileConfig(128, block_m=128, block_n=64, num_warps=4, num_stages=2),),
)

NVIDIA = {
    (9, 0): _H100,
    # A100 (sm80): not measured here. 164 KB shared memory per SM (vs 228 KB on H100): the H100
    # tiles up to head 256 fit and are kept (the three-stage 128x32 prefill pipeline at head 128
    # needs well under 100 KB), but the H100's 64x64 MLA tile (its 2-stage form asked for 344 KB
    # on the H100; the 1-stage form's size was not read) may not fit, so wide heads keep the
    # earlier 32x32 tile; follows NVIDIA's Ampere tuning guide (cp.async
    # multi-stage pipelines).
    (8, 0): AttentionConfig(decode=_H100.decode,
                            prefill=_H100.prefill[:-1] + (TileConfig(1024, 32, 32, 8, 1),),
                            split_programs_per_sm=2, split_min_keys=512,
                            source="not measured; H100 tiles, fit A100 shared memory (Ampere tuning guide)"),
    # Ada (sm89): not measured here. 100 KB shared memory per SM: two pipeline stages for prefill.
    (8, 9): AttentionConfig(
        decode=_H100.decode,
        prefill=(TileConfig(64, 128, 64, 4, 2), TileConfig(128, 64, 64, 4, 2),
                 TileConfig(256, 64, 32, 4, 1), TileConfig(1024, 32, 16, 4, 1)),
        split_programs_per_sm=2, split_min_keys=512,
        source="not measured; H100 tiles shrunk to Ada's 100 KB shared memory (Ada tuning guide)"),
}

# ROCm (CDNA, wave64), by gfx arch ---------------------------------------------------------------
# Not measured here. AMD's ROCm Triton optimisation guide (MI300X workload tuning): flash-attention
# kernels on CDNA3 run 128x64 tiles with 4 waves (wave64) and num_stages 1 (LDS is 64 KB per CU,
# software pipelining in Triton's AMD backend is driven by stream-k/instruction scheduling
# rather than stages); decode with 64-row waves wants the kv tile wider than on NVIDIA.
_CDNA3 = AttentionConfig(
    decode=(
        TileConfig(128, block_m=16, block_n=64, num_warps=4, num_stages=1),
        TileConfig(256, block_m=16, block_n=32, num_warps=4, num_stages=1),
        TileConfig(1024, block_m=16, block_n=16, num_warps=4, num_stages=1),
    ),
    prefill=(
        TileConfig(128, block_m=128, block_n=64, num_warps=4, num_stages=1),
        TileConfig(256, block_m=64, block_n=32, num_warps=4, num_stages=1),
        TileConfig(1024, block_m=32, block_n=16, num_warps=4, num_stages=1),
    ),
    split_programs_per_sm=2,
    split_min_keys=512,
    source="not measured; AMD ROCm Triton optimisation guide for MI300X (wave64, num_stages 1)",
)
ROCM = {"gfx90a": _CDNA3, "gfx942": _CDNA3, "gfx950": _CDNA3}

# The CPU interpreter: small tiles so the kernel tests stay fast (and splitting exercised early).
INTERPRETER = AttentionConfig(
    decode=(TileConfig(1024, block_m=16, block_n=16, num_warps=1, num_stages=1),),
    # prefill rows twice the decode tile's: a mixed batch's decodes take the decode tile (as on GPUs)
    prefill=(TileConfig(1024, block_m=32, block_n=16, num_warps=1, num_stages=1),),
    split_programs_per_sm=1,
    split_min_keys=16,
    source="CPU interpreter: small tiles so the kernel tests stay fast",
    mixed=(TileConfig(1024, block_m=16, block_n=16, num_warps=1, num_stages=1),),
)

# Anything not in the tables (a newer GPU, Intel XPU through Triton): the H100 numbers.
DEFAULT = _H100


def config_for(platform, interpreting: bool = False) -> AttentionConfig:
    """The attention configuration for ``platform`` (a :class:`kvdispatch.Platform`)."""
    return lookup(platform, interpreting, NVIDIA, ROCM, _CDNA3, INTERPRETER, DEFAULT)
