"""The Mixer family's small parts: activations by name, patch embedding, stochastic depth, LeCun init.

:mod:`widesparse.models.blocks` re-exports all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from widesparse.cpu_kernels import GELU
from widesparse.kernels import linear_last

__all__ = ["ACT_LAYERS", "resolve_act_layer", "to_2tuple", "PatchEmbed", "DropPath", "lecun_normal_", "drop_path_rates"]


ACT_LAYERS: dict[str, type[nn.Module]] = {
    "gelu": GELU,  # nn.GELU with the table backward in bf16 on the CPU (widesparse.cpu_kernels)
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


def resolve_act_layer(act: str | Callable[[], nn.Module] | None) -> Callable[[], nn.Module]:
    """An activation factory from a name (``gelu``, ``relu``, ``identity``, ...) or a module class."""
    if act is None:
        return GELU
    if isinstance(act, str):
        key = act.lower()
        if key not in ACT_LAYERS:
            raise ValueError(f"unknown activation {act!r}; valid: {', '.join(ACT_LAYERS)}")
        return ACT_LAYERS[key]
    return act


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
        product: the strided convolution's values (to summation order) at about half its cost forward + backward
        (CPU, 2 threads, the issue-13 stem: 0.63 against 1.23 ms in bf16, 0.98 against 1.37 ms in float32)."""
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


class DropPath(nn.Module):
    """Stochastic depth per example; ``rescale=True`` divides kept paths by the keep probability (timm)."""

    def __init__(self, p: float = 0.0, rescale: bool = True) -> None:
        super().__init__()
        self.p, self.rescale = float(p), rescale

    def forward(self, x: Tensor, batch_dim: int = 0) -> Tensor:
        """Drop whole examples along ``batch_dim`` (1 in the ``(S, B, C)`` layout; same random draws)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = [1] * x.ndim
        shape[batch_dim] = x.shape[batch_dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep if self.rescale else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"


def lecun_normal_(t: Tensor) -> Tensor:
    """LeCun normal (truncated at 2 std, JAX's ``variance_scaling(1, 'fan_in', 'truncated_normal')``)."""
    fan_in = t.shape[1] * (t[0][0].numel() if t.ndim > 2 else 1)
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def drop_path_rates(rate: float, depth: int, schedule: str) -> list[float]:
    """Per-block stochastic-depth rates: ``linear`` (``rate * i / (depth - 1)``) or ``uniform``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    if schedule == "uniform":
        return [rate] * depth
    if schedule != "linear":
        raise ValueError(f"drop_path_schedule must be 'linear' or 'uniform', got {schedule!r}")
    return [rate * i / max(depth - 1, 1) for i in range(depth)]
