"""Claims, the per-notebook results record, and the scoreboard.

A `Claim` puts the paper's number next to ours with a stated tolerance; the verdict is
computed, never typed in:
  - "reproduced":     |ours - paper| <= tolerance (and the claimed direction holds, if any);
                      for kind "at_most" / "at_least": ours <= paper + tol / ours >= paper - tol;
  - "direction only": outside the tolerance, but the qualitative direction holds;
  - "not reproduced": neither.
For a claim with no paper number (a pure ordering) only the direction decides.

`Run` is what a notebook uses: it times the run, saves figures to `figures/<profile>/`,
collects claims and metrics, and writes `results/<profile>/<stem>.json` atomically.
`python -m paper_lib.claims` prints the markdown scoreboard over every results file;
`--update-readme` rewrites the copy embedded in README.md; `--compare [REV]` reports how the
results here differ from those committed at a git revision (after a rerun: do my numbers
match the reference ones?).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from paper_lib.runtime import (
    PROJECT_ROOT,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    env_info,
    git_commit,
    output_root,
    release_kept,
)

Verdict = Literal["reproduced", "direction only", "not reproduced"]
Kind = Literal["value", "at_most", "at_least"]
VERDICTS: tuple[str, ...] = ("reproduced", "direction only", "not reproduced")
README_START = "<!-- scoreboard:start -->"
README_END = "<!-- scoreboard:end -->"


def decide(paper: float | None, ours: float, tolerance: float,
           direction_holds: bool | None = None, kind: Kind = "value") -> Verdict:
    """The verdict rule (see module docstring). NaN `ours` is never reproduced."""
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return "not reproduced"
    if paper is None:
        if direction_holds is None:
            raise ValueError("a claim without a paper number needs direction_holds")
        return "reproduced" if direction_holds else "not reproduced"
    if kind == "at_most":
        within = ours <= paper + tolerance + 1e-12
    elif kind == "at_least":
        within = ours >= paper - tolerance - 1e-12
    else:
        within = abs(ours - paper) <= tolerance + 1e-12
    if within and direction_holds is not False:
        return "reproduced"
    if direction_holds:
        return "direction only"
    return "not reproduced"


def mean_halfwidth(std: float, n: int) -> float:
    """Half-width of the two-sided 95% interval of a mean over n values with sample standard
    deviation std: Student's t with n - 1 degrees of freedom times the standard error
    (t = 4.30 at n = 3, 2.78 at 5, near 2 beyond 30; two standard errors alone would
    claim 95% from three values where they cover about 82%). Infinite for one value."""
    from scipy.stats import t  # lazy: scipy is slow to import and rarely needed here

    return float(t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else float("inf")


def seed_noise(ours: float, paper: float, tolerance: float, std: float, n: int) -> str:
    """For `Claim.noisy`: why a value claim's verdict is within seed noise, or "". `ours` is a
    mean over n seeds with standard deviation std; when an edge of the tolerance band
    (paper ± tolerance) lies inside its 95% interval (`mean_halfwidth`), another draw of
    seeds (or another CPU's rounding) can move it across, so the verdict is not a property
    of the code."""
    half = mean_halfwidth(std, n)
    edge = abs(abs(ours - paper) - tolerance)
    if edge < half:
        return (f"a tolerance edge lies inside the 95% interval (± {half:.2g}) of the mean "
                f"over {n} seeds")
    return ""


def paired_noise(diffs: Any, what: str = "runs") -> str:
    """For `Claim.noisy`: why a mean of paired differences (say, TopK's score minus ReLU's,
    one difference per independent run, each on its own data) is noise level, or "": its
    95% interval (`mean_halfwidth`) includes 0. One difference has no interval, so it is
    noise level too: its spread is unmeasured."""
    d = [float(v) for v in diffs]
    if len(d) < 2:
        return f"one difference only: its spread over {what} is unmeasured"
    mean, half = statistics.fmean(d), mean_halfwidth(statistics.stdev(d), len(d))
    if abs(mean) < half:
        return (f"|mean difference| {abs(mean):.3g} inside its 95% interval (± {half:.3g}) "
                f"over {len(d)} {what}")
    return ""


def trend_noise(x: Any, y: Any, level: float = 0.05) -> str:
    """For `Claim.noisy`: why a rank-trend claim (the sign of spearman(x, y) over a few
    SAEs or settings) is noise level, or "". Noise level when points with no trend at all
    would order themselves at least as strongly with chance `level` or more (exact
    permutation test, `metrics.spearman_permutation_p`): each point is one training run,
    and one run's luck can reorder a handful of them. `y` may hold several runs' values
    at the same x (their mean rho, each run permuted on its own)."""
    from paper_lib.metrics import as_runs, spearman_permutation_p  # lazy: loads the data code

    x, ys = list(x), as_runs(y)
    p = spearman_permutation_p(x, ys)
    if p >= level:
        runs = f" in each of {len(ys)} runs" if len(ys) > 1 else ""
        return (f"permutation p = {p:.2f} over {len(x)} points{runs}: an order this strong "
                f"arises by chance")
    return ""


def excess_noise(hits_a: int, n_a: int, hits_b: int, n_b: int, level: float = 0.05) -> str:
    """For `Claim.noisy`: why "a has more hits than b" (say, dense latents in one SAE against
    another's, each latent an item) is noise level, or "": one-sided Fisher exact p >= `level`
    (`metrics.fisher_greater_p`). It treats the items as independent draws, so it speaks to
    how many items were counted, not to another training run's luck."""
    from paper_lib.metrics import fisher_greater_p  # lazy: metrics loads the data code

    p = fisher_greater_p(hits_a, n_a, hits_b, n_b)
    if p >= level:
        return (f"Fisher exact p = {p:.2f} ({hits_a} of {n_a} against {hits_b} of {n_b}): "
                f"a split this uneven arises by chance")
    return ""


def shift_noise(a: Any, b: Any, what: str = "values", level: float = 0.05) -> str:
    """For `Claim.noisy`: why "sample a's values exceed sample b's" (say, the effects of
    latents drawn at random from two SAEs) is noise level, or "": one-sided rank-sum
    p >= `level` (`metrics.rank_sum_greater_p`). Like `excess_noise` it speaks to the items
    sampled, not to another training run's luck."""
    from paper_lib.metrics import rank_sum_greater_p  # lazy: metrics loads the data code

    a, b = list(a), list(b)
    p = rank_sum_greater_p(a, b)
    if p >= level:
        return (f"rank-sum p = {p:.2f} ({len(a)} against {len(b)} {what}): a shift this "
                f"large arises by chance")
    return ""


def display_step(tolerance: float) -> float:
    """The largest of 1, 2 or 5 x 10^k not above the tolerance (0.095 -> 0.05)."""
    if tolerance <= 0:
        return 0.01
    exp = math.floor(math.log10(tolerance))
    for m in (5, 2, 1):
        if m * 10**exp <= tolerance * (1 + 1e-9):
            return m * 10**exp
    return 10**exp


def _rounded(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{round(value / step) * step:.{decimals}f}"


def round_to(value: float | None, tolerance: float) -> str:
    """`value` rounded to a multiple of display_step(tolerance), as text: stable across
    machines unless the value sits on a rounding boundary."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return _rounded(value, display_step(tolerance))


def shown_ours(ours: float | None, paper: float | None, tolerance: float,
               direction_holds: bool | None = None, kind: Kind = "value") -> str:
    """Our number as the claims tables show it: rounded like `round_to`, but never so
    coarsely that the shown number would earn another verdict than the exact one: 0.666
    against a paper's 0.609 +- 0.05 shows as 0.66 (the next 1-2-5 step, 0.02), not as 0.65,
    which would read as reproduced. Only values within half a display step of the
    tolerance's edge get the extra digits."""
    text = round_to(ours, tolerance)
    if paper is None or ours is None or not math.isfinite(ours):
        return text
    verdict = decide(paper, ours, tolerance, direction_holds, kind)
    step = display_step(tolerance)
    for _ in range(10):
        text = _rounded(ours, step)
        if decide(paper, float(text), tolerance, direction_holds, kind) == verdict:
            return text
        step = display_step(step / 1.5)  # the next finer 1-2-5 step (they are 2-2.5x apart)
    return f"{ours:.6g}"


@dataclass(frozen=True)
class Claim:
    """One checkable statement from a paper, with our measurement and verdict."""

    id: str
    """Stable dotted id, e.g. `amort.known_dict.ito_beats_sae`."""
    statement: str
    """The claim in words."""
    paper: float | None
    """The paper's number (None for a pure ordering)."""
    ours: float
    """Our measurement, computed in the notebook."""
    tolerance: float
    """Largest |ours - paper| still counted as reproduced; justified in the notebook."""
    source: str
    """Where in the paper the number comes from (table / figure / section)."""
    direction_holds: bool | None = None
    """Whether the qualitative direction of the claim holds in our data."""
    kind: Kind = "value"
    """"value": ours should match paper; "at_most" / "at_least": paper is a bound."""
    volatile: bool = False
    """Measured from wall-clock time: recorded, but kept out of nbval-checked output and
    determinism comparisons (it changes from run to run and machine to machine)."""
    noisy: str = ""
    """Why the verdict sits within the spread of our runs (e.g. its sign changed between
    two machines): such a verdict is shown, but not nbval-checked, since it is not a
    property of the code. Determinism comparisons (same machine) still include it."""
    verdict: Verdict = field(init=False)

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"claim {self.id}: tolerance must be >= 0")
        object.__setattr__(self, "ours", float(self.ours))
        if self.paper is not None:
            object.__setattr__(self, "paper", float(self.paper))
        if self.direction_holds is not None:
            object.__setattr__(self, "direction_holds", bool(self.direction_holds))
        if self.kind not in ("value", "at_most", "at_least"):
            raise ValueError(f"claim {self.id}: unknown kind {self.kind!r}")
        object.__setattr__(self, "verdict", decide(self.paper, self.ours, self.tolerance,
                                                   self.direction_holds, self.kind))

    def line(self) -> str:
        """The verdict with our number, rounded to the tolerance's precision (`shown_ours`)."""
        paper = _paper_text(self.paper, self.kind)
        ours = shown_ours(self.ours, self.paper, self.tolerance, self.direction_holds,
                          self.kind)
        return (f"{self.id}: {self.verdict} (paper {paper}, ours ~{ours}, "
                f"tolerance {self.tolerance:g})")

    def verdict_line(self) -> str:
        """The verdict without our number: what nbval checks. Our number moves in its
        last digits with the CPU and thread count (a model trained on the CPU drifts);
        the verdict must not, and a change of verdict is a regression."""
        return (f"{self.id}: {self.verdict} (paper {_paper_text(self.paper, self.kind)}, "
                f"tolerance {self.tolerance:g})")


def _paper_text(paper: float | None, kind: str) -> str:
    if paper is None:
        return "n/a"
    return {"at_most": "<= ", "at_least": ">= "}.get(kind, "") + f"{paper:g}"


# Parameters that do not change what a run measures (display, parallelism, placement).
BOOKKEEPING_PARAMS = ("progress", "workers", "device")
CUSTOM_SUFFIX = "-custom"


def record_path(folder: str, stem: str, root: Path = PROJECT_ROOT) -> Path:
    """results/<folder>/<stem>.json, where a run of notebook `stem` keeps its record
    (folder: a profile, or <profile>-custom, see results_folder)."""
    return Path(root) / "results" / folder / f"{stem}.json"


def results_folder(params: Any) -> str:
    """`<profile>` for a run with the profile's preset parameters, `<profile>-custom` when
    any other parameter differs from it: an exploratory run (say `-p n_seeds 10`) never
    overwrites the profile's reference results, figures and scoreboard rows."""
    try:
        preset = type(params).from_profile(params.profile).to_dict()
    except (AttributeError, TypeError, ValueError):
        return str(params.profile)
    same = all(v == preset.get(k) for k, v in params.to_dict().items()
               if k not in BOOKKEEPING_PARAMS)
    return params.profile if same else params.profile + CUSTOM_SUFFIX


class Run:
    """Bookkeeping for one notebook execution."""

    def __init__(self, stem: str, params: Any, root: Path | None = None) -> None:
        self.stem = stem
        self.params = params
        self.profile = params.profile
        self.root = Path(root) if root is not None else output_root()
        self.t0 = time.perf_counter()
        self.claims: list[Claim] = []
        self.metrics: dict[str, Any] = {}
        self.volatile_metrics: list[str] = []
        self.figures: list[str] = []
        self.folder = results_folder(params)
        self.fig_dir = self.root / "figures" / self.folder
        self.results_path = record_path(self.folder, stem, self.root)
        self.git = git_commit()  # before this run writes its figures, record and notebook

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        c = Claim(*args, **kwargs)
        if any(existing.id == c.id for existing in self.claims):
            raise ValueError(f"duplicate claim id {c.id!r}")
        self.claims.append(c)
        return c

    def metric(self, name: str, value: Any, volatile: bool = False) -> None:
        """Record a metric; `volatile` marks wall-clock measurements (see Claim.volatile)."""
        self.metrics[name] = value
        if volatile:
            self.volatile_metrics.append(name)

    def savefig(self, fig: Any, name: str) -> None:
        """Save `fig` as PNG and PDF under figures/<profile>/<stem>_<name>.*, atomically,
        and list it in the record. Returns nothing: a cell ending in it shows the figure,
        not this host's path."""
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        out = self.fig_dir / f"{self.stem}_{name}"
        # No creation date in the PDF: reruns produce identical bytes (clean git diffs).
        for ext, kw in (("png", {"dpi": 120}), ("pdf", {"metadata": {"CreationDate": None}})):
            with atomic_path(out.with_suffix(f".{ext}")) as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)
        self.figures.append(str(out.relative_to(self.root)))

    def record(self) -> dict[str, Any]:
        from paper_lib.config import check_device

        device = check_device(self.profile, getattr(self.params, "device", "auto"))
        return {
            "notebook": self.stem,
            "profile": self.profile,
            "params": self.params.to_dict(),
            "env": env_info(device, self.git),
            "seconds": round(time.perf_counter() - self.t0, 1),
            "claims": [asdict(c) for c in self.claims],
            "metrics": self.metrics,
            "volatile_metrics": self.volatile_metrics,
            "figures": self.figures,
        }

    def finish(self) -> dict[str, Any]:
        """Write the results JSON; returns the record. The trained SAEs' checkpoints kept
        for an interrupted rerun (`runtime.keep_until_recorded`) are then removed."""
        rec = self.record()
        atomic_write_json(self.results_path, rec)
        release_kept()
        return rec

    def verdict_lines(self) -> str:
        """The machine-stable verdict lines (what nbval checks): no numbers of ours,
        timing claims excluded, noise-level claims named without their verdict. The
        claims table shows the numbers."""
        return "\n".join(f"{c.id}: noise level, verdict not checked" if c.noisy
                         else c.verdict_line() for c in self.claims if not c.volatile)

    def volatile_lines(self) -> str:
        """Verdict lines of the wall-clock claims (shown, never checked)."""
        return "\n".join(c.line() for c in self.claims if c.volatile)

    def table(self) -> str:
        return claims_markdown(self.claims)


def _shown(d: dict[str, Any]) -> str:
    """shown_ours of a claim's record (an asdict'ed Claim or a results-file entry)."""
    return shown_ours(d["ours"], d["paper"], d["tolerance"], d.get("direction_holds"),
                      d.get("kind", "value"))


def claims_markdown(claims: list[Claim] | list[dict[str, Any]]) -> str:
    rows = ["| claim | paper | ours | tolerance | verdict | source |",
            "|---|---|---|---|---|---|"]
    for c in claims:
        d = asdict(c) if isinstance(c, Claim) else c
        paper = _paper_text(d["paper"], d.get("kind", "value"))
        verdict = d["verdict"] + (" (noise level)" if d.get("noisy") else "")
        rows.append(f"| `{d['id']}` | {paper} | {_shown(d)} | "
                    f"{d['tolerance']:g} | {verdict} | {d['source']} |")
    return "\n".join(rows)


ICONS = {"reproduced": "✅", "direction only": "➖", "not reproduced": "❌"}


def findings_markdown(stem: str, profile: str = "smoke", root: Path = PROJECT_ROOT) -> str:
    """'What we find': the verdicts of the last recorded run of a notebook, from its
    results JSON (the claims table at the end of the notebook is the authoritative copy).
    Claims withdrawn from that record (`WITHDRAWN`) are counted apart and say why."""
    path = record_path(profile, stem, root)
    if not path.exists():
        return f"_No recorded `{profile}` run of {stem} yet: run the notebook._"
    rec = json.loads(path.read_text())
    w, gone, counts = verdict_counts(rec, root)
    if any(gone):
        counts["withdrawn"] = sum(gone)
    head = (f"**What we find** (last recorded `{profile}` run, device {rec['env']['device']}, "
            f"git {rec['env'].get('git', '?')}): " + ", ".join(f"{n} {v}" for v, n in
                                                              counts.items()) + ".")
    rows = []
    for c, g in zip(rec["claims"], gone):
        paper = _paper_text(c["paper"], c.get("kind", "value"))
        verdict = f"withdrawn; recorded: {c['verdict']}" if g else c["verdict"]
        rows.append(f"- {'⛔' if g else ICONS[c['verdict']]} {c['statement']} — paper {paper}, "
                    f"ours {_shown(c)} (*{verdict}*)")
    if w is not None and any(gone):
        rows += ["", f"⛔ Withdrawn: {w.reason}"]
    return "\n".join([head, ""] + rows)


def refresh_findings(nb: Any, stem: str, profile: str, root: Path = PROJECT_ROOT) -> bool:
    """Point an executed notebook's 'what the last recorded run found' cell at the record
    its own run wrote. Executed, that cell shows the record from before the run (the
    notebook writes its own only at the end), so a committed notebook would otherwise open
    with the previous run's numbers above its own claims table. `nb`: an nbformat node.
    Returns whether a cell changed."""
    if not record_path(profile, stem, root).exists():
        return False
    text, changed = findings_markdown(stem, profile, root), False
    for cell in nb.cells:
        if cell.cell_type != "code" or "findings_markdown(" not in cell.source:
            continue
        if "run.profile" not in cell.source and profile != "smoke":
            continue  # an older cell that always read the smoke record
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/markdown" in data and data["text/markdown"] != text:
                data["text/markdown"] = text
                changed = True
    return changed


def committed_notebooks(root: Path = PROJECT_ROOT) -> list[tuple[Path, str]]:
    """Each committed executed notebook with the profile of the record it made: the
    notebooks themselves (smoke) and the copies kept beside results/<profile>/*.json."""
    out = [(p, "smoke") for p in sorted((root / "notebooks").glob("*.ipynb"))]
    for path in sorted((root / "results").glob("*/*.ipynb")):
        if not path.parent.name.endswith(CUSTOM_SUFFIX):
            out.append((path, path.parent.name))
    return out


def refresh_committed(root: Path = PROJECT_ROOT) -> list[Path]:
    """refresh_findings on every committed notebook (after a withdrawal, say); returns the
    notebooks rewritten."""
    import nbformat

    changed = []
    for path, profile in committed_notebooks(root):
        nb = nbformat.read(str(path), as_version=4)
        if refresh_findings(nb, path.stem, profile, root):
            atomic_write_text(path, nbformat.writes(nb) + "\n")
            changed.append(path)
    return changed


def load_results(root: Path = PROJECT_ROOT) -> list[dict[str, Any]]:
    out = []
    for path in sorted((root / "results").glob("*/*.json")):
        if path.parent.name.endswith(CUSTOM_SUFFIX):  # exploratory runs stay off the board
            continue
        rec = json.loads(path.read_text())
        if "claims" in rec and "notebook" in rec:
            out.append(rec)
    return out


@dataclass(frozen=True)
class Withdrawal:
    """Claims of one committed results file found wrong after the run that made it. The
    scoreboard shows them as withdrawn, with the reason, for as long as the file is the one
    withdrawn: a rerun changes its sha256 and the withdrawal lapses (a test then asks for
    the entry's removal)."""

    results: str
    """"<profile>/<notebook>", i.e. results/<profile>/<notebook>.json."""
    sha256: str
    """Of the withdrawn file's bytes."""
    prefixes: tuple[str, ...]
    """Claim ids starting with one of these are withdrawn."""
    reason: str

    def path(self, root: Path = PROJECT_ROOT) -> Path:
        folder, stem = self.results.split("/")
        return record_path(folder, stem, root)

    def applies(self, rec: dict[str, Any], root: Path = PROJECT_ROOT) -> bool:
        path = self.path(root)
        return (self.results == f"{rec['profile']}/{rec['notebook']}" and path.exists()
                and hashlib.sha256(path.read_bytes()).hexdigest() == self.sha256)

    def covers(self, claim_id: str) -> bool:
        return claim_id.startswith(self.prefixes)


WITHDRAWN: tuple[Withdrawal, ...] = (
    Withdrawal("gpu/02_amortisation_gap",
               "246437b33eb180972acee60d318fa46be891d0776f9ce98b1c08c4536a256d16",
               ("amort.unknown.", "amort.scaling."),
               "made before the fix of 2026-12-06 (`runtime.stream_generator`), when "
               "synthetic data and initialisations shared one random stream per seed: with the "
               "dictionary unknown, the SAE, the MLP encoder's decoder and sparse coding "
               "started exactly at the true one. The known-dictionary, theorem and LM claims "
               "did not depend on it. Rerun 02 at `gpu` to replace them."),
    Withdrawal("gpu/04_matryoshka_tradeoffs",
               "7155f5b991029a278dc8e8c450a7747f7445a0142b0214b3bc50da093330aca4",
               ("interp.synthetic.",),
               "made before the fix of 2026-12-06 (`runtime.stream_generator`), when the "
               "synthetic features and the SAEs' initial decoders shared one random stream: "
               "every latent started at its true feature (at smoke that lifted inner, outer and "
               "TopK recovery to 0.91, 0.82, 0.88 from 0.81, 0.41, 0.65). The LM-based claims "
               "did not depend on it. Rerun 04 at `gpu` to replace it."),
    Withdrawal("gpu/03_topk_scaling",
               "179aff38594029955af377c3d8d8dd4814c1116067c257f904bfc8596603a5c8",
               ("topk.probe.",),
               "made before the fix of 2026-12-06 (`interp.best_single_latent_probe`), when "
               "each task's best latent was chosen by its loss on the test half and that same "
               "loss reported: an optimistic pick. At smoke it lowered the mean relative probe "
               "loss by 0.03-0.05 per SAE, more than TopK's margin over ReLU there (0.02). "
               "The other claims did not depend on it. Rerun 03 at `gpu` to replace them."),
)


def withdrawal(rec: dict[str, Any], root: Path = PROJECT_ROOT) -> Withdrawal | None:
    """The withdrawal that applies to a results record, if any."""
    return next((w for w in WITHDRAWN if w.applies(rec, root)), None)


def verdict_counts(rec: dict[str, Any], root: Path = PROJECT_ROOT
                   ) -> tuple[Withdrawal | None, list[bool], dict[str, int]]:
    """A record's withdrawal (or None), which of its claims it covers, and the count of
    each verdict among the claims it leaves standing."""
    w = withdrawal(rec, root)
    gone = [w is not None and w.covers(c["id"]) for c in rec["claims"]]
    counts = {v: sum(c["verdict"] == v and not g for c, g in zip(rec["claims"], gone))
              for v in VERDICTS}
    return w, gone, counts


def scoreboard(root: Path = PROJECT_ROOT) -> str:
    """Markdown scoreboard of every claim in results/<profile>/*.json (withdrawn claims,
    `WITHDRAWN`, counted apart and marked in their tables)."""
    records = load_results(root)
    if not records:
        return "_No results yet: run `make reproduce`._"
    lines = ["| profile | notebook | claims | reproduced | direction only | not reproduced "
             "| withdrawn |", "|---|---|---|---|---|---|---|"]
    tables = []
    for rec in records:
        w, gone, counts = verdict_counts(rec, root)
        lines.append(f"| {rec['profile']} | {rec['notebook']} | {len(rec['claims'])} | "
                     + " | ".join(str(counts[v]) for v in VERDICTS) + f" | {sum(gone)} |")
        shown = [{**c, "verdict": f"withdrawn (recorded: {c['verdict']})"} if g else c
                 for c, g in zip(rec["claims"], gone)]
        tables += ["", f"**{rec['notebook']}** (`{rec['profile']}`, device {rec['env']['device']}"
                   + (f", {rec['env']['gpu']}" if "gpu" in rec["env"] else "") + ")", "",
                   claims_markdown(shown)]
        if w is not None:
            tables += ["", f"Withdrawn: {w.reason}"]
    for profile in dict.fromkeys(rec["profile"] for rec in records):
        if (text := stability_summary(profile, root)) is not None:
            lines += ["", text]
    return "\n".join(lines + tables)


def embed_in_readme(readme: str, board: str) -> str:
    if README_START not in readme or README_END not in readme:
        raise ValueError(f"README.md lacks the {README_START} / {README_END} markers")
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{board}\n{README_END}{tail}"


VOLATILE_KEYS = {"seconds", "env", "figures", "volatile_metrics"}


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """What two runs must agree on: everything but timings, environment and the claims and
    metrics marked volatile (wall-clock measurements)."""
    out = {k: v for k, v in rec.items() if k not in VOLATILE_KEYS}
    out["claims"] = [c for c in rec.get("claims", []) if not c.get("volatile")]
    skip = set(rec.get("volatile_metrics", []))
    out["metrics"] = {k: v for k, v in rec.get("metrics", {}).items() if k not in skip}
    return out


def _leaves(x: Any, path: str = "") -> Any:
    """(path, value) of every leaf of a nested metrics record."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def compare_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """How two runs of one notebook differ, on what `comparable` keeps (no timings): the
    claims whose verdict changed, and the metric values that differ, with the relative size
    |a - b| / max(|a|, |b|) of the numeric ones (claims' `ours` among them)."""
    a, b = comparable(old), comparable(new)
    old_claims = {c["id"]: c for c in a["claims"]}
    verdicts = [(c["id"], old_claims[c["id"]]["verdict"], c["verdict"]) for c in b["claims"]
                if c["id"] in old_claims and c["verdict"] != old_claims[c["id"]]["verdict"]]
    values = dict(_leaves(a["metrics"], "metrics"))
    values.update({f"claims.{i}.ours": c["ours"] for i, c in old_claims.items()})
    news = dict(_leaves(b["metrics"], "metrics"))
    news.update({f"claims.{c['id']}.ours": c["ours"] for c in b["claims"]})
    differ, rel = [], []
    for key, v in values.items():
        w = news.get(key)
        if _same(v, w):
            continue
        differ.append(key)
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
               for t in (v, w)):
            rel.append((abs(v - w) / max(abs(v), abs(w)), key))
    rel.sort()
    return {"values": len(values), "differ": differ,
            "only_old": sorted(set(old_claims) - {c["id"] for c in b["claims"]}),
            "verdicts": verdicts, "median_rel": rel[len(rel) // 2][0] if rel else None,
            "max_rel": rel[-1] if rel else None}


def _git_record(rev: str, path: Path, root: Path) -> dict[str, Any] | None:
    rel = path.resolve().relative_to(root.resolve()).as_posix()
    out = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True,
                         text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def compare_lines(profile: str, rev: str, root: Path = PROJECT_ROOT,
                  stems: list[str] | None = None) -> list[str]:
    """A report of results/<profile>/*.json (those of `stems` only, if given) against the same
    files at git revision `rev`: per notebook, what differs (see compare_records), timings
    left out."""
    paths = sorted(p for p in (root / "results" / profile).glob("*.json")
                   if stems is None or p.stem in stems)
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           cwd=root, capture_output=True)
    if known.returncode != 0:
        raise ValueError(f"--compare {rev}: not a revision of a git checkout at {root}")
    if not paths:
        raise ValueError(f"no results/{profile}/*.json here: run `make reproduce` (or "
                         f"`python -m paper_lib.reproduce --profile {profile}`) first")
    lines = []
    for path in paths:
        old = _git_record(rev, path, root)
        if old is None:
            lines.append(f"{path.stem}: not in git revision {rev}")
            continue
        c = compare_records(old, json.loads(path.read_text()))
        head = f"{path.stem}: {len(c['differ'])} of {c['values']} values differ"
        if c["max_rel"] is not None:
            head += (f" (relative: median {c['median_rel']:.1e}, max {c['max_rel'][0]:.1e} at "
                     f"{c['max_rel'][1]})")
        lines.append(head)
        lines += [f"  verdict {i}: {was} -> {now}" for i, was, now in c["verdicts"]]
        lines += [f"  claim {i}: only in {rev}" for i in c["only_old"]]
    return lines


SEEDS_SUFFIX = "-seeds"


def seed_record_path(profile: str, seed: int, stem: str, root: Path = PROJECT_ROOT) -> Path:
    """results/<profile>-seeds/seed<seed>/<stem>.json: a run at the profile's preset
    parameters but another seed (`reproduce --seeds`), kept off the scoreboard."""
    return record_path(f"{profile}{SEEDS_SUFFIX}/seed{seed}", stem, root)


def stability_path(profile: str, root: Path = PROJECT_ROOT) -> Path:
    """results/<profile>-seeds/stability.md: the seed runs' verdicts beside the preset's."""
    return root / "results" / f"{profile}{SEEDS_SUFFIX}" / "stability.md"


def seed_stability(records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One notebook's claims across seeds: `records` maps seed -> its results record. Per
    claim of the first record (timing claims left out: their spread is the machine's, not
    the seed's), {"id", "cells": {seed: claim entry or None}, "same": one verdict at every
    seed}."""
    seeds = list(records)
    by_seed = {s: {c["id"]: c for c in records[s]["claims"]} for s in seeds}
    rows = []
    for c in records[seeds[0]]["claims"]:
        if c.get("volatile"):
            continue
        cells = {s: by_seed[s].get(c["id"]) for s in seeds}
        verdicts = {None if e is None else e["verdict"] for e in cells.values()}
        rows.append({"id": c["id"], "cells": cells, "same": len(verdicts) == 1})
    return rows


def seed_runs_found(profile: str, root: Path = PROJECT_ROOT) -> dict[str, list[int]]:
    """The seed runs made for `profile` (`reproduce --seeds`): each notebook with a preset
    record -> the other seeds it has a record at (results/<profile>-seeds/seed<s>/), where
    it has one or more; sorted."""
    base = root / "results" / f"{profile}{SEEDS_SUFFIX}"
    seeds = sorted(int(p.name[4:]) for p in base.glob("seed*")
                   if p.is_dir() and p.name[4:].isdigit())
    runs = {p.stem: [s for s in seeds if seed_record_path(profile, s, p.stem, root).exists()]
            for p in sorted((root / "results" / profile).glob("*.json"))}
    return {stem: ss for stem, ss in runs.items() if ss}


def _stability(profile: str, runs: dict[str, list[int]], root: Path
               ) -> tuple[list[tuple[str, list[int], list[dict[str, Any]]]], dict[str, set[str]]]:
    """Per notebook of `runs` (stem -> other seeds) with claims: (stem, its seeds in table
    order, seed_stability rows); and the git commits the preset and the other seeds'
    records name."""
    out, gits = [], {"preset": set(), "other seeds": set()}
    for stem, seeds in runs.items():
        base = json.loads(record_path(profile, stem, root).read_text())
        records = {int(base["params"]["seed"]): base}
        for s in seeds:
            records[s] = json.loads(seed_record_path(profile, s, stem, root).read_text())
            gits["other seeds"].add(records[s]["env"].get("git", "?"))
        gits["preset"].add(base["env"].get("git", "?"))
        rows = seed_stability(records)
        if rows:  # a notebook without claims (the explorer) has nothing to compare
            out.append((stem, list(records), rows))
    return out, gits


def _stability_rows(seeds: list[int], rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines: a claim per row, its verdict and value at each seed."""
    lines = ["| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | |",
             "|---" * (len(seeds) + 2) + "|"]
    for r in rows:
        cells = ["missing" if e is None else f"{ICONS[e['verdict']]} {_shown(e)}"
                 + (" (noise level)" if e.get("noisy") else "") for e in r["cells"].values()]
        lines.append(f"| `{r['id']}` | " + " | ".join(cells)
                     + f" | {'' if r['same'] else 'changes'} |")
    return lines


def _stability_counts(notebooks: list[tuple[str, list[int], list[dict[str, Any]]]]
                      ) -> tuple[list[int], int, int, int]:
    """(every seed shown, claims, claims that change, of those marked noise level)."""
    rows = [r for _, _, rs in notebooks for r in rs]
    changed = [r for r in rows if not r["same"]]
    noisy = sum(any(e is not None and e.get("noisy") for e in r["cells"].values())
                for r in changed)
    return sorted({s for _, ss, _ in notebooks for s in ss}), len(rows), len(changed), noisy


def stability_markdown(profile: str, runs: dict[str, list[int]],
                       root: Path = PROJECT_ROOT) -> str:
    """Which verdicts hold at other seeds: the preset records (results/<profile>/) beside
    the reruns, `runs` (stem -> seeds; seed_record_path), one table per notebook."""
    notebooks, gits = _stability(profile, runs, root)
    shown, n_claims, changed, noisy = _stability_counts(notebooks)
    summary = (f"`{profile}` verdicts at seeds {', '.join(map(str, shown))}: "
               f"{n_claims - changed} of {n_claims} claims keep one verdict at every seed "
               f"(timing claims left out); {changed} change, {noisy} of them marked noise "
               "level at one seed or more. Code (git): "
               + "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in gits.items()) + ".")
    tables = ["\n".join([f"**{stem}**", "", *_stability_rows(ss, rows)])
              for stem, ss, rows in notebooks]
    return "\n\n".join([summary, *tables]) + "\n"


def write_stability(profile: str, root: Path = PROJECT_ROOT) -> tuple[Path, str] | None:
    """Rewrite results/<profile>-seeds/stability.md from the records of every committed
    seed run (seed_runs_found); (its path, its text), or None where there are none."""
    if not (runs := seed_runs_found(profile, root)):
        return None
    path, text = stability_path(profile, root), stability_markdown(profile, runs, root)
    atomic_write_text(path, text)
    return path, text


def stability_summary(profile: str, root: Path = PROJECT_ROOT) -> str | None:
    """For the scoreboard: how many of `profile`'s claims keep their verdict at the
    committed seed runs, and the claims that change, at every seed (None without seed
    runs). Read from the records themselves, so it cannot fall behind them."""
    notebooks, _ = _stability(profile, seed_runs_found(profile, root), root)
    if not notebooks:
        return None
    shown, n_claims, changed, noisy = _stability_counts(notebooks)
    rel = stability_path(profile, root).relative_to(root)
    lines = [f"**Seed stability** (`{profile}`, seeds {', '.join(map(str, shown))}; every "
             f"claim in `{rel}`): {n_claims - changed} of {n_claims} claims keep one "
             f"verdict at every seed (timing claims left out); {changed} change, {noisy} of "
             "them marked noise level at one seed or more."]
    # the changing claims, one table per set of seeds (the same for every notebook
    # unless one has a record at another preset seed)
    for seed_set in dict.fromkeys(tuple(ss) for _, ss, _ in notebooks):
        rows = [r for _, ss, rs in notebooks if tuple(ss) == seed_set
                for r in rs if not r["same"]]
        if rows:
            lines += ["", *_stability_rows(list(seed_set), rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update-readme", action="store_true",
                    help="rewrite README's scoreboard and the committed notebooks' 'what the "
                         "last recorded run found' cells from the results records")
    ap.add_argument("--compare", metavar="REV", nargs="?", const="HEAD",
                    help="compare results/<profile>/*.json with their committed copies at git "
                         "revision REV (default HEAD): changed verdicts, differing values")
    ap.add_argument("--profile", default="smoke", help="with --compare (default smoke)")
    args = ap.parse_args(argv)
    if args.compare:
        try:
            print("\n".join(compare_lines(args.profile, args.compare)))
        except ValueError as e:
            ap.error(str(e))
        return 0
    board = scoreboard()
    if args.update_readme:
        readme = PROJECT_ROOT / "README.md"
        atomic_write_text(readme, embed_in_readme(readme.read_text(), board))
        print(f"updated {readme.name}")
        for path in refresh_committed():
            print(f"updated {path.relative_to(PROJECT_ROOT)}")
        for profile in dict.fromkeys(rec["profile"] for rec in load_results()):
            path = stability_path(profile)
            before = path.read_text() if path.exists() else None
            if (written := write_stability(profile)) and written[1] != before:
                print(f"updated {path.relative_to(PROJECT_ROOT)}")
    else:
        sys.stdout.write(board + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
