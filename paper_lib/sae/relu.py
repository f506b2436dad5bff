"""ReLU SAE with a decoder-norm-weighted L1 penalty.

z = ReLU((x - b_dec) W_enc + b_enc),  x_hat = z W_dec + b_dec,
L = ||x - x_hat||^2 + lambda * sum_i z_i ||W_dec,i||_2
(the "standard" SAE of Bricken et al. 2023 with the norm-weighted penalty of Anthropic's
April 2024 update; Gao et al. 2024 use it as their ReLU baseline, Sec. 2.3). With
unit-norm decoder rows this is the plain MSE + lambda * L1 loss of O'Neill et al.
"""

from __future__ import annotations

from torch import Tensor

from paper_lib.sae.base import SAE, SAEOutput


class ReLUSAE(SAE):
    architecture = "relu"

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        return pre.relu()

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        norms = self.W_dec.norm(dim=1)
        return {"l1": self.cfg.l1_coeff * (out.codes * norms).sum(-1).mean()}
