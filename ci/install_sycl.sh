#!/bin/bash
# Installs what the `sycl` test lane needs into a Python venv: Intel's SYCL runtime (headers with
# ESIMD, libsycl, libsycl-jit = DPC++'s run-time kernel compiler) and Intel's OpenCL CPU device.
# About 400 MB of wheels from PyPI; nothing else (the host shim is compiled by the system g++).
#
#   ci/install_sycl.sh [VENV]        # default: .venv
#
# Cache-friendly: does nothing when the pinned versions are already installed in VENV, and pip
# keeps the downloaded wheels in PIP_CACHE_DIR (point CI's cache at it). The kvdispatch shim finds
# the files through sys.prefix of that venv, or KVDISPATCH_SYCL_ROOT when installed elsewhere.
set -euo pipefail
VENV=${1:-.venv}
VERSION=2026.2.0
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "install_sycl.sh: no python at $PY" >&2; exit 2; }
have() { "$PY" -m pip show "$1" 2>/dev/null | grep -qx "Version: $VERSION"; }
if have intel-sycl-rt && have intel-opencl-rt && [ -f "$VENV/include/sycl/sycl.hpp" ]; then
  echo "install_sycl.sh: intel-sycl-rt/intel-opencl-rt $VERSION already in $VENV"
else
  "$PY" -m pip install -q "intel-sycl-rt==$VERSION" "intel-opencl-rt==$VERSION"
fi
command -v g++ >/dev/null || { echo "install_sycl.sh: g++ is needed to build the host shim" >&2; exit 2; }
