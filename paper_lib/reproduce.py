"""Run the notebooks headlessly with Papermill: `python -m paper_lib.reproduce`.

    python -m paper_lib.reproduce --profile smoke            # every notebook, CPU, offline
    python -m paper_lib.reproduce --profile gpu --only 03     # one notebook on a GPU
    python -m paper_lib.reproduce --check-determinism         # run twice, compare claims
    python -m paper_lib.reproduce --nbval                     # nbval the committed notebooks

Executed notebooks land in build/<profile>/; results JSON in results/<profile>/ and
figures in figures/<profile>/ (written by the notebooks). A smoke run also refreshes the
committed notebooks' outputs (what nbval checks) and the README scoreboard. Exits
non-zero if any notebook fails, naming the notebook and the failing cell; the failed
notebook (and, run in parallel, its process's output) is kept in
build/<profile>/<stem>.failed.*, which later runs do not overwrite with a success.

Parallel runs (`--jobs`, by default 2 for smoke on a machine with 2+ cores, else 1): the
notebooks' small CPU problems use a second core poorly (an SAE sweep runs 1.4x faster on
2 threads than on 1; imports, plotting and Python overhead use one), so two notebooks at a
time finish sooner. A `--prepare` step trains the embedded LM and harvests the shared
activations once, in a process with the kernel's pinned CPU environment, so the notebooks
read the same cached data they would have made themselves; it takes a slot of its own,
beside a notebook that needs the LM only late (BESIDE_PREPARE), and the other notebooks
start once it is done. Notebooks that read other notebooks' saved SAEs (AFTER_ALL) start
once the rest are done. Each notebook computes exactly what it computes alone, so the
claims are identical either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from paper_lib.claims import (
    BOOKKEEPING_PARAMS,
    CUSTOM_SUFFIX,
    comparable,
    compare_lines,
    compare_records,
    record_path,
    refresh_findings,
    seed_record_path,
    write_stability,
)
from paper_lib.config import PROFILES, Params
from paper_lib.kernelspec import KERNEL, cpu_flags, exec_pinned, pinned_cpu_env, refresh_if_stale
from paper_lib.runtime import (
    PROJECT_ROOT,
    atomic_write_text,
    commit_at_launch,
    output_root,
    project_relative,
)

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
# Notebooks that read what the others save (05 explores their SAEs): run after the rest.
AFTER_ALL = ("05_explore",)
# Notebooks that need the LM only in their last section (02: synthetic experiments first):
# they start beside the --prepare step instead of after it, filling the core it leaves
# idle; should one reach the LM first, it waits on the cache's build lock.
BESIDE_PREPARE = ("02_amortisation_gap",)
NBVAL_ARGS = ["--nbval-lax", "--nbval-cell-timeout", "900"]
NBVAL_OUTPUT = PROJECT_ROOT / "build" / "nbval"
"""Where notebooks checked by --nbval write their results/ and figures/."""


def notebooks(only: list[str] | None = None) -> list[Path]:
    """Notebooks in run order; `only` selects by prefix ('02') or stem."""
    nbs = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        picked = [nb for nb in nbs if any(nb.stem.startswith(o) for o in only)]
        missing = [o for o in only if not any(nb.stem.startswith(o) for nb in nbs)]
        if missing:
            raise SystemExit(f"--only {', '.join(missing)}: no such notebook; choose from "
                             + ", ".join(nb.stem for nb in nbs))
        return picked
    return nbs


def params_class(nb: Path) -> type[Params] | None:
    """The dataclass a notebook validates its parameters with (its `XParams.from_namespace`
    call, the cell after `parameters`)."""
    from paper_lib import config

    found = re.search(r"(\w+Params)\.from_namespace", nb.read_text())
    return getattr(config, found.group(1), None) if found else None


def refused_params(nbs: list[Path], profile: str, params: dict[str, Any]) -> str:
    """Why a notebook would refuse these parameters, or "": each is checked as its own
    parameters cell would, before the LM is prepared (minutes at `gpu`) or a kernel starts."""
    overrides = dict(params)
    profile = overrides.pop("profile", profile)
    for nb in nbs:
        cls = params_class(nb)
        if cls is None:
            continue
        try:
            cls.from_profile(profile, **overrides)
        except ValueError as e:
            takers = [n.stem[:2] for n in nbs if (c := params_class(n)) is not None
                      and set(overrides) <= set(c.names())]
            hint = (f" (of these notebooks, {' '.join(takers)} take them all: --only "
                    f"{' '.join(takers)})" if takers and set(overrides) - set(cls.names())
                    else "")
            return f"{nb.stem}: {e}{hint}"
    return ""


def kernel_name() -> str:
    """Our registered kernel, or the current interpreter's native one."""
    from jupyter_client.kernelspec import find_kernel_specs

    return KERNEL if KERNEL in find_kernel_specs() else "python3"


