"""Every metric against a hand-worked case."""

import math

import numpy as np
import pytest
import torch

from paper_lib import metrics


def test_fvu_hand_case():
    """x = [[2,0],[0,4]], x_hat = [[2,1],[0,3]]: residual 2, variance about the mean 10."""
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x_hat = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert metrics.fvu(x, x_hat) == pytest.approx(0.2)
    assert metrics.explained_variance(x, x_hat) == pytest.approx(0.8)


def test_fvu_rejects_constant_input():
    """FVU of data with zero variance is undefined, not silently infinite."""
    with pytest.raises(ValueError, match="zero variance"):
        metrics.fvu(torch.ones(3, 2), torch.zeros(3, 2))


@pytest.mark.parametrize("block_elements", [1 << 26, 1, 4])
def test_l0_dead_and_frequency(monkeypatch, block_elements):
    """Two rows: L0 (2 + 1) / 2; latent 2 never fires; frequencies by hand. The same read a
    row at a time (1, 4 elements per block: each row its own block), as wide codes are."""
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", block_elements)
    c = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 0.0]])
    assert metrics.l0(c) == 1.5
    assert metrics.dead_fraction(c) == pytest.approx(1 / 3)
    assert metrics.firing_count(c).tolist() == [1, 2, 0]
    assert metrics.firing_frequency(c).tolist() == [0.5, 1.0, 0.0]
    assert metrics.mean_sq_activation(c).tolist() == [0.5, 6.5, 0.0]


def test_mcc_permutation_and_sign_invariant():
    """Estimated latents that are a permuted, rescaled, sign-flipped copy give MCC 1."""
    s = torch.randn(200, 4)
    est = torch.stack([-2 * s[:, 2], s[:, 0] * 0.5, s[:, 3], 3 * s[:, 1]], dim=1)
    assert metrics.mcc(s, est) == pytest.approx(1.0)


def test_mcc_hand_case_partial():
    """Truth a=[1,0,0,1], b=[0,1,0,1]; estimate copies a and adds c=[0,1,1,1]. By hand:
    |corr(a,c)| = |corr(b,c)| = 1/sqrt(3), corr(a,b) = 0, so the matching a-a, b-c gives
    (1 + 1/sqrt(3)) / 2."""
    t = torch.tensor([[1.0, 0], [0, 1], [0, 0], [1, 1]])
    e = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 1]])
    assert metrics.mcc(t, e) == pytest.approx((1 + 1 / math.sqrt(3)) / 2)


def test_mcc_constant_column_counts_zero():
    """A dead (constant) estimated latent correlates 0, it does not produce NaN."""
    t = torch.randn(50, 2)
    e = torch.stack([t[:, 0], torch.zeros(50)], dim=1)
    assert metrics.mcc(t, e) == pytest.approx(0.5)


def test_dictionary_mcc_hand_case():
    """Atoms e1, e2 vs estimates (e2, (e1 + e2)/sqrt 2): best matching gives 1 and 1/sqrt2."""
    true = torch.eye(2)
    est = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert metrics.dictionary_mcc(true, est) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_nearest_atoms_hand_case():
    """Direction (1, 1) against atoms (2, 0), (0, -1), (3, 3), (-1, -1): cosines 1/sqrt(2),
    -1/sqrt(2), 1, -1 whatever the atoms' lengths; the opposite atom ranks last."""
    atoms = torch.tensor([[2.0, 0.0], [0.0, -1.0], [3.0, 3.0], [-1.0, -1.0]])
    idx, cos = metrics.nearest_atoms(torch.tensor([1.0, 1.0]), atoms, top=4)
    assert idx.tolist() == [2, 0, 1, 3]
    assert cos.tolist() == pytest.approx([1, 1 / math.sqrt(2), -1 / math.sqrt(2), -1])
    idx, cos = metrics.nearest_atoms(torch.tensor([0.0, 5.0]), atoms, top=9)  # top > n: all
    assert idx.tolist()[:2] == [2, 0] and len(idx) == 4


