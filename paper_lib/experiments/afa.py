"""Experiments of notebook 01: Lee et al. 2025, "Evaluating and Designing Sparse
Autoencoders by Approximating Quasi-Orthogonality" (arXiv 2503.24277).

- `bound_check`: the norm bound (Thm 3.1) on synthetic eps-quasi-orthogonal dictionaries;
- `zf_data`: per-sample ||z|| (input after b_dec centring), ||f~|| (decoder-scaled codes),
  their ratio, eps-LBO and L0 for a trained SAE: the raw material of a ZF plot;
- `sweep_configs`, `frontier_fvu`: top-AFA over its lambda against a TopK frontier over k,
  both on standardised rows (the paper's L0-L2 comparison);
- `l0_replicates`: more runs of top-AFA's lambda sweep, each on its own data draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from paper_lib import metrics
from paper_lib.config import AFAParams
from paper_lib.data import synthetic as syn
from paper_lib.experiments.common import encode_all, replicate_runs
from paper_lib.sae import SAE, SAEConfig


def tightness(ratio: np.ndarray, c: float) -> float:
    """How much of the bound's room the samples use: the largest excursion of
    r = ||f||^2/||z||^2 above 1 over the upper room 1/(1-c) - 1, or below 1 over the lower
    room 1 - 1/(1+c) (1 = some sample touches the bound; the upper room is infinite for c >= 1)."""
    lower_room = c / (1 + c)
    used = float(np.max(1 - ratio)) / lower_room
    if c < 1:
        used = max(used, float(np.max(ratio - 1)) / (c / (1 - c)))
    return used


def bound_check(n_atoms: int, dim: int, eps: float, h_values: tuple[int, ...], n_samples: int,
                seed: int) -> dict[str, Any]:
    """For an eps dictionary and codes with h active atoms (N(0,1) values): the fraction of
    samples inside ||z||^2/(1+eps(h-1)) <= ||f||^2 <= ||z||^2/(1-eps(h-1)), the ratio
    ||f||^2 / ||z||^2 per sample, and the bound's `tightness`."""
    w = syn.quasi_orthogonal_dictionary(n_atoms, dim, eps, seed)
    measured = syn.coherence(w)
    out: dict[str, Any] = {"eps": measured, "per_h": {}}
    inside_all = 0
    for h in h_values:
        f = syn.codes_with_h_active(n_samples, n_atoms, h, seed=seed * 1000 + h)
        z = f @ w
        b = metrics.afa_norm_bound(z, torch.full((n_samples,), h), measured)
        f2 = f.double().pow(2).sum(1)
        inside = (b.lower <= f2 * (1 + 1e-9)) & (f2 <= b.upper * (1 + 1e-9))
        ratio = (f2 / z.double().pow(2).sum(1)).numpy()
        c = measured * (h - 1)
        out["per_h"][h] = {"inside": float(inside.float().mean()), "ratio": ratio,
                           "c": c, "tightness": tightness(ratio, c)}
        inside_all += int(inside.sum())
    out["inside_fraction"] = inside_all / (n_samples * len(h_values))
    return out


@torch.no_grad()
def zf_data(sae: SAE, x: torch.Tensor, codes: torch.Tensor | None = None
            ) -> dict[str, np.ndarray]:
    """ZF-plot quantities for rows x (SAE units): z = x_in - b_dec, f~ = codes * ||W_dec||;
    `codes`: the SAE's codes of x, when the caller has them already."""
    codes = encode_all(sae, x)[0] if codes is None else codes
    x_in, _, _ = sae.prepare(x)
    z = (x_in - sae.b_dec).float()
    f_t = metrics.scaled_codes(codes, sae.W_dec.float())
    z_n, f_n = metrics.afa(z), f_t.norm(dim=-1)
    # eps-LBO treats z as if it were exactly sum_i f~_i w_i: the smallest eps consistent
    # with the observed norm mismatch (Lee et al. Sec. 4.3).
    lbo = metrics.eps_lbo(z, f_t)
    return {"z_norm": z_n.cpu().numpy(), "f_norm": f_n.cpu().numpy(),
            "ratio": (f_n / z_n.clamp_min(1e-12)).cpu().numpy(),
            "eps_lbo": lbo.cpu().numpy(), "l0": (codes > 0).sum(-1).cpu().numpy()}


