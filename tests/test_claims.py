"""Claims: the verdict rule, rounding, results files and the README scoreboard."""

import hashlib
import json
import os
from pathlib import Path

import pytest

from paper_lib import claims
from paper_lib.claims import Claim, decide, round_to
from paper_lib.config import AmortParams
from paper_lib.runtime import PROJECT_ROOT


@pytest.mark.parametrize("paper, ours, tol, direction, verdict", [
    (0.60, 0.63, 0.05, None, "reproduced"),
    (0.60, 0.66, 0.05, None, "not reproduced"),
    (0.60, 0.66, 0.05, True, "direction only"),
    (0.60, 0.62, 0.05, False, "not reproduced"),  # inside tolerance but wrong direction
    (None, 0.1, 0.0, True, "reproduced"),
    (None, 0.1, 0.0, False, "not reproduced"),
    (0.5, float("nan"), 0.1, True, "not reproduced"),
])
def test_verdict_rule(paper, ours, tol, direction, verdict):
    assert decide(paper, ours, tol, direction) == verdict


@pytest.mark.parametrize("ours, tol, direction, verdict", [
    (0.02, 0.0, True, "reproduced"),      # below the bound
    (0.09, 0.03, True, "reproduced"),     # above, within tolerance
    (0.20, 0.03, True, "direction only"),
    (0.20, 0.03, False, "not reproduced"),
])
def test_at_most_claims(ours, tol, direction, verdict):
    """"at most 7%" style claims: fewer is better, not a mismatch."""
    c = Claim("d", "dead <= 7%", 0.07, ours, tol, "Sec. 2", direction, kind="at_most")
    assert c.verdict == verdict
    assert "paper <= 0.07" in c.line()


def test_claim_without_paper_needs_direction():
    with pytest.raises(ValueError, match="direction_holds"):
        Claim("x", "s", None, 1.0, 0.0, "src")


def test_mean_halfwidth_is_students_t_times_the_standard_error():
    """t quantiles (0.975) from tables: 4.303 at 2 degrees of freedom, 2.776 at 4, 2.201 at
    11; one value has no interval."""
    assert claims.mean_halfwidth(1.0, 3) == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3)
    assert claims.mean_halfwidth(1.0, 5) == pytest.approx(2.776 / 5 ** 0.5, abs=1e-3)
    assert claims.mean_halfwidth(0.014, 12) == pytest.approx(2.201 * 0.014 / 12 ** 0.5,
                                                             abs=1e-5)
    assert claims.mean_halfwidth(0.0, 1) == float("inf")


@pytest.mark.parametrize("ours, std, n, noisy", [
    (0.696, 0.014, 3, True),    # edge 0.695: 0.001 away; half-width 4.303 * 0.014 / sqrt(3) = 0.035
    (0.650, 0.014, 3, False),   # 0.045 inside the band: more than 0.035 from either edge
    (0.840, 0.014, 3, False),   # 0.045 beyond the upper edge 0.795
    (0.770, 0.014, 3, True),    # 0.025 from the upper edge: inside 0.035 (2 SE, 0.016, is not)
    (0.780, 0.014, 12, False),  # more seeds: 2.201 * 0.014 / sqrt(12) = 0.0089 < 0.015
    (0.700, 0.0, 1, True),      # one seed: no interval, never settled
])
def test_seed_noise_flags_verdicts_whose_interval_reaches_an_edge(ours, std, n, noisy):
    """Band 0.745 +- 0.05 = [0.695, 0.795]; hand-worked distances to the nearer edge."""
    reason = claims.seed_noise(ours, 0.745, 0.05, std, n)
    assert bool(reason) is noisy
    assert (f"over {n} seeds" in reason) is noisy


