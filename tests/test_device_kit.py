"""The GPU-machine kit in .ci/: which wheels travel, and the session script's refusals."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheels_module():
    spec = importlib.util.spec_from_file_location("device_wheels", ROOT / ".ci/device_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _meta(name: str, version: str, *requires: str) -> dict:
    return {"name": name, "version": version, "requires_dist": list(requires)}


def test_walk_stops_at_the_image_and_follows_python_312_markers():
    dw = _wheels_module()
    meta = {dw.norm(m["name"]): m for m in [
        _meta("transformer-lens", "3.9.0", "torch>=2.6", "fancy-einsum>=0.0.3",
              "wandb>=0.13", "exceptiongroup>=1; python_version < '3.12'",
              "typeguard<5; python_version >= '3.12'"),
        _meta("fancy_einsum", "0.0.3"), _meta("exceptiongroup", "1.3"),
        _meta("typeguard", "4.6.0", "typing_extensions>=4", "importlib-metadata; "
              "python_version < '3.10'"),
        _meta("papermill", "2.7.0", "nbclient>=0.2", "black; extra == 'black'"),
        _meta("nbclient", "0.11.0", "Jupyter-Client>=6"),
        _meta("jupyter_client", "8.10.0"),
    ]}
    got = dw.needed(meta, ["transformer-lens<4", "papermill"])
    # torch and typing-extensions are in the image; wandb is skipped; exceptiongroup's marker
    # is false on 3.12; black only with the extra; names compare normalised.
    assert got == [("fancy_einsum", "0.0.3"), ("jupyter_client", "8.10.0"),
                   ("nbclient", "0.11.0"), ("papermill", "2.7.0"),
                   ("transformer-lens", "3.9.0"), ("typeguard", "4.6.0")]


def test_walk_follows_requested_extras():
    dw = _wheels_module()
    meta = {dw.norm(m["name"]): m for m in [
        _meta("papermill", "2.7.0", "black; extra == 'black'"), _meta("black", "25.1")]}
    assert dw.needed(meta, ["papermill[black]"]) == [("black", "25.1"), ("papermill", "2.7.0")]


def _session(*args: str, cwd: Path, work: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(cwd / "out"), "GPU_WORK": str(work or cwd / "work")}
    return subprocess.run([str(ROOT / ".ci/gpu_session.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_session_refuses_unknown_stage_and_missing_wheels(tmp_path):
    bad = _session("start", "env", "bench", "nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown plan or stage 'nonsense'" in bad.stdout
    mixed = _session("start", "kernels", "env", cwd=tmp_path)  # a plan stands alone
    assert mixed.returncode == 2 and "unknown plan or stage 'kernels'" in mixed.stdout
    none = _session("start", "env", cwd=tmp_path)  # no .whl/ in this folder
    assert none.returncode == 2 and "make device-wheels" in none.stdout
    lost = _session("wait", cwd=tmp_path, work=tmp_path / "none")
    assert lost.returncode == 2 and "start again" in lost.stdout
    usage = _session(cwd=tmp_path)
    assert usage.returncode == 2 and "gpu_session.sh start" in usage.stdout


def test_session_plans_fit_their_lease():
    """A plan expands to its stages (kernels by default) and `plan` prints their commands
    without running them: the kernels lease runs the CUDA tests with Triton autotuning off
    and the bench at the four TopK sizes, largest batch first, without harvest rows."""
    def plan(*args: str) -> list[str]:
        proc = subprocess.run([str(ROOT / ".ci/gpu_session.sh"), "plan", *args], text=True,
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.splitlines()

    lines = plan()
    assert [ln.split(":")[0] for ln in lines] == ["env", "tests", "bench"]
    assert lines == plan("kernels")
    tests, bench = lines[1], lines[2]
    assert "PAPER_LIB_TRITON_AUTOTUNE=0 python3 -m pytest" in tests
    assert ("--configs 768x32768x32x65536 768x32768x32x16384 768x32768x32x4096 "
            "2304x65536x64x4096 --skip harvest") in bench
    assert [ln.split(":")[0] for ln in plan("notebooks")] == ["env", "prepare", "01", "05"]
    assert [ln.split(":")[0] for ln in plan("withdrawn")] == ["env", "prepare", "02", "04"]
    assert [ln.split(":")[0] for ln in plan("bench-full", "02")] == ["bench-full", "02"]
