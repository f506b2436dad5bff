"""Notebook structure: the shape every notebook follows (STYLE.md point 10)."""

import json

import pytest

from paper_lib.reproduce import NOTEBOOK_DIR, notebooks, strip_volatile

NOTEBOOKS = notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_shape(path):
    """A parameters-tagged cell, validated params right after it, at least one executed
    NBVAL_CHECK_OUTPUT cell with output, and the paper-lib kernel."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must carry the 'parameters' tag"
    after = "".join(cells[tagged[0] + 1]["source"])
    assert "from_namespace(globals())" in after, "the cell after parameters must validate them"
    checked = [c for c in cells if c["cell_type"] == "code"
               and "# NBVAL_CHECK_OUTPUT" in "".join(c["source"])]
    assert checked and all(c.get("outputs") and c.get("execution_count") for c in checked)
    assert nb["metadata"]["kernelspec"]["name"] == "paper-lib"
    for c in checked:
        text = "".join("".join(o.get("text", "")) for o in c["outputs"])
        assert "Warning" not in text and "%|" not in text, "warnings/progress in a checked cell"


def test_only_selects_by_prefix():
    assert [p.stem for p in notebooks(["02"])] == ["02_amortisation_gap"]
    with pytest.raises(SystemExit, match="no such notebook"):
        notebooks(["99"])


def test_strip_volatile_removes_papermill_timing():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    nb.metadata["papermill"] = {"duration": 1}
    nb.cells[0].metadata["papermill"] = {"duration": 1}
    nb.cells[0].metadata["execution"] = {"x": 1}
    out = strip_volatile(nb)
    assert "papermill" not in out.metadata and out.cells[0].metadata == {}
    assert NOTEBOOK_DIR.name == "notebooks"
