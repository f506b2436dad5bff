"""Runtime plumbing shared by every notebook: device choice, seeding, environment
record, atomic file writes and the quiet-warnings policy for checked notebook cells."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from paper_lib.config import DEVICE_PATTERN
from paper_lib.kernelspec import PINNED_ENV, cpu_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def project_relative(path: Path) -> Path:
    """`path` relative to the project root when it lies inside it: what a notebook prints
    for its reader, whose checkout is elsewhere (a path outside stays absolute)."""
    path = Path(path)
    return path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path


def output_root() -> Path:
    """Where results/ and figures/ are written: the project, unless PAPER_LIB_OUTPUT_ROOT
    points elsewhere (tests and scratch runs use it to leave committed results alone)."""
    return Path(os.environ.get("PAPER_LIB_OUTPUT_ROOT", PROJECT_ROOT))


def quiet_warnings() -> None:
    """Silence known third-party warnings that would otherwise leak into notebook
    outputs (nbval compares stderr of checked cells)."""
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="jupyter_client")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def pick_device(device: str = "auto") -> torch.device:
    """`"auto"` gives CUDA when present, else CPU; anything else is checked for availability."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"device={device!r} is not 'auto', 'cpu' or 'cuda[:i]' (i a GPU number)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asked for CUDA but torch sees no GPU; "
            "use device='auto' or device='cpu'."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: torch sees {torch.cuda.device_count()} GPU(s), "
                         f"numbered from 0; use device='cuda' or 'cuda:0'.")
    return dev


