"""Experiments of notebook 04: Peter & Sogaard 2025, "Empirical Evaluation of Progressive
Coding for Sparse Autoencoders" (arXiv 2505.00190).

A progressive code gives a usable reconstruction from any prefix of its latents. We
compare, at each granularity G (a power of two up to n): a Matryoshka SAE's own prefix;
a vanilla TopK SAE pruned to G latents chosen by E[a^2], by firing frequency E[1{a>0}],
or in index order (unsorted); and TopK SAEs trained directly with G latents.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from paper_lib import metrics
from paper_lib.data.synthetic import data_generator
from paper_lib.sae import SAE, SAEConfig
from paper_lib.sae.topk import topk_codes


def granularities(n: int, smallest: int) -> list[int]:
    g, out = smallest, []
    while g <= n:
        out.append(g)
        g *= 2
    return out


def matryoshka_config(d_in: int, n: int, k: int, g_min: int, **fields: Any) -> SAEConfig:
    """Matryoshka groups ending exactly at the granularities g_min, 2 g_min, ..., n;
    `fields`: the other SAEConfig fields (hook_name, model_name, seed, dead_tokens)."""
    ends = granularities(n, g_min)
    sizes = [ends[0]] + [b - a for a, b in zip(ends, ends[1:])]
    return SAEConfig("matryoshka", d_in, n, k=k, group_fractions=tuple(s / n for s in sizes),
                     **fields)


def importance_orders(codes: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Latent orders of a vanilla SAE: by E[a^2], by firing frequency, and index order.
    Pass codes of data the pruned SAE is not evaluated on (`ActivationSet.train_sample`):
    ranking on the held-out rows it is then scored on would fit the choice to the test
    data, an edge the Matryoshka prefix, fixed in training, does not get (at smoke, up to
    0.02 of FVU at small G)."""
    return {"E[a^2]": metrics.mean_sq_activation(codes).argsort(descending=True),
            "frequency": metrics.firing_frequency(codes).argsort(descending=True),
            "unsorted": torch.arange(codes.shape[1])}


@torch.no_grad()
def pruned_topk_recon(sae: SAE, x: Tensor, keep: Tensor) -> Tensor:
    """A TopK SAE restricted to the latents `keep`: TopK over their pre-activations only
    (same k, at most |keep|), decoded with their decoder rows."""
    x_in, mu, sd = sae.prepare(x)
    pre = (x_in - sae.b_dec) @ sae.W_enc[:, keep] + sae.b_enc[keep]
    codes = topk_codes(pre, min(sae.cfg.k, len(keep)))
    recon = codes @ sae.W_dec[keep] + sae.b_dec
    return recon if mu is None else recon * sd + mu


@torch.no_grad()  # inference only: callers outside no_grad (the prefix explorer, 04's
# per-size loop) kept an autograd graph of every encoding
def matryoshka_prefix_recon(sae: SAE, x: Tensor, g: int) -> Tensor:
    """One full-size (eval) encoding, decoded from the first g latents only."""
    codes = sae.encode(x)
    codes[:, g:] = 0
    return sae.decode_like(x, codes)


Method = Callable[[Tensor, int], Tensor]


@torch.no_grad()  # inference only: a method may call an SAE module (its graph would be kept)
def prefix_curves(methods: dict[str, Method], x: Tensor, gs: list[int],
                  lm_loss: Callable[[Callable[[Tensor], Tensor]], Any] | None, scale: float,
                  rsa_samples: int, seed: int) -> list[dict[str, Any]]:
    """FVU, RSA and CE recovered of each method at each granularity. A method maps
    (activations in SAE units, G) to their reconstruction; `lm_loss` takes a raw-unit
    reconstruction function and returns metrics.LMLoss."""
    rows = []
    for name, method in methods.items():
        for g in gs:
            recon = method(x, g)
            row = {"method": name, "G": g, "FVU": metrics.fvu(x, recon),
                   "RSA": metrics.rsa(x, recon, rsa_samples, seed)}
            if lm_loss is not None:
                row["CE recovered"] = lm_loss(
                    lambda a, m=method, g=g: m(a * scale, g) / scale).recovered
            rows.append(row)
    return rows


def power_law_data(codes: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(rank, E[a^2]) of live latents sorted by decreasing E[a^2]."""
    ea2 = metrics.mean_sq_activation(codes).sort(descending=True).values.cpu().numpy()
    ea2 = ea2[ea2 > 0]
    return np.arange(1, len(ea2) + 1, dtype=float), ea2


def power_law_features(n_features: int, dim: int, n: int, mean_l0: float, exponent: float,
                       seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic activations with ground truth: unit atoms [F, d], feature i active with
    probability ~ i^-exponent (scaled to mean L0), magnitudes 1 + |N(0,1)|. Returns
    (x [n, d], codes [n, F], atoms). Drawn from the seed's data stream: an SAE of the same
    seed would otherwise start with latent i at atom i."""
    gen = data_generator(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_features, dim, generator=gen), dim=1)
    p = torch.arange(1, n_features + 1, dtype=torch.float64) ** -exponent
    p = (p / p.sum() * mean_l0).clamp(max=0.9).float()
    on = torch.rand(n, n_features, generator=gen) < p
    codes = on * (1 + torch.randn(n, n_features, generator=gen).abs())
    return codes @ atoms, codes, atoms


def latent_recovery(true_codes: Tensor, est_codes: Tensor) -> Tensor:
    """[n_est] each estimated latent's best |Pearson| with any ground-truth feature."""
    sim = metrics.abs_corr_matrix(true_codes, est_codes)
    return torch.from_numpy(sim.max(axis=0))
