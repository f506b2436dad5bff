"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: keep the k*B largest ReLU pre-activations across the whole batch, so L0 is k
on average but varies per sample. Inference: a single threshold theta replaces the batch
selection, z = pre * 1[pre > theta]; theta is the running average of the smallest kept
activation over training batches. Decoder rows unit-norm; AuxK as in TopK.
"""

from __future__ import annotations

import torch
from torch import Tensor

from paper_lib.sae.base import SAE, SAEConfig, SAEOutput

THRESHOLD_MOMENTUM = 0.99


class BatchTopKSAE(SAE):
    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # -1 marks "not yet estimated": inference falls back to plain ReLU.
        self.register_buffer("threshold", torch.tensor(-1.0))

    @torch.no_grad()
    def _update_threshold(self, kept_vals: Tensor) -> None:
        """theta <- running mean of the smallest positive kept activation."""
        kept = kept_vals[kept_vals > 0]
        if kept.numel():
            m = kept.min().float()
            t = self.threshold
            t.copy_(m if t < 0 else THRESHOLD_MOMENTUM * t + (1 - THRESHOLD_MOMENTUM) * m)

    def batch_topk(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        flat = acts.flatten()
        vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()))
        codes = torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)
        self._update_threshold(vals)
        return codes

    @torch.compiler.disable  # data-dependent shapes and branch: selection stays eager
    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's k*B largest ReLU pre-activations, exactly, found among each row's top
        4k candidates; if some row has all its candidates selected (it might own more),
        the full flat top-(k*B) decides instead."""
        acts = pre.relu()
        batch, n = acts.shape
        total = min(self.cfg.k * batch, acts.numel())
        per_row = min(n, 4 * self.cfg.k)
        cand_vals, cand_cols = acts.topk(per_row, dim=1, sorted=False)
        vals, pos = cand_vals.flatten().topk(total, sorted=False)
        rows = pos // per_row
        if per_row < n and bool((torch.bincount(rows, minlength=batch) >= per_row).any()):
            vals, flat = acts.flatten().topk(total, sorted=False)
            rows, cols = flat // n, flat % n
        else:
            cols = cand_cols.flatten()[pos]
        self._update_threshold(vals)
        order = (rows * n + cols).sort().indices  # row-major order: rows ascending
        return rows[order], cols[order]

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        if self.training:
            return self.batch_topk(pre)
        theta = self.threshold.clamp_min(0)
        return pre.relu() * (pre > theta)

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        return self.auxk_loss(out, dead_mask)
