"""Synthetic ground truth: exact sparsity, determinism, requested coherence, the AFA bound."""

import math

import pytest
import torch

from paper_lib import metrics
from paper_lib.data import synthetic as syn


def test_sparse_data_exactly_k_nonzeros_and_deterministic():
    a = syn.make_sparse_data(256, 16, 8, 3, seed=5)
    b = syn.make_sparse_data(256, 16, 8, 3, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes)
    assert ((a.codes != 0).sum(1) == 3).all()
    assert (a.codes >= 0).all()
    assert torch.allclose(a.dictionary.norm(dim=1), torch.ones(16))
    assert torch.allclose(a.x, a.codes @ a.dictionary)
    assert not torch.equal(a.x, syn.make_sparse_data(256, 16, 8, 3, seed=6).x)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_same_seed_models_do_not_start_at_the_true_dictionary(seed):
    """Data, SAE and sparse coding all given one seed: the SAE's initial decoder (and its
    tied encoder) and sparse coding's starting dictionary must not be the data's dictionary.
    With one shared stream per seed every row matched exactly (|cos| = 1); independent
    unit vectors in 8 dimensions have E|cos| = 0.27, so a mean over 64 rows stays far
    below 0.6."""
    from paper_lib.inference import sparse_coding
    from paper_lib.sae import SAEConfig, make_sae

    data = syn.make_sparse_data(32, 64, 8, 3, seed=seed)
    d = data.dictionary

    def row_cos(w):
        return float((torch.nn.functional.normalize(w, dim=1) * d).sum(1).abs().mean())

    for arch in ("relu", "topk", "mlp"):
        sae = make_sae(SAEConfig(arch, 8, 64, k=3, mlp_hidden=16, seed=seed))
        assert row_cos(sae.W_dec.detach()) < 0.6, arch
        if arch != "mlp":
            assert row_cos(sae.W_enc.detach().T) < 0.6, arch
    start = sparse_coding(data.x, 64, l1=0.01, steps=0, lr=0.01, seed=seed).dictionary
    assert row_cos(start) < 0.6


@pytest.mark.parametrize("seed", [0, 3])
def test_no_synthetic_generator_shares_a_stream_with_sae_init(seed):
    """The other ground truths too (AFA's quasi-orthogonal dictionary, notebook 04's
    power-law features): an SAE of the same seed and shape starts unrelated to them
    (E|cos| = 0.27 in 8 dimensions; a shared stream gave 1 for every row, or nearly
    1 after the quasi-orthogonal push-apart)."""
    from paper_lib.experiments.matryoshka import power_law_features
    from paper_lib.sae import SAEConfig, make_sae

    w0 = make_sae(SAEConfig("topk", 8, 24, k=2, seed=seed)).W_dec.detach()
    for atoms in (syn.quasi_orthogonal_dictionary(24, 8, 0.6, seed),
                  power_law_features(24, 8, 16, 2.0, 1.0, seed)[2]):
        assert float((w0 * atoms).sum(1).abs().mean()) < 0.6


def test_shared_dictionary_and_bad_k():
    a = syn.make_sparse_data(10, 6, 4, 2, seed=0)
    b = syn.make_sparse_data(10, 6, 4, 2, seed=1, dictionary=a.dictionary)
    assert torch.equal(a.dictionary, b.dictionary)
    with pytest.raises(ValueError, match="k=7"):
        syn.sparse_codes(3, 6, 7, torch.Generator())
    with pytest.raises(ValueError, match="shape"):
        syn.make_sparse_data(3, 6, 4, 2, 0, dictionary=torch.ones(5, 4))


def test_coherence_hand_case():
    w = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    assert syn.coherence(w) == pytest.approx(0.8)


@pytest.mark.parametrize("n, d, eps", [(64, 32, 0.3), (128, 48, 0.35), (40, 40, 0.1)])
def test_quasi_orthogonal_dictionary_hits_requested_eps(n, d, eps):
    """Measured coherence equals the requested eps to 1e-6; atoms are unit norm."""
    w = syn.quasi_orthogonal_dictionary(n, d, eps, seed=0)
    assert w.shape == (n, d)
    assert torch.allclose(w.norm(dim=1), torch.ones(n), atol=1e-5)
    assert syn.coherence(w) == pytest.approx(eps, abs=1e-5)


def test_coherence_below_welch_bound_is_refused():
    with pytest.raises(ValueError, match="Welch bound"):
        syn.quasi_orthogonal_dictionary(200, 10, 0.05, seed=0)


def test_afa_bound_holds_for_every_sample():
    """Lee et al. Thm 3.1 on random codes with h active atoms of an eps dictionary."""
    eps = 0.1
    w = syn.quasi_orthogonal_dictionary(96, 64, eps, seed=1)
    for h in (2, 4, 8):
        f = syn.codes_with_h_active(2000, 96, h, seed=h)
        z = f @ w
        bound = metrics.afa_norm_bound(z, torch.full((2000,), h), syn.coherence(w))
        f2 = f.double().pow(2).sum(1)
        assert bool(((bound.lower <= f2 * (1 + 1e-9)) & (f2 <= bound.upper * (1 + 1e-9))).all())