def strip_volatile(nb: Any) -> Any:
    """Drop per-run Papermill timing metadata so committed notebooks diff cleanly."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    return nb


def run_one(nb: Path, profile: str, out_dir: Path, params: dict[str, Any],
            update_source: bool) -> float:
    import nbformat
    import papermill as pm

    out = out_dir / nb.name
    params = dict(params)
    if profile != "smoke":
        params["profile"] = profile
    t0 = time.perf_counter()
    pm.execute_notebook(str(nb), str(out), parameters=params or None, kernel_name=kernel_name(),
                        progress_bar=False, log_output=False, cwd=str(NOTEBOOK_DIR))
    seconds = time.perf_counter() - t0
    preset = set(params) <= {"profile"}  # a custom run's record lands in <profile>-custom
    executed = strip_volatile(nbformat.read(str(out), as_version=4))
    if preset and refresh_findings(executed, nb.stem, profile, output_root()):
        atomic_write_text(out, nbformat.writes(executed) + "\n")
    if update_source and not params:
        atomic_write_text(nb, nbformat.writes(executed) + "\n")
    return seconds


def default_jobs(profile: str, n_notebooks: int, cpus: int | None = None) -> int:
    """Notebooks run at once by default: two for smoke on 2+ cores (more would share the
    laptop's memory between more kernels for little gain), one on a GPU (they would
    share it)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(2, cpus, n_notebooks)) if profile == "smoke" else 1


def waves(nbs: list[Path], profile: str) -> list[list[Path]]:
    """Notebooks in the order to start them: the independent ones longest first (by the
    last recorded run time, so two workers finish close together), then AFTER_ALL."""
    def last_seconds(nb: Path) -> float:
        try:
            res = record_path(profile, nb.stem, PROJECT_ROOT)
            return float(json.loads(res.read_text()).get("seconds", 0.0))
        except (OSError, ValueError):
            return 0.0
    first = sorted((nb for nb in nbs if nb.stem not in AFTER_ALL), key=last_seconds,
                   reverse=True)
    last = [nb for nb in nbs if nb.stem in AFTER_ALL]
    return [w for w in (first, last) if w]


def child_env(jobs: int) -> dict[str, str]:
    """Environment of a notebook process: the kernel's pinned CPU code paths (see
    kernelspec) and, with several jobs, OpenMP threads that sleep while they wait. Every
    process keeps all cores (one running alone uses them all), but spinning waiters would
    steal the cores the other notebook's threads need: measured on 2 cores, two SAE sweeps
    at 2 threads each ran 3-4x slower with spinning waiters than with sleeping ones."""
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(pinned_cpu_env(cpu_flags()))
    return env


def prepare(profile: str) -> None:
    """Train (or load) the profile's embedded LM and harvest its shared activations into
    the disk cache, as a notebook would: the same parameters (the profile's LM preset) and
    the same device set-up (`Params.torch_device`); hub models stream and have nothing to
    prepare."""
    from paper_lib.config import LMParams, lm_preset

    p = LMParams(profile=profile, **lm_preset(profile))
    if p.dataset != "stdlib":
        return
    from paper_lib.data.activations import load_activations
    from paper_lib.runtime import quiet_warnings

    quiet_warnings()
    acts = load_activations(p.model, p.dataset, p.hook, p.n_tokens, p.n_eval_tokens,
                            p.torch_device(), p.seed)
    print(f"prepared {acts.describe()}", flush=True)


