"""Every setting of every experiment at every scale, in one place (docs/theory.md §5 and §6.2).

``SCALES[name]`` holds the training recipe, the seeds and one dict of settings per experiment. Where the
paper is silent the value is our choice and the reason is written beside it; ``paper`` follows docs/theory.md §6.2's
recommended recipe (NOT the paper's, which is unknown). ``tiny`` is a reduced form of every experiment on the
embedded digits data set (8x8 images: token counts 1..64) that runs in about 5-15 minutes on 2 CPU cores;
``small`` runs on MNIST/Fashion-MNIST (28x28) or CIFAR from ``--data-dir``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

__all__ = ["Scale", "SCALES", "get_scale"]


@dataclass(frozen=True)
class Scale:
    """A scale: its default data set, recipe (TrainConfig fields), seeds and per-experiment settings."""

    name: str
    description: str
    dataset: str
    recipe: dict[str, Any]
    seeds: int
    experiments: dict[str, dict[str, Any]]

    def settings(self, exp: str, *, dataset: str | None = None, seeds: int | None = None,
                 data_dir: str | None = None, epochs: int | None = None, device: str | None = None) -> dict[str, Any]:
        """The settings dict of one experiment with the user's overrides applied."""
        s = copy.deepcopy(self.experiments[exp])
        recipe = {**self.recipe, **s.pop("recipe", {})}
        if epochs is not None:
            recipe["epochs"] = int(epochs)
        if device is not None:
            recipe["device"] = device
        if data_dir is not None:
            recipe["data_dir"] = str(data_dir)
        s["recipe"] = recipe
        if dataset is not None and not s.get("fixed_dataset"):
            s["datasets"] = [dataset]
        s.setdefault("datasets", [self.dataset])
        n = seeds if seeds is not None else s.get("seeds", self.seeds)
        s["seeds"] = list(range(int(n)))
        s["scale"] = self.name
        return s


_TINY_RECIPE = {"epochs": 30, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "warmup_epochs": 2,
                "augment": False, "label_smoothing": 0.0}
_SMALL_RECIPE = {"epochs": 20, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 2,
                 "augment": True, "label_smoothing": 0.0}
_PAPER_RECIPE = {"epochs": 200, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5,
                 "augment": True, "label_smoothing": 0.0}
_MNIST_RECIPE = {"epochs": 20, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0,
                 "augment": False}  # docs/theory.md §6.2, MNIST column (E4)

# E2's models, also E3's trained models (same settings, so the same runs)
_TINY_E2 = {"omega": 2**13, "gamma": 2, "depth": 4, "tokens": [4, 8, 16, 32, 64],
            "densities": [1, 1 / 4, 1 / 16, 1 / 64], "sw_tokens": 16}
_SMALL_E2 = {**_TINY_E2, "omega": 2**16, "tokens": [4, 8, 16, 32, 64, 128]}
_PAPER_E2 = {**_TINY_E2, "omega": 2**19, "tokens": [4, 8, 16, 32, 64, 128, 256], "sw_tokens": 64}

