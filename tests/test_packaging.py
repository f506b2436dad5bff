"""environment.yml gives conda users what pyproject.toml gives pip users."""

from __future__ import annotations

import re
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