def say(line: str) -> None:
    """One line to stdout in one write (worker threads print too)."""
    sys.stdout.write(line.rstrip("\n") + "\n")
    sys.stdout.flush()


def failure_path(profile: str, stem: str, suffix: str) -> Path:
    """Where a failed run's evidence is kept: build/<profile>/<stem>.failed.<suffix>."""
    folder = PROJECT_ROOT / "build" / profile
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}.failed.{suffix}"


def run_parallel(nbs: list[Path], profile: str, jobs: int,
                 command: Callable[[Path], list[str]], title: str,
                 prepare: list[str] | None = None,
                 beside_prepare: tuple[str, ...] = BESIDE_PREPARE) -> list[str]:
    """Run `command(nb)` for every notebook, `jobs` processes at a time. `prepare` (the
    `--prepare` command, or None) runs first in a slot of its own; beside it only the
    notebooks in `beside_prepare`, the rest once it has succeeded; AFTER_ALL notebooks
    once all others have ended; otherwise longest first (`waves`). Prints one line per
    notebook as it starts and ends (its output in full if it failed). Returns failure
    messages."""
    env = child_env(jobs)
    say(f"{title}: {len(nbs)} notebook(s), {jobs} at a time")
    pending = [nb for wave in waves(nbs, profile) for nb in wave]
    # process -> (notebook or None for the preparation, start time, captured output)
    running: dict[subprocess.Popen, tuple[Path | None, float, Any]] = {}
    prepared = prepare is None
    failures: list[str] = []
    done = 0

    def ready(nb: Path) -> bool:
        if nb.stem in AFTER_ALL:
            return prepared and not any(
                other.stem not in AFTER_ALL
                for other in [*pending, *(n for n, _, _ in running.values() if n)])
        return prepared or nb.stem in beside_prepare

    def start(nb: Path | None) -> None:
        if nb is None:  # the preparation prints its progress straight to the terminal
            proc, out = subprocess.Popen(prepare, env=env, cwd=PROJECT_ROOT), None
        else:
            say(f"  started {nb.stem}")
            # a file, not a pipe: nothing needs to read it while the process runs
            out = tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(command(nb), env=env, cwd=PROJECT_ROOT, text=True,
                                    stdout=out, stderr=subprocess.STDOUT)
        running[proc] = (nb, time.perf_counter(), out)

    def wait_any() -> subprocess.Popen:
        while True:
            for proc in running:
                if proc.poll() is not None:
                    return proc
            time.sleep(0.05)

    try:
        if prepare is not None:
            start(None)
        while running or pending:
            for nb in [nb for nb in pending if ready(nb)]:
                if len(running) >= jobs:
                    break
                pending.remove(nb)
                start(nb)
            if not running:
                break
            proc = wait_any()
            nb, t0, out = running.pop(proc)
            code = proc.returncode
            if nb is None:
                prepared = code == 0
                if not prepared:
                    failures.append(f"--prepare (LM and activations): exit status {code}")
                    if pending:
                        say("  not started: " + ", ".join(n.stem for n in pending))
                    pending.clear()
                continue
            done += 1
            say(f"[{done}/{len(nbs)}] {nb.stem}: {'ok' if code == 0 else 'FAILED'} in "
                f"{time.perf_counter() - t0:.1f} s")
            if code != 0:
                out.seek(0)
                text = out.read()
                say(text)
                # Kept past the next run (which rewrites the executed notebook), for a
                # failure that does not come back.
                log = failure_path(profile, nb.stem, f"{title}.log")
                atomic_write_text(log, f"{title} {nb.stem}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
                                  f", exit status {code}:\n{text}")
                failures.append(f"{nb.stem}: exit status {code} (output above; kept in "
                                f"{project_relative(log)})")
            out.close()
    except BaseException:
        # Ctrl-C: start nothing more; SIGINT what runs (Papermill and nbval then shut their
        # kernels down), kill what has not ended 15 s later; re-raise.
        for proc in running:
            proc.send_signal(signal.SIGINT)
        for proc in running:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    return failures