def deterministic_on_cpu(device: torch.device | str) -> None:
    """On the CPU, switch torch to its deterministic kernels. With two or more threads some
    CPU kernels (accumulating index updates, e.g. an embedding's backward) add in whatever
    order the threads finish, so two trainings of the same LM with the same seed differed
    in their weights; with this on they are bit-identical, and equal to a one-thread run.
    Left off on CUDA, where the deterministic variants of our sparse kernels are slow."""
    if torch.device(device).type == "cpu" and not torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one use (`stream`) of a seed, independent of every other use.
    `torch.Generator().manual_seed(seed)` alone gives every user of a seed the same draws:
    an SAE initialised with seed s (a random decoder, `randn(n, d)`) would start exactly at
    the ground-truth dictionary of synthetic data made with seed s, and so would sparse
    coding's random start. Data and solvers draw from their own streams instead (the
    stream's name and the seed hashed to a 63-bit seed); SAEs keep `manual_seed(cfg.seed)`
    (an MLP encoder's extra layer draws from its own stream)."""
    digest = hashlib.sha256(f"{stream}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


GIT_ENV = "PAPER_LIB_GIT"
"""When set, the commit a record names (`paper_lib.reproduce` sets it to its reading at
launch; a copy without .git may set it by hand)."""


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """HEAD's short hash, "-dirty" when tracked files differ from it; $PAPER_LIB_GIT when
    set. Read it before a run writes its outputs (tracked files: results, figures, the
    notebook itself), or every record says dirty."""
    if os.environ.get(GIT_ENV):
        return os.environ[GIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root,
            capture_output=True, text=True, timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def commit_at_launch() -> Iterator[None]:
    """Within: `git_commit()`, here and in the processes started here (they inherit
    $PAPER_LIB_GIT), returns the reading taken on entry, so every record of a driver's
    notebooks, run one after another or seed after seed, names the commit as it was before
    the first of them wrote its outputs. An outer setting is kept."""
    if os.environ.get(GIT_ENV):
        yield
        return
    os.environ[GIT_ENV] = git_commit()
    try:
        yield
    finally:
        os.environ.pop(GIT_ENV, None)


def cpu_numerics() -> dict[str, str]:
    """The CPU code paths this process was pinned to by the kernelspec, if any."""
    return {k: os.environ[k] for k in PINNED_ENV if k in os.environ}


def env_info(device: torch.device | str | None = None, git: str | None = None) -> dict[str, Any]:
    """Versions and hardware, recorded in every results JSON; `git`: the commit as read
    when the run began (default: now)."""
    dev = torch.device(device) if device is not None else pick_device()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_numerics": cpu_numerics(),
        "device": str(dev),
        "git": git if git is not None else git_commit(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version

        import transformer_lens  # noqa: F401 (version only)

        info["transformer_lens"] = version("transformer-lens")
    except Exception:  # pragma: no cover - optional at import time
        pass
    return info


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it
    for an instant (os.umask), which another thread creating a file could observe."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_tmp(path: Path) -> None:
    """Remove temporary siblings of `path` left by a writer that was killed (SIGKILL skips
    the cleanup below); there is one writer per target (shared caches are built under
    `build_lock`), so any such leftover is stale."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write to {directory}: {e.strerror or e}; choose a writable "
                      "output directory") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot write to {directory}: directory is not writable")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path` atomically,
    on error it is removed, so a crash never leaves a half-written file."""
    path = Path(path)
    _writable_dir(path.parent)
    clean_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); give it the mode a newly created file gets
    # (0666 less the umask), so a shared results folder stays readable.
    tmp_path.chmod(0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


@contextlib.contextmanager
def build_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for building the cache entry `path` (a sibling file
    `.<name>.lock`). Two processes that miss the same cache at once (two notebooks started
    together, `make reproduce` beside a JupyterLab session) then build it once: the second
    waits, and must look for the entry again once it holds the lock. The OS releases the
    lock when its holder dies. A no-op where POSIX file locks are missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    _writable_dir(path.parent)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish building {path} ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_or_build(path: str | Path, load: Callable[[], T | None],
                  build: Callable[[], T]) -> tuple[T, bool]:
    """(value, hit) of the cache entry `path`: `load()` when it finds the entry, else
    `build()` (which saves it) under `build_lock(path)`, after looking once more: another
    process may have built it while this one waited for the lock."""
    value = load()
    if value is not None:
        return value, True
    with build_lock(path):
        value = load()
        if value is not None:
            return value, True
        return build(), False


def write_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save a training run's state atomically (a crash keeps the previous one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def has_checkpoint(path: str | Path) -> bool:
    """Whether a run can resume from `path`; first removes a temporary file that a writer
    killed mid-write left beside it (no later write may come to clean it up)."""
    path = Path(path)
    clean_stale_tmp(path)
    return path.exists()


@contextlib.contextmanager
def interrupt_between_steps() -> Iterator[Callable[[], bool]]:
    """Within the block, Ctrl-C (SIGINT: a terminal's, Jupyter's interrupt) only sets a
    flag, read by the yielded callable: a training loop checks it after each step, writes a
    checkpoint and stops, so an interrupt loses no steps. A second Ctrl-C interrupts at
    once. Left as it is where Python's own handler is not installed (another thread, an
    ignored or custom handler)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Checkpoints of finished work that a notebook keeps until its record is written.
_KEPT: set[Path] = set()


def keep_until_recorded(path: str | Path) -> None:
    """Keep a checkpoint of finished work (a training's, TrainConfig.keep_finished; a
    seed task's result, `amortisation.run_tasks`) until this process's notebook writes its
    record (`release_kept`): a rerun after an interruption in the analyses that follow
    then reads that work instead of doing it again."""
    _KEPT.add(Path(path))


def release_kept() -> None:
    """Remove the checkpoints kept by `keep_until_recorded` (Run.finish calls this)."""
    while _KEPT:
        _KEPT.pop().unlink(missing_ok=True)


def read_checkpoint(path: str | Path, key: str, what: str = "checkpoint",
                    other: str = "a different configuration",
                    fix: str = "delete it to start over") -> dict[str, Any]:
    """A checkpoint written by `write_checkpoint` for the run identified by `key`, loaded
    without unpickling arbitrary objects; a ValueError saying what to do if it cannot be
    read safely or belongs to `other` (then: `fix`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickle
    except FileNotFoundError:  # removed since it was found (a finished run released it)
        raise
    except Exception as e:
        raise ValueError(f"{what} {path} cannot be read safely ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); delete it to start over") from None
    if state.get("key") != key:
        raise ValueError(f"{what} {path} belongs to {other}; {fix}")
    return state


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like `atomic_path` for a directory: fill the yielded temporary directory; it
    is swapped in for `path` only when the block finishes without error."""
    path = Path(path)
    _writable_dir(path.parent)
    clean_stale_tmp(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide caches from other users
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
