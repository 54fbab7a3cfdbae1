import subprocess
import sys

from kvdispatch import cli


def test_info_lists_every_backend_and_selection(capsys):
    assert cli.main(["info", "-v"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "reshape_and_cache_flash", "flash_attn_varlen_func", "torch"):
        assert name in out
    assert "not a backend for platform 'cpu'" in out  # -v explains why triton is not chosen on cpu


def test_check_passes_on_cpu(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "FAIL" not in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "kvdispatch.cli", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Selected backend" in r.stdout
