"""CPU numerics fingerprint: `python -m paper_lib.fingerprint [--out F] [--compare G ...]`.

The smoke numbers are bit-reproducible only where every CPU kernel the notebooks use sums
in the same order. When two machines' notebooks disagree, this says which kernel differs:
it runs each op the notebooks lean on (random draws, matrix products at the smoke shapes
and their weight gradients, the LM's nonlinearities, top-k, the sparse decode and its
gradients, a fused Adam step), the float64 statistics computed outside torch (NumPy's
OpenBLAS products and sums behind MCC, SciPy's least-squares fits behind the scaling laws)
plus two end-to-end checks (80 TopK SAE steps, and a forward and backward of a small
HookedTransformer), on fixed inputs, and hashes each result. `--compare` prints the ops
whose hashes differ from another machine's JSON. The JSON also records which code paths
the CPU libraries picked at run time (`libraries`): OpenBLAS's kernel set and the NumPy
SIMD targets this CPU runs, the choices that differ between CPU generations.

It runs under the notebooks' pinned CPU numerics (re-executing itself with them if
needed); `--as-is` keeps the caller's environment instead, to try other pins, e.g.
`MKL_CBWR=COMPATIBLE,STRICT python -m paper_lib.fingerprint --as-is`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The smoke profile's sizes: LM width 128 (MLP 512, 4 heads of 32, context 128) and SAE
# dictionaries of 512 latents at k = 16, on batches of 4096 rows.
ROWS, D, N, K = 4096, 128, 512, 16


def digest(*arrays: Tensor | np.ndarray) -> str:
    """sha256 (16 hex digits) of the raw bytes of tensors or NumPy arrays, in row-major
    order."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, Tensor):
            a = a.detach().cpu().numpy()
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, D, generator=gen)
    w = torch.randn(N, D, generator=gen) / D ** 0.5
    g = torch.randn(ROWS, N, generator=gen)
    return x, w, g


def _linear_grads() -> tuple[Tensor, ...]:
    x, w, g = _inputs()
    x.requires_grad_(True)
    w.requires_grad_(True)
    F.linear(x, w).backward(g)
    return x.grad, w.grad


def _sparse_decode() -> tuple[Tensor, ...]:
    x, w, _ = _inputs()
    top = F.linear(x, w).topk(K, dim=1)
    dec = w.clone().requires_grad_(True)
    vals = top.values.relu().requires_grad_(True)
    out = F.embedding_bag(top.indices, dec, per_sample_weights=vals, mode="sum")
    out.backward(x)
    return out, dec.grad, vals.grad


def _adam() -> tuple[Tensor, ...]:
    _, w, g = _inputs()
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    for _ in range(3):
        p.grad = g[:N, :D].clone()
        opt.step()
    return (p.detach(),)


def _sae_training() -> tuple[Tensor, ...]:
    from paper_lib.data.synthetic import make_sparse_data
    from paper_lib.sae import SAEConfig, make_sae
    from paper_lib.train import ShuffledBatches, TrainConfig, train_saes

    x = make_sparse_data(8192, 4 * 32, 32, 4, seed=0).x
    sae = make_sae(SAEConfig("topk", 32, 256, k=8, seed=0))
    train_saes([sae], ShuffledBatches(x, 256, 0), TrainConfig(steps=80, progress=False))
    return tuple(v for _, v in sorted(sae.state_dict().items()))


def _lm_forward_backward() -> tuple[Tensor, ...]:
    from transformer_lens import HookedTransformer

    from paper_lib.data.lm import LMConfig
    from paper_lib.runtime import quiet_warnings

    quiet_warnings()
    cfg = LMConfig("fingerprint", n_layers=1, d_model=D, n_heads=4, n_ctx=128, steps=1,
                   batch_rows=8)
    model = HookedTransformer(cfg.tl_config(), move_to_device=False)
    tokens = torch.randint(0, 257, (8, 128), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, return_type="loss")
    loss.backward()
    return (loss.detach(), *(p.grad for p in model.parameters()))


def _float64_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Two float64 code matrices to correlate, as MCC does: 4096 samples of 128 and of 64
    latents."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((ROWS, D)), rng.standard_normal((ROWS, D // 2))


def _mcc_products() -> tuple[np.ndarray, ...]:
    from paper_lib import metrics

    a, b = _float64_inputs()
    corr = metrics.abs_corr_matrix(torch.from_numpy(a), torch.from_numpy(b))
    return corr, np.array([metrics.matched_mean(corr)[0]])


def _float64_sums() -> tuple[np.ndarray, ...]:
    a, _ = _float64_inputs()
    # a whole-array sum, column means, and the mean of five values (a claim over seeds)
    return np.array([a.sum(), a[:5, 0].mean()]), a.mean(axis=0)


def _scaling_fits() -> tuple[np.ndarray, ...]:
    from paper_lib import scaling

    n, k = (np.array(v, float).ravel() for v in np.meshgrid([512, 1024, 2048, 4096],
                                                             [8, 16, 32, 64]))
    rng = np.random.default_rng(0)
    loss = 0.5 * n ** -0.1 * k ** -0.3 * np.exp(0.01 * rng.standard_normal(n.size))
    return (np.array(scaling.fit_power_law(n, loss)),
            np.array(scaling.fit_joint_law(n, k, loss)))


