"""Matryoshka SAE (Bussmann et al. 2025, arXiv 2503.17547; evaluated by Peter & Sogaard
2025, arXiv 2505.00190, Sec. 3).

A BatchTopK SAE whose latents are split into nested groups with prefix ends
m_1 < m_2 < ... < m_G = n. One encoding at full size yields every nested
reconstruction x_hat_{:m} = z_{:m} W_dec,{:m} + b_dec, and the loss is the mean of the
G prefix losses (plus AuxK), so early latents must reconstruct well on their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paper_lib.sae.base import SAEConfig, SAEOutput
from paper_lib.sae.batchtopk import BatchTopKSAE


def group_ends(d_sae: int, fractions: tuple[float, ...]) -> list[int]:
    """Prefix ends for groups with the given size fractions (each group >= 1 latent)."""
    ends, acc = [], 0.0
    for f in fractions:
        acc += f
        ends.append(round(acc * d_sae))
    ends[-1] = d_sae
    for i in range(len(ends)):
        lo = ends[i - 1] + 1 if i else 1
        ends[i] = max(ends[i], lo)
    if ends[-1] != d_sae:
        raise ValueError(f"cannot split {d_sae} latents into {len(fractions)} groups")
    return ends


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.ends = group_ends(cfg.d_sae, cfg.group_fractions)

    @property
    def nested_ends(self) -> tuple[int, ...]:  # type: ignore[override]
        """The group ends: the sparse path decodes all prefixes at once."""
        return tuple(self.ends)

    def prefix_recons(self, codes: Tensor) -> list[Tensor]:
        """Reconstruction from each nested prefix [B, d], smallest first."""
        out, acc, start = [], self.b_dec.expand(codes.shape[0], -1), 0
        for end in self.ends:
            acc = acc + codes[:, start:end] @ self.W_dec[start:end]
            out.append(acc)
            start = end
        return out

    def recon_loss(self, out: SAEOutput) -> Tensor:
        """Mean over the G prefixes of each prefix's reconstruction loss."""
        prefixes = (out.prefixes if out.prefixes is not None
                    else torch.stack(self.prefix_recons(out.codes), 1))
        return (out.x_in[:, None] - prefixes).pow(2).sum(-1).mean(0).mean()
