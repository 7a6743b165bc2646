"""Patch embedding: images ``(B, in_chans, H, W)`` to token features ``(B, S, C)``."""

from __future__ import annotations

from torch import Tensor, nn

from widesparse.ops.matmul import linear_last

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(v: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``8 -> (8, 8)``; validates positive integers and names the argument in errors."""
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i > 0 for i in t):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return t  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embedding: ``(B, in_chans, H, W) -> (B, S, C)``, tokens row-major."""

    def __init__(self, image_size, patch_size, in_chans: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.image_size = to_2tuple(image_size, "image_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for axis, n, p in zip(("height", "width"), self.image_size, self.patch_size, strict=True):
            if n % p:
                raise ValueError(
                    f"image {axis} {n} is not divisible by patch {axis} {p} "
                    f"(image_size={self.image_size}, patch_size={self.patch_size}); choose a patch size dividing {n}"
                )
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, self.patch_size, self.patch_size, device=device, dtype=dtype)

    def _check(self, x: Tensor) -> None:
        if x.shape[-2:] != self.image_size:
            raise ValueError(f"input image size {tuple(x.shape[-2:])} != model image_size {self.image_size}")

    def forward(self, x: Tensor) -> Tensor:
        """Patches cut into ``(B, S, in_chans * p_h * p_w)`` (one copy of the images), embedded by one matrix
        product: the strided convolution's values (to summation order) at about half its cost forward + backward."""
        return self._embed(x, (0, 2, 4, 1, 3, 5))

    def forward_sbc(self, x: Tensor) -> Tensor:
        """The same embedding in the token-major layout ``(S, B, C)`` (contiguous), the fast path of the Mixer."""
        return self._embed(x, (2, 4, 0, 1, 3, 5))

    def _embed(self, x: Tensor, order: tuple[int, ...]) -> Tensor:
        self._check(x)
        B, K = x.shape[0], x.shape[1]
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        patches = x.reshape(B, K, gh, ph, gw, pw).permute(*order).flatten(-3)  # (B, gh, gw, K*ph*pw) or (gh, gw, B, .)
        patches = patches.flatten(0, 1) if order[0] == 2 else patches.flatten(1, 2)
        return linear_last(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
