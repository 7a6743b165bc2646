"""Shallow MLPs with Monarch or Kronecker weights: the E4 comparison (docs/theory.md §3.8, E4).

Papers:
    Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022.
    Hayase & Karakida, "Understanding MLP-Mixer as a Wide and Sparse MLP", ICML 2024, arXiv:2306.01470.

The image is the matrix ``X`` of shape ``(S, C) = (H, W * in_chans)`` (docs/theory.md E4 [choice]: on MNIST
``S = C = b = 28``, ``n = 784``; digits is 8x8, ``b = 8``), and the network acts on ``x = vec X`` (column-major):

    x -> act(M_1 x + b_1) -> ... -> act(M_depth x + b_depth) -> head (linear, n -> num_classes)

* ``monarch_mlp``: every ``M`` a free Monarch matrix ``P L P^T R`` (:class:`~widesparse.layers.monarch.MonarchLinear`,
  ``C`` blocks of ``R``, ``S`` blocks of ``L``; ``2 b^3`` weights at ``S = C = b``) with a full bias.
* ``kron_mlp``: every ``M = V^T ⊗ W`` with tied blocks, the linear S-Mixer layer ``vec(W X V)`` (docs/theory.md
  (4), (13); :class:`~widesparse.layers.monarch.TiedMonarchLinear`, ``2 b^2`` weights) with the S-Mixer's token and
  channel biases.

The activation acts only between layers: inside ``M`` the two steps are linear ("inner linear, outer GELU",
docs/theory.md §6.2). ``nblocks`` sets ``C`` (default ``W * in_chans``), so ``X`` is ``vec X`` read as an
``(n / nblocks, nblocks)`` matrix. ``patch_size`` is accepted (the train loop passes every data set's default)
and ignored: these models see pixels, not patches.

Seeds: the weights are the only random draw. ``init_seed`` (or, when it is ``None``, ``seed``) draws them all from
one generator seeded with it, independent of the global RNG; with both ``None`` they come from the global RNG.
The model surface (head, intermediates, checkpointing) is :class:`~widesparse.models.surface.ModelSurface`'s, on the
stream ``vec X`` ``(B, n)``; ``forward_head`` pools by ``vec``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from widesparse.layers.activation import resolve_act_layer
from widesparse.layers.monarch import MonarchLinear, TiedMonarchLinear
from widesparse.layers.patch_embed import to_2tuple
from widesparse.linalg import unvec, vec
from widesparse.models.registry import register_preset
from widesparse.models.seeds import init_generator
from widesparse.models.surface import ModelSurface, Step

__all__ = ["MonarchMlp"]

LayerKind = Literal["monarch", "kron"]


class MonarchMlp(ModelSurface):
    """``depth`` layers ``x -> act(M x + b)`` on ``x = vec X`` (``M`` Monarch or ``V^T ⊗ W``), then a linear head.

    Images ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``; ``init_seed``/``seed`` fix the weights.
    """

    _intermediates_what = "layers"

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        in_chans: int = 1,
        depth: int = 2,
        layer: LayerKind = "monarch",
        act_layer: str | Callable[[], nn.Module] = "gelu",
        nblocks: int | None = None,
        bias: bool = True,
        patch_size: Any = None,
        seed: int | None = None,
        init_seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if layer not in ("monarch", "kron"):
            raise ValueError(f"unknown layer {layer!r}; valid: monarch, kron")
        if isinstance(depth, bool) or int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        if isinstance(in_chans, bool) or int(in_chans) != in_chans or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        self.image_size = to_2tuple(image_size, "image_size")
        self.in_chans, self.layer_kind, self.patch_size = int(in_chans), layer, patch_size
        n = self.num_features = self.image_size[0] * self.image_size[1] * self.in_chans
        C = self.image_size[1] * self.in_chans if nblocks is None else nblocks
        if isinstance(C, bool) or int(C) != C or C < 1 or n % C:
            raise ValueError(
                f"nblocks={nblocks} must divide the n = H*W*in_chans = {n} input pixels "
                f"(it is the column count C of X); valid: {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}"
            )
        self.num_tokens, self.dim = n // int(C), int(C)
        self.num_classes = int(num_classes)
        cls = MonarchLinear if layer == "monarch" else TiedMonarchLinear
        fk = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList(cls(n, n, self.dim, bias=bias, **fk) for _ in range(int(depth)))
        self.act = resolve_act_layer(act_layer)()
        self.norm = nn.Identity()  # no normalisation; kept so that generic code can call model.norm(features)
        self.head: nn.Module = nn.Linear(n, self.num_classes, **fk) if num_classes > 0 else nn.Identity()
        self.init_weights(seed if init_seed is None else init_seed)

    # ---------------------------------------------------------------------------------------------- init
    def init_weights(self, seed: int | None = None) -> None:
        """Monarch/Kronecker factors LeCun-uniform per factor, zero biases; head as ``nn.Linear`` (``U(±1/√n)``).

        ``seed`` draws everything from a dedicated generator (reproducible whatever the global RNG); ``None``
        uses the global RNG.
        """
        g = init_generator(seed)
        for layer in self.layers:
            layer.reset_parameters(g)
        if isinstance(self.head, nn.Linear) and self.head.weight.device.type != "meta":
            bound = 1.0 / math.sqrt(self.num_features)
            with torch.no_grad():
                for t in (self.head.weight, self.head.bias):
                    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=g))

    # ------------------------------------------------------------------------------------------- surface
    def _init_head(self, head: nn.Linear) -> None:
        """A new head keeps ``nn.Linear``'s init (``U(±1/√n)``, global RNG), as :meth:`init_weights` draws it."""

    def to_vec(self, images: Tensor) -> Tensor:
        """Images ``(B, in_chans, H, W)`` -> ``vec X`` ``(B, n)`` with ``X[h, w*in_chans + ch] = image[ch, h, w]``."""
        expected = (self.in_chans, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (B, {want}), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).reshape(images.shape[0], self.num_features)

    def _layer(self, i: int, x: Tensor) -> Tensor:
        return self.act(self.layers[i](x))

    def _embed(self, x: Tensor) -> Tensor:
        return self.to_vec(x)

    def _steps(self) -> list[tuple[str, Step]]:
        """The ``depth`` layers ``layers.{i}`` (each output after the activation)."""
        return [(f"layers.{i}", partial(self._layer, i)) for i in range(len(self.layers))]

    def _as_tokens(self, h: Tensor) -> Tensor:
        """``vec X`` ``(B, n)`` -> ``X`` ``(B, S, C)``."""
        return unvec(h, self.num_tokens, self.dim)

    def _pool(self, x: Tensor) -> Tensor:
        """Features ``(B, S, C)`` (or already ``(B, n)``) -> ``vec`` ``(B, n)``: the head sees every pixel."""
        return vec(x) if x.ndim == 3 else x

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the last layer's output as a matrix ``(B, S, C)`` (``unvec`` of the hidden vector)."""
        h = self._embed(x)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for _, step in self._steps():
            h = checkpoint(step, h, use_reentrant=False) if ckpt else step(h)
        return self._as_tokens(h)


# ------------------------------------------------------------------------------------------------ registry
register_preset("monarch_mlp", MonarchMlp, {}, "E4: MLP with free Monarch weights ``P L P^T R`` on ``vec X`` "
                "(default 28x28, 2 layers, GELU, linear head).", fixed={"layer": "monarch"})
register_preset("kron_mlp", MonarchMlp, {}, "E4: MLP with tied Kronecker weights ``V^T ⊗ W`` (linear S-Mixer "
                "layers, docs/theory.md (13)) on ``vec X``.", fixed={"layer": "kron"})
