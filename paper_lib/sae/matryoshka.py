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

from paper_lib.sae import kernels
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

    def prefix_recons(self, codes: Tensor) -> list[Tensor]:
        """Reconstruction from each nested prefix [B, d], smallest first."""
        out, acc, start = [], self.b_dec.expand(codes.shape[0], -1), 0
        for end in self.ends:
            acc = acc + codes[:, start:end] @ self.W_dec[start:end]
            out.append(acc)
            start = end
        return out

    def prefix_recons_sparse(self, sel: tuple[Tensor, Tensor, Tensor], batch: int) -> list[Tensor]:
        """Sparse-path twin of prefix_recons: each group decodes only its own selections
        (together one decode's work), then the prefixes are running sums."""
        rows, cols, vals = sel
        group = torch.bucketize(cols, torch.tensor(self.ends, device=cols.device), right=True)
        out, acc = [], self.b_dec.expand(batch, -1)
        for g in range(len(self.ends)):
            idx = (group == g).nonzero().flatten()  # rows stay sorted within the subset
            acc = acc + kernels.sparse_decode(rows[idx], cols[idx], vals[idx], self.W_dec, batch)
            out.append(acc)
        return out

    def recon_loss(self, out: SAEOutput) -> Tensor:
        recons = (self.prefix_recons(out.codes) if out.sel is None
                  else self.prefix_recons_sparse(out.sel, out.x_in.shape[0]))
        losses = [(out.x_in - r).pow(2).sum(-1).mean() for r in recons]
        return torch.stack(losses).mean()
