"""Shallow MLPs with Monarch or Kronecker weights: the E4 comparison (PAPER.md §3.8, E4).

Papers:
    Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022.
    Hayase & Karakida, "Understanding MLP-Mixer as a Wide and Sparse MLP", ICML 2024, arXiv:2306.01470.

The image is the matrix ``X`` of shape ``(S, C) = (H, W * in_chans)`` (PAPER.md E4 [choice]: on MNIST
``S = C = b = 28``, ``n = 784``; digits is 8x8, ``b = 8``), and the network acts on ``x = vec X`` (column-major):

    x -> act(M_1 x + b_1) -> ... -> act(M_depth x + b_depth) -> head (linear, n -> num_classes)

* ``monarch_mlp``: every ``M`` a free Monarch matrix ``P L P^T R`` (:class:`~widesparse.layers.monarch.MonarchLinear`,
  ``C`` blocks of ``R``, ``S`` blocks of ``L``; ``2 b^3`` weights at ``S = C = b``) with a full bias.
* ``kron_mlp``: every ``M = V^T ⊗ W`` with tied blocks, the linear S-Mixer layer ``vec(W X V)`` (PAPER.md (4),
  (13); :class:`~widesparse.layers.monarch.TiedMonarchLinear`, ``2 b^2`` weights) with the S-Mixer's token and channel
  biases.

The activation acts only between layers: inside ``M`` the two steps are linear ("inner linear, outer GELU",
PAPER.md §6.2). ``nblocks`` sets ``C`` (default ``W * in_chans``), so ``X`` is ``vec X`` read as an
``(n / nblocks, nblocks)`` matrix. ``patch_size`` is accepted (the train loop passes every data set's default)
and ignored: these models see pixels, not patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from widesparse.layers.activation import resolve_act_layer
from widesparse.layers.monarch import MonarchLinear, TiedMonarchLinear
from widesparse.layers.patch_embed import to_2tuple
from widesparse.linalg import unvec, vec
from widesparse.models.base import collect_intermediates
from widesparse.models.registry import register_model

__all__ = ["MonarchMlp"]

LayerKind = Literal["monarch", "kron"]


class MonarchMlp(nn.Module):
    """``depth`` layers ``x -> act(M x + b)`` on ``x = vec X`` (``M`` Monarch or ``V^T ⊗ W``), then a linear head."""

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
        self.init_weights(seed)

    # ---------------------------------------------------------------------------------------------- init
    def init_weights(self, seed: int | None = None) -> None:
        """Monarch/Kronecker factors LeCun-uniform per factor, zero biases; head as ``nn.Linear`` (``U(±1/√n)``).

        ``seed`` draws everything from a dedicated generator (reproducible whatever the global RNG); ``None``
        uses the global RNG.
        """
        g = None if seed is None else torch.Generator().manual_seed(int(seed))
        for layer in self.layers:
            layer.reset_parameters(g)
        if isinstance(self.head, nn.Linear) and self.head.weight.device.type != "meta":
            bound = 1.0 / math.sqrt(self.num_features)
            with torch.no_grad():
                for t in (self.head.weight, self.head.bias):
                    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=g))

    # ------------------------------------------------------------------------------------------- surface
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (``num_classes=0``: no head, features out)."""
        p = next(self.layers[0].parameters())
        self.num_classes = num_classes
        self.head = (
            nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
            if num_classes
            else (nn.Identity())
        )

    def feature_names(self) -> list[str]:
        """Names of the ``depth`` layers whose outputs :meth:`forward_intermediates` returns."""
        return [f"layers.{i}" for i in range(len(self.layers))]

    def to_vec(self, images: Tensor) -> Tensor:
        """Images ``(B, in_chans, H, W)`` -> ``vec X`` ``(B, n)`` with ``X[h, w*in_chans + ch] = image[ch, h, w]``."""
        expected = (self.in_chans, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"expected images of shape (B, {want}), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).reshape(images.shape[0], self.num_features)

    def _layer(self, i: int, x: Tensor) -> Tensor:
        return self.act(self.layers[i](x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the last layer's output as a matrix ``(B, S, C)`` (``unvec`` of the hidden vector)."""
        h = self.to_vec(x)
        for i in range(len(self.layers)):
            h = self._layer(i, h)
        return unvec(h, self.num_tokens, self.dim)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``vec`` of the features ``(B, S, C)`` (or already ``(B, n)``) then the head (``pre_logits`` stops before)."""
        h = vec(x) if x.ndim == 3 else x
        return h if pre_logits else self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NLC", "vec"] = "NLC",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Every layer's output (after the activation), as the Mixer's method (same arguments).

        ``indices``: ``None`` all, an int ``n`` for the last ``n``, or a list (negative allowed) into
        :meth:`feature_names`. ``output_fmt="NLC"`` gives ``(B, S, C)``, ``"vec"`` gives ``(B, n)``. ``norm`` is
        accepted for the common signature and changes nothing: this model has no normalisation.
        """
        if output_fmt not in ("NLC", "vec"):
            raise ValueError(f"output_fmt must be 'NLC' or 'vec', got {output_fmt!r}")
        steps = [partial(self._layer, i) for i in range(len(self.layers))]

        def as_matrix(h: Tensor) -> Tensor:
            return unvec(h, self.num_tokens, self.dim)

        feature = (lambda h: h) if output_fmt == "vec" else as_matrix
        return collect_intermediates(steps, self.to_vec(x), indices, stop_early, intermediates_only, feature,
                                     as_matrix, what="layers")


# ------------------------------------------------------------------------------------------------ registry
_KWARGS = set(MonarchMlp.__init__.__code__.co_varnames[1 : MonarchMlp.__init__.__code__.co_argcount]) - {"layer"}


def _build(layer: LayerKind, kwargs: dict[str, Any], name: str) -> MonarchMlp:
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"model {name!r} got unknown keyword argument(s) {unknown}; valid: {sorted(_KWARGS)}")
    return MonarchMlp(layer=layer, **kwargs)


@register_model
def monarch_mlp(**kwargs: Any) -> MonarchMlp:
    """E4: MLP with free Monarch weights ``P L P^T R`` on ``vec X`` (default 28x28, 2 layers, GELU, linear head)."""
    return _build("monarch", kwargs, "monarch_mlp")


@register_model
def kron_mlp(**kwargs: Any) -> MonarchMlp:
    """E4: MLP with tied Kronecker weights ``V^T ⊗ W`` (linear S-Mixer layers, PAPER.md (13)) on ``vec X``."""
    return _build("kron", kwargs, "kron_mlp")
