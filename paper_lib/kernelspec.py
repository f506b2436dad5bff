"""Register the `paper-lib` Jupyter kernel that Papermill, nbval and JupyterLab use.

`python -m paper_lib.kernelspec` (run by `make`) installs the kernel into the venv and
pins the CPU numerics its processes use. Without the pin, PyTorch and MKL pick the
widest SIMD code path the CPU has (AVX2 on one machine, AVX-512 on the next), which
sums floats in a different order: a CPU-trained model then drifts from machine to
machine and the smoke numbers stop matching the committed notebooks. With every x86
machine held to the AVX2 paths the numbers should agree (tried on one CPU type only).
No torch import here: the variables only act in a process that has not loaded torch.

It then byte-compiles the third-party modules every kernel, test and worker process
imports (`precompile`). The venv is installed with `pip --no-compile`, and where
PYTHONDONTWRITEBYTECODE is set (CI machines set it) Python never caches what it compiles
on import, so every new process would recompile torch, transformers and friends from
source: measured in a fresh clone, `make test`'s unit tests took 224 s that way and
127 s with the modules compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

KERNEL = "paper-lib"
DISPLAY_NAME = "Python (paper_lib)"
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def pinned_cpu_env(flags: set[str]) -> dict[str, str]:
    """Environment that holds PyTorch (ATen), MKL and oneDNN to their AVX2 code paths.

    Only on CPUs that have AVX2: ATen trusts ATEN_CPU_CAPABILITY without checking the
    hardware, so forcing it on an older CPU would crash with an illegal instruction.
    """
    return dict(PINNED_ENV) if "avx2" in flags else {}


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
    path = Path(prefix, "share", "jupyter", "kernels", name, "kernel.json")
    spec = json.loads(path.read_text())
    # Quiet the kernel's start-up warning (unencrypted local TCP) in every run.
    if "--IPKernelApp.log_level=ERROR" not in spec["argv"]:
        spec["argv"].append("--IPKernelApp.log_level=ERROR")
    spec["env"] = {**spec.get("env", {}), **pinned_cpu_env(cpu_flags())}
    path.write_text(json.dumps(spec, indent=1))
    return path


if __name__ == "__main__":
    # `--precompile-only`: after the test tools are added to an installed venv.
    if "--precompile-only" not in sys.argv[1:]:
        spec_path = install()
        print(f"kernel {KERNEL!r}: {spec_path} (env {json.loads(spec_path.read_text())['env']})")
    precompile()
    print("byte-compiled the modules kernels and tests import")
