#!/usr/bin/env bash
# CPU lane: exactly what this repository's .ci/run runs (reference backend, Triton kernels through
# TRITON_INTERPRET=1, SYCL kernels on Intel's OpenCL CPU device), then a quick benchmark smoke run
# whose JSON the workflow uploads.
#   bash ci/lanes/cpu.sh            # artifacts in ${ARTIFACTS:-ci-artifacts}
set -euo pipefail
cd "$(dirname "$0")/../.."
ARTIFACTS=${ARTIFACTS:-ci-artifacts}
mkdir -p "$ARTIFACTS"
bash .ci/run
"${VENV:-.venv}/bin/python" -m kvdispatch.cli bench --device cpu --quick --no-overhead \
  --json "$ARTIFACTS/bench-cpu.json" --markdown "$ARTIFACTS/bench-cpu.md"