SCALES: dict[str, Scale] = {
    "tiny": Scale(
        "tiny",
        "every experiment reduced to the embedded digits data set (8x8, 1,437 training images), CPU minutes",
        "digits", _TINY_RECIPE, 2,
        {
            # Mixers S = C = 16 and 8 (m = 256, 64) for the paper's 64 and 32 (8x8 images); SW-MLPs of the same m.
            "E1": {"sizes": [16, 8], "densities": [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64], "gamma": 2,
                   "depth": 4, "cka_batch": 128, "cka_passes": 3},
            # Ω = 2^13 puts the optimum S = C = 16 on digits, as 2^19 puts S = C = 64 on CIFAR (both (Ω/γ)^(1/3)).
            "E2": _TINY_E2,
            # At init no data is needed, so a larger budget (2^16, optimum S = C = 32) costs nothing; "trained":
            # σ_max after training of E2's models (the same runs, trained once).
            "E3": {"omega": 2**16, "gamma": 2, "tokens": [4, 8, 16, 32, 64],
                   "densities": [1, 1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 1024], "trained": _TINY_E2},
            "E4": {"depth": 2, "seeds": 3, "recipe": {**_MNIST_RECIPE, "epochs": 30}},
            # γ = 1 S-Mixers: Ω = 2^9 and 2^12 have their optima at S = C = 8 and 16.
            "E5": {"omegas": [2**9, 2**12], "gamma": 1, "depth": 4, "tokens": [2, 4, 8, 16, 32],
                   "sw_densities": [1, 1 / 4, 1 / 16], "min_channels": 2},
            "E6": {"omega": 2**14, "gammas": [0.5, 1, 2, 4, 8], "depth": 4},
            "E7": {"omega": 2**13, "gamma": 2, "depth": 4, "tokens": [2, 4, 8, 16, 32, 64], "min_channels": 2},
            "E8": {"side": 16, "gamma": 2, "depths": [1, 2, 4, 8, 12]},
            # Digits analogues of Mixer-SS/8 (few tokens) and Mixer-SS-W (S moved to C) at equal connections.
            "E9": {"omega": 2**13, "gamma": 2, "depth": 4, "narrow_tokens": 4, "wide_tokens": 16},
            "E10": {"sides": [8, 16, 32], "gamma": 2, "depth": 4, "batch_size": 32, "steps": 5},
        },
    ),
    "small": Scale(
        "small",
        "MNIST / Fashion-MNIST (28x28) or CIFAR from --data-dir at reduced widths; a few GPU-hours or a CPU day",
        "mnist", _SMALL_RECIPE, 2,
        {
            "E1": {"sizes": [16], "densities": [1, 1 / 4, 1 / 16, 1 / 64, 1 / 256], "gamma": 2, "depth": 4,
                   "cka_batch": 256, "cka_passes": 3, "seeds": 2},
            "E2": _SMALL_E2,
            "E3": {"omega": 2**19, "gamma": 2, "tokens": [4, 8, 16, 32, 64, 128, 256],
                   "densities": [1, 1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 1024], "trained": _SMALL_E2},
            "E4": {"depth": 2, "seeds": 3, "recipe": _MNIST_RECIPE},  # MNIST by default; --dataset overrides
            "E5": {"omegas": [2**12, 2**15], "gamma": 1, "depth": 8, "tokens": [4, 8, 16, 32, 64, 128],
                   "sw_densities": [1, 1 / 4, 1 / 16], "min_channels": 2},
            "E6": {"omega": 2**16, "gammas": [0.5, 1, 2, 4, 8], "depth": 4},
            "E7": {"omega": 2**16, "gamma": 2, "depth": 8, "tokens": [4, 8, 16, 32, 64, 128], "min_channels": 2},
            "E8": {"side": 28, "gamma": 2, "depths": [2, 4, 8, 12]},
            "E9": {"omega": 2**16, "gamma": 2, "depth": 8, "narrow_tokens": 4, "wide_tokens": 28},
            "E10": {"sides": [16, 32, 64], "gamma": 2, "depth": 8, "batch_size": 64, "steps": 3},
        },
    ),
    "paper": Scale(
        "paper",
        "the paper's sizes, data sets and seeds (3; 4 for CKA/width) on GPUs, recipe of docs/theory.md §6.2",
        "cifar10", _PAPER_RECIPE, 3,
        {
            "E1": {"sizes": [64, 32], "densities": [1, 1 / 4, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256],
                   "gamma": 2, "depth": 4, "cka_batch": 256, "cka_passes": 10, "seeds": 4},
            "E2": {**_PAPER_E2, "seeds": 4},
            "E3": {"omega": 2**19, "gamma": 2, "tokens": [4, 8, 16, 32, 64, 128, 256],
                   "densities": [1, 1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 1024], "trained": _PAPER_E2},
            "E4": {"depth": 2, "seeds": 5, "datasets": ["mnist"], "fixed_dataset": True, "recipe": _MNIST_RECIPE},
            "E5": {"omegas": [2**18, 2**21, 2**27], "gamma": 1, "depth": 8, "tokens": [4, 16, 64, 128, 256, 512],
                   "sw_densities": [1, 1 / 4, 1 / 16, 1 / 64], "sw_omegas": [2**18], "min_channels": 2,
                   "datasets": ["cifar10", "cifar100", "stl10"]},
            # E6's Ω is unknown: 2^21 (the middle budget of E5); γ grid ours.
            "E6": {"omega": 2**21, "gammas": [0.5, 1, 2, 4, 8], "depth": 8},
            # E7's Ω is unknown: 2^21 with γ = 2 (optimum S = C = 102 -> S = 128 reachable on 32x32).
            "E7": {"omega": 2**21, "gamma": 2, "depth": 8, "tokens": [4, 8, 16, 32, 64, 128, 256],
                   "min_channels": 2, "datasets": ["cifar10", "cifar100", "stl10"]},
            "E8": {"side": 128, "gamma": 2, "depths": [4, 8, 12, 16, 20], "datasets": ["cifar10", "cifar100", "stl10"]},
            # Mixer-SS/8 and -W: our reconstruction (docs/theory.md E9 leaves C, depth and γ unknown); see catalog.E9.
            "E9": {"omega": 2**23, "gamma": 4, "depth": 8, "narrow_tokens": 16, "wide_tokens": 64,
                   "datasets": ["cifar10", "cifar100"]},
            "E10": {"sides": [16, 32, 64], "gamma": 2, "depth": 8, "batch_size": 128, "steps": 3},
        },
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid: {', '.join(SCALES)}")
    return SCALES[name]
