"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: keep the k*B largest ReLU pre-activations across the whole batch, so L0 is k
on average but varies per sample. Inference: a single threshold theta replaces the batch
selection, z = pre * 1[pre > theta], theta being the smallest activation the batch
selection keeps. Decoder rows unit-norm; AuxK as in TopK.

Where theta comes from: the reference code keeps a running average of that smallest kept
activation over training steps (SAELens and the BatchTopK repository: momentum 0.99;
dictionary_learning: 0.999, from step 1000). Over a run of a few hundred steps, as here at
`smoke`, the average still remembered early training, whose activations were larger: a
Matryoshka SAE after 250 steps had theta 0.80 where its final weights' training batches gave
0.64, and kept 13.8 latents per held-out token instead of about k = 16. So the trainer sets
theta from the final weights (`calibrate_threshold_`, on the last training batch, before
every evaluation): what the running average tends to over a long run, at any length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from paper_lib.sae.base import SAE, SAEConfig, SAEOutput


class BatchTopKSAE(SAE):
    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # -1 marks "not yet estimated": inference falls back to plain ReLU.
        self.register_buffer("threshold", torch.tensor(-1.0))

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, chunk: int = 4096) -> None:
        """theta <- the smallest activation the batch selection would keep on rows x [B, d]
        taken as one batch, under the current weights: the (k*B)-th largest positive ReLU
        pre-activation, or the smallest positive one if fewer are positive; left as it was
        if none is. The trainer calls it on a training batch. Rows are encoded `chunk` at a
        time, each chunk's k*B largest kept (B x n pre-activations at once would take 17 GB
        for 65,536 rows of a 65,536-latent SAE)."""
        total, n = self.cfg.k * x.shape[0], self.cfg.d_sae
        kept = None  # the k*B largest positive values so far
        for i in range(0, x.shape[0], chunk):
            x_in, _, _ = self.prepare(x[i:i + chunk].float())
            flat = self.pre_acts(x_in).view(-1)
            vals = flat[largest_positive(flat, min(total, flat.numel()), n)]
            kept = vals if kept is None else torch.cat([kept, vals])
            if kept.numel() > total:
                kept = kept.topk(total, sorted=False).values
        if kept is not None and kept.numel():
            self.threshold.copy_(kept.min())

    def batch_topk(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        flat = acts.flatten()
        vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)

    @torch.compiler.disable  # data-dependent shapes and branch: selection stays eager
    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's k*B largest ReLU pre-activations, exactly, in row-major order
        (`largest_positive`)."""
        batch, n = pre.shape
        pos = largest_positive(pre.view(-1), min(self.cfg.k * batch, pre.numel()), n)
        return pos // n, pos % n

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        if self.training:
            return self.batch_topk(pre)
        theta = self.threshold.clamp_min(0)
        return pre.relu() * (pre > theta)

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        return self.auxk_loss(out, dead_mask)


def largest_positive(flat: Tensor, total: int, n: int) -> Tensor:
    """Positions, ascending, of the `total` largest positive entries of flat (rows of n
    entries, flattened), exactly; all positive entries if fewer are positive.

    A strided sample gives a threshold a little below the total-th largest value; the
    entries above it (1.2-1.7 total, in order from `nonzero`) are the only candidates, and
    their top `total` is the answer. If the sample aimed too high (fewer candidates than
    total: rare by its margin), every positive entry is a candidate. Entries at or below
    zero are never kept: their codes would be zero."""
    theta = sample_threshold(flat, total / flat.numel(), n)
    pos = (flat > max(theta, 0.0)).nonzero().squeeze(1)
    if pos.numel() < total and theta > 0:  # the sample aimed too high
        pos = (flat > 0).nonzero().squeeze(1)
    if pos.numel() > total:
        keep = flat[pos].topk(total, sorted=False).indices.sort().values  # back in order
        pos = pos[keep]
    return pos


SAMPLE = 1 << 18


def sample_stride(numel: int, n: int) -> int:
    """Step between sampled entries: about numel / SAMPLE, coprime to the row length n."""
    stride = max(1, numel // SAMPLE)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def sample_threshold(flat: Tensor, frac: float, n: int) -> float:
    """A value that 1.2-1.7 x frac of the entries exceed (at least frac of them with
    high probability: 3 standard deviations of the sampled count, plus 8), from a strided
    sample of about SAMPLE entries. The stride shares no
    factor with the row length n, so the sample visits every column, not a few."""
    sample = flat[::sample_stride(flat.numel(), n)]
    hits = frac * sample.numel()
    rank = min(sample.numel(), math.ceil(1.2 * hits + 3 * math.sqrt(hits) + 8))
    return float(sample.topk(rank, sorted=False).values.min())
