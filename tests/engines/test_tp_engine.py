"""``benchmarks/tp_engine.py`` under torchrun on the CPU (gloo): tensor-parallel continuous batching
through ``paged|kvdispatch`` over 2 ranks gives the single-device greedy tokens, and kvdispatch's ops
run per rank on a head share give the full-heads output (issue 14, items 2 and 3).

Each case launches ``python -m torch.distributed.run --standalone --nproc-per-node 2`` with this
interpreter (about 10 s each here) and reads the script's verdict line and exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tp_engine.py"


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "KVDISPATCH_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _verdict(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert lines, f"no verdict line (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return lines[-1]


def test_tensor_parallel_continuous_batching_matches_one_device():
    transformers = pytest.importorskip("transformers")
    from kvdispatch.integrations import transformers as kvd_tf
    try:
        kvd_tf._check_version(transformers.__version__)
    except RuntimeError as e:
        pytest.skip(str(e))
    proc = _torchrun("--mode", "engine")
    verdict = _verdict(proc)
    assert proc.returncode == 0 and verdict.startswith("PASS"), \
        f"{verdict}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert "tp_plan='auto' over 2 ranks" in verdict and "per rank 2 q / 1 kv heads" in verdict, verdict
    assert "ranks that returned results: [0, 1]" in proc.stdout


def test_ops_per_rank_on_a_head_share_match_full_heads():
    proc = _torchrun("--mode", "ops")
    verdict = _verdict(proc)
    assert proc.returncode == 0 and verdict.startswith("PASS"), \
        f"{verdict}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert "4 q / 2 kv heads each" in verdict, verdict
