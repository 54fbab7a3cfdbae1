"""`kvdispatch bench` on the CPU: the command, its JSON, and the rule that every result is checked
against the reference before it is timed (wrong vendors are reported WRONG, never timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import kvdispatch
import kvdispatch.cli
from kvbench.cases import Case, Workload, default_suite, quick_suite, select_cases
from kvbench.cli import bench as main, run_bench as run
from kvbench.compare import force_backend
from kvbench.vendors import KvdispatchImpl, Unsupported, Vendor, discover_vendors
from kvdispatch.registry import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_quick_json(tmp_path):
    """The issue's command works on the CPU and its JSON holds a checked, timed row per case."""
    out = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    md = tmp_path / "out.md"
    rc = kvdispatch.cli.main(["bench", "--device", "cpu", "--quick", "--json", str(out), "--plot", str(plot),
                              "--markdown", str(md), "--rep-ms", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["info"]["copy"]["GBps"] > 0 and data["info"]["matmul"]["TFLOPs"] > 0
    cases = {c.id for c in quick_suite()}
    ref_rows = [r for r in data["rows"] if r["impl"] == "kvdispatch[reference]"]
    assert {r["case"] for r in ref_rows} == cases
    for r in ref_rows:
        assert r["status"] == "ok", r
        assert r["us"] > 0 and r["GBps"] > 0 and r["pct_copy"] > 0
        if r["op"] in ("decode", "prefill", "mixed"):
            assert r["TFLOPs"] > 0 and r["rel_err"] is not None and r["rel_err"] < 3e-2
    # the torch baselines ran, were checked, and are not "vendors"
    naive = [r for r in data["rows"] if r["impl"] == "torch naive write"]
    assert naive and all(r["status"] == "ok" for r in naive), naive
    assert all(r["vs_best_vendor"] is None for r in data["rows"])
    names = {v["name"]: v for v in data["implementations"]}
    assert not names["flag_gems"]["available"] and "cpu" in names["flag_gems"]["reason"]
    assert {"write", "decode"} <= {o["op"] for o in data["overhead"]}
    assert plot.stat().st_size > 10_000
    text = md.read_text()
    assert "## write" in text and "## decode" in text and "## Dispatch overhead" in text


def test_vendor_discovery():
    names = {v.name for v in discover_vendors()}
    assert {"flag_gems", "vllm-C", "vllm-triton", "flashinfer", "flashinfer-tc", "flash-attn", "ipex",
            "torch naive write", "torch SDPA (pre-gathered K/V)"} <= names
    ipex = registry.get("ipex")  # IPEX is also a kvdispatch backend (XPU only, low priority)
    assert ipex.priority < registry.get("triton").priority
    assert ipex.available(kvdispatch.platform_of(torch.device("cpu"))) is not None


# -- fakes: a vendor that writes to the wrong place, one returning wrong attention, one that
# leaves outputs unwritten, one that cannot run, one that crashes, and one correct "vendor" ---
class _WrongSlotWrite(Vendor):
    name, platforms, ops = "fake-wrong-slot", ("*",), ("write",)

    def prepare(self, op, w):
        def fn():
            with torch.no_grad():
                shifted = (w.slot_mapping + 1) % (w.key_cache.shape[0] * w.key_cache.shape[1])
                kvdispatch.reshape_and_cache_flash(w.key, w.value, w.key_cache, w.value_cache, shifted)
        return fn


class _ScaledAttention(Vendor):
    name, platforms, ops = "fake-scaled-attention", ("*",), ("decode",)

    def prepare(self, op, w):
        kw = w.public_attention_kwargs()
        return lambda: kvdispatch.flash_attn_varlen_func(**kw) * 1.1


class _Unwritten(Vendor):
    name, platforms, ops = "fake-unwritten", ("*",), ("decode",)

    def prepare(self, op, w):
        out = w.new_out()

        def fn():
            kvdispatch.flash_attn_varlen_func(**w.public_attention_kwargs(out))
            out[0, 0, 0] = float("nan")  # one element never written
            return out
        return fn


class _Declines(Vendor):
    name, platforms, ops = "fake-declines", ("*",), ("write", "decode")

    def prepare(self, op, w):
        raise Unsupported("no HND here")


class _Crashes(Vendor):
    name, platforms, ops = "fake-crashes", ("*",), ("write",)

    def prepare(self, op, w):
        return lambda: 1 / 0


class _CorrectVendor(Vendor):
    name, platforms, ops = "fake-correct", ("*",), ("write", "decode")

    def prepare(self, op, w):
        if op == "write":
            a = (w.key, w.value, w.key_cache, w.value_cache, w.slot_mapping, w.kv_cache_dtype, w.k_scale, w.v_scale)
            return lambda: kvdispatch.reshape_and_cache_flash(*a)
        kw = w.public_attention_kwargs()
        return lambda: kvdispatch.flash_attn_varlen_func(**kw)


def _fake_vendors():
    return [_WrongSlotWrite(), _ScaledAttention(), _Unwritten(), _Declines(), _Crashes(), _CorrectVendor()]


def test_third_party_vendors_through_entry_points(monkeypatch):
    """A package adds adapters through the harness's own ``kvbench.vendors`` entry-point group."""
    import importlib.metadata

    from kvbench import vendors

    class _EP:
        name, value = "fake", "fake_pkg:vendors"

        def load(self):
            return _fake_vendors

    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [_EP()] if kw.get("group") == vendors.ENTRY_POINTS else real(**kw))
    names = {v.name for v in discover_vendors()}
    assert {v.name for v in _fake_vendors()} <= names and "flag_gems" in names
    with pytest.raises(ValueError, match="two benchmark vendors"):
        discover_vendors([_Crashes()])


def test_wrong_vendors_are_reported_and_never_timed():
    res = run(["--device", "cpu", "--quick", "--ops", "write,decode", "--layouts", "NHD", "--dtypes", "bf16",
               "--impls", "fake,kvdispatch", "--rep-ms", "1", "--no-overhead"], extra_vendors=_fake_vendors())
    rows = {(r["case"], r["impl"]): r for r in res["rows"]}
    write = next(c.id for c in quick_suite() if c.op == "write" and c.layout == "NHD" and c.dtype == "bf16")
    decode = next(c.id for c in quick_suite() if c.op == "decode" and c.layout == "NHD" and c.dtype == "bf16")
    r = rows[(write, "fake-wrong-slot")]
    assert r["status"] == "WRONG" and "bytes differ" in r["reason"] and r["us"] is None
    r = rows[(decode, "fake-scaled-attention")]
    assert r["status"] == "WRONG" and "relative error" in r["reason"] and r["us"] is None
    r = rows[(decode, "fake-unwritten")]
    assert r["status"] == "WRONG" and "NaN" in r["reason"] and r["us"] is None
    assert rows[(write, "fake-declines")]["status"] == "unsupported"
    assert rows[(write, "fake-declines")]["reason"] == "no HND here"
    r = rows[(write, "fake-crashes")]
    assert r["status"] == "error" and "ZeroDivisionError" in r["reason"]
    # the only correct vendor is the best vendor; kvdispatch rows get their ratio to it
    for case in (write, decode):
        good = rows[(case, "fake-correct")]
        assert good["status"] == "ok" and good["vs_best_vendor"] == pytest.approx(1.0)
        mine = rows[(case, "kvdispatch[reference]")]
        assert mine["vs_best_vendor"] == pytest.approx(good["us"] / mine["us"])


def test_main_fails_when_kvdispatch_is_wrong(monkeypatch):
    """Exit status 1 when a kvdispatch backend's own result is WRONG (what CI lanes rely on)."""
    from kvbench import cases as bench_cases

    real = bench_cases.Workload.check

    def flaky(self, result):
        why = real(self, result)
        return why or "planted failure"

    monkeypatch.setattr(bench_cases.Workload, "check", flaky)
    assert main(["--device", "cpu", "--quick", "--ops", "write", "--layouts", "NHD", "--dtypes", "bf16",
                 "--tokens", "16", "--impls", "kvdispatch", "--rep-ms", "1", "--no-overhead"]) == 1


def test_overhead_only_mode(tmp_path, monkeypatch):
    """``--overhead-only``: the dispatch-overhead table alone, as JSON and markdown."""
    from kvbench import runner

    monkeypatch.setattr(runner, "overhead_cases", lambda quick, more: [
        Case("write", num_kv_heads=1, head_size=16, block_size=16, tokens=4)])
    out, md = tmp_path / "oh.json", tmp_path / "oh.md"
    assert main(["--overhead-only", "--device", "cpu", "--quick", "--impls", "kvdispatch", "--json", str(out),
                 "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["overhead"]
    assert all(o["op"] == "write" and o["us"] > 0 for o in data["overhead"]), data["overhead"]
    assert "## Dispatch overhead" in md.read_text()


def test_tune_attention_smoke(tmp_path):
    """``--tune attention --quick``: the sweep's machinery at tiny sizes on the CPU (every row checked
    against the reference before it is timed)."""
    out = tmp_path / "tune.json"
    assert main(["--tune", "attention", "--quick", "--device", "cpu", "--sections", "copy,tiles",
                 "--tiles", "decode:16,64,4,2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["info"]["copy_GBps"] > 0 and data["info"]["command"].startswith("kvdispatch bench --tune attention")
    (row,) = data["results"]
    assert row["section"] == "tiles" and "error" not in row and row["us"] > 0 and row["rel_err"] < 3e-2


def test_byte_and_flop_counts():
    w = Workload.build(Case("write", num_kv_heads=2, head_size=64, block_size=16, tokens=10), "cpu")
    assert w.bytes == 10 * 2 * (64 + 64) * (2 + 2) + 10 * 8
    w = Workload.build(Case("write", dtype="fp8", num_kv_heads=2, head_size=64, block_size=16, tokens=10), "cpu")
    assert w.bytes == 10 * 2 * 128 * (2 + 1) + 10 * 8
    w = Workload.build(Case("mla-write", layout="MLA", kv_lora_rank=32, rope_dim=8, tokens=5), "cpu")
    assert w.bytes == 5 * 40 * 4 + 5 * 8
    c = Case("decode", num_q_heads=4, num_kv_heads=2, head_size=32, block_size=16, batch=3, kv_len=40)
    w = Workload.build(c, "cpu")
    assert w.bytes == 3 * 40 * 2 * 64 * 2 + 3 * 4 * 64 * 2
    assert w.flops == 2 * 3 * 40 * 4 * 64
    # causal, q_len 3 of kv_len 5 (bottom-right): rows see 3, 4, 5 keys
    c = Case("mixed", num_q_heads=1, num_kv_heads=1, head_size=16, block_size=16, batch=1, prefills=1, q_len=3, kv_len=5)
    assert Workload.build(c, "cpu").flops == 2 * (3 + 4 + 5) * 32


class _Bf16QOnly(Vendor):
    """A correct attention adapter that was written for bf16 q: the runner must not hand it an fp8 one."""
    name, platforms, ops = "fake-bf16-q", ("*",), ("prefill",)
    prepared = 0  # prepare calls, per instance

    def prepare(self, op, w):
        self.prepared += 1
        kw = w.public_attention_kwargs()
        return lambda: kvdispatch.flash_attn_varlen_func(**kw)


class _Fp8Q(_Bf16QOnly):
    name, fp8_q = "fake-fp8-q", True


def test_fp8q_prefill_workload_and_rows():
    """dtype "fp8q": q quantized per tensor to the cache's fp8 type (vLLM's FA3 convention), bf16 out; kvdispatch
    checks ok against the reference, an implementation without ``fp8_q`` is "unsupported" before ``prepare``."""
    from kvbench.layouts import fp8_max
    from kvbench.runner import run_case
    from kvbench.vendors.torch_baselines import SdpaGathered
    from kvdispatch.platform import interpreting

    case = next(c for c in quick_suite() if c.dtype == "fp8q")
    assert case.op == "prefill" and case.kv_cache_dtype == "fp8" and case.act_dtype == torch.bfloat16
    w = Workload.build(case, "cpu")
    assert w.q.dtype == torch.float8_e4m3fn and w.key_cache.dtype == torch.float8_e4m3fn
    assert w.q_descale.dtype == torch.float32 and w.q_descale.shape == (1,)
    assert w.q.float().abs().amax() == fp8_max(torch.float8_e4m3fn)  # the largest |q| maps to the fp8 max
    assert w.k_descale.shape == (case.batch, case.num_kv_heads)
    assert w.new_out().dtype == torch.bfloat16 and w.gathered_kv()[0][0].dtype == torch.bfloat16
    total_q, kv = case.batch * case.q_len, case.batch * case.kv_len
    assert w.bytes == kv * 2 * 128 * 1 + total_q * 4 * (64 * 1 + 64 * 2)  # fp8 K/V and q, bf16 out
    # the same case with a bf16 q: the reference sees the quantized q, so it differs from it by q's rounding
    w16 = Workload.build(replace(case, dtype="fp8"), "cpu")
    assert w16.q_descale is None and w16.q.dtype == torch.bfloat16
    assert 1e-3 < (w.ref - w16.ref).norm() / w16.ref.norm() < 3e-2

    impls = [KvdispatchImpl(registry.get("reference"))]
    if interpreting():  # tests/conftest.py without a GPU: the Triton kernels on CPU tensors
        impls.append(KvdispatchImpl(registry.get("triton")))
    for impl in impls:
        r = run_case(case, w, impl, 1.0, 1.0, rep_ms=1)
        assert r["status"] == "ok" and r["rel_err"] < 3e-2 and r["us"] > 0, r
    bf16_q, fp8_q = _Bf16QOnly(), _Fp8Q()
    for impl in (bf16_q, SdpaGathered()):
        r = run_case(case, w, impl, 1.0, 1.0, rep_ms=1)
        assert r["status"] == "unsupported" and r["reason"] == "fp8 q (q_descale)" and r["us"] is None, r
    assert bf16_q.prepared == 0
    assert run_case(case, w, fp8_q, 1.0, 1.0, rep_ms=1)["status"] == "ok" and fp8_q.prepared == 1
    # the bf16-q adapter still runs the fp8 (bf16 q) case
    assert run_case(replace(case, dtype="fp8"), w16, _Bf16QOnly(), 1.0, 1.0, rep_ms=1)["status"] == "ok"


def test_fp8q_is_attention_only():
    """No suite has fp8q writes; a write case given "fp8q" is an fp8 write (writes have no q); every attention
    workload has ``q_descale``."""
    for suite in (default_suite(), quick_suite()):
        sel = select_cases(suite, dtypes="fp8q")
        assert sel and all(c.op in ("decode", "prefill", "mixed") for c in sel)
    ids = [c.id for c in default_suite()]
    fp8 = "prefill NHD fp8 B8xL2048 32q/8kv xD128 bs16 causal"
    assert ids[ids.index(fp8) + 1] == fp8.replace("fp8", "fp8q")
    with pytest.raises(ValueError, match="--dtypes"):
        select_cases(default_suite(), dtypes="fp8,int8")
    w = Workload.build(Case("write", dtype="fp8q", num_kv_heads=2, head_size=64, block_size=16, tokens=10), "cpu")
    assert w.kv_cache_dtype == "fp8" and w.k_scale is not None and w.key_cache.dtype == torch.float8_e4m3fn
    with force_backend("reference"):
        kvdispatch.reshape_and_cache_flash(w.key, w.value, w.key_cache, w.value_cache, w.slot_mapping,
                                           w.kv_cache_dtype, w.k_scale, w.v_scale)
    assert w.check(None) is None
    for c in quick_suite():
        if c.op in ("decode", "prefill", "mixed"):
            assert (Workload.build(c, "cpu").q_descale is None) == (c.dtype != "fp8q")


def test_suite_selection_and_anchors():
    suite = default_suite()
    ids = {c.id for c in suite}
    for t in (256, 4096, 32768):
        assert f"write NHD bf16 T{t} H8xD128 bs16" in ids
    assert "decode NHD bf16 B32xL4096 32q/8kv xD128 bs16" in ids
    assert "decode NHD bf16 B128xL4096 32q/8kv xD128 bs16" in ids
    assert "prefill NHD bf16 B8xL2048 32q/8kv xD128 bs16 causal" in ids
    sel = select_cases(suite, ops="write", layouts="HND", tokens="100,200")
    assert {(c.layout, c.tokens) for c in sel} == {("HND", 100), ("HND", 200)}
    assert all(c.dtype in ("bf16", "fp8") for c in sel)
    sel = select_cases(suite, ops="decode", layouts="NHD", dtypes="bf16", decode="2x64")
    assert {(c.batch, c.kv_len, c.block_size) for c in sel} == {(2, 64, 16), (2, 64, 64)}
    sel = select_cases(suite, sizes="B8xL2048")
    assert sel and all(c.op == "prefill" for c in sel)
    with pytest.raises(ValueError, match="--ops"):
        select_cases(suite, ops="attention")


def test_gpu_check_and_lane_scripts_parse():
    for script in ("benchmarks/gpu_check.sh", "ci/lanes/cpu.sh", "ci/lanes/nvidia.sh", "ci/lanes/rocm.sh",
                   "ci/lanes/xpu.sh"):
        path = os.path.join(ROOT, script)
        assert os.path.exists(path), script
        subprocess.run(["bash", "-n", path], check=True)


def test_ipex_backend_declares_what_it_serves():
    """IPEX as a kvdispatch backend: XPU only, below our own XPU and Triton backends, and it
    declines (with a reason) every cache its PagedAttention cannot address."""
    from kvbench.layouts import make_kv_cache
    from kvdispatch.backends.xpu.ipex import IpexBackend
    from kvdispatch.platform import Platform

    xpu = Platform(name="xpu", device_type="xpu", arch="Intel(R) Data Center GPU Max 1550")
    b = IpexBackend()
    assert "XPU" in b.available(Platform(name="cpu", device_type="cpu"))
    assert b.available(xpu) is not None  # IPEX is not installed here: the reason says so
    assert "intel_extension_for_pytorch" in b.available(xpu)
    assert b.priority < registry.get("triton").priority < registry.get("xpu-sycl").priority
    nhd = kvdispatch.KVCacheDescriptor.from_tensors(*make_kv_cache("NHD", 4, 16, 2, 64))
    hnd = kvdispatch.KVCacheDescriptor.from_tensors(*make_kv_cache("HND", 4, 16, 2, 64))
    k8, v8 = make_kv_cache("NHD", 4, 16, 2, 64, dtype=torch.float8_e4m3fn)
    fp8 = kvdispatch.KVCacheDescriptor.from_tensors(k8, v8, "fp8", torch.ones(1), torch.ones(1))
    assert b.supports("reshape_and_cache_flash", nhd, xpu) is None
    assert "packed" in b.supports("reshape_and_cache_flash", hnd, xpu)
    assert "fp8" in b.supports("flash_attn_varlen_func", fp8, xpu)


def test_decode_prefill_split_rebuilds_the_batch():
    """The split a vendor adapter runs as two kernels (flashinfer-tc: prefill wrapper + decode wrapper): each
    part's rows, cu_seqlens_q, page lists and block-table rows, attended on their own (reference backend) into
    their rows of one output, give the whole batch's result."""
    from types import SimpleNamespace
    from kvbench.vendors.common import decode_prefill_split, paged_kv_indptr
    case = Case("mixed", num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, batch=5, prefills=2,
                q_len=9, kv_len=40)
    w = Workload.build(case, "cpu")
    pre, dec = decode_prefill_split(w)
    assert (pre.seqs, dec.seqs) == (range(0, 2), range(2, 5))
    assert (pre.rows, dec.rows) == (slice(0, 18), slice(18, 21))
    out = w.new_out()
    for part in (pre, dec):
        b = slice(part.seqs.start, part.seqs.stop)
        kw = dict(w.public_attention_kwargs(out[part.rows]), q=w.q[part.rows], cu_seqlens_q=part.qo_indptr,
                  seqused_k=w.seqused_k[b], block_table=w.block_table[b])
        with force_backend("reference"):
            kvdispatch.flash_attn_varlen_func(**kw)
    torch.testing.assert_close(out.float(), w.ref, atol=2e-2, rtol=2e-2)
    # the parts' page lists are the whole batch's, cut at the split
    whole, parts = paged_kv_indptr(w), [paged_kv_indptr(w, p.seqs) for p in (pre, dec)]
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), whole[1])
    assert torch.equal(torch.cat([parts[0][2], parts[1][2]]), whole[2])
    assert torch.equal(parts[1][0] + parts[0][0][-1], whole[0][2:])
    # decodes first (vLLM's order) and interleaved kinds (no split)
    order = SimpleNamespace(q_lens=[1, 1, 1, 7, 0, 3], device=torch.device("cpu"))
    pre, dec = decode_prefill_split(order)
    assert (pre.seqs, dec.seqs, pre.rows, dec.rows) == (range(3, 6), range(0, 3), slice(3, 13), slice(0, 3))
    assert pre.qo_indptr.tolist() == [0, 7, 7, 10] and dec.qo_indptr.tolist() == [0, 1, 2, 3]
    assert decode_prefill_split(SimpleNamespace(q_lens=[1, 5, 1], device="cpu")) is None
    assert decode_prefill_split(SimpleNamespace(q_lens=[1, 1], device="cpu")) is None


@pytest.mark.parametrize("script", ["fp8_ab.py", "size_ceilings.py",
                                    pytest.param("mixed_ab.py", marks=pytest.mark.slow)])  # 90 s on 2 cores
def test_ab_scripts_smoke(script):
    """The GPU A/B scripts the tuning tables cite run end to end on the CPU (Triton interpreter, tiny
    sizes): every variant checked against the reference, none WRONG, none raising."""
    path = [ROOT, os.path.join(ROOT, "benchmarks")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--quick", "--device", "cpu"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) >= 3, r.stdout
    assert not [x for x in lines if "WRONG" in x or "Error" in x], r.stdout
