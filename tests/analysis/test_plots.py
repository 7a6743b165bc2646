"""Tests of widesparse.analysis.plots: the CKA heatmap and the diagonal-mean summary (headless, no pyplot state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widesparse.analysis.plots import plot_cka, plot_diagonal_means


def _texts(labels: list) -> list[str]:
    return [t.get_text() for t in labels]


def test_heatmap_labels_title_values_and_file(tmp_path) -> None:
    m = np.array([[0.9, 0.2, 0.1], [0.3, 0.7, 0.4]])
    fig = plot_cka(m, ["a.0", "a.1"], ["b.0", "b.1", "b.2"], tmp_path / "h.png", label_a="Mixer", label_b="SW-MLP")
    ax = fig.axes[0]
    assert _texts(ax.get_xticklabels()) == ["b.0", "b.1", "b.2"]
    assert _texts(ax.get_yticklabels()) == ["a.0", "a.1"]
    assert ax.get_xlabel() == "SW-MLP layer" and ax.get_ylabel() == "Mixer layer"
    assert "diagonal mean 0.800" in ax.get_title()  # (0.9 + 0.7) / 2
    np.testing.assert_array_equal(ax.images[0].get_array(), m)
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert sorted(_texts(ax.texts)) == sorted(f"{v:.2f}" for v in m.ravel())
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    big = plot_cka(torch.rand(20, 20, dtype=torch.float64), [str(i) for i in range(20)], [str(i) for i in range(20)])
    assert not big.axes[0].texts  # no annotations on large matrices unless asked
    plot_cka(m, ["a.0", "a.1"], ["b.0", "b.1", "b.2"], tmp_path / "h.svg")
    assert (tmp_path / "h.svg").read_text().lstrip().startswith("<?xml")


def test_heatmap_rejects_mismatched_names() -> None:
    with pytest.raises(ValueError, match=r"matrix shape \(2, 3\) != \(2, 2\)"):
        plot_cka(np.zeros((2, 3)), ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="2-d"):
        plot_cka(np.zeros(3), ["a"], ["b"])


def test_diagonal_means_summary(tmp_path) -> None:
    p = [1 / 64, 1 / 16, 1 / 4, 1.0]
    seeds = np.array([[0.5, 0.65, 0.4, 0.3], [0.55, 0.7, 0.45, 0.25]])
    fig = plot_diagonal_means(
        p, {"SW-MLP": seeds, "other": seeds[0]}, tmp_path / "d.png", vline=1 / 16, vline_label="p = 1/C"
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylim() == (0.0, 1.0)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), seeds.mean(axis=0))
    assert ax.lines[2].get_xdata()[0] == pytest.approx(1 / 16)  # the vertical line
    assert _texts(ax.get_legend().get_texts()) == ["SW-MLP", "other", "p = 1/C"]
    assert (tmp_path / "d.png").exists()
    with pytest.raises(ValueError, match="3 values for 4 x values"):
        plot_diagonal_means(p, [0.1, 0.2, 0.3])