def test_paired_noise_passes_only_means_outside_their_interval():
    """Differences 4, 6, 5: mean 5, sd 1, half-width 4.303 / sqrt(3) = 2.48 < 5: settled.
    1, 2, 3: mean 2, sd 1, 2.48 > 2: noise level (two standard errors, 1.15, would have
    settled it). 1, -1, 3: sd 2, half-width 4.97. One difference: no spread, noise level."""
    assert claims.paired_noise([4, 6, 5]) == ""
    assert claims.paired_noise([1, 2, 3]) != ""
    assert claims.paired_noise([1, -1, 3]) == (
        "|mean difference| 1 inside its 95% interval (± 4.97) over 3 runs")
    assert claims.paired_noise([-0.5], "draws") == (
        "one difference only: its spread over draws is unmeasured")


def test_trend_noise_passes_only_orders_unlikely_by_chance():
    """Four SAEs in perfect order: p = 1/24 < 0.05, a trend. One adjacent swap: p = 4/24,
    noise level. Five in perfect falling order: 1/120, a trend."""
    assert claims.trend_noise([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]) == ""
    assert claims.trend_noise([1, 2, 3, 4], [0.1, 0.2, 0.4, 0.3]) == (
        "permutation p = 0.17 over 4 points: an order this strong arises by chance")
    assert claims.trend_noise(range(5), [5, 4, 3, 2, 1]) == ""
    # two runs over 3 points, one with a swap: p = 5/36 (test_metrics), noise level
    assert claims.trend_noise([1, 2, 3], [[1, 2, 3], [1, 3, 2]]) == (
        "permutation p = 0.14 over 3 points in each of 2 runs: an order this strong arises "
        "by chance")


def test_excess_noise_passes_only_splits_unlikely_by_chance():
    """4 of 4 against 0 of 4: p = 1 / C(8, 4) = 1/70 < 0.05, an excess. 3 of 3 against 0 of
    3: p = 1/20 = 0.05, noise level (the level itself does not pass)."""
    assert claims.excess_noise(4, 4, 0, 4) == ""
    assert claims.excess_noise(3, 3, 0, 3) == (
        "Fisher exact p = 0.05 (3 of 3 against 0 of 3): a split this uneven arises by chance")


def test_shift_noise_passes_only_shifts_unlikely_by_chance():
    """Four values against four, a's all above b's: 1 of C(8, 4) = 70 splits, p = 0.014, a
    shift. Three against three, all above: 1 of 20, p = 0.05, noise level."""
    assert claims.shift_noise([5, 6, 7, 8], [1, 2, 3, 4]) == ""
    assert claims.shift_noise([4, 5, 6], [1, 2, 3], "latents") == (
        "rank-sum p = 0.05 (3 against 3 latents): a shift this large arises by chance")


def test_round_to_tolerance():
    """Rounded to the 1-2-5 step at or below the tolerance."""
    assert round_to(0.666, 0.05) == "0.65"
    assert round_to(0.640, 0.095) == "0.65"
    assert round_to(0.3333, 0.01) == "0.33"
    assert round_to(12.4, 1) == "12"
    assert round_to(0.37, 0.0) == "0.37"
    assert claims.display_step(0.3) == pytest.approx(0.2)


def test_round_to_passes_nan_through():
    """A NaN measurement (never reproduced) is shown as nan instead of crashing the table."""
    assert round_to(float("nan"), 0.05) == "nan"
    assert claims.shown_ours(float("nan"), 0.5, 0.05) == "nan"


@pytest.mark.parametrize("ours, paper, tol, direction, kind, shown", [
    (0.6656, 0.609, 0.05, None, "value", "0.66"),   # 0.65 would sit inside 0.609 +- 0.05
    (0.7871, 0.745, 0.05, None, "value", "0.78"),   # 0.80 would sit outside it
    (0.6400, 0.609, 0.05, None, "value", "0.65"),   # far from the edge: the plain rounding
    (0.6595, 0.609, 0.05, None, "value", "0.66"),   # just outside (0.0505): 0.65 would not do
    (0.6613, 0.611, 0.05, None, "value", "0.662"),  # 0.65, 0.66, 0.66, 0.660 all sit inside
    (0.1040, 0.07, 0.03, True, "at_most", "0.105"),  # 0.10 would sit inside the bound + tol
    (0.7000, None, 0.0, True, "value", "0.70"),     # no paper number: nothing to contradict
])
def test_shown_number_never_contradicts_its_verdict(ours, paper, tol, direction, kind, shown):
    """The claims tables round our number to the tolerance, one 1-2-5 step finer at a time
    until the shown number earns the same verdict as the exact one."""
    assert claims.shown_ours(ours, paper, tol, direction, kind) == shown
    if paper is not None:
        assert decide(paper, float(shown), tol, direction, kind) == \
            decide(paper, ours, tol, direction, kind)


