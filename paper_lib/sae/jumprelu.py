"""JumpReLU SAE, for reading (Rajamanoharan et al. 2024, arXiv 2407.14435).

z_i = pre_i * 1[pre_i > theta_i] with a learned threshold per latent, pre = (x - b_dec)
W_enc + b_enc. It is the inference form SAELens saves for JumpReLU SAEs (Gemma Scope) and
for the BatchTopK and Matryoshka SAEs it trains, so `load_sae` reads such files into this
class for exploration and scoring. Training one needs the paper's straight-through
estimator for theta, which this package does not implement: the trainer refuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paper_lib.sae.base import SAE, SAEConfig


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))  # theta per latent

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)
