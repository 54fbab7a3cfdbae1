#!/usr/bin/env bash
# compute-sanitizer over a representative subset of the GPU tests (the GPU machine; CUDA only):
#   memcheck  - out-of-bounds / misaligned global and shared accesses, on the write and attention
#               kernels: every layout of the matrix (NHD, HND, combined, cross-layer, diffkv,
#               head-major, MLA), fp8 (e4m3 / e5m2 / fnuz, uint8 views), split-KV (merge kernel),
#               ALiBi / sinks / LSE, hints below the real lengths, int64 offsets (a cache over 2^31
#               elements);
#   racecheck - shared-memory races, on the attention kernels (decode, split-KV, prefill tiles).
# PyTorch's caching allocator would hide an overrun inside one of its pooled blocks:
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation, so memcheck sees it.
# Each tool's summary and full log land in $OUT (default benchmarks/results/local):
# sanitize_memcheck.log, sanitize_racecheck.log, sanitize_summary.txt.
#
#   bash benchmarks/sanitize.sh              # both tools
#   TOOLS=memcheck bash benchmarks/sanitize.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CS=${COMPUTE_SANITIZER:-compute-sanitizer}
TOOLS=${TOOLS:-"memcheck racecheck"}
export PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 2; }

# -k selections of tests/gpu (test ids carry the case: layout, dtype, options), sized so that each
# tool ends within its limit on an H200 after a warm Triton cache (run gpu_check.sh's tests first):
# memcheck 51 tests, racecheck 6
MEMCHECK_K='(matrix_write_big and T1920 and (HND or head-major or diffkv or cross-layer or fnuz or uint8)) or (matrix_mla_big and (T2000] or e4m3))
 or (matrix_attention_big and (HND or combined or cross-layer or diffkv or mla-slices or fp8 or splits or varlen))
 or split_counts_agree or int64_offsets or (max_seqlen_k_below and 16 and not bf16)'
RACECHECK_K='(matrix_attention_big and (splits3 or alibi-head or HND-bfloat16-q91)) or split_counts_agree'
# per-tool limit in seconds (0: none); a tool cut off by it reports "timed out" instead of a summary
LIMIT_S=${SANITIZE_LIMIT_S:-0}

summary="$OUT/sanitize_summary.txt"
: >"$summary"
status=0
for tool in $TOOLS; do
  case "$tool" in
    memcheck) sel=$MEMCHECK_K; files="tests/gpu/test_triton_write_gpu.py tests/gpu/test_triton_attention_gpu.py" ;;
    racecheck) sel=$RACECHECK_K; files="tests/gpu/test_triton_attention_gpu.py" ;;
    *) echo "unknown tool $tool"; exit 2 ;;
  esac
  log="$OUT/sanitize_$tool.log"
  echo "== compute-sanitizer --tool $tool" | tee -a "$summary"
  # --target-processes all: pytest's process is the one launching; --error-exitcode makes
  # a finding fail the run even where the tests themselves pass
  timeout "$LIMIT_S" $CS --tool "$tool" --target-processes all --error-exitcode 99 --print-limit 50 \
    $PY -m pytest -q -m gpu -p no:cacheprovider $files -k "$(echo $sel)" >"$log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "timed out after $LIMIT_S s" | tee -a "$summary"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|error" "$log" | tail -5 | tee -a "$summary"
  echo "exit status: $rc" | tee -a "$summary"
  [ "$rc" = 0 ] || status=1
done
exit $status
