"""Power-law and joint scaling-law fits (Gao et al. 2024, Sec. 3).

- `fit_power_law`: y = a x^b by least squares in log-log space;
- `fit_power_law_offset`: y = a x^b + c, an irreducible term c >= 0;
- `fit_joint_law`: Gao et al.'s joint law in latents n and sparsity k,
  L(n, k) = exp(alpha + beta_k ln k + beta_n ln n + gamma ln k ln n) + exp(zeta + eta ln k),
  fitted by least squares on ln L from several starting points; `joint_law_se` gives its
  parameters' standard errors, which say which of them a grid of (n, k) pins down.
Each returns its parameters and R^2 (of ln y, where the fit is in log space).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _check(x: np.ndarray, y: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.size < need:
        raise ValueError(f"need at least {need} matching (x, y) points, got {x.size}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("power-law fits need positive x and y")
    return x, y


class PowerLaw(NamedTuple):
    a: float
    b: float
    """The exponent."""
    r2: float
    """R^2 of ln y."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, float) ** self.b


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """y = a x^b: ordinary least squares of ln y on ln x."""
    x, y = _check(x, y, 2)
    b, ln_a = np.polyfit(np.log(x), np.log(y), 1)
    pred = ln_a + b * np.log(x)
    return PowerLaw(float(np.exp(ln_a)), float(b), _r2(np.log(y), pred))


def exponent_interval(x: np.ndarray, y: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of fit_power_law's exponent b (ordinary least squares of ln y on
    ln x: b +- t_{(1+level)/2, m-2} * s / sqrt(Sxx)). Over a handful of points an exponent
    near 0 says little about its sign: this says how little."""
    from scipy.stats import t as student_t

    x, y = _check(x, y, 3)
    lx, ly = np.log(x), np.log(y)
    b, c = np.polyfit(lx, ly, 1)
    dof = lx.size - 2
    se = np.sqrt(np.sum((ly - (c + b * lx)) ** 2) / dof / np.sum((lx - lx.mean()) ** 2))
    half = float(student_t.ppf((1 + level) / 2, dof) * se)
    return float(b - half), float(b + half)


class PowerLawOffset(NamedTuple):
    a: float
    b: float
    c: float
    """Irreducible term."""
    r2: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(x, float) ** self.b + self.c


def fit_power_law_offset(x: np.ndarray, y: np.ndarray) -> PowerLawOffset:
    """y = a x^b + c with a, c >= 0, least squares on ln y."""
    x, y = _check(x, y, 4)
    lx, ly = np.log(x), np.log(y)
    start = fit_power_law(x, y)

    def resid(p: np.ndarray) -> np.ndarray:
        ln_a, b, ln_c = p
        return np.log(np.exp(ln_a + b * lx) + np.exp(ln_c)) - ly

    best = None
    for frac in (1e-3, 0.1, 0.5):
        p0 = [np.log(start.a), start.b, np.log(max(y.min() * frac, 1e-12))]
        r = least_squares(resid, p0)
        if best is None or r.cost < best.cost:
            best = r
    ln_a, b, ln_c = best.x
    pred = np.log(np.exp(ln_a + b * lx) + np.exp(ln_c))
    return PowerLawOffset(float(np.exp(ln_a)), float(b), float(np.exp(ln_c)), _r2(ly, pred))


class JointLaw(NamedTuple):
    alpha: float
    beta_k: float
    beta_n: float
    gamma: float
    zeta: float
    eta: float
    r2: float
    """R^2 of ln L."""

    def __call__(self, n: np.ndarray, k: np.ndarray) -> np.ndarray:
        ln_n, ln_k = np.log(np.asarray(n, float)), np.log(np.asarray(k, float))
        return (np.exp(self.alpha + self.beta_k * ln_k + self.beta_n * ln_n
                       + self.gamma * ln_k * ln_n) + np.exp(self.zeta + self.eta * ln_k))


def _joint_inputs(n: np.ndarray, k: np.ndarray, loss: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, k, loss = (np.asarray(a, float) for a in (n, k, loss))
    if not (n.shape == k.shape == loss.shape) or n.size < 7:
        raise ValueError(f"need at least 7 (n, k, L) points for 6 parameters, got {n.size}")
    if np.any(n <= 0) or np.any(k <= 0) or np.any(loss <= 0):
        raise ValueError("the joint law needs positive n, k and L")
    return np.log(n), np.log(k), np.log(loss)


def joint_law_se(n: np.ndarray, k: np.ndarray, loss: np.ndarray,
                 law: JointLaw) -> dict[str, float]:
    """Standard errors of `law`'s six parameters on these points: the linearised
    least-squares covariance s^2 (J^T J)^-1, with J the derivative of ln L(n, k) in each
    parameter at `law` and s^2 = SSR / (m - 6) the residual variance of ln L over m points.
    With A and B the exponents of the two terms and w = e^A / (e^A + e^B), J's columns are
    w, w ln k, w ln n, w ln k ln n, 1 - w, (1 - w) ln k. A parameter combination the points
    cannot resolve (a singular value of J below double precision) gives inf for every
    parameter in it: such a fit's surface can be read, not those parameters."""
    ln_n, ln_k, ln_l = _joint_inputs(n, k, loss)
    a, bk, bn, g, z, e, _ = law
    big_a = a + bk * ln_k + bn * ln_n + g * ln_k * ln_n
    big_b = z + e * ln_k
    w = np.exp(big_a - np.logaddexp(big_a, big_b))
    jac = np.stack([w, w * ln_k, w * ln_n, w * ln_k * ln_n, 1 - w, (1 - w) * ln_k], axis=1)
    s2 = float(np.sum((ln_l - np.logaddexp(big_a, big_b)) ** 2)) / (ln_l.size - 6)
    _, sing, vt = np.linalg.svd(jac, full_matrices=False)
    ok = sing > sing.max() * max(jac.shape) * np.finfo(float).eps
    var = s2 * np.sum(vt[ok] ** 2 / sing[ok, None] ** 2, axis=0)
    var[np.any(np.abs(vt[~ok]) > 1e-8, axis=0)] = np.inf
    return dict(zip(JointLaw._fields[:6], (float(v) for v in np.sqrt(var))))


def fit_joint_law(n: np.ndarray, k: np.ndarray, loss: np.ndarray) -> JointLaw:
    """Gao et al.'s L(n, k) (Sec. 3.2, Eq. 4 form), best of several starting points."""
    ln_n, ln_k, ln_l = _joint_inputs(n, k, loss)

    def model(p: np.ndarray) -> np.ndarray:
        a, bk, bn, g, z, e = p
        return np.logaddexp(a + bk * ln_k + bn * ln_n + g * ln_k * ln_n, z + e * ln_k)

    best = None
    floor = float(ln_l.min())  # = ln of the smallest loss
    for a0, bn0, z0 in ((ln_l.mean(), -0.3, floor - 1), (0.0, -0.5, floor - 3),
                        (ln_l.max(), -0.1, floor - 0.3), (1.0, -1.0, floor - 5)):
        r = least_squares(lambda p: model(p) - ln_l, [a0, -0.3, bn0, 0.0, z0, -0.1],
                          max_nfev=20000)
        if best is None or r.cost < best.cost:
            best = r
    return JointLaw(*(float(v) for v in best.x), _r2(ln_l, model(best.x)))
