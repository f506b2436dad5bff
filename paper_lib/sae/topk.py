"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", Eq. 3).

z = ReLU(TopK(W_enc^T (x - b_pre) + b_enc)),  x_hat = W_dec z + b_pre,
with b_pre stored as b_dec (SAELens' apply_b_dec_to_input). Decoder rows are kept at
unit norm, the gradient component parallel to them removed (Sec. 2.4); W_enc starts as
W_dec^T; b_pre starts at the geometric median of a data sample. Loss: ||x - x_hat||^2
+ AuxK (App. B.1), plus L(4k)/8 when multi_topk (Sec. 5.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from paper_lib.sae import kernels
from paper_lib.sae.base import SAE, SAEOutput


def topk_codes(pre: Tensor, k: int) -> Tensor:
    """[B, n] keep each row's k largest pre-activations, then ReLU."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


class TopKSAE(SAE):
    architecture = "topk"

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        return topk_codes(pre, self.cfg.k)

    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        return kernels.row_topk(self.cfg.k)(pre)

    def encode_at_k(self, x: Tensor, k: int) -> Tensor:
        """Codes with a different number of active latents k' (k generalisation)."""
        if not 0 < k <= self.cfg.d_sae:
            raise ValueError(f"k'={k} must satisfy 0 < k' <= d_sae={self.cfg.d_sae}")
        x_in, _, _ = self.prepare(x)
        return topk_codes(self.pre_acts(x_in), k)

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        terms = self.auxk_loss(out, dead_mask)
        if self.cfg.multi_topk:
            k4 = min(4 * self.cfg.k, self.cfg.d_sae)
            recon4 = self.decode(topk_codes(out.pre, k4))
            terms["mse_4k"] = (out.x_in - recon4).pow(2).sum(-1).mean() / 8
        return terms
