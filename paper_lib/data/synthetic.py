"""Synthetic ground truth for the two papers that have one.

(a) Amortisation gap (O'Neill, Gumran, Klindt, arXiv 2411.13117, Sec. 4): exactly-K-sparse
    codes S in R^{n x N} with |N(0,1)| magnitudes on K random positions, a Gaussian
    dictionary D in R^{N x M} with unit-norm atoms (rows), and data X = S D (no noise).
(b) AFA bound (Lee et al. 2025, arXiv 2503.24277, Sec. 3): dictionaries whose unit-norm
    atoms have a chosen coherence eps = max_{i != j} |<w_i, w_j>|, and codes with exactly
    h active atoms.
Every function is seeded and returns the ground truth alongside the data; the draws come
from the seed's data stream (`runtime.stream_generator`), never the one an SAE or solver of
the same seed initialises from.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from paper_lib.runtime import stream_generator


def data_generator(seed: int) -> torch.Generator:
    """The generator every synthetic ground truth of a seed is drawn from: the seed's data
    stream, not the one an SAE or solver given the same seed initialises from."""
    return stream_generator(seed, "synthetic-data")


class SparseData(NamedTuple):
    x: torch.Tensor
    """Data, [n, M] = codes @ dictionary."""
    codes: torch.Tensor
    """Ground-truth codes S, [n, N], exactly K nonzeros per row."""
    dictionary: torch.Tensor
    """Ground-truth dictionary D, [N, M], unit-norm rows."""


def sparse_codes(n: int, n_latents: int, k: int, gen: torch.Generator,
                 signed: bool = False) -> torch.Tensor:
    """[n, n_latents] codes with exactly `k` nonzeros per row, magnitudes |N(0,1)|
    (times a random sign when `signed`)."""
    if not 0 < k <= n_latents:
        raise ValueError(f"k={k} must satisfy 0 < k <= n_latents={n_latents}")
    support = torch.rand(n, n_latents, generator=gen).argsort(dim=1)[:, :k]
    mags = torch.randn(n, k, generator=gen).abs()
    if signed:
        mags = mags * (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1)
    codes = torch.zeros(n, n_latents)
    codes.scatter_(1, support, mags)
    return codes


def gaussian_dictionary(n_latents: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """[n_latents, dim] Gaussian atoms normalised to unit norm."""
    d = torch.randn(n_latents, dim, generator=gen)
    return d / d.norm(dim=1, keepdim=True)


def make_sparse_data(n: int, n_latents: int, dim: int, k: int, seed: int,
                     dictionary: torch.Tensor | None = None) -> SparseData:
    """X = S D with a fresh (or the given) dictionary; same seed, same data. Drawn from the
    seed's data stream, so an SAE or solver given the same seed does not start at D."""
    gen = data_generator(seed)
    d = gaussian_dictionary(n_latents, dim, gen) if dictionary is None else dictionary
    if d.shape != (n_latents, dim):
        raise ValueError(f"dictionary has shape {tuple(d.shape)}, expected ({n_latents}, {dim})")
    s = sparse_codes(n, n_latents, k, gen)
    return SparseData(s @ d, s, d)


def coherence(w: torch.Tensor) -> float:
    """eps = max_{i != j} |cos(w_i, w_j)| over the rows of `w`."""
    wn = w / w.norm(dim=1, keepdim=True)
    g = (wn @ wn.T).abs()
    g.fill_diagonal_(0)
    return float(g.max())


def welch_bound(n_atoms: int, dim: int) -> float:
    """The smallest coherence any n_atoms unit vectors in R^dim can have."""
    if n_atoms <= dim:
        return 0.0
    return math.sqrt((n_atoms - dim) / (dim * (n_atoms - 1)))


def quasi_orthogonal_dictionary(n_atoms: int, dim: int, eps: float, seed: int,
                                max_iter: int = 5000) -> torch.Tensor:
    """[n_atoms, dim] unit-norm atoms with coherence equal to `eps` (to 1e-6).

    Random atoms are pushed apart by gradient steps on sum(relu(|G_ij| - eps')^2) until
    every |cos| <= eps' (slightly under eps); then the closest pair is rotated in its
    own plane to have cosine exactly eps, so the measured coherence is the requested one.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps={eps} must lie in (0, 1)")
    wb = welch_bound(n_atoms, dim)
    if eps < wb * 1.05:
        raise ValueError(f"eps={eps} is below what {n_atoms} atoms in {dim} dims allow "
                         f"(Welch bound {wb:.4f}); raise eps or dim")
    gen = data_generator(seed)
    w = gaussian_dictionary(n_atoms, dim, gen).double()
    target = eps * 0.98
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-2)
    eye = torch.eye(n_atoms, dtype=torch.bool)
    for _ in range(max_iter):
        wn = w / w.norm(dim=1, keepdim=True)
        g = (wn @ wn.T).abs().masked_fill(eye, 0)
        if g.max() <= target:
            break
        loss = torch.relu(g - target * 0.99).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise ValueError(f"could not reach coherence {eps} with {n_atoms} atoms in {dim} dims "
                         f"within {max_iter} steps; raise eps or dim")
    w = (w / w.norm(dim=1, keepdim=True)).detach()
    # Set the closest pair to cosine exactly eps (sign kept).
    g = (w @ w.T).masked_fill(eye, 0)
    i, j = divmod(int(g.abs().argmax()), n_atoms)
    sign = 1.0 if g[i, j] >= 0 else -1.0
    u = w[j] - (w[j] @ w[i]) * w[i]
    u = u / u.norm()
    w[j] = sign * eps * w[i] + math.sqrt(1 - eps**2) * u
    measured = coherence(w)
    if abs(measured - eps) > 1e-6:
        # Rotating w_j pushed another pair above eps: retry from another seed.
        return quasi_orthogonal_dictionary(n_atoms, dim, eps, seed + 7919, max_iter)
    return w.float()


def codes_with_h_active(n: int, n_atoms: int, h: int, seed: int,
                        signed: bool = True) -> torch.Tensor:
    """[n, n_atoms] codes with exactly h nonzeros per row (N(0,1) values by default)."""
    gen = data_generator(seed)
    return sparse_codes(n, n_atoms, h, gen, signed=signed)
