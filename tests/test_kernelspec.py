"""The kernelspec pins CPU numerics only where the CPU can run the pinned code path."""

import json
from pathlib import Path

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
    assert env.pop("TORCHINDUCTOR_CACHE_DIR")  # see the next test
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT",
                   "ONEDNN_MAX_CPU_ISA": "AVX2",  # STRICT: independent of the thread count
                   "OPENBLAS_CORETYPE": "Haswell"}  # NumPy's float64 products


def test_pinned_processes_keep_their_own_compile_cache():
    """torch.compile code of pinned (AVX2) processes is cached apart from inductor's default
    cache, which unpinned processes on this machine fill with AVX-512 code: inductor does
    not key CPU code on ATEN_CPU_CAPABILITY, and mixing them corrupted the heap. The test
    process runs pinned (tests/conftest.py), so it uses the separate cache too."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = kernelspec.pinned_cpu_env({"avx2"})["TORCHINDUCTOR_CACHE_DIR"]
    assert os.path.dirname(cache) == os.path.dirname(default_cache_dir())
    assert cache != default_cache_dir()
    if "avx2" in kernelspec.cpu_flags():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == cache


def test_installed_kernel_carries_quiet_log_and_env(tmp_path, monkeypatch):
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    path = kernelspec.install(prefix=str(tmp_path))
    spec = json.loads(path.read_text())
    assert spec["argv"].count("--IPKernelApp.log_level=ERROR") == 1
    assert spec["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    kernelspec.install(prefix=str(tmp_path))  # idempotent
    assert json.loads(path.read_text())["argv"].count("--IPKernelApp.log_level=ERROR") == 1


def test_stale_kernel_is_refreshed(tmp_path, monkeypatch):
    """A kernel installed before the pins changed (MKL_CBWR=AVX2, not strict) is reinstalled
    with today's; a current one is left alone, and a missing one is not created (kernels
    then inherit the driver's pinned env)."""
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    assert kernelspec.refresh_if_stale(prefix=str(tmp_path)) is None
    assert not kernelspec.kernel_json(prefix=str(tmp_path)).exists()
    path = kernelspec.install(prefix=str(tmp_path))
    assert kernelspec.refresh_if_stale(prefix=str(tmp_path)) is None
    spec = json.loads(path.read_text())
    spec["env"]["MKL_CBWR"] = "AVX2"
    path.write_text(json.dumps(spec))
    assert kernelspec.refresh_if_stale(prefix=str(tmp_path)) == "MKL_CBWR AVX2 -> AVX2,STRICT"
    assert json.loads(path.read_text())["env"] == kernelspec.pinned_cpu_env({"avx2"})
    assert kernelspec.refresh_if_stale(prefix=str(tmp_path)) is None


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


def test_missing_pins_names_each_pin_a_process_lacks(monkeypatch):
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    pins = kernelspec.pinned_cpu_env({"avx2"})
    assert kernelspec.missing_pins(pins) == {}
    assert kernelspec.missing_pins({**pins, "MKL_CBWR": "AVX2"}) == {"MKL_CBWR": "AVX2,STRICT"}
    assert kernelspec.missing_pins({}) == pins
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"sse2"})
    assert kernelspec.missing_pins({}) == {}  # nothing to pin on a CPU without AVX2


def test_exec_pinned_replaces_only_an_unpinned_process(monkeypatch):
    """An unpinned process is replaced by the same command with the pins added (its other
    variables kept); a pinned one carries on."""
    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    execs = []
    monkeypatch.setattr(kernelspec.os, "execve", lambda *a: execs.append(a))
    pins = kernelspec.pinned_cpu_env({"avx2"})
    for name, value in pins.items():
        monkeypatch.setenv(name, value)
    kernelspec.exec_pinned("paper_lib.train", ["--steps", "3"])
    assert execs == []
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("PAPER_LIB_SOMETHING", "kept")
    kernelspec.exec_pinned("paper_lib.train", ["--steps", "3"])
    (path, args, env), = execs
    assert args == [path, "-m", "paper_lib.train", "--steps", "3"]
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["PAPER_LIB_SOMETHING"] == "kept"
    assert all(env[k] == v for k, v in pins.items())


def test_cpu_model_names_vendor_and_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
                    "flags\t\t: avx2\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n")
    assert kernelspec.cpu_model(info) == "AuthenticAMD: AMD EPYC"
    assert kernelspec.cpu_model(tmp_path / "missing")  # platform's name, or "unknown"


PROBE = "PAPER_LIB_PROBE_OPENBLAS"


def test_openblas_core_probe():
    """Run by the next test in a pytest of its own: the OpenBLAS kernels this test process
    got are the pinned ones."""
    import os

    import pytest

    from paper_lib.fingerprint import libraries

    if PROBE not in os.environ:
        pytest.skip("probe: run by test_pins_reach_openblas_before_any_plugin_loads_it")
    cores = set(libraries()["openblas_core"].values())
    assert cores == {kernelspec.PINNED_ENV["OPENBLAS_CORETYPE"]}, cores


def test_pins_reach_openblas_before_any_plugin_loads_it():
    """OpenBLAS reads OPENBLAS_CORETYPE once, when NumPy loads it, and tests/conftest.py sets
    the pins only after pytest's plugins have loaded (jaxtyping's imported NumPy, so the unit
    tests ran on the CPU's own OpenBLAS kernels until pyproject disabled it). A pytest started
    from a shell that lacks the variable gets the pinned kernels."""
    import os
    import subprocess
    import sys

    import pytest

    if "avx2" not in kernelspec.cpu_flags():
        pytest.skip("no AVX2: nothing is pinned")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q",
                          f"{__file__}::test_openblas_core_probe"],
                         env={**env, PROBE: "1"}, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:]