def latest_results(profile: str, stem: str) -> Path:
    """The results JSON a run of `stem` last wrote: results/<profile>/ for preset
    parameters, results/<profile>-custom/ for others (claims.results_folder)."""
    paths = [record_path(folder, stem, PROJECT_ROOT)
             for folder in (profile, profile + CUSTOM_SUFFIX)]
    return max((p for p in paths if p.exists()), key=lambda p: p.stat().st_mtime,
               default=paths[0])


def report_against_committed(profile: str, stems: list[str], since: float,
                             root: Path = PROJECT_ROOT) -> None:
    """Print how the results this run wrote to results/<profile>/ (not -custom) compare with
    the committed ones (`claims --compare HEAD`): the reader's first question after a rerun.
    Silent outside a git checkout."""
    written = [stem for stem in stems if (f := record_path(profile, stem, root)).exists()
               and f.stat().st_mtime >= since]
    if not written:
        return
    try:
        lines = compare_lines(profile, "HEAD", root, stems=written)
    except ValueError:
        return
    print("against the committed results (python -m paper_lib.claims --compare):", *lines,
          sep="\n  ")


def run_sequential(nbs: list[Path], profile: str, params: dict[str, Any], update: bool,
                   check_determinism: bool) -> list[str]:
    """Run the notebooks one after another in this process; returns failure messages."""
    from papermill.exceptions import PapermillExecutionError

    out_dir = PROJECT_ROOT / "build" / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for i, nb in enumerate(nbs, 1):
        print(f"[{i}/{len(nbs)}] {nb.stem} ({profile}) ...", end=" ", flush=True)
        try:
            secs = run_one(nb, profile, out_dir, params, update)
            status = f"ok in {secs:.1f} s"
            if check_determinism:
                res = latest_results(profile, nb.stem)
                first = json.loads(res.read_text())
                secs2 = run_one(nb, profile, out_dir, params, False)
                second = json.loads(res.read_text())
                same = comparable(first) == comparable(second)
                status += f"; rerun {secs2:.1f} s: {'identical' if same else 'DIFFERENT'}"
                if not same:
                    c = compare_records(first, second)
                    where = (f"; largest relative difference {c['max_rel'][0]:.1e} at "
                             f"{c['max_rel'][1]}" if c["max_rel"] else "")
                    failures.append(f"{nb.stem}: claims/metrics differ between two runs "
                                    f"({len(c['differ'])} of {c['values']} values{where})")
            print(status, flush=True)
        except PapermillExecutionError as e:
            print("FAILED", flush=True)
            kept = failure_path(profile, nb.stem, "ipynb")
            shutil.copyfile(out_dir / nb.name, kept)  # the next run rewrites out_dir's copy
            failures.append(f"{nb.stem}: cell {e.cell_index} (In [{e.exec_count}]) raised "
                            f"{e.ename}: {e.evalue}  -> see {project_relative(kept)}")
    return failures


