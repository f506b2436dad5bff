"""The CPU numerics fingerprint: hashes, comparison, and the command's checks."""

import hashlib
import json

import numpy as np
import pytest
import torch

from paper_lib import fingerprint, kernelspec


def test_digest_hashes_the_raw_float_bytes():
    assert fingerprint.digest(torch.zeros(2)) == hashlib.sha256(bytes(8)).hexdigest()[:16]
    one = hashlib.sha256(bytes.fromhex("0000803f")).hexdigest()[:16]  # 1.0f, little-endian
    assert fingerprint.digest(torch.ones(1)) == one
    assert fingerprint.digest(torch.ones(2, 2).t()) == fingerprint.digest(torch.ones(4))
    # NumPy arrays hash their own bytes: float64 zeros are 8 zero bytes each
    assert fingerprint.digest(np.zeros(2)) == hashlib.sha256(bytes(16)).hexdigest()[:16]
    assert fingerprint.digest(np.ones(1, np.float32)) == one
    assert fingerprint.digest(np.ones((2, 2)).T) == fingerprint.digest(np.ones(4))


def test_compare_names_differing_and_one_sided_ops():
    assert fingerprint.compare({"a": "1", "b": "2"}, {"a": "1", "b": "2"}) == []
    assert fingerprint.compare({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"}) == ["b", "c"]


def test_library_differences_name_the_code_paths_that_differ():
    """Two machines' `libraries`: each differing entry is named with both values; a file
    without the entry (made before it was recorded) adds nothing."""
    ours = {"openblas_core": {"libscipy_openblas": "Haswell"}, "numpy_simd": ["X86_V3"]}
    theirs = {"libraries": {"openblas_core": {"libscipy_openblas": "SkylakeX"},
                            "numpy_simd": ["X86_V3"]}}
    assert fingerprint.library_differences(ours, theirs) == [
        "OpenBLAS kernels: {'libscipy_openblas': 'Haswell'} here, "
        "{'libscipy_openblas': 'SkylakeX'} there"]
    assert fingerprint.library_differences(ours, {"libraries": ours}) == []
    assert fingerprint.library_differences(ours, {"ops": {}}) == []


def test_fingerprint_repeats_within_a_machine(tmp_path, capsys):
    """Same process, same numerics: every op hashes the same twice (the deterministic
    kernels are on), and the JSON records the CPU it ran on and the code paths NumPy's
    libraries picked (NumPy's SIMD targets are among those it was built to dispatch)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__

    out = tmp_path / "fp.json"
    assert fingerprint.main(["--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert len(first["ops"]) == len(fingerprint._ops()) >= 19
    assert first["env"]["cpu"] == kernelspec.cpu_model()
    assert set(first["libraries"]["numpy_simd"]) <= set(__cpu_dispatch__)
    assert all(core is None or core for core in first["libraries"]["openblas_core"].values())
    assert fingerprint.main(["--compare", str(out)]) == 0
    assert "0 of 19 ops differ" in capsys.readouterr().out


def test_compare_file_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "fingerprint", lambda: pytest.fail("ran the ops"))
    (tmp_path / "bad.json").write_text('{"env": {}}')
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        with pytest.raises(SystemExit):
            fingerprint.main(["--compare", str(path)])
