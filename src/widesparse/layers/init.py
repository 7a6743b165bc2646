"""Initialisers the Mixer family uses beyond :mod:`torch.nn.init`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["lecun_normal_"]


def lecun_normal_(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """LeCun normal (truncated at 2 std, JAX's ``variance_scaling(1, 'fan_in', 'truncated_normal')``), in place;
    ``generator`` as in :mod:`torch.nn.init` (``None``: the global RNG)."""
    fan_in = t.shape[1] * (t[0][0].numel() if t.ndim > 2 else 1)
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=generator)
