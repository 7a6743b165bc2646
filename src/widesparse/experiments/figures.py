"""The figures of E1-E10 in the paper's form (matplotlib, PNG and SVG), drawn from the results table.

``draw(exp_id, rows, out_dir)`` writes ``<exp>.png`` and ``<exp>.svg`` (and E1's heatmaps) and returns
the PNG paths; an experiment with nothing finished draws nothing. Error bars are one standard deviation over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from widesparse.experiments.findings import mean_by

__all__ = ["draw", "FIGURES"]

Row = dict[str, Any]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    _plt().close(fig)
    return paths[:1]


def _line(ax: Any, rows: Sequence[Row], x: str, y: str, label: str, scale: float = 1.0, **where: Any) -> Any:
    """One series with one-std error bars; returns its colour (None when it has no finished point)."""
    d = mean_by(rows, x, y, **where)
    if not d:
        return None
    xs = list(d)
    bars = ax.errorbar(xs, [scale * v[0] for v in d.values()], yerr=[scale * v[1] for v in d.values()], marker="o",
                       capsize=3, label=label)
    return bars.lines[0].get_color()


def _series(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r["series"] for r in rows if r.get("series")))


def _e1(rows: Sequence[Row], out: Path) -> list[Path]:
    plt = _plt()
    cka = [r for r in rows if r.get("role") == "cka"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, s in enumerate(_series(cka)):
        color = _line(ax, cka, "p", "diag_mean", s, series=s) or "gray"
        C = next(r["C"] for r in cka if r["series"] == s)
        ax.axvline(1 / C, ls="--", color=color, alpha=0.7)
        ax.text(1 / C, 0.02 + 0.07 * i, f" p = 1/C = 1/{C}", color=color, va="bottom",
                transform=ax.get_xaxis_transform())
    ax.set(xscale="log", xlabel="density p of the SW-MLP", ylabel="mean diagonal CKA with the Mixer",
           title="E1: Mixer vs SW-MLP features")
    ax.axhspan(0.6, 0.7, color="tab:green", alpha=0.12, label="paper: peak 0.6-0.7 at p ≈ 1/C")
    ax.legend()
    paths = _save(fig, out, "E1")
    first = _series(cka)[0] if cka else None  # heatmaps of the widest Mixer (the first size)
    done = [r for r in cka if r.get("status") == "done" and r.get("seed") == 0 and r.get("series") == first]
    if done:
        d = mean_by(cka, "p", "diag_mean", series=first)
        best = max(d, key=lambda p: d[p][0])
        pick = [r for r in done if r["p"] in (best, 1.0)]
        fig, axes = plt.subplots(1, len(pick), figsize=(4.2 * len(pick), 3.8), squeeze=False)
        for ax, r in zip(axes[0], sorted(pick, key=lambda r: r["p"]), strict=True):
            m = np.load(out.parent / "runs" / r["run_id"] / "cka.npy")
            im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="lower")
            ax.set(title=f"{first}, p = 1/{1 / r['p']:g}: diag {np.mean(np.diag(m)):.3f}", xlabel="SW-MLP layer",
                   ylabel="Mixer layer")
        fig.colorbar(im, ax=axes[0].tolist())
        fig.savefig(out / "E1_heatmaps.png", dpi=120)
        fig.savefig(out / "E1_heatmaps.svg")
        plt.close(fig)
        paths.append(out / "E1_heatmaps.png")
    return paths


def _err_plot(rows: Sequence[Row], out: Path, name: str, x: str, xlabel: str, title: str, *, logx: bool = False,
              by: str = "series", extra: Callable[[Any], None] | None = None) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in _series(rows) if by == "series" else sorted({r[by] for r in rows}):
        _line(ax, rows, x, "test_err", s, 100.0, **{by: s})
    if logx:
        ax.set_xscale("log", base=2)
    errs = [100 * r["test_err"] for r in rows if r.get("test_err")]
    if errs and max(errs) > 8 * min(errs):  # one diverged point would flatten the rest: log scale
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="test error (%)", title=title)
    if extra:
        extra(ax)
    ax.legend()
    return _save(fig, out, name)


def _e2(rows: Sequence[Row], out: Path) -> list[Path]:
    omega = next((r["omega_target"] for r in rows if r.get("omega_target")), None)
    return _err_plot(rows, out, "E2", "gamma_m", "hidden width γm", f"E2: error vs width at Ω ≈ 2^{math.log2(omega):g}"
                     if omega else "E2", logx=True)


def _e3(rows: Sequence[Row], out: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in _series(rows):
        _line(ax, rows, "m", "sigma_max", s, series=s)
    edge = next((r["mp_edge"] for r in rows if r.get("mp_edge")), None)
    if edge:
        ax.axhline(edge, ls="--", color="gray", label=f"1+√γ = {edge:.3f}")
    ax.set(xscale="log", xlabel="width m", ylabel="σ_max of the expanding layers (mean)",
           title="E3: top singular value")
    ax.legend()
    return _save(fig, out, "E3")


def _bars(rows: Sequence[Row], out: Path, name: str, key: str, title: str) -> list[Path]:
    plt = _plt()
    d = mean_by(rows, key, "test_err")
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    labels = [str(k) for k in d]
    ax.bar(labels, [100 * v[0] for v in d.values()], yerr=[100 * v[1] for v in d.values()], capsize=4,
           color=["tab:blue", "tab:orange", "tab:green"][: len(d)])
    ax.set(ylabel="test error (%)", title=title)
    return _save(fig, out, name)


def _e4(rows: Sequence[Row], out: Path) -> list[Path]:
    return _bars(rows, out, "E4", "series", "E4: Monarch vs Kronecker")


def _e5(rows: Sequence[Row], out: Path) -> list[Path]:
    plt = _plt()
    budgets = sorted({r["budget"] for r in rows if r.get("budget")})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 3.8), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        for s in ("s_mixer", "rp_s_mixer", "sw_mlp"):
            _line(ax, rows, "m", "test_err", s, 100.0, series=s, budget=b)
        ax.set(xscale="log", xlabel="effective width m", ylabel="test error (%)", title=f"E5: Ω = {b}")
        ax.legend()
    return _save(fig, out, "E5")


def _e6(rows: Sequence[Row], out: Path) -> list[Path]:
    done = [r for r in rows if r.get("status") == "done"]
    best = max((r["train_acc"] for r in done), default=0.0)
    kept = [{**r, "series": "kept (train acc >= 0.99 x best)"} for r in done if r["train_acc"] >= 0.99 * best]
    every = [{**r, "series": "all runs"} for r in done]
    return _err_plot(every + kept, out, "E6", "gamma", "expansion factor γ", "E6: error vs γ at fixed Ω", logx=True)


def _e7(rows: Sequence[Row], out: Path) -> list[Path]:
    sets = sorted({r["dataset"] for r in rows})
    tagged = [{**r, "series": f"{r['series']} ({r['dataset']})" if len(sets) > 1 else r["series"]} for r in rows]
    return _err_plot(tagged, out, "E7", "log2_S_over_C", "log2(S / C)", "E7: error along a fixed-Ω curve",
                     extra=lambda ax: ax.axvline(0, ls="--", color="gray"))


def _e8(rows: Sequence[Row], out: Path) -> list[Path]:
    return _err_plot(rows, out, "E8", "L", "depth L", "E8: depth at C = S")


def _e9(rows: Sequence[Row], out: Path) -> list[Path]:
    return _bars(rows, out, "E9", "series", "E9: equal connections, S moved toward C")


def _e10(rows: Sequence[Row], out: Path) -> list[Path]:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in _series(rows):
        _line(axes[0], rows, "m", "peak_bytes", s, 2.0**-20, series=s)
        _line(axes[1], rows, "m", "step_seconds", s, 1000.0, series=s)
    axes[0].set(xscale="log", yscale="log", xlabel="width m", ylabel="peak memory of a step (MiB)", title="E10: memory")
    axes[1].set(xscale="log", yscale="log", xlabel="width m", ylabel="training step (ms)", title="E10: time")
    axes[0].legend()
    return _save(fig, out, "E10")


FIGURES: dict[str, Callable[[Sequence[Row], Path], list[Path]]] = {
    "E1": _e1, "E2": _e2, "E3": _e3, "E4": _e4, "E5": _e5, "E6": _e6, "E7": _e7, "E8": _e8, "E9": _e9, "E10": _e10,
}


def draw(exp: str, rows: Sequence[Row], out_dir: str | Path) -> list[Path]:
    """Draw experiment ``exp``'s figures into ``out_dir`` from its rows; nothing when no row is done."""
    mine = [r for r in rows if r.get("experiment") == exp and r.get("status") == "done"]
    if not mine:
        return []
    return FIGURES[exp](mine, Path(out_dir))
