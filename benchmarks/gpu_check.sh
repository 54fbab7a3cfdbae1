#!/usr/bin/env bash
# THE script for every GPU run (the device machine, the GPU CI lanes, a developer's workstation):
#   1. installs kvdispatch (editable, no deps) and, if .whl/ holds wheels (FlagGems and its needs),
#      those into /tmp/site;
#   2. prints the platform (nvidia-smi, `kvdispatch info`);
#   3. runs the GPU tests: pytest -m gpu;
#   4. runs the benchmark suite (`kvdispatch bench`), every result checked against the reference
#      before it is timed, writing <name>.json / .md / .png.
# Everything lands in $OUT (default benchmarks/results/local): gpu_check.log, pytest.log,
# <name>.json, <name>.md, <name>.png, info.txt -- six files (the device machine returns at most 8).
#
#   bash benchmarks/gpu_check.sh                       # tests + full suite
#   bash benchmarks/gpu_check.sh --skip-tests --ops write,decode --tokens 4096
#   BENCH_NAME=h100 bash benchmarks/gpu_check.sh        # name of the result files (default: from the GPU)
#
# Options (before any bench arguments): --skip-tests, --skip-bench, --quick (bench --quick, and
# pytest -m "gpu and not slow"). Every other argument is passed to `kvdispatch bench`.
# Env: PYTHON (default python3), PYTEST_TIMEOUT_S (default 420; a cold Triton cache: about 2 minutes
# on an H200 with 8 xdist workers), PYTEST_WORKERS (default: half the cores, at most 8, when
# pytest-xdist is installed; 0 = one process), BENCH_TIMEOUT_S (default 0 = none).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export KVDISPATCH_BENCH_INVOKED_BY="bash benchmarks/gpu_check.sh $*"
run_tests=1 run_bench=1 quick=0
bench_args=()
for a in "$@"; do
  case "$a" in
    --skip-tests) run_tests=0 ;;
    --skip-bench) run_bench=0 ;;
    --quick) quick=1; bench_args+=(--quick) ;;
    *) bench_args+=("$a") ;;
  esac
done
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  log "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { log "wheel install failed"; status=1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
log "== installing kvdispatch"
$PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { log "pip install -e . failed"; exit 2; }

{
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || \
    rocm-smi --showproductname 2>&1 || echo "(no nvidia-smi / rocm-smi)"
  $PY - <<'PYEOF'
import importlib.metadata as md
for d in ("torch", "triton", "flag_gems", "vllm", "flashinfer-python", "flash_attn", "intel_extension_for_pytorch"):
    try:
        print(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d} not installed")
PYEOF
  $PY -m kvdispatch.cli info
} 2>&1 | tee "$OUT/info.txt" >>"$LOG"
tail -n +1 "$OUT/info.txt" | head -20

if [ "$run_tests" = 1 ]; then
  marker="gpu"
  [ "$quick" = 1 ] && marker="gpu and not slow"
  log "== pytest -m '$marker'"
  # pytest-xdist where installed: Triton compiles dominate a cold run, and they run in parallel
  # over the workers (one GPU shared; PYTEST_WORKERS=0 runs in one process)
  workers=${PYTEST_WORKERS:-$($PY -c "import os, xdist; print(min(8, max(1, (os.cpu_count() or 2) // 2)))" 2>/dev/null || echo 0)}
  xd=(); [ "$workers" != 0 ] && xd=(-n "$workers")
  timeout "${PYTEST_TIMEOUT_S:-420}" $PY -m pytest -q "${xd[@]}" -m "$marker" -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -25
  rc=${PIPESTATUS[0]}
  tail -5 "$OUT/pytest.log" >>"$LOG"
  log "pytest exit status: $rc"
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1   # 5: no tests collected
fi

if [ "$run_bench" = 1 ]; then
  name=${BENCH_NAME:-$($PY -c "
import re, torch
n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
m = re.search(r'(H100|H200|H20|A100|L40S|MI300X|MI325X|MI250X|B200)', n)
print((m.group(1) if m else re.sub(r'[^A-Za-z0-9]+', '_', n)).lower())" 2>/dev/null || echo gpu)}
  log "== kvdispatch bench -> $OUT/$name.{json,md,png}"
  bt=${BENCH_TIMEOUT_S:-0}
  timeout "$bt" $PY -m kvdispatch.cli bench --json "$OUT/$name.json" --markdown "$OUT/$name.md" --plot "$OUT/$name.png" \
    "${bench_args[@]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "bench exit status: $rc"
  [ "$rc" = 0 ] || status=1
fi
log "== gpu_check.sh done, status $status"
exit $status
