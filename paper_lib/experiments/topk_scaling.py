"""Experiments of notebook 03: Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

One lockstep training run feeds everything: the TopK (n, k) grid, a ReLU+L1 sweep at the
frontier size, a TopK without AuxK and tied init (dead latents), and a multi-TopK SAE
(k generalisation). The functions below turn the trained SAEs into the paper's analyses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paper_lib import metrics
from paper_lib.config import TopKParams
from paper_lib.data.activations import ActivationSet
from paper_lib.experiments.common import train_on
from paper_lib.inference import refine_codes
from paper_lib.sae import SAE, SAEConfig
from paper_lib.train import TrainResult


def grid_name(n: int, k: int) -> str:
    return f"topk_n{n}_k{k}"


def sweep_configs(p: TopKParams, d_in: int, hook: str) -> dict[str, SAEConfig]:
    common = dict(d_in=d_in, hook_name=hook, model_name=p.model, seed=p.seed,
                  dead_tokens=p.dead_window)
    cfgs = {grid_name(n, k): SAEConfig("topk", d_sae=n, k=k, **common)
            for n in p.n_values for k in p.k_values}
    for l1 in p.relu_l1:
        cfgs[f"relu_n{p.frontier_n}_l1{l1:g}"] = SAEConfig("relu", d_sae=p.frontier_n,
                                                            l1_coeff=l1, **common)
    cfgs[f"topk_n{p.dead_n}_k{p.dead_k}_noauxk_untied"] = SAEConfig(
        "topk", d_sae=p.dead_n, k=p.dead_k, auxk=False, tied_init=False, **common)
    cfgs[f"multitopk_n{p.frontier_n}_k{p.multi_k}"] = SAEConfig(
        "topk", d_sae=p.frontier_n, k=p.multi_k, multi_topk=True, **common)
    return cfgs


def reseeded_configs(cfgs: dict[str, SAEConfig], offset: int) -> dict[str, SAEConfig]:
    """A copy of each named config at initialisation seed seed + offset, named
    <name>_s<seed + offset>, every other setting equal."""
    return {f"{name}_s{c.seed + offset}": replace(c, seed=c.seed + offset)
            for name, c in cfgs.items()}


def train_reseeded(acts: ActivationSet, cfgs: dict[str, SAEConfig], copies: int,
                   data_seed: int, **train_kw: Any) -> dict[str, TrainResult]:
    """`copies` more training runs of the named configs: run i (1..copies) starts at
    initialisation seed seed + i (`reseeded_configs`) and reads the training rows in the
    order of data seed data_seed + i (batches and the decoder bias's sample), so the runs
    differ from the original by both kinds of training luck, which one run's comparison
    cannot see. `train_kw`: `train_on`'s other arguments."""
    out: dict[str, TrainResult] = {}
    for i in range(1, copies + 1):
        group = reseeded_configs(cfgs, i)
        out.update(zip(group, train_on(acts, list(group.values()), seed=data_seed + i,
                                       **train_kw)))
    return out


def dominated_fraction(front_l0: np.ndarray, front_y: np.ndarray, l0: np.ndarray,
                       y: np.ndarray) -> float:
    """Fraction of points (l0, y) dominated by some frontier point (L0 <= and y <=), among
    the points whose L0 lies inside the frontier's L0 range (outside it nothing can be
    concluded: no frontier point is comparable). NaN if none lies inside."""
    inside = (l0 >= front_l0.min()) & (l0 <= front_l0.max())
    dom = [bool(np.any((front_l0 <= a) & (front_y <= b)))
           for a, b in zip(l0[inside], y[inside])]
    return float(np.mean(dom)) if dom else float("nan")


@torch.no_grad()
def refit_ratio(sae: SAE, x: Tensor, steps: int = 300) -> float:
    """Shrinkage check (Gao et al. Sec. 5.1): re-optimise each sample's active codes with the
    decoder fixed and no penalty; mean refit / original activation over active entries
    (> 1: the encoder under-shoots)."""
    codes = sae.encode(x)
    with torch.enable_grad():
        refit = refine_codes(x, codes, sae.W_dec, sae.b_dec, 0.0, steps, 3e-3,
                             support=codes > 0)
    active = codes > 0
    return float(refit[active].mean() / codes[active].mean())


@torch.no_grad()
def fvu_at_k(sae: SAE, x: Tensor, k_values: list[int]) -> dict[int, float]:
    """FVU of a TopK SAE evaluated with k' active latents (k generalisation)."""
    out = {}
    for k in k_values:
        out[k] = metrics.fvu(x, sae.decode(sae.encode_at_k(x, k)))
    return out


def sample_live_latents(codes: Tensor, n: int, seed: int) -> list[int]:
    live = (codes > 0).any(0).nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    pick = live[torch.randperm(len(live), generator=gen)[:n]]
    return sorted(pick.tolist())


def summarise_grid(results: dict[str, Any], p: TopKParams) -> list[dict[str, float]]:
    rows = []
    for n in p.n_values:
        for k in p.k_values:
            f = results[grid_name(n, k)].final
            rows.append({"n": n, "k": k, "nmse": f["fvu"], "l0": f["l0"],
                         "dead_train": f["dead_train"], "dead_eval": f["dead_eval"]})
    return rows