def libraries() -> dict[str, Any]:
    """The code paths NumPy's and SciPy's CPU libraries picked on this machine: OpenBLAS's
    kernel set per loaded OpenBLAS (None where it cannot be asked) and the NumPy SIMD
    dispatch targets this CPU supports."""
    import ctypes

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    cores: dict[str, str | None] = {}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    for lib in sorted({line.split()[-1] for line in maps if "openblas" in line.lower()
                       and ".so" in line}):
        name = Path(lib).name.split("-")[0]
        cores[name] = None
        for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_", "openblas_get_corename"):
            try:
                fn = getattr(ctypes.CDLL(lib), sym)
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_char_p
            cores[name] = fn().decode()
            break
    return {"openblas_core": cores,
            "numpy_simd": [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]}


def _ops() -> dict[str, Callable[[], tuple[Tensor | np.ndarray, ...]]]:
    def one(f: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[], tuple[Tensor, ...]]:
        return lambda: (f(*_inputs()),)

    return {
        "randn": one(lambda x, w, g: x),
        "matmul encoder (4096x128 @ 128x512)": one(lambda x, w, g: F.linear(x, w)),
        "matmul decoder (4096x512 @ 512x128)": one(lambda x, w, g: g @ w),
        "matmul weight grad (x.T @ g over 4096 rows)": one(lambda x, w, g: g.T @ x),
        "linear backward": _linear_grads,
        "bmm attention scores": one(lambda x, w, g: torch.bmm(
            x.view(128, 32, D), x.view(128, 32, D).transpose(1, 2))),
        "gelu": one(lambda x, w, g: F.gelu(g)),
        "layer_norm": one(lambda x, w, g: F.layer_norm(g, (N,))),
        "log_softmax": one(lambda x, w, g: F.log_softmax(g, dim=-1)),
        "exp / log / tanh": one(lambda x, w, g: torch.tanh(g.exp().log1p())),
        "sum over 2M floats": one(lambda x, w, g: g.sum()),
        "topk (k=16 of 512)": one(lambda x, w, g: torch.cat(
            [v.float() for v in g.topk(K, dim=1)], dim=1)),
        "sparse decode (embedding_bag) and grads": _sparse_decode,
        "fused Adam (3 steps)": _adam,
        "float64 correlations and Hungarian mean (MCC; NumPy, OpenBLAS)": _mcc_products,
        "float64 sums and means (NumPy)": _float64_sums,
        "power-law and joint-law fits (NumPy, SciPy least squares)": _scaling_fits,
        "TopK SAE training (80 steps)": _sae_training,
        "HookedTransformer forward + backward": _lm_forward_backward,
    }


def fingerprint() -> dict[str, str]:
    """The hash of each op's result on fixed inputs, in this process's CPU numerics."""
    from paper_lib.runtime import deterministic_on_cpu

    deterministic_on_cpu(torch.device("cpu"))
    return {name: digest(*op()) for name, op in _ops().items()}


def library_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The library code paths that differ from another fingerprint JSON's `libraries`
    (nothing when it has none: files made before they were recorded)."""
    other = theirs.get("libraries")
    if not other:
        return []
    names = {"openblas_core": "OpenBLAS kernels", "numpy_simd": "NumPy SIMD targets"}
    return [f"{label}: {ours.get(key)} here, {other.get(key)} there"
            for key, label in names.items() if ours.get(key) != other.get(key)]


def compare(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The ops whose hashes differ (or that only one side ran)."""
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_lib.fingerprint",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the fingerprint JSON here")
    ap.add_argument("--compare", type=Path, nargs="*", default=[],
                    help="fingerprint JSON files of other machines or settings")
    ap.add_argument("--as-is", action="store_true",
                    help="keep this environment's CPU settings instead of the kernel's pins")
    args = ap.parse_args(argv)
    others = {}
    for path in args.compare:  # read before any work: a typo fails at once
        try:
            others[path] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--compare {path}: not a fingerprint JSON ({type(e).__name__}: {e})")
        if not isinstance(others[path], dict) or "ops" not in others[path]:
            ap.error(f"--compare {path}: not a fingerprint JSON (no 'ops')")
    if argv is None and not args.as_is:
        from paper_lib.kernelspec import exec_pinned

        exec_pinned("paper_lib.fingerprint")
    from paper_lib.runtime import atomic_write_json, env_info

    ops = fingerprint()
    libs = libraries()
    for name, h in ops.items():
        print(f"{h}  {name}")
    print(f"OpenBLAS kernels: {libs['openblas_core'] or 'none loaded'}; NumPy SIMD targets: "
          f"{', '.join(libs['numpy_simd']) or 'baseline only'}")
    if args.out is not None:
        atomic_write_json(args.out, {"env": env_info("cpu"), "libraries": libs, "ops": ops})
    for path, theirs in others.items():
        diff = compare(ops, theirs["ops"])
        print(f"\nvs {path}: {len(diff)} of {len(ops)} ops differ"
              + "".join(f"\n  {name}" for name in diff)
              + "".join(f"\n  ({line})" for line in library_differences(libs, theirs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
