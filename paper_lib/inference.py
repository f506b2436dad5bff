"""Sparse inference beyond an amortised encoder (O'Neill, Gumran, Klindt, arXiv 2411.13117).

- `refine_codes`: inference-time optimisation (ITO): start from given codes (an SAE's,
  or zeros) and minimise ||x - z W_dec - b_dec||^2 + l1 * sum_i z_i ||W_dec,i|| over
  z >= 0 with Adam, optionally on a fixed support (equal-L0 refinement).
- `sparse_coding`: learn the dictionary and every training code jointly (no encoder);
  new data is encoded with `refine_codes` from zeros.
- `inference_flops`: per-sample cost of each encoder, for the compute-optimal view.
Amortised encoders themselves (linear-ReLU SAE, MLP) are SAE architectures in paper_lib.sae,
trained by paper_lib.train.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from paper_lib.runtime import stream_generator


def _objective(x: Tensor, z: Tensor, w_dec: Tensor, b_dec: Tensor, norms: Tensor,
               l1: float) -> Tensor:
    return (x - z @ w_dec - b_dec).pow(2).sum(-1).mean() + l1 * (z * norms).sum(-1).mean()


def refine_codes(x: Tensor, codes: Tensor, w_dec: Tensor, b_dec: Tensor | None = None,
                 l1: float = 0.0, steps: int = 500, lr: float = 1e-2,
                 support: Tensor | None = None,
                 on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """ITO on codes [B, n] for data x [B, d] with a fixed dictionary w_dec [n, d].

    support: optional bool [B, n]; entries outside it stay 0 (keeps L0 unchanged).
    on_step(step, z): called after every step (for MCC-vs-compute traces).
    """
    w_dec, x = w_dec.detach().float(), x.detach().float()
    b = torch.zeros(x.shape[1], device=x.device) if b_dec is None else b_dec.detach().float()
    norms = w_dec.norm(dim=1)
    z = codes.detach().float().clamp_min(0).clone()
    if support is not None:
        z = z * support
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for step in range(steps):
        loss = _objective(x, z, w_dec, b, norms, l1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(min=0)
            if support is not None:
                z.mul_(support)
        if on_step is not None:
            on_step(step + 1, z.detach())
    return z.detach()


class SparseCoding(NamedTuple):
    dictionary: Tensor
    """[n, d] learned atoms, unit norm."""
    codes: Tensor
    """[B, n] learned non-negative training codes."""
    trace: list[tuple[int, Tensor]]
    """(step, dictionary snapshot) every `trace_every` steps."""


def sparse_coding(x: Tensor, n_latents: int, l1: float, steps: int, lr: float, seed: int,
                  trace_every: int = 0) -> SparseCoding:
    """Jointly optimise a unit-norm dictionary D [n, d] and codes S >= 0 [B, n] to minimise
    ||x - S D||^2 + l1 ||S||_1 (no encoder: every sample has its own free code)."""
    gen = stream_generator(seed, "sparse-coding")  # not the data's or an SAE's draws
    d = torch.randn(n_latents, x.shape[1], generator=gen)
    d = (d / d.norm(dim=1, keepdim=True)).to(x.device).requires_grad_(True)
    s = (torch.rand(x.shape[0], n_latents, generator=gen) * 0.1).to(x.device).requires_grad_(True)
    opt = torch.optim.Adam([d, s], lr=lr)
    zero_b = torch.zeros(x.shape[1], device=x.device)
    trace: list[tuple[int, Tensor]] = []
    for step in range(steps):
        loss = _objective(x, s, d, zero_b, torch.ones(n_latents, device=x.device), l1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            s.clamp_(min=0)
            d /= d.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if trace_every and (step + 1) % trace_every == 0:
            trace.append((step + 1, d.detach().clone()))
    return SparseCoding(d.detach(), s.detach(), trace)


def inference_flops(method: str, dim: int, n_latents: int, hidden: int = 0,
                    steps: int = 0) -> float:
    """Multiply-adds x 2 per sample to encode one input of width `dim` into `n_latents`.

    sae: one matrix product (2 M N); mlp: 2 (M h + h N); ito: the SAE's encoder plus
    `steps` gradient steps, each a decode and its transpose (4 M N) plus Adam's update
    (~10 N); sparse coding: the same steps starting from zero codes.
    """
    enc, step = 2 * dim * n_latents, 4 * dim * n_latents + 10 * n_latents
    if method == "sae":
        return float(enc)
    if method == "mlp":
        return float(2 * (dim * hidden + hidden * n_latents))
    if method == "ito":
        return float(enc + steps * step)
    if method == "sparse_coding":
        return float(steps * step)
    raise ValueError(f"unknown method {method!r}: use sae, mlp, ito or sparse_coding")
