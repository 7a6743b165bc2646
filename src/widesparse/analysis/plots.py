"""CKA figures: the layer-by-layer heatmap and the diagonal-mean summary (docs/theory.md §4.4, experiment E1).

Nothing from the package is imported; arrays and layer names come in. matplotlib (the ``plot`` extra)
is imported inside the functions and only through ``matplotlib.figure.Figure``, so no pyplot state or GUI
backend is touched. Every function returns the ``Figure`` and saves it when given a path (format by suffix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_cka", "plot_diagonal_means"]


def _matrix(matrix: Any) -> np.ndarray:
    if hasattr(matrix, "detach"):  # a torch tensor, without importing torch here
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"need a non-empty 2-d CKA matrix, got shape {m.shape}")
    return m


def plot_cka(
    matrix: Any,
    names_a: Sequence[str],
    names_b: Sequence[str],
    path: str | Path | None = None,
    *,
    label_a: str = "model A",
    label_b: str = "model B",
    title: str | None = None,
    annotate: bool | None = None,
) -> Any:
    """Heatmap of a CKA matrix (rows: layers of A from the bottom up; columns: layers of B), tick labels from
    the layer names, colour scale fixed to [0, 1], title with the diagonal mean (mean of ``M[i, i]``,
    ``i < min(La, Lb)``). ``annotate`` writes the values in the cells (default: at most 256 cells)."""
    from matplotlib.figure import Figure

    m = _matrix(matrix)
    if m.shape != (len(names_a), len(names_b)):
        raise ValueError(f"plot_cka: matrix shape {m.shape} != ({len(names_a)}, {len(names_b)}) from the layer names")
    la, lb = m.shape
    fig = Figure(figsize=(min(3.0 + 0.45 * lb, 14.0), min(2.5 + 0.4 * la, 12.0)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(im, ax=ax, label="CKA")
    ax.set_xticks(range(lb), list(names_b), rotation=90, fontsize=7)
    ax.set_yticks(range(la), list(names_a), fontsize=7)
    ax.set_xlabel(f"{label_b} layer")
    ax.set_ylabel(f"{label_a} layer")
    diag = float(np.mean(np.diagonal(m)))
    ax.set_title(title or f"{label_a} vs {label_b}: diagonal mean {diag:.3f}", fontsize=9)
    if annotate if annotate is not None else la * lb <= 256:
        for i in range(la):
            for j in range(lb):
                color = "black" if m[i, j] > 0.6 else "white"
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def plot_diagonal_means(
    x: Sequence[float],
    means: Sequence[float] | dict[str, Sequence[float]],
    path: str | Path | None = None,
    *,
    xlabel: str = "density p",
    log_x: bool = True,
    vline: float | None = None,
    vline_label: str | None = None,
    title: str | None = None,
) -> Any:
    """Diagonal-mean CKA against a swept quantity (E1: against the SW-MLP density, a line at ``p = 1/C``).

    ``means`` is one series or ``{label: series}``; a series may hold one row per seed (shape ``(seeds,
    len(x))``), drawn as mean +- std.
    """
    from matplotlib.figure import Figure

    xs = np.asarray(x, dtype=np.float64)
    series = means if isinstance(means, dict) else {"": means}
    fig = Figure(figsize=(5.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for label, ys in series.items():
        y = np.atleast_2d(np.asarray(ys, dtype=np.float64))
        if y.shape[1] != len(xs):
            raise ValueError(f"series {label!r} has {y.shape[1]} values for {len(xs)} x values")
        mu, sd = y.mean(axis=0), y.std(axis=0)
        ax.plot(xs, mu, marker="o", label=label or None)
        if y.shape[0] > 1:
            ax.fill_between(xs, mu - sd, mu + sd, alpha=0.2)
    if vline is not None:
        ax.axvline(vline, color="gray", linestyle="--", label=vline_label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CKA, mean of the diagonal")
    ax.set_ylim(0.0, 1.0)
    if title:
        ax.set_title(title, fontsize=9)
    if len(series) > 1 or vline_label:
        ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
