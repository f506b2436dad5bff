"""The kernelspec pins CPU numerics only where the CPU can run the pinned code path."""

import json

from paper_lib import kernelspec


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbogomips\t: 1\n")
    assert kernelspec.cpu_flags(info) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert kernelspec.cpu_flags(tmp_path / "missing") == set()


def test_pin_only_on_avx2_cpus():
    assert kernelspec.pinned_cpu_env({"sse2", "avx"}) == {}  # forcing avx2 would crash
    assert kernelspec.pinned_cpu_env(set()) == {}  # non-x86 / unknown: leave defaults
    env = kernelspec.pinned_cpu_env({"avx2", "avx512f"})
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_installed_kernel_carries_quiet_log_and_env(tmp_path, monkeypatch):
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    path = kernelspec.install(prefix=str(tmp_path))
    spec = json.loads(path.read_text())
    assert spec["argv"].count("--IPKernelApp.log_level=ERROR") == 1
    assert spec["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    kernelspec.install(prefix=str(tmp_path))  # idempotent
    assert json.loads(path.read_text())["argv"].count("--IPKernelApp.log_level=ERROR") == 1


def test_precompile_writes_bytecode_despite_dontwritebytecode(tmp_path, monkeypatch, capfd):
    """With PYTHONDONTWRITEBYTECODE set (as on CI), a plain import caches nothing; the
    install step's precompile still leaves a .pyc; a module not installed is passed over and
    one that fails to import is reported, neither stops the install."""
    import subprocess
    import sys

    (tmp_path / "warm_me.py").write_text("X = 1\n")
    (tmp_path / "cold.py").write_text("Y = 2\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    subprocess.run([sys.executable, "-c", "import cold"], check=True, cwd=tmp_path)
    assert not (tmp_path / "__pycache__").exists()  # the failure mode being fixed
    (tmp_path / "broken.py").write_text("raise ImportError('half-installed')\n")
    kernelspec.precompile((("warm_me", "no_such_module_xyz"), ("broken",)))
    cached = {p.name.split(".")[0] for p in (tmp_path / "__pycache__").iterdir()}
    assert cached == {"warm_me", "broken"}  # compiled, then failed on running
    out = capfd.readouterr().out
    assert "no_such_module_xyz" not in out  # not installed: passed over quietly
    assert "skipped broken (ImportError: half-installed)" in out
