"""environment.yml gives conda users what pyproject.toml gives pip users; the Makefile
needs no tool beyond POSIX ones to decide what to install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    for extra in ("dev", "browser"):  # what `make test` installs; bench stays optional
        wanted.update({_name(r): r for r in project["optional-dependencies"][extra]})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip
    listed = {_name(r): r.replace(" ", "") for r in pip if r != "-e ."}
    assert set(listed) == set(wanted), "environment.yml and pyproject.toml list different packages"
    for name, req in wanted.items():
        if name != "torch":  # pinned to the CPU build there, as the Makefile does
            assert listed[name] == req.replace(" ", ""), f"{name}: version ranges differ"


@pytest.fixture
def make() -> str:
    path = shutil.which("make")
    if path is None:
        pytest.skip("make is not installed")
    return path


def test_makefile_stamp_needs_only_posix_tools(make, tmp_path):
    """The install stamp's hash (which reinstalls the venv when the dependencies change) is
    computed when make reads the Makefile; with sha1sum, a GNU tool macOS lacks, it came out
    empty there, with an error on every command."""
    for tool in ("sh", "cat", "cut", "cksum"):  # POSIX: on every Unix
        (tmp_path / tool).symlink_to(shutil.which(tool))
    res = subprocess.run([make, "-pnq", "venv"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/tmp")})
    assert "not found" not in res.stderr, res.stderr
    hashes = [line.split(":=", 1)[1].strip() for line in res.stdout.splitlines()
              if line.startswith("HASH :=")]
    assert hashes and hashes[0], "the stamp's hash is empty"


def test_make_names_a_too_old_python_before_creating_the_venv(make, tmp_path):
    """macOS's own python3 is 3.9; pyproject.toml asks for 3.10. make says so, and how to
    name another, instead of creating a venv that pip then refuses to install into."""
    old = tmp_path / "python3"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.6" && exit 0\nexit 1\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    res = subprocess.run([make, "-s", f"PYTHON={old}", f"VENV={venv}", "reproduce"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert (f"PYTHON={old} is Python 3.9.6; paper_lib needs Python 3.10 or newer: name one, "
            "e.g. make PYTHON=python3.12 reproduce") in res.stderr
    assert not venv.exists()