def test_frontier_fvu_hand_case():
    """TopK frontier points (16, 0.1) and (64, 0.025) lie on FVU = 1.6 / L0 (slope -1 in
    log-log), so at L0 = 32 it reads 0.05; at an end point its own FVU; outside, NaN."""
    from paper_lib.experiments.afa import frontier_fvu

    l0, fvu = [64, 16], [0.025, 0.1]  # unsorted on purpose
    assert frontier_fvu(l0, fvu, 32) == pytest.approx(0.05)
    assert frontier_fvu(l0, fvu, 16) == pytest.approx(0.1)
    assert math.isnan(frontier_fvu(l0, fvu, 8)) and math.isnan(frontier_fvu(l0, fvu, 65))
    assert math.isnan(frontier_fvu([16], [0.1], 16))


def test_probe_replicates_draw_data_initialisation_and_batch_order(monkeypatch):
    """With seed 10 and probe_seeds 3, runs 2 and 3 of the probe comparison each harvest
    their own draw (seeds 11, 12), train the SAEs (initialised at 3 + 1, 3 + 2) on it in
    that draw's batch order, and score them on that draw's held-out tokens; probe_seeds 1:
    no run at all."""
    from types import SimpleNamespace

    from paper_lib.config import TopKParams
    from paper_lib.experiments import common
    from paper_lib.experiments import topk_scaling as ts
    from paper_lib.sae import SAEConfig

    def fake_train_on(acts, cfgs, steps, batch_size, lr, device, progress, desc, seed, **kw):
        return [SimpleNamespace(sae=(c.seed, seed, acts.draw)) for c in cfgs]

    monkeypatch.setattr(common, "load_activations",
                        lambda *a, context_size: SimpleNamespace(draw=a[6]))  # a[6]: seed
    monkeypatch.setattr(common, "train_on", fake_train_on)
    monkeypatch.setattr(ts, "probe_inputs", lambda acts, n: (("held-out", acts.draw, n), None))
    monkeypatch.setattr(ts, "encode_all", lambda sae, x: ((sae, x), None))
    monkeypatch.setattr(ts, "probe_scores", lambda codes, labels: {ts.PROBE_SCORE: codes})
    cfg = {"relu": SAEConfig("relu", 8, 32, l1_coeff=2.0, seed=3),
           "topk": SAEConfig("topk", 8, 32, k=4, seed=3)}
    p = TopKParams(seed=10, probe_seeds=3, analysis_tokens=300)
    out = ts.probe_replicates(p, cfg, "cpu")
    assert out == [{name: ((3 + i, 10 + i, 10 + i), ("held-out", 10 + i, 300)) for name in cfg}
                   for i in (1, 2)]
    assert ts.probe_replicates(TopKParams(probe_seeds=1), cfg, "cpu") == []


def test_l0_replicates_train_top_afa_at_every_lambda_per_draw(monkeypatch):
    """With seed 5 and lambda_seeds 2, the one extra run of 01's lambda sweep harvests draw 6
    at the sweep's hook, trains top-AFA at each lambda of the grid (initialised at seed 6,
    standardised rows, no TopK) in draw 6's batch order, and reads each one's held-out L0."""
    from types import SimpleNamespace

    from paper_lib.config import AFAParams
    from paper_lib.experiments import afa, common

    calls = []

    def fake_train_on(acts, cfgs, steps, batch_size, lr, device, progress, desc, seed, **kw):
        calls.append((acts.draw, seed, [(c.architecture, c.afa_lambda, c.seed,
                                         c.standardize_input, c.hook_name) for c in cfgs]))
        return [SimpleNamespace(final={"l0": 1000 * c.afa_lambda + c.seed}) for c in cfgs]

    monkeypatch.setattr(common, "load_activations",
                        lambda *a, context_size: SimpleNamespace(draw=(a[2], a[6])))  # hook, seed
    monkeypatch.setattr(common, "train_on", fake_train_on)
    p = AFAParams(seed=5, lambda_seeds=2, afa_lambdas=(0.25, 0.5))
    out = afa.l0_replicates(p, "blocks.0.hook_resid_pre", 16, "cpu")
    assert calls == [(("blocks.0.hook_resid_pre", 6), 6,
                      [("topafa", 0.25, 6, True, "blocks.0.hook_resid_pre"),
                       ("topafa", 0.5, 6, True, "blocks.0.hook_resid_pre")])]
    assert out == [{"topafa lambda=0.25": 256.0, "topafa lambda=0.5": 506.0}]
    assert afa.l0_replicates(AFAParams(lambda_seeds=1), "h", 16, "cpu") == []


def test_lambda_label_hand_cases():
    """The authors' grid reads as 1/n; a weight that is no reciprocal of a whole number
    keeps its value (1/0.3 = 3.33 must not read 1/3)."""
    from paper_lib.experiments.afa import lambda_label

    assert [lambda_label(v) for v in (1 / 128, 1 / 24, 0.0625, 1.0)] == \
        ["1/128", "1/24", "1/16", "1/1"]
    assert lambda_label(0.3) == "0.3" and lambda_label(0.007) == "0.007"
