"""Helpers shared by the tests: small versions of every registered model, a few training steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from widesparse.models import create_model

# Small, rectangular sizes: S = (8/2) * (8/4) = 8 tokens, C = 5 channels, hidden widths != S, C (gamma != 1).
SMALL: dict[str, Any] = {
    "image_size": 8,
    "patch_size": (2, 4),
    "in_chans": 2,
    "dim": 5,
    "depth": 2,
    "num_classes": 4,
}
HIDDEN: dict[str, Any] = {"token_hidden": 3, "channel_hidden": 7}


# models on raw pixels (the image itself is X in R^{H x W*in_chans}): no patch size, no dim
PIXEL_MLPS = {"monarch_mlp", "kron_mlp"}


def small_kwargs(name: str, **extra: Any) -> dict[str, Any]:
    """Keyword arguments that shrink any registered model to a test size."""
    if name in PIXEL_MLPS:
        return {"image_size": 8, "in_chans": 2, "depth": 2, "num_classes": 4, **extra}
    kw = dict(SMALL)
    if "s_mixer" not in name:
        kw.update(HIDDEN)
    kw.update(extra)
    return kw


def make_small(name: str, **extra: Any) -> torch.nn.Module:
    """A small instance of ``name`` with a non-zero head (so that every parameter receives a gradient)."""
    model = create_model(name, **small_kwargs(name, **extra))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        w = model.head.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    return model


def train_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int = 20,
    opt: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> list[float]:
    """``steps`` optimiser steps on one batch ``(x, y)`` (AdamW, lr 1e-2, weight decay 0.05 unless ``opt``);
    the loss before each step."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_loss_falls(losses: list[float], ratio: float = 0.7) -> None:
    """The last loss is below ``ratio`` times the first (training does something)."""
    assert losses[-1] < ratio * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (want < {ratio} x first)"