def test_afa_and_eps_lbo_hand_case():
    """Atoms at 60 degrees (cos 1/2), f = (1, 1): ||z||^2 = 1 + 1 + 2 * 0.5 = 3, ||f||^2 = 2,
    h = 2, so eps-LBO = |3 - 2| / (1 * 2) = 0.5, which is the true coherence."""
    w = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    f = torch.tensor([[1.0, 1.0]])
    z = f @ w
    assert metrics.afa(z).item() == pytest.approx(math.sqrt(3))
    assert metrics.eps_lbo(z, f).item() == pytest.approx(0.5)
    assert math.isnan(metrics.eps_lbo(z, torch.tensor([[1.0, 0.0]])).item())  # h = 1


def test_scaled_codes_uses_decoder_norms():
    """f~_i = f_i ||W_dec,i||."""
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert metrics.scaled_codes(torch.tensor([[1.0, 1.0]]), w).tolist() == [[5.0, 2.0]]


def test_afa_norm_bound_hand_case():
    """||z||^2 = 3, eps = 0.5, h = 2: bounds 3/1.5 = 2 and 3/0.5 = 6; and infinite upper
    bound once eps (h - 1) >= 1."""
    z = torch.tensor([[math.sqrt(3), 0.0]])
    b = metrics.afa_norm_bound(z, torch.tensor([2]), 0.5)
    assert b.lower.item() == pytest.approx(2.0) and b.upper.item() == pytest.approx(6.0)
    assert math.isinf(metrics.afa_norm_bound(z, torch.tensor([3]), 0.5).upper.item())


def test_prefix_fvu_hand_case():
    """Two orthogonal unit atoms: with only the first, the second coordinate is lost."""
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    codes = x.clone()
    w, b = torch.eye(2), torch.zeros(2)
    full, first = metrics.prefix_fvu(x, codes, w, b, torch.tensor([0, 1]), [2, 1])
    assert full == pytest.approx(0.0) and first == pytest.approx(0.5)


def test_rsa_identity_and_scale_invariance():
    """RSA is 1 for identical and for uniformly scaled representations."""
    x = torch.randn(40, 5)
    assert metrics.rsa(x, x) == pytest.approx(1.0)
    assert metrics.rsa(x, 3 * x) == pytest.approx(1.0)


def test_pearson_hand_case():
    assert metrics.pearson(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1)
    assert metrics.pearson(torch.tensor([1.0, 2, 3]), torch.ones(3)) == 0.0


def test_lm_loss_arithmetic():
    """clean 2, spliced 2.5, zero 4: recovered (4 - 2.5) / (4 - 2) = 0.75, delta 0.5."""
    loss = metrics.LMLoss(clean=2.0, spliced=2.5, zero=4.0)
    assert loss.recovered == pytest.approx(0.75) and loss.delta == pytest.approx(0.5)


def _reference_losses(model, tokens, hook, fn):
    """Clean / spliced / zero CE by three plain full forwards with a TransformerLens hook
    (BOS position left clean), the definition SpliceEval must agree with."""
    def swap(f):
        def hook_fn(act, hook=None):
            new = f(act.clone())
            new[:, 0] = act[:, 0]
            return new
        return hook_fn
    out = []
    for f in (None, fn, torch.zeros_like):
        hooks = [] if f is None else [(hook, swap(f))]
        with torch.no_grad():
            out.append(float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)))
    return out


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre",
                                  "blocks.0.hook_mlp_out"])
def test_splice_eval_matches_full_forwards(tiny_lm, hook):
    """Kept-residual (resid_pre) and hooked (other hooks) paths give the CE of three full
    forwards, on every call, with batches that split the rows unevenly."""
    model, _ = tiny_lm
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (5, 24), generator=gen)
    tokens[:, 0] = 256
    ev = metrics.SpliceEval(model, tokens, hook, batch_size=2)
    for scale in (0.5, 0.9, 0.5):
        got = ev(lambda a, s=scale: a * s)
        want = _reference_losses(model, tokens, hook, lambda a, s=scale: a * s)
        assert list(got) == pytest.approx(want, rel=1e-5)


