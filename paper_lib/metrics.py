"""Every metric the notebooks report, each defined once (DESIGN.md, "Metrics").

Shapes: x, x_hat [B, d]; codes [B, n]; dictionaries [n, d] (one atom per row).
All functions are pure; none is hidden inside a model's forward.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import hypergeom, mannwhitneyu

from paper_lib.data.harvest import resid_pre_layer, stop_layer

# --------------------------------------------------------------------------- reconstruction


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    (the normalised MSE of Gao et al. 2024; explained variance = 1 - FVU)."""
    return float((x.double() - x_hat.double()).pow(2).sum()) / total_variance(x)


def total_variance(x: torch.Tensor) -> float:
    """sum ||x - mean(x)||^2 over the rows x, FVU's denominator (float64); a ValueError
    where it is 0 (FVU is then undefined)."""
    x = x.double()
    total = float((x - x.mean(0, keepdim=True)).pow(2).sum())
    if total == 0:
        raise ValueError("FVU is undefined: x has zero variance")
    return total


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - FVU."""
    return 1.0 - fvu(x, x_hat)


# codes of a wide SAE over many tokens are tens of GB (131,072 latents x 65,536 tokens: 34 GB):
# per-latent reductions read them a block of rows at a time, so a temporary (a bool mask, a
# float copy) is never the codes' size
CHUNK_ELEMENTS = 1 << 26


def _row_blocks(codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return codes.split(max(1, CHUNK_ELEMENTS // max(1, codes.shape[-1])))


def l0(codes: torch.Tensor) -> float:
    """Mean number of nonzero latents per row."""
    nonzero = sum(int((b != 0).sum()) for b in _row_blocks(codes))
    return nonzero / codes.shape[0] if codes.shape[0] else float("nan")


def firing_count(codes: torch.Tensor) -> torch.Tensor:
    """[n] int64 number of rows on which each latent is active (a > 0)."""
    count = torch.zeros(codes.shape[-1], dtype=torch.int64, device=codes.device)
    for b in _row_blocks(codes):
        count += (b > 0).sum(0)
    return count


def dead_fraction(codes: torch.Tensor) -> float:
    """Fraction of latents that never activate (> 0) in this window of rows."""
    return float((firing_count(codes) == 0).float().mean())


def firing_frequency(codes: torch.Tensor) -> torch.Tensor:
    """[n] fraction of rows on which each latent is active, E[1{a > 0}]."""
    return firing_count(codes).float() / codes.shape[0]


def mean_sq_activation(codes: torch.Tensor) -> torch.Tensor:
    """[n] E[a^2] per latent (Peter & Sogaard's importance ordering)."""
    total = torch.zeros(codes.shape[-1], dtype=torch.float32, device=codes.device)
    for b in _row_blocks(codes):
        total += b.float().pow(2).sum(0)
    return total / codes.shape[0]


def prefix_fvu(x: torch.Tensor, codes: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
               order: torch.Tensor, sizes: list[int]) -> list[float]:
    """FVU when only the first m latents of `order` decode, for each m in `sizes`
    (nested-prefix FVU; with `order` = arange it is a Matryoshka prefix)."""
    out = []
    for m in sizes:
        keep = order[:m]
        out.append(fvu(x, codes[:, keep] @ w_dec[keep] + b_dec))
    return out


# --------------------------------------------------------------------------- identifiability


def _standardise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(0, keepdims=True)
    norm = np.linalg.norm(a, axis=0, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


def abs_corr_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[n_a, n_b] |Pearson correlation| between the columns of a [B, n_a] and b [B, n_b];
    a constant column correlates 0 with everything."""
    an = _standardise(a.detach().double().cpu().numpy())
    bn = _standardise(b.detach().double().cpu().numpy())
    return np.abs(an.T @ bn)


def matched_mean(sim: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean similarity after Hungarian matching rows to columns (maximising the total);
    each row of the smaller side is matched once. Returns (mean, rows, cols)."""
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return float(sim[rows, cols].mean()), rows, cols


def mcc(true_codes: torch.Tensor, est_codes: torch.Tensor) -> float:
    """Mean correlation coefficient: mean |Pearson| between ground-truth and estimated
    latents after Hungarian matching (O'Neill et al. 2024, Sec. 4)."""
    return matched_mean(abs_corr_matrix(true_codes, est_codes))[0]


def dictionary_mcc(true_dict: torch.Tensor, est_dict: torch.Tensor) -> float:
    """Mean |cosine| between ground-truth atoms [N, M] and estimated atoms [n, M] after
    Hungarian matching."""
    t = torch.nn.functional.normalize(true_dict.detach().double(), dim=1)
    e = torch.nn.functional.normalize(est_dict.detach().double(), dim=1)
    return matched_mean((t @ e.T).abs().cpu().numpy())[0]


def nearest_atoms(direction: torch.Tensor, atoms: torch.Tensor, top: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` rows of atoms [n, d] most similar to direction [d] by signed cosine
    (codes are non-negative, so an opposite atom is not the same feature): (indices,
    cosines), best first."""
    atoms = atoms.detach()
    v = direction.detach().to(atoms.device, atoms.dtype)
    # a product and the row norms: no normalised [n, d] copy of a large dictionary
    cos = (atoms @ v) / (atoms.norm(dim=1) * v.norm()).clamp_min(1e-12)
    vals, idx = cos.topk(min(top, cos.numel()))
    return idx, vals


# --------------------------------------------------------------------------- AFA (Lee et al.)


def afa(z: torch.Tensor) -> torch.Tensor:
    """[B] approximate feature activation ||z||_2 of the dense embedding z (Lee et al. 2025)."""
    return z.norm(dim=-1)


def scaled_codes(codes: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """f~_i = f_i * ||W_dec,i||: codes in units of a unit-norm decoder."""
    return codes * w_dec.norm(dim=-1)


def eps_lbo(z: torch.Tensor, f_tilde: torch.Tensor) -> torch.Tensor:
    """[B] per-sample lower bound on the dictionary's quasi-orthogonality,
    |‖z‖² − ‖f̃‖²| / ((h − 1)‖f̃‖²) with h the number of active latents; NaN where h < 2."""
    h = (f_tilde != 0).sum(-1).double()
    f2 = f_tilde.double().pow(2).sum(-1)
    z2 = z.double().pow(2).sum(-1)
    out = (z2 - f2).abs() / ((h - 1) * f2)
    return torch.where(h >= 2, out, torch.full_like(out, float("nan")))


class NormBound(NamedTuple):
    lower: torch.Tensor
    """[B] ||z||^2 / (1 + eps (h - 1))"""
    upper: torch.Tensor
    """[B] ||z||^2 / (1 - eps (h - 1)); inf where eps (h - 1) >= 1"""


def afa_norm_bound(z: torch.Tensor, h: torch.Tensor, eps: float) -> NormBound:
    """Lee et al. 2025, Thm. 3.1: for eps-quasi-orthogonal unit atoms and h active latents,
    ||z||^2 / (1 + eps(h-1)) <= ||f||^2 <= ||z||^2 / (1 - eps(h-1))."""
    z2 = z.double().pow(2).sum(-1)
    c = eps * (h.double() - 1)
    upper = torch.where(c < 1, z2 / (1 - c).clamp_min(1e-300), torch.full_like(z2, float("inf")))
    return NormBound(z2 / (1 + c), upper)


# --------------------------------------------------------------------------- representations


def rsa(x: torch.Tensor, x_hat: torch.Tensor, n_samples: int = 512, seed: int = 0) -> float:
    """Representational similarity: Pearson correlation between the upper triangles of
    the pairwise Euclidean distance matrices of x and x_hat on `n_samples` rows."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=gen)[: min(n_samples, x.shape[0])]
    a, b = x[idx].double().cpu(), x_hat[idx].double().cpu()
    iu = torch.triu_indices(len(idx), len(idx), offset=1)
    da, db = torch.cdist(a, a)[iu[0], iu[1]], torch.cdist(b, b)[iu[0], iu[1]]
    return float(torch.corrcoef(torch.stack([da, db]))[0, 1])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flat tensors (0 if either is constant)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else 0.0


# --------------------------------------------------------------------------- trends


def average_ranks(a) -> np.ndarray:
    """1-based ranks of a 1-D sequence; tied values share the mean of their positions."""
    a = np.asarray(a, dtype=float)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):  # ties: replace positional ranks by their mean
        tied = a == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties share a
    rank, so a tied variable cannot pass on the order of another). 0 when either side is
    constant (no monotone trend can be read off it)."""
    ra, rb = average_ranks(a), average_ranks(b)
    if len(ra) != len(rb):
        raise ValueError(f"spearman: {len(ra)} values against {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def spearman_interval(x, samples: list, reps: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of spearman(x, medians): point i's value is the median of its
    repeated measurements samples[i] (e.g. per-round timing ratios), resampled with
    replacement `reps` times. Says whether a trend over noisy points is more than noise."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(s, dtype=float) for s in samples]
    if len(arrs) != len(x) or any(len(s) == 0 for s in arrs):
        raise ValueError("spearman_interval: one non-empty sample per x value")
    stats = [spearman(x, [np.median(rng.choice(s, len(s))) for s in arrs]) for _ in range(reps)]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def as_runs(y) -> list[np.ndarray]:
    """One run's values (a flat sequence) or several runs' (a sequence of sequences), as a
    list of float arrays, one per run."""
    y = list(y)
    runs_given = bool(y) and np.ndim(y[0]) > 0
    return [np.asarray(list(r), dtype=float) for r in (y if runs_given else [y])]


def spearman_permutation_p(x, y, exact_up_to: int = 8, reps: int = 20_000,
                           seed: int = 0) -> float:
    """One-sided p-value of spearman(x, y) in the direction it leans: the chance that the
    points, if exchangeable (no trend at all), put y in an order at least as correlated
    with x. A trend over a few SAEs cannot be told from noise unless this is small: over 4
    points only a perfect order reaches 1/24 = 0.042.

    `y` may instead hold several runs' values at the same x (one sequence per run, say per
    data draw): the statistic is then the mean of the runs' correlations and each run's
    order is exchangeable on its own (a stratified test), so runs that agree add power (two
    runs over 3 points, both in order: 1/36). Exact over every joint order while they
    number at most exact_up_to! (8! = 40320), else from `reps` random draws of them."""
    x, ys = list(x), as_runs(y)
    if any(len(r) != len(x) for r in ys):
        raise ValueError(f"spearman_permutation_p: every run needs one value per x "
                         f"({len(x)}); got {[len(r) for r in ys]}")
    n, runs = len(x), len(ys)
    rho = float(np.mean([spearman(x, r) for r in ys]))
    exact = math.factorial(n) ** runs <= math.factorial(exact_up_to)
    if exact:
        orders = [list(o) for o in itertools.permutations(range(n))]
        stats = np.zeros(1)
        for r in ys:  # every joint order: the sum over runs of each run's statistic
            stats = np.add.outer(stats, [spearman(x, r[o]) for o in orders]).ravel()
        stats = stats / runs
    else:
        rng = np.random.default_rng(seed)
        stats = np.array([np.mean([spearman(x, r[rng.permutation(n)]) for r in ys])
                          for _ in range(reps)])
    eps = 1e-9  # a tie of the statistic counts as at least as extreme
    hits = int((stats >= rho - eps).sum() if rho >= 0 else (stats <= rho + eps).sum())
    return hits / len(stats) if exact else (hits + 1) / (len(stats) + 1)


def fisher_greater_p(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """One-sided Fisher exact p-value that group a's rate (hits_a of n_a) exceeds group b's
    (hits_b of n_b): the chance, if all n_a + n_b items were equally likely to be hits, that
    the hits_a + hits_b hits put at least hits_a of themselves in group a (hypergeometric
    tail). 3 of 3 against 0 of 3: 1 / C(6, 3) = 0.05."""
    for name, hits, n in (("a", hits_a, n_a), ("b", hits_b, n_b)):
        if not 0 <= hits <= n:
            raise ValueError(f"group {name}: {hits} hits of {n} items; need 0 <= hits <= n")
    return float(hypergeom.sf(hits_a - 1, n_a + n_b, hits_a + hits_b, n_a))


def rank_sum_greater_p(a, b) -> float:
    """One-sided Mann-Whitney (rank-sum) p-value that values of sample a tend to exceed
    those of sample b: the chance, if all values were exchangeable, that a's ranks among
    both would sum at least as high. Exact for small samples without ties, else the normal
    approximation (scipy's choice). [3, 4] against [1, 2]: 1 of C(4, 2) = 6 splits, 1/6."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"a rank-sum test needs two non-empty samples (got {len(a)} and "
                         f"{len(b)} values)")
    return float(mannwhitneyu(a, b, alternative="greater").pvalue)


# --------------------------------------------------------------------------- downstream loss


class LMLoss(NamedTuple):
    clean: float
    """next-token CE of the unmodified model"""
    spliced: float
    """CE with the hook's activation replaced by the reconstruction"""
    zero: float
    """CE with the hook's activation zero-ablated"""

    @property
    def recovered(self) -> float:
        """CE loss recovered = (zero - spliced) / (zero - clean)."""
        return (self.zero - self.spliced) / (self.zero - self.clean)

    @property
    def delta(self) -> float:
        """Delta LM loss = spliced - clean (Gao et al.'s downstream loss)."""
        return self.spliced - self.clean


class SpliceEval:
    """Next-token CE of `model` on fixed token rows [B, T]: clean, with a reconstruction
    spliced in at `hook`, and with the hook zero-ablated (`LMLoss`). Built once and called
    once per reconstruction (many SAEs, many prefix sizes): the clean and zero-ablated CE
    are computed on the first call only, and at blocks.L.hook_resid_pre the residual
    entering block L is kept (up to `cache_bytes`), so each reconstruction runs blocks L
    and up only, via start_at_layer. Any other hook splices through run_with_hooks. The
    BOS position keeps its clean value when `skip_bos` (the SAE never saw it)."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, hook: str,
                 batch_size: int = 32, skip_bos: bool = True, cache_bytes: float = 2**30):
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [rows, T] with T >= 2, got {tuple(tokens.shape)}")
        stop_layer(model, hook)  # names the valid hooks when `hook` is not one
        self.model, self.hook, self.skip_bos = model, hook, skip_bos
        self.batches = list(tokens.split(batch_size))
        # start_at_layer takes the residual alone: not for shortformer position embeddings
        shortformer = model.cfg.positional_embedding_type == "shortformer"
        self.layer = None if shortformer else resid_pre_layer(hook)
        dtype = next(model.parameters()).dtype
        self.keep_resid = (self.layer is not None
                           and tokens.numel() * model.cfg.d_model * dtype.itemsize <= cache_bytes)
        self._resid: list[torch.Tensor] = []
        self._clean_zero: tuple[float, float] | None = None
        self.n = tokens.shape[0] * (tokens.shape[1] - 1)

    def _replace(self, act: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        # a copy: `fn` may work in place, and `act` may be the kept residual
        flat = act.reshape(-1, act.shape[-1]).to(torch.float32, copy=True)
        new = fn(flat).reshape(act.shape).to(act.dtype)
        if self.skip_bos:
            new[:, 0] = act[:, 0]
        return new

    def _resid_at(self, i: int) -> torch.Tensor:
        if i < len(self._resid):
            return self._resid[i]
        resid = self.model(self.batches[i], stop_at_layer=self.layer)
        if self.keep_resid:
            self._resid.append(resid)
        return resid

    def _ce(self, i: int, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
        """Summed CE of batch i with `fn` (None: clean) replacing the hook's activation."""
        tok = self.batches[i]
        if self.layer is not None:
            resid = self._resid_at(i)
            loss = self.model(resid if fn is None else self._replace(resid, fn),
                              start_at_layer=self.layer, tokens=tok, return_type="loss",
                              loss_per_token=True)
        else:
            hooks = [] if fn is None else [(self.hook, lambda a, hook=None: self._replace(a, fn))]
            loss = self.model.run_with_hooks(tok, return_type="loss", loss_per_token=True,
                                             fwd_hooks=hooks)
        return float(loss.float().sum())

    @torch.inference_mode()
    def __call__(self, reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> LMLoss:
        first = self._clean_zero is None
        totals = [0.0, 0.0, 0.0]
        for i in range(len(self.batches)):
            if first:
                totals[0] += self._ce(i, None)
                totals[2] += self._ce(i, torch.zeros_like)
            totals[1] += self._ce(i, reconstruct)
        if first:
            self._clean_zero = (totals[0] / self.n, totals[2] / self.n)
        clean, zero = self._clean_zero
        return LMLoss(clean, totals[1] / self.n, zero)
