"""E1-E10 of docs/theory.md §5 as data: one expansion function each, with the paper's finding and our choices.

Each ``_eN(settings)`` turns one experiment's settings (:mod:`widesparse.experiments.scales`) into
:class:`~widesparse.experiments.specs.Point` objects; identical runs asked for by several experiments (e.g. the
E2 Mixer points and the E7 normal-Mixer points at the same Ω) get the same run id and are trained once.

This module is also the experiments' registry (``register_experiment``, ``get_experiment``, ``list_experiments``):
it imports the vocabulary of :mod:`widesparse.experiments.specs`, never the other way round, so importing it
registers E1-E10 before anyone can ask for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from widesparse import budget
from widesparse.budget import nearest_tokens, patch_for_tokens
from widesparse.data.datasets import image_geometry
from widesparse.experiments.specs import Experiment, Point, Run, mixer_point, sw_backend, sw_point, train_run

__all__ = ["register_experiment", "get_experiment", "list_experiments"]

_EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(exp: Experiment) -> Experiment:
    """Add ``exp`` under its id (``E1`` ... ``E10``); a second registration of an id is an error."""
    if exp.id in _EXPERIMENTS:
        raise ValueError(f"experiment {exp.id} registered twice")
    _EXPERIMENTS[exp.id] = exp
    return exp


def list_experiments() -> list[str]:
    """The registered experiment ids in numeric order."""
    return sorted(_EXPERIMENTS, key=lambda e: int(e[1:]))


def get_experiment(name: str) -> Experiment:
    """The experiment ``name`` (case-insensitive); unknown names raise ``ValueError`` listing the valid ones."""
    key = name.upper()
    if key not in _EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(list_experiments())}")
    return _EXPERIMENTS[key]


def _train(s: dict[str, Any], exp: str, model: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> list[Point]:
    out = []
    for ds in s["datasets"]:
        for seed in s["seeds"]:
            run = train_run(s["recipe"], model, kwargs, ds, seed)
            out.append(Point(exp, run, {**meta, "model": model, "dataset": ds, "seed": seed}))
    return out


def _mixer_curve(s: dict[str, Any], exp: str, omega: float, variants: tuple[str, ...], img: int) -> list[Point]:
    out = []
    for S in nearest_tokens(img, s["tokens"]):
        C = budget.solve_channels(omega, 1.0 if variants[0] in ("s_mixer", "rp_s_mixer") else s["gamma"], S)
        if C + 0.5 < s.get("min_channels", 1):
            continue
        for v in variants:
            kw, meta = mixer_point(S, omega, s["gamma"], s["depth"], img, variant=v)
            meta["log2_S_over_C"] = math.log2(meta["S"] / meta["C"])
            out += _train(s, exp, v, kw, meta)
    return out


def _img(s: dict[str, Any]) -> int:
    """Image size of the one data set an expansion sees (:func:`_per_dataset` hands them over one at a time)."""
    (ds,) = s["datasets"]
    return image_geometry(ds)[0]


def _per_dataset(fn: Callable[[dict[str, Any]], list[Point]]) -> Callable[[dict[str, Any]], list[Point]]:
    """Expand once per data set (each has its own image size, hence its own token grid)."""

    def expand(s: dict[str, Any]) -> list[Point]:
        return [p for ds in s["datasets"] for p in fn({**s, "datasets": [ds]})]

    expand.__doc__ = fn.__doc__
    return expand


# ------------------------------------------------------------------------------------------------ E1
def _e1(s: dict[str, Any]) -> list[Point]:
    img, out = _img(s), []
    for side in s["sizes"]:
        S = nearest_tokens(img, [side])[0]
        mkw, mmeta = mixer_point(S, None, s["gamma"], s["depth"], img, C=side)
        for ds in s["datasets"]:
            for seed in s["seeds"]:
                a = train_run(s["recipe"], "mixer", mkw, ds, seed)
                out.append(Point("E1", a, {**mmeta, "model": "mixer", "dataset": ds, "seed": seed, "role": "train"}))
                for p in s["densities"]:
                    if p * S * side * s["gamma"] < 1:
                        continue
                    name = "mlp" if p == 1 else "sw_mlp"
                    kw = {"patch_size": mkw["patch_size"], "width": S * side, "gamma": float(s["gamma"]),
                          "depth": s["depth"], **({"density": float(p), **sw_backend(p)} if p < 1 else {})}
                    b = train_run(s["recipe"], name, kw, ds, seed)
                    cka = Run("cka", {"a": a.id, "b": b.id, "dataset": ds, "batch_size": s["cka_batch"],
                                      "passes": s["cka_passes"], "seed": seed, "data_dir": s["recipe"].get("data_dir")},
                              needs=(a.id, b.id))
                    omega = p * s["gamma"] * (S * side) ** 2
                    meta = {**mmeta, "p": float(p), "p_mixer": mmeta["p"], "omega": omega, "omega_target": omega,
                            "connections": 4.0 * s["depth"] * omega, "series": f"S=C={side}", "model": name,
                            "dataset": ds, "seed": seed}
                    out += [Point("E1", b, {**meta, "role": "train", "series": name}),
                            Point("E1", cka, {**meta, "role": "cka"})]
    return out


# ------------------------------------------------------------------------------------------------ E2
def _e2(s: dict[str, Any]) -> list[Point]:
    img = _img(s)
    out = _mixer_curve(s, "E2", s["omega"], ("mixer",), img)
    S = nearest_tokens(img, [s["sw_tokens"]])[0]
    for p in s["densities"]:
        name, kw, meta = sw_point(p, s["omega"], s["gamma"], s["depth"], img, S)
        out += _train(s, "E2", name, kw, {**meta, "series": "sw_mlp"})
    return out


# ------------------------------------------------------------------------------------------------ E3
def _e3(s: dict[str, Any]) -> list[Point]:
    img, chans, classes = image_geometry(s["datasets"][0])
    geo = {"image_size": img, "in_chans": chans, "num_classes": classes}
    out = []
    for seed in s["seeds"]:
        for S in nearest_tokens(img, s["tokens"]):
            if budget.solve_channels(s["omega"], s["gamma"], S) < 1:
                continue
            kw, meta = mixer_point(S, s["omega"], s["gamma"], 1, img)
            run = Run("spectra", {"model": "mixer", "model_kwargs": {**kw, **geo, "init_mode": "gaussian"},
                                  "seed": seed})
            out.append(Point("E3", run, {**meta, "model": "mixer", "seed": seed}))
        for p in s["densities"]:  # one token (patch = image), so m = sqrt(Ω/(γp)) is not rounded to a multiple of S
            name, kw, meta = sw_point(p, s["omega"], s["gamma"], 1, img, 1)
            run = Run("spectra", {"model": name, "model_kwargs": {**kw, **geo}, "seed": seed})
            out.append(Point("E3", run, {**meta, "series": "sw_mlp", "model": name, "seed": seed}))
    if s.get("trained"):  # σ_max after training, of E2's models (shared runs)
        for p in _e2({**s, **s["trained"], "datasets": s["datasets"][:1]}):
            run = Run("spectra", {"run": p.run.id}, needs=(p.run.id,))
            meta = {**p.meta, "series": f"{p.meta['series']} (trained)", "experiment": "E3"}
            out += [Point("E3", p.run, {**p.meta, "role": "train"}), Point("E3", run, meta)]
    return out


# ------------------------------------------------------------------------------------------------ E4
def _e4(s: dict[str, Any]) -> list[Point]:
    img = _img(s)
    out = []
    for name in ("monarch_mlp", "kron_mlp"):
        kw = {"depth": s["depth"]}
        out += _train(s, "E4", name, kw, {"S": img, "C": img, "m": img * img, "L": s["depth"], "series": name})
    return out


# ------------------------------------------------------------------------------------------------ E5
def _e5(s: dict[str, Any]) -> list[Point]:
    img, out = _img(s), []
    for omega in s["omegas"]:
        pts = _mixer_curve(s, "E5", omega, ("s_mixer", "rp_s_mixer"), img)
        out += [Point(p.experiment, p.run, {**p.meta, "budget": f"2^{math.log2(omega):g}"}) for p in pts]
    S = nearest_tokens(img, [int(round(budget.optimal_side(min(s["omegas"]), 1.0)))])[0]
    for omega in s.get("sw_omegas", s["omegas"][:1]):
        for p in s["sw_densities"]:
            name, kw, meta = sw_point(p, omega, 1.0, s["depth"], img, S)
            out += _train(s, "E5", name, kw, {**meta, "series": "sw_mlp", "budget": f"2^{math.log2(omega):g}"})
    return out


# ------------------------------------------------------------------------------------------------ E6
def _e6(s: dict[str, Any]) -> list[Point]:
    img, out = _img(s), []
    for g in s["gammas"]:
        S = nearest_tokens(img, [budget.optimal_side(s["omega"], g)])[0]
        kw, meta = mixer_point(S, s["omega"], g, s["depth"], img)
        out += _train(s, "E6", "mixer", kw, meta)
    return out


# ------------------------------------------------------------------------------------------------ E7
def _e7(s: dict[str, Any]) -> list[Point]:
    return _mixer_curve(s, "E7", s["omega"], ("mixer", "rp_mixer"), _img(s))


# ------------------------------------------------------------------------------------------------ E8
def _e8(s: dict[str, Any]) -> list[Point]:
    img, out = _img(s), []
    S = nearest_tokens(img, [s["side"]])[0]
    for L in s["depths"]:
        for v in ("mixer", "rp_mixer"):
            kw, meta = mixer_point(S, None, s["gamma"], L, img, C=s["side"], variant=v)
            out += _train(s, "E8", v, kw, meta)
    return out


# ------------------------------------------------------------------------------------------------ E9
def _e9(s: dict[str, Any]) -> list[Point]:
    img, out = _img(s), []
    for key, label in (("narrow_tokens", "Mixer-SS (few tokens)"), ("wide_tokens", "Mixer-SS-W (S toward C)")):
        S = nearest_tokens(img, [s[key]])[0]
        kw, meta = mixer_point(S, s["omega"], s["gamma"], s["depth"], img)
        out += _train(s, "E9", "mixer", kw, {**meta, "series": label, "patch": str(patch_for_tokens(img, S))})
    return out


# ------------------------------------------------------------------------------------------------ E10
def _e10(s: dict[str, Any]) -> list[Point]:
    img, chans, classes = image_geometry(s["datasets"][0])
    out = []
    for side in s["sides"]:
        S = nearest_tokens(img, [side])[0]
        base = {"patch_size": patch_for_tokens(img, S), "dim": side, "depth": s["depth"]}
        models = [("mixer", {"token_expansion": s["gamma"], "channel_expansion": s["gamma"]}, "mixer"),
                  ("rp_mixer", {"token_expansion": s["gamma"], "channel_expansion": s["gamma"]}, "rp_mixer"),
                  ("sw_mlp", {"gamma": s["gamma"], "backend": "masked"}, "sw_mlp (masked)"),
                  ("sw_mlp", {"gamma": s["gamma"], "backend": "sparse"}, "sw_mlp (sparse)")]
        for name, extra, label in models:
            run = Run("memory", {"model": name, "model_kwargs": {**base, **extra}, "batch_size": s["batch_size"],
                                 "image_size": img, "in_chans": chans, "num_classes": classes, "steps": s["steps"],
                                 "device": s["recipe"].get("device", "cpu")})
            _, meta = mixer_point(S, None, s["gamma"], s["depth"], img, C=side)
            out.append(Point("E10", run, {**meta, "series": label, "model": name, "seed": 0}))
    return out


_COMMON = "Training recipe docs/theory.md §6.2 (the paper's is unknown); test error on the standard test split."
register_experiment(Experiment(
    "E1", "CKA between a trained Mixer and SW-MLPs of equal width over densities",
    "Diagonal-mean CKA between the Mixer and an SW-MLP peaks at p ≈ 1/C; the sparse MLP's CKA matrix is more "
    "diagonal than the dense MLP's.", "peak diagonal CKA ≈ 0.6-0.7 at p ≈ 1/C (Mixers with S = C = 64 and 32, "
    "CIFAR-10, 4 seeds)",
    ("SW-MLPs have the Mixer's width m = SC, depth and γ, and vary only p (p = 1 is the dense MLP).",
     "Features: the residual stream after every mixing sublayer (2L per model); seed s of the Mixer is paired "
     "with seed s of each SW-MLP (docs/theory.md §4.4, §6.1 item 8).", _COMMON), _per_dataset(_e1), x="p"))
register_experiment(Experiment(
    "E2", "Test error vs hidden width γm at a fixed connection budget Ω (Mixer and SW-MLP)",
    "Both improve with width; near γm ≈ 8000 the SW-MLP is worse than the Mixer and barely responds to width.",
    "Ω = 2^19, γ = 2, CIFAR-10; Mixer up to γm = 8192 at S = C = 64; SW-MLP γm = 1024 (p = 1) to 8192 (p = 1/64)",
    ("Mixer C solved from Ω at each S and rounded (the realized Ω is recorded).",
     "SW-MLP width m = √(Ω/(γp)) rounded to a multiple of its token count.", _COMMON), _per_dataset(_e2), x="gamma_m"))
register_experiment(Experiment(
    "E3", "Top singular value of the effective mixing weights at init vs width at fixed Ω",
    "The Mixer's σ_max stays flat near 1 + √γ; the SW-MLP's grows with width.",
    "Marchenko-Pastur edge 1 + √γ = 2.414 at γ = 2; SW-MLP growth reportedly linear in m",
    ("Gaussian init with variance 1/fan-in for the Mixer (the MP setting); SW-MLP init N(0, 1/(fan_in·p)) "
     "(Golubeva); σ_max of the expanding (γm x m) layers, averaged over them.",
     "docs/theory.md §3.9: with this init the SW-MLP growth is mild until rows hold a few dozen non-zeros.",
     "'(trained)' series: the same σ_max after training, of E2's models (original Mixer init; the same runs as E2)."),
    _e3))
register_experiment(Experiment(
    "E4", "Monarch (free) vs Kronecker (tied, linear S-Mixer) weights in shallow MLPs",
    "Comparable test error: weight sharing costs little.", "MNIST, 5 seeds; numbers not reported",
    ("Image as X ∈ R^{b x b}, depth 2 + linear head (docs/theory.md §6.2 MNIST column).",), _per_dataset(_e4),
    x="series"))
register_experiment(Experiment(
    "E5", "S-Mixer and RP S-Mixer width sweeps at several Ω",
    "Test error falls with the effective width m for both, plateauing near S = C.",
    "Ω = 2^18, 2^21, 2^27 (γ = 1: optima S = C = 64, 128, 512); CIFAR-10/100, STL-10; 3 seeds",
    ("S-Mixer: one matrix per mixing step, GELU, no LN/skip (docs/theory.md (3)); SW-MLP (with the Mixer's LN and "
     "residual, γ = 1) only at the smallest Ω, as in the paper.", _COMMON), _per_dataset(_e5)))
register_experiment(Experiment(
    "E6", "Expansion factor γ at fixed Ω",
    "Error falls with γ; only runs with high training accuracy are shown.",
    "CIFAR-10; γm = γ^{1/3}Ω^{2/3} at S = C; threshold unknown",
    ("At each γ, S is the reachable token count nearest (Ω/γ)^{1/3} and C is solved from Ω.",
     "Training-accuracy filter: keep runs with train_acc >= 0.99 x the sweep's best; both sets are shown.", _COMMON),
    _per_dataset(_e6), x="gamma"))
register_experiment(Experiment(
    "E7", "C vs S at fixed Ω for normal and RP Mixers",
    "One valley with its minimum near C = S, for every data set and both variants.",
    "CIFAR-10/100, STL-10, ImageNet-1k; Ω unknown",
    ("Ω and γ chosen so that the optimum S = C is reachable on the data set's images.", _COMMON),
    _per_dataset(_e7), x="log2_S_over_C"))
register_experiment(Experiment(
    "E8", "Depth at C = S for normal vs RP Mixers",
    "RP is worse when shallow and comparable or better as depth grows.",
    "C = S = 128, L ∈ {4, 8, 12, 16, 20}; CIFAR-10/100, STL-10, ImageNet-1k", (_COMMON,), _per_dataset(_e8), x="L"))
register_experiment(Experiment(
    "E9", "Table 1: wider Mixers at a fixed number of connections",
    "Moving S toward C at equal connections lowers the error (Mixer-SS-W < Mixer-SS/8; Mixer-B-W < Mixer-B/16).",
    "CIFAR-10 15.91 → 12.07 ± 0.47, CIFAR-100 44.24 → 38.13; ImageNet 23.56 → 23.26 ± 0.19; β-LASSO 14.81 / 40.44",
    ("Mixer-SS/8 and Mixer-SS-W are our reconstruction: patch 8 (S = 16) and patch 4 (S = 64), γ = 4, L = 8, "
     "C solved so that the total effective connections 4LΩ equal 2^28 ≈ 268M, the order of the paper's 255-256M.",
     "Connections count effective mixing-matrix non-zeros only; embedding and head are reported apart."),
    _per_dataset(_e9), x="S"))
register_experiment(Experiment(
    "E10", "Memory, FLOPs and time of SW-MLP (masked, sparse), Mixer and RP-Mixer",
    "A dense-masked SW-MLP at ImageNet Mixer scale needs terabytes; the Mixer and RP-Mixer need megabytes and "
    "equal FLOPs.", "23.2 TB (masked SW-MLP) vs 26.3 MB (Mixer/RP-Mixer) at Mixer-B/16 scale",
    ("Peak resident memory of a training step (forward, backward, AdamW) measured in a fresh process.",
     "The extrapolation to Mixer-B/16 is analytic (widesparse.analysis.profiling.masked_sw_mlp_memory)."), _e10, x="m"))