def test_splice_eval_runs_lower_blocks_once(tiny_lm):
    """At blocks.1.hook_resid_pre block 0 runs once per batch however many reconstructions
    are scored; block 1 runs for clean + zero once, then once per reconstruction. An
    in-place reconstruction does not corrupt the kept residual; with no cache budget block
    0 runs every time and the numbers do not change."""
    model, _ = tiny_lm
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    runs = [0, 0]
    handles = [model.blocks[i].register_forward_pre_hook(
        lambda *_, i=i: runs.__setitem__(i, runs[i] + 1)) for i in (0, 1)]
    try:
        ev = metrics.SpliceEval(model, tokens, "blocks.1.hook_resid_pre", batch_size=2)
        first = ev(lambda a: a.mul_(0.7))
        again = ev(lambda a: a.mul_(0.7))
        ev(lambda a: a)
        assert runs == [2, 2 * (3 + 1 + 1)]
        assert again == first
        runs[:] = [0, 0]
        cold = metrics.SpliceEval(model, tokens, "blocks.1.hook_resid_pre", batch_size=2,
                                  cache_bytes=0)
        assert list(cold(lambda a: a * 0.7)) == pytest.approx(list(first), rel=1e-6)
        cold(lambda a: a * 0.7)
        assert runs[0] == 2 * (3 + 1)  # every pass recomputes the residual below the hook
    finally:
        for h in handles:
            h.remove()


def test_splice_eval_rejects_bad_input(tiny_lm):
    model, _ = tiny_lm
    with pytest.raises(ValueError, match="unknown hook"):
        metrics.SpliceEval(model, torch.zeros(2, 8, dtype=torch.long), "blocks.0.hook_nonsense")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        metrics.SpliceEval(model, torch.zeros(2, 8, dtype=torch.long), "blocks.9.hook_resid_pre")
    with pytest.raises(ValueError, match="T >= 2"):
        metrics.SpliceEval(model, torch.zeros(2, 1, dtype=torch.long), "blocks.0.hook_resid_pre")


def test_splice_eval_identity_splice(tiny_lm):
    """Splicing the identity reconstruction leaves the CE exactly at its clean value."""
    model, _ = tiny_lm
    tokens = torch.randint(0, 256, (4, 32))
    tokens[:, 0] = 256
    out = metrics.SpliceEval(model, tokens, "blocks.1.hook_resid_pre")(lambda a: a)
    assert out.spliced == pytest.approx(out.clean, rel=1e-5)
    assert out.zero != pytest.approx(out.clean, rel=1e-6)  # the ablation hook took effect
    assert np.isfinite(out.recovered)


def test_average_ranks_share_ties():
    assert metrics.average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert metrics.average_ranks([3, 1, 2]).tolist() == [3, 1, 2]


