"""Plots of joint accuracy against FLOPs (matplotlib, drawn off-screen and saved as PNG)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .rows import Summary

REFERENCE_MARKERS = {"ensemble": ("*", "black"), "ensemble (mean emb)": ("P", "tab:purple"),
                     "model A": ("^", "tab:green"), "model B": ("v", "tab:olive")}


def pyplot() -> Any:
    """`matplotlib.pyplot` on the off-screen Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_plot(fig: Any, ax: Any, summaries: Sequence[Summary], title: str, path: Path,
                legend: dict | None = None) -> None:
    """The rest of a joint-accuracy-vs-FLOPs plot (`benchmarks.accuracy`, `benchmarks.width`):
    the ensemble and the single models as reference markers, axes, title, legend; saved and
    closed."""
    plt = pyplot()
    for s in summaries:
        if s.method in REFERENCE_MARKERS:
            marker, colour = REFERENCE_MARKERS[s.method]
            ax.errorbar([s.flops / 1e6], [100 * s.mean["joint"]], yerr=[100 * s.std["joint"]],
                        marker=marker, markersize=11, color=colour, linestyle="none", label=s.method)
    ax.set_xlabel("FLOPs per sample (M)")
    ax.set_ylabel("joint accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or dict(fontsize=8, loc="best")))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
