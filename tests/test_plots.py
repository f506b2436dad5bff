"""Figure helpers: what a reader sees on the axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from paper_lib import plots  # noqa: E402


def test_value_ticks_label_each_measured_value_plainly():
    """A sweep over n = 128..1024 on a log axis: by default only 10^3 is labelled; with
    value_ticks every measured n is, as a plain number, and nothing else is."""
    fig, ax = plt.subplots()
    ax.loglog([128, 256, 512, 1024], [0.2, 0.15, 0.12, 0.1], "o")
    plots.value_ticks(ax, [1024, 128, 256, 512, 256])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_visible()]
    assert labels == ["128", "256", "512", "1024"]
    assert ax.get_xticks(minor=True).size == 0
    plots.value_ticks(ax, [0.1, 0.15], axis="y")
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.1", "0.15"]
    plt.close(fig)
