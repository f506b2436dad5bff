"""Register the `paper-lib` Jupyter kernel that Papermill, nbval and JupyterLab use.

`python -m paper_lib.kernelspec` (run by `make`) installs the kernel into the venv and
pins the CPU numerics its processes use. Without the pin, PyTorch and MKL pick the
widest SIMD code path the CPU has (AVX2 on one machine, AVX-512 on the next), which
sums floats in a different order: a CPU-trained model then drifts from machine to
machine and the smoke numbers stop matching the committed notebooks; and MKL's products
round differently with another thread count. With every x86 machine held to the AVX2 paths,
MKL in its strict reproducible mode, the numbers should agree across Intel CPUs whatever the
model and core count (thread counts checked bit for bit). Not across vendors: MKL honours
MKL_CBWR=AVX2 on Intel CPUs only (on an AMD host the smoke numbers differed from the Intel
ones in the 3rd-4th digit; see README, *CPU numerics*, and `paper_lib.fingerprint`).
No torch import here: the variables only act in a process that has not loaded torch.

It then byte-compiles the third-party modules every kernel, test and worker process
imports (`precompile`). The venv is installed with `pip --no-compile`, and where
PYTHONDONTWRITEBYTECODE is set (CI machines set it) Python never caches what it compiles
on import, so every new process would recompile torch, transformers and friends from
source: measured in a fresh clone, `make test`'s unit tests took 224 s that way and
127 s with the modules compiled.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL = "paper-lib"
DISPLAY_NAME = "Python (paper_lib)"
# STRICT: MKL's plain CNR mode (MKL_CBWR=AVX2) repeats a GEMM's rounding only at a fixed
# thread count; strict mode also makes it independent of the thread count. Without it, on a
# 2-core AVX-512 host an LM trained with 1 and with 2 threads differed (weight gradients,
# x.T @ g over the batch, summed in another order); with it they are bit-identical, at no
# measurable cost (SAE steps and a 2048x512x2048 product on 2 cores).
# OPENBLAS_CORETYPE: NumPy's and SciPy's OpenBLAS (float64 statistics: MCC's correlations,
# the scaling fits) picks its kernels at load, SkylakeX on an AVX-512 CPU and Haswell on an
# AVX2 one; on a Zen 4 host the two gave different bits in both (`paper_lib.fingerprint`).
# Haswell is OpenBLAS's AVX2 kernel set; an OpenBLAS that does not know the name detects.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}


def _cpuinfo(field: str, cpuinfo: str | Path) -> str | None:
    """The first `field` line of /proc/cpuinfo (None where it or the file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    return set((_cpuinfo("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Vendor and model, e.g. "GenuineIntel: Intel(R) Xeon(R) ...": the pins hold CPU numerics
    only among Intel CPUs (MKL ignores MKL_CBWR=AVX2 on others), so results record it."""
    import platform

    vendor, model = _cpuinfo("vendor_id", cpuinfo), _cpuinfo("model name", cpuinfo)
    return ": ".join(p for p in (vendor, model) if p) or platform.processor() or "unknown"


def inductor_cache_dir() -> str:
    """torch.compile's on-disk cache for pinned processes, beside its default one."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_paper_lib_avx2")


def pinned_cpu_env(flags: set[str]) -> dict[str, str]:
    """Environment that holds PyTorch (ATen), MKL, oneDNN and OpenBLAS to their AVX2 code
    paths.

    Only on CPUs that have AVX2: ATen trusts ATEN_CPU_CAPABILITY without checking the
    hardware, so forcing it on an older CPU would crash with an illegal instruction.
    It also gives torch.compile a cache of its own: inductor's on-disk cache does not key
    its CPU code on ATEN_CPU_CAPABILITY, and on a 2-core AVX-512 host code compiled by an
    unpinned process (AVX-512) and loaded by a pinned one, or the reverse, corrupted the
    heap or gave wrong numbers (torch 2.13).
    """
    if "avx2" not in flags:
        return {}
    return {**PINNED_ENV, "TORCHINDUCTOR_CACHE_DIR": inductor_cache_dir()}


# Every variable pinned_cpu_env may set (what a stale kernel is checked for).
PINNED_KEYS = (*PINNED_ENV, "TORCHINDUCTOR_CACHE_DIR")


def missing_pins(env: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """The kernel's pins that `env` lacks or sets otherwise ({} when it has them all, or
    where the CPU has nothing to pin)."""
    return {k: v for k, v in pinned_cpu_env(cpu_flags()).items() if env.get(k) != v}


def exec_pinned(module: str, argv: list[str] | None = None) -> None:
    """Replace this process with `python -m module *argv` (default: this command's own
    arguments) under the kernel's pins if it lacks them; return if it has them. For commands
    whose CPU numbers must match the notebooks' (the pins only act before torch loads, so
    setting them here would be too late). An exec, not a child: the pid, signals and exit
    status stay the caller's (make test kills the background prepare by pid)."""
    missing = missing_pins()
    if missing:
        sys.stdout.flush()
        sys.stderr.flush()
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", module, *args],
                  {**os.environ, **missing})


# Imported to write their bytecode: what kernels (notebook cells, the ipykernel debugger,
# PDF figures), pytest with nbval, Papermill and the SAELens check load. Two groups, one
# process each, run side by side (22 s instead of 39 s on 2 cores): the torch stack and
# the Jupyter / plotting stack share little. Test-only packages are skipped until installed.
WARM_GROUPS = (
    ("torch", "transformer_lens", "transformers", "datasets", "safetensors.torch",
     "scipy.optimize", "sae_lens"),
    ("pandas", "matplotlib.pyplot", "matplotlib.backends.backend_pdf", "fontTools.subset",
     "seaborn", "ipywidgets", "tqdm.auto", "ipykernel.kernelapp", "ipykernel.ipkernel",
     "debugpy", "papermill", "nbclient", "nbformat", "nbval.plugin", "pytest"),
)

_IMPORT_EACH = """\
import importlib, importlib.util, sys
for name in sys.argv[1:]:
    if importlib.util.find_spec(name.partition(".")[0]) is None:
        continue  # not installed (a test-only extra before `make test`)
    try:
        importlib.import_module(name)
    except Exception as e:
        print(f"precompile: skipped {name} ({type(e).__name__}: {e})")
"""


def precompile(groups: tuple[tuple[str, ...], ...] = WARM_GROUPS) -> None:
    """Import each group of modules in a child process allowed to write bytecode (.pyc).

    Bytecode lands in each package's own __pycache__ inside the venv, where every later
    process reads it whatever its PYTHONDONTWRITEBYTECODE; the project's sources stay
    untouched. Modules not installed are passed over; one that fails to import is
    reported and skipped.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # cwd away from the project, so no local folder shadows a package
    procs = [subprocess.Popen([sys.executable, "-c", _IMPORT_EACH, *group], env=env,
                              cwd=sys.prefix) for group in groups]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"precompile: import process exited with {codes}")


def install(name: str = KERNEL, prefix: str = sys.prefix) -> Path:
    """Install the kernelspec under `prefix` with a quiet log and the pinned CPU env."""
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", prefix,
                    "--name", name, "--display-name", DISPLAY_NAME],
                   check=True, stdout=subprocess.DEVNULL)
    path = kernel_json(name, prefix)
    spec = json.loads(path.read_text())
    # Quiet the kernel's start-up warning (unencrypted local TCP) in every run.
    if "--IPKernelApp.log_level=ERROR" not in spec["argv"]:
        spec["argv"].append("--IPKernelApp.log_level=ERROR")
    spec["env"] = {**spec.get("env", {}), **pinned_cpu_env(cpu_flags())}
    path.write_text(json.dumps(spec, indent=1))
    return path


def kernel_json(name: str = KERNEL, prefix: str = sys.prefix) -> Path:
    return Path(prefix, "share", "jupyter", "kernels", name, "kernel.json")


def refresh_if_stale(name: str = KERNEL, prefix: str = sys.prefix) -> str | None:
    """Reinstall the kernelspec under `prefix` if it exists but pins other CPU numerics than
    this version and CPU call for (a venv made before the pins changed: make reinstalls only
    when pyproject.toml or the Makefile change, and a kernel's own env overrides what its
    parent passes on). Returns what changed, or None."""
    path = kernel_json(name, prefix)
    try:
        have = json.loads(path.read_text()).get("env", {})
    except (OSError, ValueError):
        return None  # not installed here: kernels inherit the caller's (pinned) env
    want = pinned_cpu_env(cpu_flags())
    stale = {k: (have.get(k), want.get(k)) for k in PINNED_KEYS if have.get(k) != want.get(k)}
    if not stale:
        return None
    install(name, prefix)  # ipykernel writes a fresh kernel.json, then today's pins go in
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in stale.items())


if __name__ == "__main__":
    # `--precompile-only`: after the test tools are added to an installed venv.
    if "--precompile-only" not in sys.argv[1:]:
        spec_path = install()
        print(f"kernel {KERNEL!r}: {spec_path} (env {json.loads(spec_path.read_text())['env']})")
    precompile()
    print("byte-compiled the modules kernels and tests import")
