"""Wheels the GPU machine lacks, for `.ci/gpu_session.sh` (run by `make device-wheels`).

The GPU machine (see ../.library/device) has PyTorch, numpy, transformers and the rest of
its image, no package index, and Python 3.12 on x86-64. This resolves what the notebooks,
tests and benchmark need with pip (a dry run, nothing installed), walks that resolution from
our roots and stops at every package the image already holds, and downloads the rest as
cp312 manylinux wheels into `.whl/` (git-ignored; carried to the machine). The session
script installs them with --no-deps into /tmp/site and imports each root before any work.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".whl"
# What the notebooks, tests and bench import on the GPU machine (jupyterlab, nbval and
# playwright stay behind: nothing there opens a browser or compares notebooks).
ROOTS = ["transformer-lens>=2.16,<4", "datasets>=2.19", "papermill>=2.5", "nbformat>=5.9",
         "nbclient", "ipykernel>=6.29", "ipywidgets>=8.1", "eai-sparsify>=1.3"]
# Never imported by what runs there: wandb (transformer_lens.train imports it lazily) and
# an sdist-only generation helper.
SKIP = {"wandb", "transformers-stream-generator"}
# The machine image's packages, as ../.library/device/KINDS.md lists them (2026-11-17).
DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize huggingface-hub hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp""".split()
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_26_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_34_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64"]
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_machine": "x86_64",
              "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(roots: list[str]) -> dict[str, dict]:
    """pip's resolution of `roots` (a dry run): normalised name -> metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run",
                        "--ignore-installed", "--report", str(report), *roots], check=True)
        items = json.loads(report.read_text())["install"]
    return {norm(i["metadata"]["name"]): i["metadata"] for i in items}


def needed(meta: dict[str, dict], roots: list[str]) -> list[tuple[str, str]]:
    """(name, version) of every package reachable from `roots` that the machine lacks: a
    walk of the resolution that stops at the image's packages and at SKIP."""
    have = {norm(n) for n in DEVICE} | {norm(n) for n in SKIP}
    todo = [Requirement(r) for r in roots]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in seen or name in have:
            continue
        seen.add(name)
        for dep in meta[name].get("requires_dist") or []:
            dep_req = Requirement(dep)
            extras = req.extras or {""}
            if dep_req.marker is None or any(
                    dep_req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras):
                todo.append(dep_req)
    return sorted((meta[n]["name"], meta[n]["version"]) for n in seen)


def download(pins: list[tuple[str, str]], out: Path) -> None:
    """cp312 x86-64 wheels of `pins` into `out`, no dependencies (the walk chose them)."""
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", *plats, "-d", str(out), *[f"{n}=={v}" for n, v in pins]], check=True)


def main() -> None:
    pins = needed(resolve(ROOTS), ROOTS)
    tmp = OUT.with_name(".whl.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    download(pins, tmp)
    shutil.rmtree(OUT, ignore_errors=True)
    tmp.rename(OUT)  # a failed download leaves the old folder as it was
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 2**20
    print(f"{len(pins)} wheels, {size:.1f} MiB in {OUT.relative_to(ROOT)}/ "
          f"(the device carries at most 64 MiB with the tree):")
    print("  " + " ".join(f"{n}=={v}" for n, v in pins))


if __name__ == "__main__":
    main()
