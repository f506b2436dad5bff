"""Run the notebooks headlessly with Papermill: `python -m paper_lib.reproduce`.

    python -m paper_lib.reproduce --profile smoke            # every notebook, CPU, offline
    python -m paper_lib.reproduce --profile gpu --only 03     # one notebook on a GPU
    python -m paper_lib.reproduce --check-determinism         # run twice, compare claims

Executed notebooks land in build/<profile>/; results JSON in results/<profile>/ and
figures in figures/<profile>/ (written by the notebooks). A smoke run also refreshes the
committed notebooks' outputs (what nbval checks) and the README scoreboard. Exits
non-zero if any notebook fails, naming the notebook and the failing cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from paper_lib.config import PROFILES
from paper_lib.kernelspec import KERNEL
from paper_lib.runtime import PROJECT_ROOT, atomic_write_text

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
VOLATILE_KEYS = {"seconds", "env", "figures", "volatile_metrics"}


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
    if update_source and not params:
        executed = strip_volatile(nbformat.read(str(out), as_version=4))
        atomic_write_text(nb, nbformat.writes(executed) + "\n")
    return seconds


def comparable(rec: dict[str, Any]) -> dict[str, Any]:
    """What two runs must agree on: everything but timings, environment and the claims and
    metrics marked volatile (wall-clock measurements)."""
    out = {k: v for k, v in rec.items() if k not in VOLATILE_KEYS}
    out["claims"] = [c for c in rec.get("claims", []) if not c.get("volatile")]
    skip = set(rec.get("volatile_metrics", []))
    out["metrics"] = {k: v for k, v in rec.get("metrics", {}).items() if k not in skip}
    return out


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
    args = ap.parse_args(argv)
    params = {}
    for name, value in args.param:
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    nbs = notebooks(args.only)
    out_dir = PROJECT_ROOT / "build" / args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    update = args.profile == "smoke" and not args.no_update and not args.check_determinism
    failures, total = [], time.perf_counter()
    from papermill.exceptions import PapermillExecutionError

    for i, nb in enumerate(nbs, 1):
        print(f"[{i}/{len(nbs)}] {nb.stem} ({args.profile}) ...", end=" ", flush=True)
        try:
            secs = run_one(nb, args.profile, out_dir, params, update)
            status = f"ok in {secs:.1f} s"
            if args.check_determinism:
                res = PROJECT_ROOT / "results" / args.profile / f"{nb.stem}.json"
                first = comparable(json.loads(res.read_text()))
                secs2 = run_one(nb, args.profile, out_dir, params, False)
                second = comparable(json.loads(res.read_text()))
                same = first == second
                status += f"; rerun {secs2:.1f} s: {'identical' if same else 'DIFFERENT'}"
                if not same:
                    failures.append(f"{nb.stem}: claims/metrics differ between two runs")
            print(status, flush=True)
        except PapermillExecutionError as e:
            print("FAILED", flush=True)
            failures.append(f"{nb.stem}: cell {e.cell_index} (In [{e.exec_count}]) raised "
                            f"{e.ename}: {e.evalue}  -> see {out_dir / nb.name}")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            return 130
    print(f"total {time.perf_counter() - total:.1f} s for {len(nbs)} notebook(s)")
    if failures:
        print("\n".join(["FAILED:"] + failures), file=sys.stderr)
        return 1
    if update:
        from paper_lib.claims import main as claims_main

        claims_main(["--update-readme"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
