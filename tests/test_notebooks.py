"""Notebook structure: the shape every notebook follows (STYLE.md point 10)."""

import json
import os

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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_warning_or_host_path_reaches_a_reader(path):
    """No cell of a committed notebook shows a warning (a reader takes one for a fault of
    the run: 04 once showed torch's "requires_grad=True to a scalar", from metrics computed
    with autograd on) or a returned path (01 and 02 showed PosixPath('/<this host's
    checkout>/figures/...') below cells ending in run.savefig)."""
    for i, c in enumerate(json.loads(path.read_text())["cells"]):
        for o in c.get("outputs", []):
            text = "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
            assert "Warning" not in text, f"cell {i} shows a warning: {text.strip()[:300]}"
            assert "PosixPath(" not in text, f"cell {i} shows a path: {text.strip()[:300]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_lists_every_parameter(path):
    """The parameters cell is its dataclass's `parameters_cell()`, and Papermill's own
    parser finds every field with its type and help: `papermill --help-notebook` documents
    them all, and no valid parameter is reported as unknown."""
    import papermill

    from paper_lib.reproduce import params_class

    raw = path.read_text()
    cls = params_class(path)
    cell = next(c for c in json.loads(raw)["cells"]
                if "parameters" in c["metadata"].get("tags", []))
    assert "".join(cell["source"]) == cls.parameters_cell(), \
        f"stale parameters cell: replace it with {cls.__name__}.parameters_cell()"
    found = papermill.inspect_notebook(str(path))
    assert list(found) == cls.names()
    assert found["profile"]["default"] == "'smoke'" and found["seed"]["inferred_type_name"] == "int"
    assert all(found[n]["help"] and found[n]["default"] == "None" for n in cls.names()[1:])


def test_parameters_cell_annotations_are_plain_names():
    from paper_lib.config import AmortParams

    cell = AmortParams.parameters_cell()
    assert "profile: str = 'smoke'  # named preset" in cell  # a Literal reads as its type
    assert "mlp_widths: list = None  # hidden widths" in cell  # tuple[int, ...] -> list
    assert "lm_gap: bool = None" in cell


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


def test_waves_longest_first_then_after_all(tmp_path, monkeypatch):
    """Independent notebooks start longest first by their last recorded time (unknown: 0
    s, last), and the explorer that reads their SAEs comes in a wave of its own."""
    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    res = tmp_path / "results" / "smoke"
    res.mkdir(parents=True)
    for stem, secs in (("01_a", 90.0), ("02_b", 120.0), ("03_c", 160.0), ("05_explore", 9.0)):
        (res / f"{stem}.json").write_text(json.dumps({"seconds": secs}))
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_a", "02_b", "03_c", "04_new", "05_explore")]
    got = [[p.stem for p in wave] for wave in reproduce.waves(nbs, "smoke")]
    assert got == [["03_c", "02_b", "01_a", "04_new"], ["05_explore"]]
    assert [[p.stem for p in w] for w in reproduce.waves(nbs[:2], "smoke")] == [["02_b", "01_a"]]


def test_default_jobs():
    from paper_lib.reproduce import default_jobs

    assert default_jobs("smoke", 5, cpus=2) == 2
    assert default_jobs("smoke", 5, cpus=16) == 2
    assert default_jobs("smoke", 5, cpus=1) == 1
    assert default_jobs("smoke", 1, cpus=8) == 1
    assert default_jobs("gpu", 5, cpus=16) == 1  # notebooks would share one GPU


