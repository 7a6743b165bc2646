"""Tests of widesparse.data.augment: batched crop/flip against a per-image loop, normalisation, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widesparse.data.augment import CropFlip, apply_crop_flip, draw_crop_flip, normalize, normalize_affine


def reference(x: np.ndarray, oy, ox, flip, padding: int) -> np.ndarray:
    """One image at a time, as torchvision's RandomCrop(padding) + RandomHorizontalFlip do it."""
    out = np.empty_like(x)
    _, _, H, W = x.shape
    for i in range(len(x)):
        p = np.pad(x[i], ((0, 0), (padding, padding), (padding, padding)))
        crop = p[:, oy[i] : oy[i] + H, ox[i] : ox[i] + W]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


@pytest.mark.parametrize("padding", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
def test_crop_flip_matches_per_image_reference(padding, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (33, 3, 7, 5), generator=g).to(dtype)
    params = draw_crop_flip(33, padding, True, g)
    got = apply_crop_flip(x, params, padding)
    want = reference(x.numpy(), params.oy.numpy(), params.ox.numpy(), params.flip.numpy(), padding)
    assert got.dtype == dtype and got.shape == x.shape
    assert np.array_equal(got.numpy(), want)


def test_draws_cover_the_range_and_are_seeded():
    p = draw_crop_flip(4000, 2, True, torch.Generator().manual_seed(1))
    assert sorted(p.oy.unique().tolist()) == sorted(p.ox.unique().tolist()) == [0, 1, 2, 3, 4]
    assert 0.45 < p.flip.float().mean().item() < 0.55
    q = draw_crop_flip(4000, 2, True, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(p, q, strict=True))
    r = draw_crop_flip(4000, 2, True, torch.Generator().manual_seed(2))
    assert not torch.equal(p.oy, r.oy)


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    p = draw_crop_flip(6, 0, False)
    assert not p.flip.any() and torch.equal(apply_crop_flip(x, p, 0), x)


def test_take_selects_examples():
    p = draw_crop_flip(10, 3, True, torch.Generator().manual_seed(0))
    idx = torch.tensor([7, 2])
    sub = p.take(idx)
    assert isinstance(sub, CropFlip) and sub.oy.tolist() == [p.oy[7].item(), p.oy[2].item()]
    assert sub.flip.tolist() == [p.flip[7].item(), p.flip[2].item()]


def test_crop_flip_validates():
    x = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="for 2 images, batch has 3"):
        apply_crop_flip(x, draw_crop_flip(2, 1, True), 1)
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\)"):
        apply_crop_flip(torch.zeros(3, 4, 4), draw_crop_flip(3, 1, True), 1)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        draw_crop_flip(3, -1, True)


def test_normalize_formula_float64():
    x = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.25)
    got = normalize(x, mean, std, 255, torch.float64)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    want = (x.double() / 255 - m) / s
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    f32 = normalize(x, mean, std, 255)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), want, atol=1e-5)
    scale, shift = normalize_affine(mean, std, 16)
    assert scale.shape == shift.shape == (1, 3, 1, 1)
    assert scale.flatten().tolist() == [1 / (16 * s) for s in std]
    assert shift.flatten().tolist() == [-m / s for m, s in zip(mean, std, strict=True)]


def test_normalize_validates():
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        normalize(torch.zeros(2, 1, 2, 2), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="std > 0"):
        normalize(torch.zeros(2, 1, 2, 2), (0.5,), (0.0,))
    with pytest.raises(ValueError, match="differ in length"):
        normalize_affine((0.1, 0.2), (0.3,))
