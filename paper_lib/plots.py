"""Figure helpers shared by notebooks and widgets: one style, titled and labelled axes."""

from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

PALETTE = {"sae": "#d62728", "relu": "#d62728", "sae_ito": "#2ca02c", "ito": "#2ca02c",
           "mlp32": "#ff7f0e", "mlp256": "#9467bd", "sparse_coding": "#1f77b4",
           "topk": "#1f77b4", "batchtopk": "#17becf", "matryoshka": "#9467bd",
           "topafa": "#8c564b", "mlp": "#ff7f0e"}


def setup() -> None:
    """The project's matplotlib style (seaborn whitegrid, readable sizes)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams.update({"figure.dpi": 90, "axes.titlesize": 11, "axes.labelsize": 10,
                         "legend.fontsize": 8, "figure.constrained_layout.use": True})


def color(name: str) -> str | None:
    return PALETTE.get(name)


def zf_plot(ax: plt.Axes, z_norm: np.ndarray, f_norm: np.ndarray,
            bands: Sequence[float] = (0.25, 0.5, 1.0), title: str = "",
            max_points: int = 4000, seed: int = 0) -> None:
    """Lee et al.'s ZF plot: x = ||z|| (input after b_dec centring), y = ||f~|| (codes
    scaled by decoder norms), with the bound's bands ||z||/sqrt(1 +- c) for c = eps(h-1)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(z_norm))[:max_points]
    ax.scatter(z_norm[idx], f_norm[idx], s=3, alpha=0.35, color="k", rasterized=True)
    lim = float(np.nanmax([z_norm.max(), f_norm.max()])) * 1.05
    xs = np.linspace(0, lim, 100)
    ax.plot(xs, xs, color="C3", lw=1.2, label="||f~|| = ||z||")
    for i, c in enumerate(bands):
        lo, hi = xs / np.sqrt(1 + c), xs / np.sqrt(max(1 - c, 1e-9)) if c < 1 else None
        col = plt.cm.Blues(0.35 + 0.2 * i)
        if hi is not None:
            ax.fill_between(xs, lo, hi, color=col, alpha=0.25, label=f"eps(h-1) = {c:g}")
        else:
            ax.fill_between(xs, lo, lim, color=col, alpha=0.15, label=f"eps(h-1) = {c:g}")
    ax.set_xlim(0, lim)
    ax.set_ylim(0, lim)
    ax.set_xlabel("||z||  (input norm after b_dec centring)")
    ax.set_ylabel("||f~||  (feature norm, decoder-scaled)")
    ax.set_title(title)
    ax.legend(loc="upper left")


def mean_band(ax: plt.Axes, x: np.ndarray, ys: np.ndarray, label: str,
              color: str | None = None) -> None:
    """Mean line with a +-1 std band over the first axis of ys [runs, len(x)]."""
    m, s = ys.mean(0), ys.std(0)
    ax.plot(x, m, label=label, color=color)
    ax.fill_between(x, m - s, m + s, alpha=0.2, color=color)


def loglog_fit(ax: plt.Axes, x: np.ndarray, y: np.ndarray, fit_y: np.ndarray | None,
               label: str, color: str | None = None, marker: str = "o") -> None:
    ax.loglog(x, y, marker, color=color, label=label)
    if fit_y is not None:
        ax.loglog(x, fit_y, "--", color=color, lw=1)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels


def value_ticks(ax: plt.Axes, values, axis: str = "x") -> None:
    """Ticks at the values a sweep measured, labelled plainly (128, 256, ...), on a log
    axis whose default labels would read 10^2, 10^3 and leave the points in between
    unlabelled."""
    values = sorted({float(v) for v in values})
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(matplotlib.ticker.FixedLocator(values))
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(matplotlib.ticker.NullLocator())


def close(fig: plt.Figure) -> None:
    plt.close(fig)