def test_child_env_sleeping_waiters_only_in_parallel(monkeypatch):
    from paper_lib import reproduce

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(reproduce, "cpu_flags", lambda: {"avx2"})
    assert reproduce.child_env(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in reproduce.child_env(1)
    assert reproduce.child_env(1)["ATEN_CPU_CAPABILITY"] == "avx2"  # the kernel's pin
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's choice stands
    assert reproduce.child_env(2)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_prepare_runs_under_the_kernels_pins(monkeypatch):
    """`reproduce --prepare` started without the kernel's pins (as make test starts it)
    replaces itself with a pinned `--prepare`; started with them, it prepares in place.
    Without this the cached LM came from the unpinned code paths whenever make test ran
    first."""
    from paper_lib import kernelspec, reproduce

    monkeypatch.setattr(kernelspec, "cpu_flags", lambda: {"avx2"})
    execs, prepared = [], []

    def fake_exec(path, args, env):
        execs.append((args, env))
        raise SystemExit(0)  # where the real exec would never come back

    monkeypatch.setattr(kernelspec.os, "execve", fake_exec)
    monkeypatch.setattr(reproduce, "prepare", prepared.append)
    for name, value in kernelspec.pinned_cpu_env({"avx2"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MKL_CBWR", "AVX2")  # one pin off (a shell, an older kernel)
    monkeypatch.setattr(reproduce.sys, "argv", ["reproduce.py", "--prepare", "--profile", "smoke"])
    with pytest.raises(SystemExit):
        reproduce.main()
    (args, env), = execs
    assert args[1:] == ["-m", "paper_lib.reproduce", "--prepare", "--profile", "smoke"]
    assert env["MKL_CBWR"] == "AVX2,STRICT" and env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert not prepared
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    assert reproduce.main() == 0
    assert prepared == ["smoke"] and len(execs) == 1


def test_determinism_check_names_what_differs(tmp_path, monkeypatch):
    """--check-determinism runs a notebook twice; a difference fails the run, saying how many
    values differ and the largest relative difference (0.25 -> 0.2: 0.2), while a timing
    change alone does not."""
    from paper_lib import reproduce

    results = tmp_path / "r.json"
    runs = iter([(0.25, 1.0), (0.2, 2.0), (0.25, 1.0), (0.25, 3.0)])

    def fake_run(nb, profile, out_dir, params, update):
        fvu, secs = next(runs)
        results.write_text(json.dumps({"claims": [], "metrics": {"fvu": fvu},
                                       "seconds": secs, "volatile_metrics": []}))
        return secs

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "run_one", fake_run)
    monkeypatch.setattr(reproduce, "latest_results", lambda profile, stem: results)
    nb = tmp_path / "01_x.ipynb"
    assert reproduce.run_sequential([nb], "smoke", {}, False, True) == [
        "01_x: claims/metrics differ between two runs (1 of 1 values; largest relative "
        "difference 2.0e-01 at metrics.fvu)"]
    assert reproduce.run_sequential([nb], "smoke", {}, False, True) == []


def test_failed_notebook_is_kept_past_the_next_run(tmp_path, monkeypatch):
    """A notebook that raises is copied to build/<profile>/<stem>.failed.ipynb, which the
    next run (rewriting build/<profile>/<stem>.ipynb) leaves as it was."""
    from papermill.exceptions import PapermillExecutionError

    from paper_lib import reproduce

    outcomes = iter(["boom", "fine"])

    def fake_run(nb, profile, out_dir, params, update):
        text = next(outcomes)
        (out_dir / nb.name).write_text(text)
        if text == "boom":
            raise PapermillExecutionError(3, 4, "x = 1 / 0", "ZeroDivisionError",
                                          "division by zero", [])
        return 1.0

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "run_one", fake_run)
    nb = tmp_path / "04_x.ipynb"
    kept = tmp_path / "build" / "smoke" / "04_x.failed.ipynb"
    assert reproduce.run_sequential([nb], "smoke", {}, False, False) == [
        f"04_x: cell 3 (In [4]) raised ZeroDivisionError: division by zero  -> see {kept}"]
    assert reproduce.run_sequential([nb], "smoke", {}, False, False) == []
    assert kept.read_text() == "boom"
    assert (tmp_path / "build" / "smoke" / "04_x.ipynb").read_text() == "fine"


def test_run_parallel_reports_each_failure(tmp_path, monkeypatch, capsys):
    """Every notebook's process runs (two at a time); a non-zero exit becomes a failure
    naming the notebook, with that process's output printed."""
    import sys

    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_a", "02_b", "03_c", "05_explore")]
    ran = tmp_path / "ran"
    ran.mkdir()

    def command(nb):
        code = (f"import pathlib; pathlib.Path({str(ran / nb.stem)!r}).touch(); "
                f"print('out of {nb.stem}'); raise SystemExit({3 if nb.stem == '02_b' else 0})")
        return [sys.executable, "-c", code]

    failures = reproduce.run_parallel(nbs, "smoke", 2, command, "test")
    assert sorted(p.name for p in ran.iterdir()) == ["01_a", "02_b", "03_c", "05_explore"]
    kept = tmp_path / "build" / "smoke" / "02_b.failed.test.log"
    assert failures == [f"02_b: exit status 3 (output above; kept in {kept})"]
    assert kept.read_text().endswith("exit status 3:\nout of 02_b\n")
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # only the failure's
    out = capsys.readouterr().out
    assert "out of 02_b" in out and "out of 01_a" not in out
    assert "02_b: FAILED" in out
    assert out.rstrip().splitlines()[-1].startswith("[4/4] 05_explore: ok")  # after the rest


@pytest.mark.parametrize("argv, message", [
    (["--nbval", "--profile", "gpu"], "--nbval checks the committed smoke notebooks"),
    (["--nbval", "-p", "steps", "3"], "--nbval checks the committed smoke notebooks"),
    (["--jobs", "-1"], "--jobs -1: give 1 or more"),
])
def test_reproduce_rejects_bad_arguments(argv, message, capsys):
    from paper_lib.reproduce import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_run_parallel_interrupt_stops_running_and_queued(tmp_path, monkeypatch):
    """Ctrl-C while notebooks run: the running processes get SIGINT (so Papermill / nbval
    can shut their kernels down) and end without finishing, and nothing queued (here the
    explorer's wave) starts afterwards."""
    import sys

    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    res = tmp_path / "results" / "smoke"
    res.mkdir(parents=True)
    for stem, secs in (("01_a", 10.0), ("02_b", 20.0), ("03_c", 30.0)):
        (res / f"{stem}.json").write_text(json.dumps({"seconds": secs}))
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_a", "02_b", "03_c", "05_explore")]
    marks = tmp_path / "marks"
    marks.mkdir()

    def command(nb):
        # 02_b ends (and so triggers the Ctrl-C below) only once 03_c is inside its try
        # block: a SIGINT during 03_c's start-up would leave no mark to check.
        work = ("deadline = time.time() + 30\n"
                "    while not (m / '03_c.sleeping').exists() and time.time() < deadline:\n"
                "        time.sleep(0.01)" if nb.stem == "02_b" else
                f"(m / '{nb.stem}.sleeping').touch()\n    time.sleep(60)")
        # The child takes Ctrl-C as Python does by default even if this test process
        # inherited SIGINT ignored (pytest runs after other tests, or from a script's
        # background job), since ignored signals pass on to children.
        code = (f"import pathlib, signal, time\nm = pathlib.Path({str(marks)!r})\n"
                "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                f"(m / '{nb.stem}.started').touch()\n"
                f"try:\n    {work}\n    (m / '{nb.stem}.finished').touch()\n"
                f"except KeyboardInterrupt:\n    (m / '{nb.stem}.interrupted').touch()\n")
        return [sys.executable, "-c", code]

    real_say = reproduce.say

    def say(line):
        real_say(line)
        if line.startswith("[1/"):  # the first notebook to end: the user presses Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "say", say)
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_parallel(nbs, "smoke", 2, command, "test")
    names = {p.name for p in marks.iterdir()}
    assert {"03_c.started", "03_c.interrupted", "02_b.finished"} <= names
    assert not {"03_c.finished", "01_a.finished"} & names  # stopped, not waited for
    assert "05_explore.started" not in names


def _marking_command(marks, wait_for=None, code=0):
    """A process that marks its start (noting whether the preparation had ended by then),
    optionally waits up to 30 s for another process's start mark, then exits with `code`."""
    import sys

    def command(name):
        wait = (f"deadline = time.time() + 30\n"
                f"while not (m / '{wait_for}.started').exists():\n"
                f"    if time.time() > deadline: raise SystemExit(9)\n"
                f"    time.sleep(0.01)\n") if wait_for else ""
        return [sys.executable, "-c",
                f"import pathlib, time\nm = pathlib.Path({str(marks)!r})\n"
                f"(m / '{name}.started').write_text(str((m / 'prep.ended').exists()))\n"
                f"{wait}(m / '{name}.ended').touch()\nraise SystemExit({code})\n"]
    return command


def test_run_parallel_starts_late_lm_notebooks_beside_the_preparation(tmp_path, monkeypatch):
    """The preparation takes a slot; beside it runs only a notebook that needs the LM
    late (here 02_b: the preparation waits for it to start, so it must start while the
    preparation runs); the others start only after it ended."""
    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_a", "02_b", "03_c", "05_explore")]
    notebook = _marking_command(marks)
    prep = _marking_command(marks, wait_for="02_b")("prep")
    failures = reproduce.run_parallel(nbs, "smoke", 2, lambda nb: notebook(nb.stem), "test",
                                      prepare=prep, beside_prepare=("02_b",))
    assert failures == []
    seen = {p.stem: p.read_text() for p in marks.glob("*.started")}
    assert seen == {"prep": "False", "02_b": "False", "01_a": "True", "03_c": "True",
                    "05_explore": "True"}


def test_run_parallel_failed_preparation_starts_nothing_more(tmp_path, monkeypatch, capsys):
    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_a", "02_b", "05_explore")]
    notebook = _marking_command(marks)
    prep = _marking_command(marks, wait_for="02_b", code=2)("prep")
    failures = reproduce.run_parallel(nbs, "smoke", 2, lambda nb: notebook(nb.stem), "test",
                                      prepare=prep, beside_prepare=("02_b",))
    assert failures == ["--prepare (LM and activations): exit status 2"]
    assert sorted(p.stem for p in marks.glob("*.started")) == ["02_b", "prep"]
    assert "not started: 01_a, 05_explore" in capsys.readouterr().out


def test_determinism_check_reads_the_file_the_run_just_wrote(tmp_path, monkeypatch):
    """With custom parameters a run writes results/<profile>-custom/: the determinism
    check must compare that file, not the untouched reference one."""
    import os

    from paper_lib import reproduce

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    ref, custom = (tmp_path / "results" / f / "02_x.json" for f in ("smoke", "smoke-custom"))
    assert reproduce.latest_results("smoke", "02_x") == ref  # nothing yet: the reference
    for i, p in enumerate((ref, custom)):
        p.parent.mkdir(parents=True)
        p.write_text("{}")
        os.utime(p, (1000 + i, 1000 + i))
    assert reproduce.latest_results("smoke", "02_x") == custom
    os.utime(ref, (2000, 2000))
    assert reproduce.latest_results("smoke", "02_x") == ref


def test_nbval_writes_notebook_records_to_scratch(monkeypatch):
    """`reproduce --nbval` executes the committed notebooks; their Run records and figures
    must land under build/nbval, not over the committed results/ and figures/ (whose timing
    claims and git field would change on every `make test`)."""
    from paper_lib import reproduce

    seen = {}

    def fake_run_parallel(nbs, profile, jobs, command, title, prepare=None):
        seen["root"] = os.environ.get("PAPER_LIB_OUTPUT_ROOT")
        seen["cmd"] = command(nbs[0])
        return []

    monkeypatch.delenv("PAPER_LIB_OUTPUT_ROOT", raising=False)
    monkeypatch.setattr(reproduce, "run_parallel", fake_run_parallel)
    monkeypatch.setattr(reproduce, "refresh_if_stale", lambda: "")
    assert reproduce.main(["--nbval", "--only", "02"]) == 0
    assert seen["root"] == str(reproduce.PROJECT_ROOT / "build" / "nbval")
    assert "--nbval-lax" in seen["cmd"] and seen["cmd"][-1].endswith("02_amortisation_gap.ipynb")


def test_seeds_reruns_each_seed_keeps_its_record_and_tables_the_verdicts(tmp_path,
                                                                         monkeypatch, capsys):
    """`reproduce --seeds 3 5 --only 02`: two runs with `-p seed 3` and `-p seed 5` and
    nothing else changed; each run's -custom record (the same path both times) is copied
    to results/smoke-seeds/seed<s>/ before the next overwrites it; the table compares both
    with results/smoke/. Bad requests are refused before any run."""
    from paper_lib import reproduce
    from paper_lib.claims import record_path, seed_record_path

    monkeypatch.setattr(reproduce, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "refresh_if_stale", lambda: None)
    runs = []

    def fake_run(nbs, profile, params, update, check):
        seed = params["seed"]
        runs.append((seed, update, sorted(params)))
        path = record_path("smoke-custom", nbs[0].stem, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        verdict = "not reproduced" if seed == 5 else "reproduced"
        path.write_text(json.dumps({"params": {"seed": seed}, "env": {"git": "x"}, "claims": [
            {"id": "a", "paper": None, "ours": 1.0, "tolerance": 0.1, "verdict": verdict}]}))
        return []
    monkeypatch.setattr(reproduce, "run_sequential", fake_run)
    stem = "02_amortisation_gap"
    with pytest.raises(SystemExit):  # no preset record yet
        reproduce.main(["--seeds", "3", "--only", "02"])
    assert "results/smoke/ lacks 02_amortisation_gap" in capsys.readouterr().err
    base = record_path("smoke", stem, tmp_path)
    base.parent.mkdir(parents=True)
    base.write_text(json.dumps({"params": {"seed": 0}, "env": {"git": "x"}, "claims": [
        {"id": "a", "paper": None, "ours": 1.0, "tolerance": 0.1, "verdict": "reproduced"}]}))
    for bad in (["0"], ["3", "3"]):
        with pytest.raises(SystemExit):
            reproduce.main(["--seeds", *bad, "--only", "02"])
    assert runs == []
    assert reproduce.main(["--seeds", "3", "5", "--only", "02", "-p", "workers", "1"]) == 0
    assert runs == [(3, False, ["seed", "workers"]), (5, False, ["seed", "workers"])]
    assert json.loads(seed_record_path("smoke", 3, stem, tmp_path).read_text())[
        "params"]["seed"] == 3
    table = (tmp_path / "results" / "smoke-seeds" / "stability.md").read_text()
    assert "0 of 1 claims keep one verdict" in table
    assert "| `a` | ✅ 1.0 | ✅ 1.0 | ❌ 1.0 | changes |" in table