def test_verdict_line_is_rounded():
    c = Claim("a.b", "s", 0.609, 0.6663, 0.05, "Table 1")
    assert c.line() == "a.b: not reproduced (paper 0.609, ours ~0.66, tolerance 0.05)"
    # the nbval-checked form drops our number, which drifts with the CPU
    assert c.verdict_line() == "a.b: not reproduced (paper 0.609, tolerance 0.05)"


def test_run_writes_results_atomically(tmp_path):
    """Run.finish writes the DESIGN.md schema; no temporary file is left behind."""
    run = claims.Run("99_test", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("t.one", "one", 1.0, 1.01, 0.05, "Fig. 1")
    run.metric("m", 3)
    with pytest.raises(ValueError, match="duplicate"):
        run.claim("t.one", "again", 1.0, 1.0, 0.1, "Fig. 1")
    rec = run.finish()
    path = tmp_path / "results" / "smoke" / "99_test.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["claims"][0]["verdict"] == "reproduced" == rec["claims"][0]["verdict"]
    assert set(on_disk) >= {"notebook", "profile", "params", "env", "seconds", "claims", "metrics"}
    assert {"torch", "device", "git"} <= set(on_disk["env"])
    assert [p.name for p in path.parent.iterdir()] == ["99_test.json"]


def test_git_commit_reads_head_and_tracked_changes(tmp_path, committed_results, monkeypatch):
    """HEAD's short hash; "-dirty" once a tracked file changes (an untracked one does
    not count); $PAPER_LIB_GIT, when set, wins."""
    import subprocess

    from paper_lib.runtime import GIT_ENV, git_commit

    monkeypatch.delenv(GIT_ENV, raising=False)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "new.txt").write_text("untracked")
    assert git_commit(tmp_path) == head
    (committed_results / "01_x.json").write_text("{}")
    assert git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv(GIT_ENV, "abc1234")
    assert git_commit(tmp_path) == "abc1234"


def test_commit_at_launch_holds_the_first_reading(monkeypatch):
    """Inside, git_commit() (and any process started there) returns the reading taken on
    entry, whatever the tree does meanwhile; on exit it reads again. An outer setting (a
    driver's, or one set by hand) is kept, inside and after."""
    from paper_lib import runtime

    monkeypatch.delenv(runtime.GIT_ENV, raising=False)
    readings = iter(["abc1234", "abc1234-dirty"])
    monkeypatch.setattr(runtime, "git_commit", lambda: next(readings))
    with runtime.commit_at_launch():
        assert os.environ[runtime.GIT_ENV] == "abc1234"
    assert runtime.GIT_ENV not in os.environ
    monkeypatch.setenv(runtime.GIT_ENV, "outer99")
    with runtime.commit_at_launch():
        assert os.environ[runtime.GIT_ENV] == "outer99"
    assert os.environ[runtime.GIT_ENV] == "outer99"
    assert next(readings) == "abc1234-dirty"  # read once only, on the first entry


