"""The vocabulary of an experiment: runs, points, experiments, and the model points on a fixed-Ω curve.

A :class:`Run` is one unit of work (train a model, CKA of two trained runs, spectra at init, a
memory/time measurement) identified by a hash of its inputs, so that experiments asking for the same run share it
and a finished run is never repeated. A :class:`Point` is one experiment's view of a run: the run plus the
coordinates the experiment plots (series, S, C, γ, L, m, γm, p, Ω, seed, ...).

Imports point one way: :mod:`widesparse.experiments.catalog` builds E1-E10 from this vocabulary and holds their
registry (``get_experiment``, ``list_experiments``); nothing here imports the catalog. The token grids
(``nearest_tokens``, ``patch_for_tokens``, ...) are :mod:`widesparse.budget`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from widesparse import budget
from widesparse.budget import patch_for_tokens

__all__ = ["KINDS", "Run", "Point", "Experiment", "sw_backend", "mixer_point", "sw_point", "train_run",
           "forward_flops"]

KINDS = ("train", "spectra", "memory", "cka")  # execution order: a cka run reads two finished train runs


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _without_location(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_location(v) for k, v in obj.items() if k != "data_dir"}
    return obj


@dataclass(frozen=True, eq=False)
class Run:
    """One unit of work: ``kind`` in :data:`KINDS` and its inputs ``params`` (JSON-able); ``needs`` are run ids."""

    kind: str
    params: dict[str, Any]
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def id(self) -> str:
        """``<kind>-<model>-<10 hex digits of the inputs' hash>``: equal inputs, equal id.

        Where the data set lives (``data_dir``) is not an input: moving the data keeps the finished runs.
        """
        digest = hashlib.sha1(_canonical([self.kind, _without_location(self.params)]).encode()).hexdigest()[:10]
        model = self.params.get("model") or self.params.get("config", {}).get("model") or "pair"
        return f"{self.kind}-{model}-{digest}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class Point:
    """One experiment's row: its :class:`Run` and the coordinates it is plotted at (``meta``)."""

    experiment: str
    run: Run
    meta: dict[str, Any]


@dataclass(frozen=True)
class Experiment:
    """An experiment of docs/theory.md §5: how it expands at a scale, and the paper's finding it is checked against.

    ``expand(settings)`` returns the points (``settings`` is this experiment's dict of the scale table in
    :mod:`widesparse.experiments.scales`); ``choices`` are our decisions where the paper is silent, with reasons.
    """

    id: str
    title: str
    finding: str
    paper_numbers: str
    choices: tuple[str, ...]
    expand: Callable[[dict[str, Any]], list[Point]]
    x: str = "m"  # the main x coordinate, for the plan listing
    tags: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------ model points
def forward_flops(connections: float, m: float, S: float, image_size: int, in_chans: int, num_classes: int) -> float:
    """Forward FLOPs per example: 2 x (mixing connections + patch embedding + head), dense layers counted dense.

    The embedding maps S patches of ``in_chans * image_size² / S`` pixels to C = m / S channels; the head C -> classes.
    """
    return 2.0 * (connections + m * in_chans * image_size * image_size / S + (m / S) * num_classes)


def train_run(recipe: dict[str, Any], model: str, model_kwargs: dict[str, Any], dataset: str, seed: int) -> Run:
    """A training run: TrainConfig fields ``recipe`` plus model, data set, model kwargs and seed."""
    config = {**recipe, "model": model, "dataset": dataset, "seed": int(seed), "model_kwargs": model_kwargs}
    return Run("train", {"config": config})


def mixer_point(S: int, omega: float | None, gamma: float, depth: int, image_size: int, *, C: int | None = None,
                variant: str = "mixer") -> tuple[dict[str, Any], dict[str, Any]]:
    """Model kwargs and coordinates of a Mixer-family model with S tokens on the fixed-Ω curve (10).

    C is solved from Ω (``budget.solve_channels``) and rounded to the nearest integer >= 1 unless given; the
    coordinates hold the realized Ω, m = SC, γm and p. ``variant``: a registered Mixer-family name.
    """
    single = variant in ("s_mixer", "rp_s_mixer")  # one matrix per mixing step (docs/theory.md (3)): γ = 1
    if single:
        gamma = 1.0
    if C is None:
        if omega is None:
            raise ValueError("mixer_point: give omega (C is then solved from it) or C")
        C = max(1, math.floor(budget.solve_channels(omega, gamma, S) + 0.5))
    patch = patch_for_tokens(image_size, S)
    kwargs: dict[str, Any] = {"patch_size": patch, "dim": int(C), "depth": int(depth)}
    if single:
        real = budget.mixer_omega(S, C, S, C)
        per_block = 2.0 * real
    else:
        kwargs.update(token_expansion=float(gamma), channel_expansion=float(gamma))
        real = budget.mixer_omega(S, C, max(1, round(gamma * S)), max(1, round(gamma * C)))
        per_block = 4.0 * real
    meta = {"S": S, "C": int(C), "gamma": float(gamma), "L": int(depth), "m": S * int(C),
            "gamma_m": float(gamma) * S * int(C), "p": budget.density(S, C), "omega": real,
            "omega_target": float(omega if omega is not None else real), "connections": per_block * depth,
            "series": variant}
    return kwargs, meta


def sw_backend(p: float, backend: str = "sparse") -> dict[str, str]:
    """The SW-MLP storage for density p: CSR (the default) below 1/2, the masked dense weight from 1/2 on, where
    the sparse kernels are slower than a dense matmul (same mask, same numbers: only the speed differs)."""
    return {"backend": "masked"} if p >= 0.5 or backend == "masked" else {}


def sw_point(p: float, omega: float, gamma: float, depth: int, image_size: int, S: int,
             *, backend: str = "sparse") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model name, kwargs and coordinates of an SW-MLP of density p at budget Ω: m = √(Ω/(γp)), a multiple of S.

    p = 1 is the dense MLP (model ``mlp``). The realized Ω = pγm² is recorded.
    """
    m_real = budget.sw_mlp_width(omega, gamma, p)
    C = max(1, round(m_real / S))
    m = S * C
    kwargs = {"patch_size": patch_for_tokens(image_size, S), "width": m, "gamma": float(gamma), "depth": int(depth)}
    if p < 1:
        kwargs["density"] = float(p)
        kwargs.update(sw_backend(p, backend))
    real = p * gamma * m * m
    meta = {"S": S, "C": C, "gamma": float(gamma), "L": int(depth), "m": m, "gamma_m": float(gamma) * m,
            "p": float(p), "omega": real, "omega_target": float(omega), "connections": 4.0 * depth * real,
            "series": "mlp" if p == 1 else "sw_mlp"}
    return ("mlp" if p == 1 else "sw_mlp"), kwargs, meta