def seed_runs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`--seeds`: each notebook rerun at each seed with otherwise preset parameters, its
    record copied to results/<profile>-seeds/seed<s>/, then the verdicts tabulated beside
    the preset run's. Everything is checked before the first notebook starts."""
    preset_seed = next(f.default for f in dataclasses.fields(Params) if f.name == "seed")
    if args.nbval or args.check_determinism or args.prepare:
        ap.error("--seeds runs the notebooks: it takes no --nbval, --check-determinism or "
                 "--prepare")
    bad = sorted({name for name, _ in args.param} - set(BOOKKEEPING_PARAMS))
    if bad:
        ap.error(f"--seeds compares with the preset runs, so it takes no -p {bad[0]} (only "
                 f"{', '.join(BOOKKEEPING_PARAMS)})")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) < len(args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: give distinct seeds >= 0")
    if preset_seed in args.seeds:
        ap.error(f"--seeds: {preset_seed} is the preset seed, whose runs are "
                 f"results/{args.profile}/: give other seeds")
    nbs = notebooks(args.only)
    missing = [nb.stem for nb in nbs if not record_path(args.profile, nb.stem,
                                                         PROJECT_ROOT).exists()]
    if missing:
        ap.error(f"--seeds compares with the preset runs, and results/{args.profile}/ lacks "
                 f"{', '.join(missing)}: run `python -m paper_lib.reproduce --profile "
                 f"{args.profile}` first")
    stems = [nb.stem for nb in nbs]
    extra = [a for name, value in args.param for a in ("-p", name, value)]
    for seed in args.seeds:
        print(f"== seed {seed}", flush=True)
        rc = main(["--profile", args.profile, "--only", *stems, "--jobs", str(args.jobs),
                   "--no-update", "--no-scoreboard", "-p", "seed", str(seed), *extra])
        if rc:
            return rc
        for stem in stems:  # the -custom record is overwritten by the next seed: keep it
            src = record_path(args.profile + CUSTOM_SUFFIX, stem, PROJECT_ROOT)
            dst = seed_record_path(args.profile, seed, stem, PROJECT_ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dst, src.read_text())
    # every notebook with a record at every seed run so far, this call's and earlier ones'
    out, table = write_stability(args.profile, PROJECT_ROOT)
    print(table + f"\n(written to {out.relative_to(PROJECT_ROOT)}; `make scoreboard` puts "
          "its summary in README.md)")
    return 0


def leftover_checkpoints(root: Path = PROJECT_ROOT / "data" / "ckpt") -> str | None:
    """A line on the checkpoints under `root` once a run is over: those its notebooks
    finished are gone, so these belong to runs interrupted or with other parameters,
    resumed only by rerunning them, and at the `paper` scale take gigabytes. None if none."""
    files = [f for f in root.rglob("*.pt") if f.is_file()] if root.is_dir() else []
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    shown = next(f"{size / unit:.1f} {name}" for unit, name in
                 ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")) if size >= unit or unit == 1)
    newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime
                                                                   for f in files)))
    return (f"{project_relative(root)} holds {len(files)} checkpoint(s) of interrupted runs or "
            f"runs with other parameters ({shown}, newest {newest}): rerunning such a run "
            f"resumes it; delete {project_relative(root)} to free the space")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the notebooks with Papermill.")
    ap.add_argument("--profile", default="smoke", choices=PROFILES)
    ap.add_argument("--only", nargs="*", help="notebook prefixes or stems, e.g. 02 03")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="extra notebook parameter (JSON value)")
    ap.add_argument("--check-determinism", action="store_true",
                    help="run each notebook twice and compare its claims and metrics")
    ap.add_argument("--no-update", action="store_true",
                    help="smoke: do not refresh committed notebooks and README scoreboard")
    ap.add_argument("-j", "--jobs", type=int, default=0,
                    help="notebooks at a time (0: 2 for smoke on 2+ cores, else 1)")
    ap.add_argument("--nbval", action="store_true",
                    help="check the committed smoke notebooks with nbval instead of running "
                         "Papermill (what `make test` does)")
    ap.add_argument("--prepare", action="store_true",
                    help="only train/load the embedded LM and harvest its activations")
    ap.add_argument("--seeds", nargs="+", type=int, metavar="S",
                    help="rerun the notebooks at these seeds too (preset parameters otherwise; "
                         "records under results/<profile>-seeds/) and tabulate which verdicts "
                         "change against results/<profile>/ (written to "
                         "results/<profile>-seeds/stability.md, with every notebook run "
                         "at these seeds so far)")
    ap.add_argument("--no-scoreboard", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with commit_at_launch():  # every record of this call names the commit as it is now
        return run(ap, args, argv)


def run(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """`main` once the command line is parsed."""
    if args.jobs < 0:
        ap.error(f"--jobs {args.jobs}: give 1 or more, or 0 for the default")
    if args.seeds is not None:
        return seed_runs(ap, args)
    if args.nbval and (args.profile != "smoke" or args.param or args.check_determinism):
        ap.error("--nbval checks the committed smoke notebooks: it takes no --profile, "
                 "--param or --check-determinism")
    if args.prepare:
        if argv is None:
            # A command started without the kernel's pins (make test runs it beside the unit
            # tests) prepares under them, as the notebooks' own prepare step does: the LM
            # cache is kept per CPU numerics, and an unpinned one is not what they read.
            exec_pinned("paper_lib.reproduce")
        try:
            prepare(args.profile)
        except ValueError as e:  # e.g. the gpu profile on a machine without CUDA
            print(f"--prepare: {e}", file=sys.stderr)
            return 2
        return 0
    params = {}
    for name, value in args.param:
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    if args.profile != "smoke" or "device" in params:  # refuse before any notebook starts
        from paper_lib.config import check_device

        try:
            check_device(args.profile, str(params.get("device", "auto")))
        except ValueError as e:
            print(f"reproduce: {e}", file=sys.stderr)
            return 2
    nbs = notebooks(args.only)
    refused = refused_params(nbs, args.profile, params)
    if refused:
        print(f"reproduce: {refused}", file=sys.stderr)
        return 2
    changed = refresh_if_stale()
    if changed:
        print(f"kernel {KERNEL!r}: reinstalled with today's CPU numerics ({changed})",
              flush=True)
    jobs = args.jobs or default_jobs(args.profile, len(nbs))
    update = args.profile == "smoke" and not args.no_update and not args.check_determinism
    total, started = time.perf_counter(), time.time()
    # the LM and activations every notebook reads, made once (see run_parallel)
    prep = [sys.executable, "-m", "paper_lib.reproduce", "--prepare", "--profile", args.profile]
    try:
        if args.nbval:
            kernel = kernel_name()
            # The notebooks' Run records and figures go to scratch: a check must not rewrite
            # the committed results (their timing claims and git field differ every run).
            os.environ.setdefault("PAPER_LIB_OUTPUT_ROOT", str(NBVAL_OUTPUT))
            failures = run_parallel(
                nbs, args.profile, jobs, lambda nb: [
                    sys.executable, "-m", "pytest", "-q", *NBVAL_ARGS, "--nbval-kernel-name",
                    kernel, str(nb.relative_to(PROJECT_ROOT))], "nbval",
                prep if len(nbs) > 1 else None)
        elif jobs > 1 and len(nbs) > 1:
            flags = [f for f, on in (("--no-update", args.no_update),
                                     ("--check-determinism", args.check_determinism)) if on]
            extra = [a for name, value in args.param for a in ("-p", name, value)]
            failures = run_parallel(
                nbs, args.profile, jobs, lambda nb: [
                    sys.executable, "-m", "paper_lib.reproduce", "--profile", args.profile,
                    "--only", nb.stem, "--jobs", "1", "--no-scoreboard", *flags, *extra],
                "papermill", prep)
        else:
            failures = run_sequential(nbs, args.profile, params, update,
                                      args.check_determinism)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    print(f"total {time.perf_counter() - total:.1f} s for {len(nbs)} notebook(s)")
    if not args.nbval and not args.no_scoreboard:  # a worker's parent reports for it
        report_against_committed(args.profile, [nb.stem for nb in nbs], started)
        if note := leftover_checkpoints():
            print(note)
    if failures:
        print("\n".join(["FAILED:"] + failures), file=sys.stderr)
        return 1
    if update and not args.nbval and not args.no_scoreboard:
        from paper_lib.claims import main as claims_main

        claims_main(["--update-readme"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
