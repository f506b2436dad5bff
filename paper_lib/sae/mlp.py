"""SAE with a one-hidden-layer MLP encoder (O'Neill, Gumran, Klindt, arXiv 2411.13117, Sec. 4).

z = ReLU(W_2 ReLU(W_1 (x - b_dec) + b_1) + b_enc),  x_hat = z W_dec + b_dec,
L = ||x - x_hat||^2 + lambda * sum_i z_i ||W_dec,i||.
The extra hidden layer gives the encoder more capacity than the linear-nonlinear SAE
encoder, which the paper shows cannot invert every K-sparse code when M < N.
W_enc [hidden, d_sae] maps hidden units to latents; W_1 [d_in, hidden] is extra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from paper_lib.runtime import stream_generator
from paper_lib.sae.base import SAE, SAEConfig, SAEOutput


class MLPSAE(SAE):
    architecture = "mlp"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # its own stream: manual_seed(seed + 1) would replay the next seed's SAE initialisation
        gen = stream_generator(cfg.seed, "mlp-encoder")
        h = cfg.mlp_hidden
        self.W_1 = nn.Parameter((torch.rand(cfg.d_in, h, generator=gen) * 2 - 1)
                                / math.sqrt(cfg.d_in))
        self.b_1 = nn.Parameter(torch.zeros(h))
        self.W_enc = nn.Parameter((torch.rand(h, cfg.d_sae, generator=gen) * 2 - 1)
                                  / math.sqrt(h))

    def pre_acts(self, x_in: Tensor) -> Tensor:
        hidden = ((x_in - self.b_dec) @ self.W_1 + self.b_1).relu()
        return hidden @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        return pre.relu()

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        norms = self.W_dec.norm(dim=1)
        return {"l1": self.cfg.l1_coeff * (out.codes * norms).sum(-1).mean()}