def test_spearman_hand_cases():
    """x = [1, 1, 2], y = [3, 1, 2]: ranks [1.5, 1.5, 3] and [3, 1, 2], deviations
    [-.5, -.5, 1] and [1, -1, 0]: covariance 0. Breaking the tie by position would give
    -0.5. Dense-latent fractions [0, 0, .006, .041] against k = [4, 8, 16, 32]: ranks
    [1.5, 1.5, 3, 4] and [1, 2, 3, 4], 4.5 / sqrt(5 * 4.5) = 0.9487."""
    assert metrics.spearman([1, 1, 2], [3, 1, 2]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.spearman([4, 8, 16, 32], [0, 0, .006, .041]) == pytest.approx(4.5 / 22.5 ** .5)
    assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert metrics.spearman([1, 2, 3], [5, 5, 5]) == 0.0
    with pytest.raises(ValueError, match="3 values against 2"):
        metrics.spearman([1, 2, 3], [1, 2])


def test_spearman_interval_separates_trend_from_noise():
    """Medians that fall with x whatever the resample: the interval is the point (-1, -1).
    Every point drawn from one distribution: the interval straddles 0."""
    falling = [[3.0, 3.1], [2.0, 2.1], [1.0, 1.1]]
    assert metrics.spearman_interval([1, 2, 3], falling, reps=200) == (-1.0, -1.0)
    same = [[1.0, 2.0, 3.0, 4.0]] * 6
    lo, hi = metrics.spearman_interval(list(range(6)), same, reps=500)
    assert lo < 0 < hi
    with pytest.raises(ValueError, match="one non-empty sample"):
        metrics.spearman_interval([1, 2], [[1.0]])


def test_spearman_permutation_p_counts_orders_by_hand():
    """4 points in perfect order: 1 of the 4! = 24 orders is as extreme, p = 1/24. One
    adjacent swap (rho 0.8): that order, the perfect one and the two other adjacent swaps
    reach 0.8, p = 4/24. Falling perfectly over 5 points: 1/120 (the side it leans). A tie
    (0, 0, 1, 2): the two orders keeping both zeros first reach its rho, p = 2/24. No
    trend (rho 0) is at least as extreme as at least half the orders."""
    assert metrics.spearman_permutation_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1 / 24)
    assert metrics.spearman_permutation_p([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 24)
    assert metrics.spearman_permutation_p(range(5), [5, 4, 3, 2, 1]) == pytest.approx(1 / 120)
    assert metrics.spearman_permutation_p([1, 2, 3, 4], [0, 0, 1, 2]) == pytest.approx(2 / 24)
    assert metrics.spearman_permutation_p([1, 2, 3, 4], [2, 4, 1, 3]) >= 0.5
    # beyond exact_up_to, random orders: (hits + 1) / (reps + 1) for a perfect order of 10
    p = metrics.spearman_permutation_p(range(10), range(10), exact_up_to=8, reps=999)
    assert p == pytest.approx(1 / 1000)


def test_spearman_permutation_p_over_several_runs_by_hand():
    """Runs at the same x, each permuted on its own; the statistic is their mean rho. Over
    3 points the 6 orders give rho 1, 0.5, 0.5, -0.5, -0.5, -1. Two runs both in order:
    only (1, 1) of the 36 joint orders reaches a mean of 1, p = 1/36. One in order, one with
    a swap (mean 0.75): (1, 1), (1, 0.5) twice and (0.5, 1) twice, p = 5/36. Opposite orders
    (mean 0): at least half. 3 runs x 5 points (120^3 joint orders) go to random draws."""
    p = metrics.spearman_permutation_p
    assert p([1, 2, 3], [[1, 2, 3], [1, 2, 3]]) == pytest.approx(1 / 36)
    assert p([1, 2, 3], [[1, 2, 3], [1, 3, 2]]) == pytest.approx(5 / 36)
    assert p([1, 2, 3], [[1, 2, 3], [3, 2, 1]]) >= 0.5
    assert p(range(5), [range(5)] * 3, reps=999) == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="one value per x"):
        p([1, 2, 3], [[1, 2, 3], [1, 2]])


def test_fisher_greater_p_counts_splits_by_hand():
    """3 of 3 against 0 of 3: the 3 hits fall in group a in 1 of C(6, 3) = 20 equally likely
    ways, p = 1/20. 2 of 4 against 0 of 4: C(4, 2) / C(8, 2) = 6/28. 1 of 2 against 1 of 2:
    only "no hit in a" (1 of C(4, 2) = 6 ways) is less extreme, p = 5/6. No hit in a: p = 1."""
    assert metrics.fisher_greater_p(3, 3, 0, 3) == pytest.approx(1 / 20)
    assert metrics.fisher_greater_p(2, 4, 0, 4) == pytest.approx(6 / 28)
    assert metrics.fisher_greater_p(1, 2, 1, 2) == pytest.approx(5 / 6)
    assert metrics.fisher_greater_p(0, 5, 3, 5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="group b: 4 hits of 3 items"):
        metrics.fisher_greater_p(1, 3, 4, 3)


def test_rank_sum_greater_p_counts_splits_by_hand():
    """Four values, two per sample: C(4, 2) = 6 equally likely splits of the ranks. [3, 4]
    against [1, 2] holds the top two ranks, 1 split of 6 as extreme: p = 1/6. [2, 4] against
    [1, 3] (rank sum 6): the splits {3, 4} and {2, 4} reach 6, p = 2/6."""
    assert metrics.rank_sum_greater_p([3, 4], [1, 2]) == pytest.approx(1 / 6)
    assert metrics.rank_sum_greater_p([2, 4], [1, 3]) == pytest.approx(2 / 6)
    assert metrics.rank_sum_greater_p([1, 2], [3, 4]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two non-empty samples"):
        metrics.rank_sum_greater_p([], [1.0])
