"""Batched, seeded image augmentation and normalisation as tensor ops, on whatever device the batch lives.

Imports nothing from ``widesparse``. Images stay ``uint8`` ``(N, C, H, W)`` in memory (4x
less than float32); a batch is cropped and flipped as ``uint8`` and normalised to float in one fused op.

Randomness is drawn up front for a whole epoch (:func:`draw_crop_flip`: one offset pair and one flip bit per
example position), from a generator seeded per epoch. The augmentation of epoch ``e`` is thus a pure function
of ``(seed, e)``, which makes a resumed run, or one split over several processes, see exactly the same images
as an uninterrupted single-process run.

Random crop with padding follows torchvision's ``RandomCrop(size, padding)``: the image is zero-padded (black,
before normalisation) by ``padding`` on each side and a window of the original size is cut at a uniform
offset in ``0 .. 2 * padding`` along each axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CropFlip", "apply_crop_flip", "draw_crop_flip", "normalize", "normalize_affine"]


class CropFlip(NamedTuple):
    """Per-example augmentation parameters: crop offsets ``oy``, ``ox`` (``int64``) and ``flip`` (``bool``)."""

    oy: Tensor
    ox: Tensor
    flip: Tensor

    def take(self, idx: Tensor) -> CropFlip:
        """The parameters of the examples at positions ``idx``."""
        return CropFlip(self.oy[idx], self.ox[idx], self.flip[idx])


def draw_crop_flip(n: int, padding: int, hflip: bool, generator: torch.Generator | None = None) -> CropFlip:
    """Draw crop offsets (uniform in ``0 .. 2 * padding``) and flip bits (p = 1/2 if ``hflip``) for ``n`` examples.

    The draws happen in a fixed order (offsets y, offsets x, flips) on the generator's device (CPU by default);
    with ``padding == 0`` the offsets are all ``padding`` (no shift) and nothing is drawn for them.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding:
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    else:
        oy = ox = torch.zeros(n, dtype=torch.int64)
    flip = torch.rand(n, generator=generator) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool)
    return CropFlip(oy, ox, flip)


def apply_crop_flip(x: Tensor, params: CropFlip, padding: int) -> Tensor:
    """Crop every image of ``x`` ``(B, C, H, W)`` at its own offset after zero padding, then flip where asked.

    Works on any dtype (``uint8`` is cheapest) and device; ``params`` may live on the CPU.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if params.oy.shape != (B,):
        raise ValueError(f"augmentation parameters for {params.oy.shape[0]} images, batch has {B}")
    dev = x.device
    if padding:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy, ox = params.oy.to(dev, non_blocking=True), params.ox.to(dev, non_blocking=True)
        rows = (oy[:, None] + torch.arange(H, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(W, device=dev))[:, None, None, :]
        b = torch.arange(B, device=dev)[:, None, None, None]
        c = torch.arange(C, device=dev)[None, :, None, None]
        x = xp[b, c, rows, cols]
    flip = params.flip.to(dev, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize_affine(
    mean: Sequence[float], std: Sequence[float], pixel_max: float = 255.0
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` in float64 with ``(x / pixel_max - mean) / std == x * scale + shift``."""
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
    if pixel_max <= 0 or any(s <= 0 for s in std):
        raise ValueError(f"need pixel_max > 0 and std > 0, got {pixel_max} and {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    return (1.0 / (pixel_max * s)).reshape(1, -1, 1, 1), (-m / s).reshape(1, -1, 1, 1)


def normalize(
    x: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pixel_max: float = 255.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pixels ``0 .. pixel_max`` (any dtype) to ``(x / pixel_max - mean) / std`` per channel, as ``dtype``.

    Computed as one fused ``x * scale + shift`` in ``dtype`` (constants rounded from float64).
    """
    if x.ndim != 4 or x.shape[1] != len(mean):
        raise ValueError(f"expected images (B, {len(mean)}, H, W) for {len(mean)} channel stats, got {tuple(x.shape)}")
    scale, shift = normalize_affine(mean, std, pixel_max)
    return torch.addcmul(shift.to(x.device, dtype), x.to(dtype), scale.to(x.device, dtype))