def test_run_records_the_commit_as_it_was_when_the_run_began(tmp_path, monkeypatch):
    """A run writes tracked files (figures, then its record and notebook) before its record
    is made: the record names the commit read when the Run began, not a "-dirty" of its own
    making."""
    readings = iter(["abc1234", "abc1234-dirty"])
    monkeypatch.setattr(claims, "git_commit", lambda: next(readings))
    run = claims.Run("99_test", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("t.one", "one", 1.0, 1.01, 0.05, "Fig. 1")
    assert run.finish()["env"]["git"] == "abc1234"


def test_savefig_lists_the_figure_and_shows_no_host_path(tmp_path):
    """Run.savefig writes PNG and PDF, lists the figure relative to the output root, and
    returns nothing (a cell ending in it showed PosixPath('/home/...') to every reader);
    printed paths inside the project are relative to it."""
    from matplotlib.figure import Figure  # no pyplot: the test leaves its state alone

    from paper_lib.runtime import project_relative

    run = claims.Run("99_test", AmortParams.from_profile("smoke"), root=tmp_path)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert run.savefig(fig, "curve") is None
    assert sorted(p.name for p in (tmp_path / "figures" / "smoke").iterdir()) == \
        ["99_test_curve.pdf", "99_test_curve.png"]
    assert run.figures == ["figures/smoke/99_test_curve"]
    assert project_relative(PROJECT_ROOT / "data" / "saes") == Path("data/saes")
    assert project_relative(tmp_path / "x") == tmp_path / "x"


def test_exploratory_runs_keep_off_the_reference_results(tmp_path):
    """A run whose parameters differ from its profile's preset writes results and figures
    to <profile>-custom/ and stays off the scoreboard; display, parallelism and device
    settings do not make a run custom."""
    preset = AmortParams.from_profile("smoke")
    assert claims.results_folder(preset) == "smoke"
    assert claims.results_folder(preset.replace(progress=False, workers=1, device="cpu")) == "smoke"
    assert claims.results_folder(preset.replace(n_seeds=7)) == "smoke-custom"
    assert claims.results_folder(AmortParams.from_profile("gpu", device="cpu")) == "gpu"
    ref = claims.Run("96_r", preset, root=tmp_path)
    ref.claim("r.a", "a", 1.0, 1.0, 0.1, "T1")
    ref.finish()
    run = claims.Run("96_r", preset.replace(n_seeds=7), root=tmp_path)
    run.claim("r.a", "a", 1.0, 5.0, 0.1, "T1")
    run.finish()
    assert run.fig_dir == tmp_path / "figures" / "smoke-custom"
    kept = json.loads((tmp_path / "results" / "smoke" / "96_r.json").read_text())
    assert kept["claims"][0]["verdict"] == "reproduced"
    assert json.loads((tmp_path / "results" / "smoke-custom" / "96_r.json").read_text()
                      )["params"]["n_seeds"] == 7
    assert [r["params"]["n_seeds"] for r in claims.load_results(tmp_path)] == [preset.n_seeds]


def test_readme_scoreboard_is_current():
    """The README embeds the scoreboard of the committed results (run `make scoreboard`)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    expected = claims.embed_in_readme(readme, claims.scoreboard())
    assert readme == expected, "stale README scoreboard: run `make scoreboard`"


def test_scoreboard_counts(tmp_path):
    run = claims.Run("98_x", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("x.a", "a", 1.0, 1.0, 0.1, "T1")
    run.claim("x.b", "b", 1.0, 2.0, 0.1, "T1", direction_holds=True)
    run.finish()
    board = claims.scoreboard(tmp_path)
    assert "| smoke | 98_x | 2 | 1 | 1 | 0 | 0 |" in board


def test_withdrawn_claims_are_counted_apart_until_the_file_is_rerun(tmp_path, monkeypatch):
    """A withdrawal applies to the exact file it names (by sha256): its claims leave the
    verdict counts for the withdrawn column, and a rerun (new bytes) lifts it."""
    run = claims.Run("98_x", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("x.known", "a", 1.0, 1.0, 0.1, "T1")
    run.claim("x.unknown.a", "b", 1.0, 2.0, 0.1, "T1", direction_holds=True)
    run.claim("x.unknown.b", "c", 1.0, 1.0, 0.1, "T1")
    run.finish()
    path = tmp_path / "results" / "smoke" / "98_x.json"
    w = claims.Withdrawal("smoke/98_x", hashlib.sha256(path.read_bytes()).hexdigest(),
                          ("x.unknown.",), "started at the answer")
    monkeypatch.setattr(claims, "WITHDRAWN", (w,))
    board = claims.scoreboard(tmp_path)
    assert "| smoke | 98_x | 3 | 1 | 0 | 0 | 2 |" in board
    assert "| `x.unknown.a` | 1 | 2.0 | 0.1 | withdrawn (recorded: direction only) |" in board
    assert "| `x.known` | 1 | 1.0 | 0.1 | reproduced |" in board
    assert "Withdrawn: started at the answer" in board
    path.write_text(path.read_text() + " ")  # a rerun: other bytes
    board = claims.scoreboard(tmp_path)
    assert "| smoke | 98_x | 3 | 2 | 1 | 0 | 0 |" in board and "Withdrawn" not in board


def test_every_withdrawal_names_a_committed_file_as_it_is():
    """An entry whose file was rerun (other bytes) or removed no longer applies: delete it."""
    for w in claims.WITHDRAWN:
        assert w.path().exists(), f"{w.results}: no such results file; remove its withdrawal"
        assert hashlib.sha256(w.path().read_bytes()).hexdigest() == w.sha256, (
            f"results/{w.results}.json was rerun: remove its entry from claims.WITHDRAWN")
        rec = json.loads(w.path().read_text())
        assert any(w.covers(c["id"]) for c in rec["claims"]), f"{w.results}: withdraws nothing"


def _findings_notebook(source: str, shown: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/markdown": shown,
                                                              "text/plain": "<Markdown>"})]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), cell]
    return nb


def test_refresh_findings_shows_the_record_of_the_run_itself(tmp_path, monkeypatch):
    """An executed notebook's findings cell showed the record from before its run; the
    refresh puts this run's record there, with withdrawn claims marked and counted apart.
    An older cell that reads the smoke record is left alone in a gpu notebook."""
    run = claims.Run("98_x", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("x.known", "known statement", 1.0, 1.0, 0.1, "T1")
    run.claim("x.unknown.a", "unknown statement", 1.0, 2.0, 0.1, "T1", direction_holds=True)
    run.finish()
    nb = _findings_notebook("Markdown(findings_markdown(run.stem, run.profile))", "old run")
    assert claims.refresh_findings(nb, "98_x", "smoke", tmp_path)
    shown = nb.cells[1].outputs[0]["data"]["text/markdown"]
    assert "1 reproduced, 1 direction only, 0 not reproduced." in shown
    assert "- ✅ known statement — paper 1, ours 1.0 (*reproduced*)" in shown
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "<Markdown>"
    assert not claims.refresh_findings(nb, "98_x", "smoke", tmp_path)  # already current

    path = tmp_path / "results" / "smoke" / "98_x.json"
    w = claims.Withdrawal("smoke/98_x", hashlib.sha256(path.read_bytes()).hexdigest(),
                          ("x.unknown.",), "started at the answer")
    monkeypatch.setattr(claims, "WITHDRAWN", (w,))
    assert claims.refresh_findings(nb, "98_x", "smoke", tmp_path)
    shown = nb.cells[1].outputs[0]["data"]["text/markdown"]
    assert "1 reproduced, 0 direction only, 0 not reproduced, 1 withdrawn." in shown
    assert "(*withdrawn; recorded: direction only*)" in shown
    assert shown.endswith("⛔ Withdrawn: started at the answer")

    old_cell = _findings_notebook('Markdown(findings_markdown("98_x"))', "smoke record")
    (tmp_path / "results" / "gpu").mkdir()
    (tmp_path / "results" / "gpu" / "98_x.json").write_text(path.read_text())
    assert not claims.refresh_findings(old_cell, "98_x", "gpu", tmp_path)
    assert old_cell.cells[1].outputs[0]["data"]["text/markdown"] == "smoke record"


def test_committed_notebooks_open_with_their_own_record():
    """Each committed notebook's findings cell shows the record its run wrote (refresh with
    `python -m paper_lib.claims --update-readme`, which `make reproduce` runs)."""
    import nbformat

    checked = 0
    for path, profile in claims.committed_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        before = nbformat.writes(nb)
        claims.refresh_findings(nb, path.stem, profile)
        assert nbformat.writes(nb) == before, (
            f"{path.relative_to(PROJECT_ROOT)}: its findings cell shows another record; run "
            "`python -m paper_lib.claims --update-readme`")
        checked += any("findings_markdown(run.stem, run.profile)" in c.source for c in nb.cells)
    assert checked >= 4  # notebooks 01-04 at least


def test_volatile_claims_stay_out_of_checked_lines_and_comparisons(tmp_path):
    """Wall-clock claims are recorded but excluded from verdict lines and determinism."""
    from paper_lib.claims import comparable

    run = claims.Run("97_t", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("a.stable", "s", 1.0, 1.0, 0.1, "T1")
    run.claim("a.timing", "t", 1.25, 2.0, 0.25, "T2", direction_holds=True, volatile=True)
    run.metric("cost", 3.0, volatile=True)
    run.metric("fvu", 0.1)
    assert "a.timing" not in run.verdict_lines() and "a.timing" in run.volatile_lines()
    rec = json.loads(json.dumps(run.finish()))  # as read back from disk
    other = json.loads(json.dumps(rec))
    other["claims"][1]["ours"] = 9.0
    other["metrics"]["cost"] = 7.0
    assert comparable(rec) == comparable(other)
    other["metrics"]["fvu"] = 0.2
    assert comparable(rec) != comparable(other)


def _rec(ours, verdict, fvu, dead, cost=1.0):
    return {"claims": [{"id": "a", "ours": ours, "verdict": verdict},
                       {"id": "t", "ours": cost, "verdict": "reproduced", "volatile": True}],
            "metrics": {"grid": [{"fvu": fvu, "dead": dead}], "name": "x", "nan": float("nan"),
                        "cost": cost},
            "volatile_metrics": ["cost"], "seconds": cost, "env": {"cpu": str(cost)}}


def test_compare_records_hand_case():
    """fvu 0.25 -> 0.2 (relative 0.05 / 0.25 = 0.2), dead 0 -> 1 (relative 1), claim a's ours
    0.5 -> 0.4 (0.2) with its verdict flipped; NaN equals NaN; the volatile claim, metric,
    timings and environment never count."""
    c = claims.compare_records(_rec(0.5, "reproduced", 0.25, 0, cost=1.0),
                               _rec(0.4, "not reproduced", 0.2, 1, cost=9.0))
    assert c["values"] == 5  # grid fvu, grid dead, name, nan, and claim a's ours
    assert sorted(c["differ"]) == ["claims.a.ours", "metrics.grid[0].dead",
                                   "metrics.grid[0].fvu"]
    assert c["verdicts"] == [("a", "reproduced", "not reproduced")]
    assert c["median_rel"] == pytest.approx(0.2) and c["max_rel"] == (1.0, "metrics.grid[0].dead")
    same = claims.compare_records(_rec(0.5, "reproduced", 0.25, 0), _rec(0.5, "reproduced",
                                                                           0.25, 0, cost=3.0))
    assert same["differ"] == [] and same["max_rel"] is None and same["verdicts"] == []


@pytest.fixture
def committed_results(tmp_path):
    """A git checkout in tmp_path whose HEAD holds results/smoke/01_x.json."""
    import subprocess

    res = tmp_path / "results" / "smoke"
    res.mkdir(parents=True)
    (res / "01_x.json").write_text(json.dumps(_rec(0.5, "reproduced", 0.25, 0)))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "ref"], check=True)
    return res


def test_compare_against_git_reports_each_notebook(tmp_path, committed_results):
    """A rerun's results/<profile>/*.json against their committed copies: the changed
    verdict and differing values named per notebook; a notebook not committed says so."""
    res = committed_results
    (res / "01_x.json").write_text(json.dumps(_rec(0.4, "not reproduced", 0.25, 0)))
    (res / "02_y.json").write_text(json.dumps(_rec(0.5, "reproduced", 0.25, 0)))
    lines = claims.compare_lines("smoke", "HEAD", tmp_path)
    assert lines == ["01_x: 1 of 5 values differ (relative: median 2.0e-01, max 2.0e-01 at "
                     "claims.a.ours)", "  verdict a: reproduced -> not reproduced",
                     "02_y: not in git revision HEAD"]
    with pytest.raises(ValueError, match="no results/gpu"):
        claims.compare_lines("gpu", "HEAD", tmp_path)
    with pytest.raises(ValueError, match="nosuchrev: not a revision"):
        claims.compare_lines("smoke", "nosuchrev", tmp_path)


def test_reproduce_reports_only_what_this_run_wrote(tmp_path, committed_results, capsys,
                                                    tmp_path_factory):
    """After a run, reproduce compares the results it wrote (newer than its start) with the
    committed ones, and says nothing outside a git checkout or when it wrote none."""
    import time

    from paper_lib.reproduce import report_against_committed

    start = time.time()
    rerun = committed_results / "01_x.json"
    rerun.write_text(json.dumps(_rec(0.5, "reproduced", 0.2, 0)))
    # written after start, whatever the clock: the file system stamps files from a coarser
    # clock than time.time(), which can put a file written at once a tick before it
    os.utime(rerun, (start + 1, start + 1))
    report_against_committed("smoke", ["01_x", "02_y"], start, tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("against the committed results") and "\n  01_x: 1 of 5 values" in out
    report_against_committed("smoke", ["01_x"], time.time() + 60, tmp_path)  # none newer
    plain = tmp_path_factory.mktemp("plain")  # a copy without .git
    (plain / "results" / "smoke").mkdir(parents=True)
    (plain / "results" / "smoke" / "01_x.json").write_text(json.dumps(_rec(0.5, "x", 0.2, 0)))
    report_against_committed("smoke", ["01_x"], start, plain)
    assert capsys.readouterr().out == ""


def test_noise_level_claims_are_named_but_not_checked(tmp_path):
    """A noise-level verdict stays in the table and the JSON, not in the checked lines."""
    run = claims.Run("97_t", AmortParams.from_profile("smoke"), root=tmp_path)
    run.claim("a.stable", "s", 1.0, 1.0, 0.1, "T1")
    run.claim("a.coin", "c", None, -0.04, 0.01, "T2", direction_holds=True,
              noisy="sign changed between machines")
    assert run.verdict_lines().splitlines() == [
        "a.stable: reproduced (paper 1, tolerance 0.1)",
        "a.coin: noise level, verdict not checked"]
    rec = run.finish()
    assert rec["claims"][1]["verdict"] == "reproduced"
    assert "| reproduced (noise level) |" in claims.claims_markdown(rec["claims"])


def _record(seed: int, verdicts: dict[str, str], noisy: tuple[str, ...] = (),
            git: str = "abc1234") -> dict:
    """A results record with one value claim per entry of `verdicts` (plus a timing claim)."""
    claims_ = [{"id": i, "statement": i, "paper": None, "ours": 0.5, "tolerance": 0.1,
                "kind": "value", "direction_holds": v != "not reproduced", "volatile": False,
                "noisy": "why" if i in noisy else "", "verdict": v, "source": "S"}
               for i, v in verdicts.items()]
    claims_.append({"id": "t.cost", "statement": "t", "paper": 1.0, "ours": 1.3,
                    "tolerance": 0.1, "kind": "value", "direction_holds": True,
                    "volatile": True, "noisy": "", "verdict": "direction only", "source": "S"})
    return {"notebook": "09_x", "profile": "smoke", "params": {"seed": seed},
            "env": {"git": git}, "claims": claims_}


def test_seed_stability_tables_which_verdicts_change(tmp_path):
    """`a` keeps its verdict at seeds 0, 1, 2; `b` turns at seed 1 (marked noise level
    there); `c` is missing at seed 2, which counts as a change; the timing claim is left
    out. So 1 of 3 claims is stable, 2 change, 1 of them marked noise level."""
    base = {"a": "reproduced", "b": "reproduced", "c": "not reproduced"}
    recs = {0: _record(0, base), 1: _record(1, {**base, "b": "not reproduced"}, ("b",)),
            2: _record(2, {"a": "reproduced", "b": "reproduced"}, git="def5678")}
    rows = claims.seed_stability(recs)
    assert [(r["id"], r["same"]) for r in rows] == [("a", True), ("b", False), ("c", False)]
    assert rows[2]["cells"][2] is None
    path = claims.record_path("smoke", "09_x", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(recs[0]))
    for s in (1, 2):
        p = claims.seed_record_path("smoke", s, "09_x", tmp_path)
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(recs[s]))
    for s in (0, 1, 2):  # a notebook without claims (the explorer) gets no table
        p = (claims.record_path("smoke", "09_y", tmp_path) if s == 0 else
             claims.seed_record_path("smoke", s, "09_y", tmp_path))
        p.write_text(json.dumps({**recs[s], "claims": []}))
    text = claims.stability_markdown("smoke", {"09_x": [1, 2], "09_y": [1, 2]}, tmp_path)
    assert "09_y" not in text
    assert text.startswith("`smoke` verdicts at seeds 0, 1, 2: 1 of 3 claims keep one verdict "
                           "at every seed (timing claims left out); 2 change, 1 of them marked "
                           "noise level at one seed or more. Code (git): preset abc1234; "
                           "other seeds abc1234, def5678.")
    assert "| `b` | ✅ 0.5 | ❌ 0.5 (noise level) | ✅ 0.5 | changes |" in text
    assert "| `c` | ❌ 0.5 | ❌ 0.5 | missing | changes |" in text
    assert "t.cost" not in text


def test_seed_runs_are_found_and_summarised_under_the_scoreboard(tmp_path):
    """Notebook 09_x has runs at seeds 1 and 2 (its claim `b` turns at seed 1), 09_z at
    seed 2 only (nothing changes), 09_w none: found as {09_x: [1, 2], 09_z: [2]}. The
    scoreboard then says 2 of 3 claims keep their verdict, 1 changes, marked noise level,
    and lists that one claim alone; stability.md is written with both tables."""
    def put(path, rec):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))

    base = {"a": "reproduced", "b": "reproduced"}
    for stem, seeds in (("09_x", (1, 2)), ("09_z", (2,)), ("09_w", ())):
        put(claims.record_path("smoke", stem, tmp_path),
            {**_record(0, base if stem == "09_x" else {"c": "reproduced"}), "notebook": stem,
             "env": {"git": "abc1234", "device": "cpu"}})
        for s in seeds:
            flipped = {**base, "b": "not reproduced"} if s == 1 else base
            put(claims.seed_record_path("smoke", s, stem, tmp_path),
                {**_record(s, flipped if stem == "09_x" else {"c": "reproduced"},
                           ("b",) if s == 1 else ()), "notebook": stem})
    (tmp_path / "results" / "smoke-seeds" / "seed7").mkdir()  # an empty run folder
    assert claims.seed_runs_found("smoke", tmp_path) == {"09_x": [1, 2], "09_z": [2]}
    assert claims.seed_runs_found("gpu", tmp_path) == {}
    board = claims.scoreboard(tmp_path)
    assert ("**Seed stability** (`smoke`, seeds 0, 1, 2; every claim in "
            "`results/smoke-seeds/stability.md`): 2 of 3 claims keep one verdict at every "
            "seed (timing claims left out); 1 change, 1 of them marked noise level") in board
    assert "| `b` | ✅ 0.5 | ❌ 0.5 (noise level) | ✅ 0.5 | changes |" in board
    assert "| `a` |" not in board.split("**09_x**")[0]  # stable claims are not listed
    path, text = claims.write_stability("smoke", tmp_path)
    assert path.read_text() == text and "**09_x**" in text and "**09_z**" in text
    assert "| claim | seed 0 | seed 2 | |" in text.split("**09_z**")[1]
    assert claims.write_stability("gpu", tmp_path) is None


def test_committed_stability_table_is_current():
    """results/<profile>-seeds/stability.md is what the committed seed runs' records give
    (run `make scoreboard`)."""
    for profile in ("smoke", "gpu"):
        runs = claims.seed_runs_found(profile)
        path = claims.stability_path(profile)
        if runs:
            assert path.read_text() == claims.stability_markdown(profile, runs), \
                f"stale {path.name}: run `make scoreboard`"
        else:
            assert not path.exists(), f"{path} has no seed runs behind it"
