"""top-AFA SAE (Lee, Davies, Canby, Hockenmaier 2025, arXiv 2503.24277, Sec. 5).

Input rows are standardised; x_c = x - b_dec; a = ReLU(x_c W_enc) with no encoder bias.
Per sample, sort (a_i ||W_dec,i||)^2 in descending order and keep the k* latents whose
cumulative norm sqrt(sum_{j<=k} a_(j)^2) is closest to the approximate feature activation
AFA = ||x_c||: k is chosen per input from the norm bound, not fixed.

Loss, as in the authors' released training code (github.com/SewoongLee/top-afa-sae,
training/sae.py), which produced the paper's runs: per-element MSE + lambda * mean over rows of
(||f|| - ||x||)^2 + AuxK, with x the standardised input (not centred by b_dec) and f the
selected codes. Our reconstruction term sums over the d input dimensions instead of
averaging, so the norm term is weighted lambda * d here: lambda means what it means there
(their sweep: 1/128 ... 1/16, where a larger lambda makes top-AFA keep more latents).
"""

from __future__ import annotations

import torch
from torch import Tensor

from paper_lib.sae.base import SAE, SAEConfig, SAEOutput


class TopAFASAE(SAE):
    architecture = "topafa"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.b_enc.requires_grad_(False)  # no encoder bias (kept at 0 for the SAELens layout)

    @torch.no_grad()
    def keep_mask(self, pre: Tensor, x_in: Tensor) -> Tensor:
        """[B, n] bool: per row, the k* largest decoder-scaled activations whose cumulative
        norm is closest to AFA = ||x_c||."""
        acts = pre.relu()
        target = (x_in - self.b_dec).norm(dim=-1, keepdim=True)
        scaled2 = (acts * self.W_dec.norm(dim=1)).pow(2)
        sorted2, order = scaled2.sort(dim=-1, descending=True)
        cum = sorted2.cumsum(-1).sqrt()
        k_star = (cum - target).abs().argmin(dim=-1, keepdim=True) + 1  # [B, 1]
        rank = torch.arange(acts.shape[-1], device=acts.device).expand_as(acts)
        return torch.zeros_like(rank, dtype=torch.bool).scatter(-1, order, rank < k_star)

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        return pre.relu() * self.keep_mask(pre, x_in)

    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        rows, cols = self.keep_mask(pre, x_in).nonzero(as_tuple=True)
        return rows, cols

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        f_norm = self.scaled_code_norm(out)  # decoder rows are unit norm: = ||f||
        gap = (f_norm - out.x_in.norm(dim=-1)).pow(2).mean()
        terms = {"afa": self.cfg.afa_lambda * out.x_in.shape[1] * gap}
        terms.update(self.auxk_loss(out, dead_mask))
        return terms


def topafa_config(d_in: int, d_sae: int, **kw) -> SAEConfig:
    """A top-AFA config with the paper's standardised input."""
    return SAEConfig("topafa", d_in, d_sae, standardize_input=True, **kw)