def family_configs(d_in: int, d_sae: int, k: int, l1_coeff: float, afa_lambda: float,
                   hook: str, model: str, seed: int, dead_tokens: int) -> dict[str, SAEConfig]:
    """The five architectures the ZF plots compare, on equal footing (same n, seed and
    dead-latent window)."""
    common = dict(d_in=d_in, d_sae=d_sae, hook_name=hook, model_name=model, seed=seed,
                  dead_tokens=dead_tokens)
    return {
        "relu": SAEConfig("relu", l1_coeff=l1_coeff, **common),
        "topk": SAEConfig("topk", k=k, **common),
        "batchtopk": SAEConfig("batchtopk", k=k, **common),
        "matryoshka": SAEConfig("matryoshka", k=k, **common),
        "topafa": SAEConfig("topafa", afa_lambda=afa_lambda, standardize_input=True, **common),
    }


def topafa_name(lam: float) -> str:
    """The sweep's name of top-AFA at loss weight lam."""
    return f"topafa lambda={lam:.4g}"


def lambda_label(lam: float) -> str:
    """A loss weight as the authors write their grid, 1/n where 1/lam is a whole number
    (1/128, 1/24), else its decimal value."""
    inv = 1 / lam
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 * inv else f"{lam:.3g}"


def sweep_configs(d_in: int, d_sae: int, lambdas: Sequence[float], ks: Sequence[int], hook: str,
                  model: str, seed: int, dead_tokens: int) -> dict[str, SAEConfig]:
    """top-AFA at each lambda and TopK at each k, all on standardised rows as in the authors'
    runs (same n, seed and dead-latent window): the points and the frontier of an L0-FVU
    plot."""
    common = dict(d_in=d_in, d_sae=d_sae, standardize_input=True, hook_name=hook,
                  model_name=model, seed=seed, dead_tokens=dead_tokens)
    cfgs = {topafa_name(lam): SAEConfig("topafa", afa_lambda=lam, **common) for lam in lambdas}
    cfgs.update({f"topk k={k}": SAEConfig("topk", k=k, **common) for k in ks})
    return cfgs


def frontier_fvu(l0: Sequence[float], fvu: Sequence[float], at: float) -> float:
    """FVU of the TopK frontier (points (L0, FVU), e.g. one per k) at L0 = `at`: linear in
    log L0 and log FVU between the two neighbouring points. NaN outside the points' L0 range:
    a frontier is not extrapolated."""
    pts = sorted(zip(l0, fvu))
    xs, ys = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    if len(pts) < 2 or not xs[0] <= np.log(at) <= xs[-1]:
        return float("nan")
    return float(np.exp(np.interp(np.log(at), xs, ys)))


def l0_replicates(p: AFAParams, hook: str, d_in: int,
                  device: torch.device) -> list[dict[str, float]]:
    """Runs 2 .. p.lambda_seeds of top-AFA over p.afa_lambdas (`sweep_configs`' names and
    settings), each on its own draw of text, initialisation and batch order
    (`replicate_runs`): {name: held-out mean L0} per run, for the trend of L0 in lambda."""
    cfgs = sweep_configs(d_in, p.d_sae, p.afa_lambdas, (), hook, p.model, p.seed,
                         p.dead_window)
    return replicate_runs(p, hook, cfgs, p.lambda_seeds, device,
                          lambda acts, trained: {name: r.final["l0"]
                                                 for name, r in trained.items()},
                          "top-AFA λ sweep")
