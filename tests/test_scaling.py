"""Scaling-law fits recover known exponents from synthetic power-law data."""

import numpy as np
import pytest

from paper_lib import scaling


def test_power_law_exact():
    x = np.array([128, 256, 512, 1024, 2048.0])
    fit = scaling.fit_power_law(x, 3.0 * x ** -0.25)
    assert fit.b == pytest.approx(-0.25) and fit.a == pytest.approx(3.0)
    assert fit.r2 == pytest.approx(1)


def test_power_law_noisy():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 1e5, 20)
    y = 2.0 * x ** -0.4 * np.exp(rng.normal(0, 0.02, x.size))
    fit = scaling.fit_power_law(x, y)
    assert fit.b == pytest.approx(-0.4, abs=0.02) and fit.r2 > 0.99


def test_power_law_offset_recovers_irreducible_term():
    x = np.geomspace(10, 1e5, 15)
    fit = scaling.fit_power_law_offset(x, 5.0 * x ** -0.5 + 0.02)
    assert fit.b == pytest.approx(-0.5, abs=1e-3) and fit.c == pytest.approx(0.02, rel=1e-2)


def test_joint_law_recovers_parameters():
    """Noise-free data from known (alpha, beta_k, beta_n, gamma, zeta, eta)."""
    true = scaling.JointLaw(0.5, -0.6, -0.2, 0.02, -4.0, -0.3, 1.0)
    n, k = np.meshgrid([256, 512, 1024, 2048, 4096], [4, 8, 16, 32, 64])
    loss = true(n.ravel(), k.ravel())
    fit = scaling.fit_joint_law(n.ravel(), k.ravel(), loss)
    assert fit.r2 > 0.9999
    assert np.allclose(fit(n.ravel(), k.ravel()), loss, rtol=1e-3)
    assert fit.beta_n == pytest.approx(-0.2, abs=0.02)


def test_joint_law_se_is_the_regression_se_when_one_term_is_off():
    """With zeta = -50 the second term is e^-50 of the first (w = 1 in double precision),
    so ln L = alpha + beta_k ln k + beta_n ln n + gamma ln k ln n: a linear regression on
    (1, ln k, ln n, ln k ln n). Its four standard errors are then s sqrt(diag((X^T X)^-1))
    with s^2 = SSR / (m - 6), worked here from the normal equations; zeta and eta move
    nothing and get inf."""
    rng = np.random.default_rng(0)
    n, k = (v.ravel().astype(float) for v in np.meshgrid([256, 512, 1024, 2048],
                                                          [4, 8, 16, 32]))
    x = np.stack([np.ones_like(n), np.log(k), np.log(n), np.log(k) * np.log(n)], axis=1)
    ln_l = x @ [0.5, -0.6, -0.2, 0.02] + rng.normal(0, 0.05, n.size)
    coef = np.linalg.solve(x.T @ x, x.T @ ln_l)
    ssr = np.sum((ln_l - x @ coef) ** 2)
    want = np.sqrt(ssr / (n.size - 6) * np.diag(np.linalg.inv(x.T @ x)))
    law = scaling.JointLaw(*coef, -50.0, 0.0, float("nan"))
    se = scaling.joint_law_se(n, k, np.exp(ln_l), law)
    got = [se[p] for p in ("alpha", "beta_k", "beta_n", "gamma")]
    assert np.allclose(got, want, rtol=1e-6)
    assert se["zeta"] == se["eta"] == np.inf


def test_joint_law_se_is_inf_for_what_one_n_cannot_tell():
    """Every point at one n: alpha and beta_n (and beta_k and gamma) enter only as
    alpha + beta_n ln n (beta_k + gamma ln n), so neither of a pair is determined; the second
    term's zeta and eta are, from its share of L."""
    k = np.array([2, 4, 8, 16, 32, 64, 128, 256], float)
    n = np.full_like(k, 1024)
    law = scaling.JointLaw(0.5, -0.6, -0.2, 0.02, -3.0, -0.3, float("nan"))
    loss = law(n, k) * np.exp(np.random.default_rng(1).normal(0, 0.01, k.size))
    se = scaling.joint_law_se(n, k, loss, law)
    assert all(se[p] == np.inf for p in ("alpha", "beta_k", "beta_n", "gamma"))
    assert np.isfinite(se["zeta"]) and np.isfinite(se["eta"])


def test_fit_input_errors():
    with pytest.raises(ValueError, match="at least 2"):
        scaling.fit_power_law([1.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="at least 7"):
        scaling.fit_joint_law([1, 2], [1, 2], [1, 2])


def test_exponent_interval_hand_case():
    """ln x = 0, 1, 2, 3 and ln y = 0, -1, -1, -3: Sxx = 5, Sxy = -4.5, so b = -0.9 and
    ln a = 0.1; residuals -0.1, -0.2, 0.7, -0.4 give SSR 0.7, s^2 = 0.35 on 2 degrees of
    freedom, se(b) = sqrt(0.07) = 0.26458; t(0.975, 2) = 4.30265, so -0.9 +- 1.13838: an
    interval that includes 0. Exact points give a zero-width interval."""
    x = np.exp([0.0, 1.0, 2.0, 3.0])
    y = np.exp([0.0, -1.0, -1.0, -3.0])
    lo, hi = scaling.exponent_interval(x, y)
    assert lo == pytest.approx(-2.03838, abs=1e-4) and hi == pytest.approx(0.23838, abs=1e-4)
    lo, hi = scaling.exponent_interval([1, 2, 4, 8], [8, 4, 2, 1])
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        scaling.exponent_interval([1, 2], [1, 2])
