"""Experiments of notebook 03: Gao et al. 2024, "Scaling and evaluating sparse autoencoders".

One lockstep training run feeds everything: the TopK (n, k) grid, a ReLU+L1 sweep at the
frontier size, a TopK without AuxK and tied init (dead latents), and a multi-TopK SAE
(k generalisation). The functions below turn the trained SAEs into the paper's analyses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from paper_lib import interp, metrics
from paper_lib.config import TopKParams
from paper_lib.data.activations import ActivationSet
from paper_lib.experiments.common import encode_all, replicate_runs
from paper_lib.inference import refine_codes
from paper_lib.sae import SAE, SAEConfig


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


PROBE_SCORE = "mean relative probe loss"


def probe_inputs(acts: ActivationSet, n_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The first n_tokens held-out activations the probes read, and their labels."""
    x = acts.eval[:n_tokens]
    return x, interp.position_labels(acts.eval_tokens, x.shape[0], vocab=acts.vocab)


def probe_scores(codes: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    """Each task's relative probe loss (`interp.probe_losses`: 1 = useless, 0 = perfect)
    and their mean, the SAE's score (PROBE_SCORE)."""
    rel = {t: v["relative"] for t, v in interp.probe_losses(codes.cpu(), labels).items()}
    return {PROBE_SCORE: float(np.mean(list(rel.values()))), **rel}


def probe_replicates(p: TopKParams, cfgs: dict[str, SAEConfig],
                     device: torch.device) -> list[dict[str, float]]:
    """Runs 2 .. p.probe_seeds of the probe comparison between the named configs, each a
    full replication of the first (the sweep's) on its own draw of text, initialisation and
    batch order (`replicate_runs`). Every named SAE gets its PROBE_SCORE on that draw's
    first p.analysis_tokens held-out tokens. One {name: score} per run."""
    def score(acts: ActivationSet, trained: dict[str, Any]) -> dict[str, float]:
        x, labels = probe_inputs(acts, p.analysis_tokens)
        return {name: probe_scores(encode_all(r.sae, x)[0], labels)[PROBE_SCORE]
                for name, r in trained.items()}
    return replicate_runs(p, p.hook, cfgs, p.probe_seeds, device, score, "probe comparison",
                          lr_scale_with_n=True, lr_ref_latents=p.lr_ref_n,
                          heldout_midway=False)


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
    live = (metrics.firing_count(codes) > 0).nonzero().flatten().cpu()
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
