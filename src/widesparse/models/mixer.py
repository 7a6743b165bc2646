"""MLP-Mixer, S-Mixer and RP-Mixer: the Mixer family of Hayase & Karakida.

Papers:
    Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021, arXiv:2105.01601.
    Hayase & Karakida, "Understanding MLP-Mixer as a Wide and Sparse MLP", ICML 2024, arXiv:2306.01470.
    (No official code exists for the latter; widesparse is its reference implementation.)

Block (docs/theory.md (1)-(2)): ``U = X + W_2 act(W_1 LN(X))`` (token mixing, widths S -> D_S -> S) and
``Y = U + act(LN(U) W_3) W_4`` (channel mixing, C -> D_C -> C), on ``X`` of shape ``(B, S, C)``. On ``x = vec X``
these are the wide sparse maps ``I_C ⊗ W`` (density 1/C) and ``V^T ⊗ I_S`` (density 1/S) of width ``m = S*C``.

* ``mixer``: the original Mixer (pre-norm residual, LayerNorm eps 1e-6, GELU).
* ``s_mixer``: docs/theory.md (3), no LayerNorm, no skip, one matrix per mixing step followed by the activation;
  ``mixing_layers=2`` gives two-layer expanded mixing MLPs (still no LN/skip, activation after each step).
* ``rp_mixer``/``rp_s_mixer``: fixed uniform random permutations ``J_1`` on the input vec and ``J_2`` on the
  output vec of every mixing step (docs/theory.md §4.3); ``permutation="identity"`` reproduces the Mixer exactly.

Widths: ``token_hidden = round(token_expansion * S)``, ``channel_hidden = round(channel_expansion * C)``
unless given explicitly (the original presets fix them: B/16 has D_S = 384, D_C = 3072).

Init (``init_mode``):
* ``"mixer"`` (default): the original Mixer init as timm implements it: Xavier-uniform mixing weights (on the
  small factors, i.e. as ``nn.Linear``), mixing-MLP biases ~ N(0, 1e-6), LeCun-normal patch embedding with zero
  bias, LayerNorm weight 1 / bias 0, zero head weight and bias ``head_bias``.
* ``"jax"``: as the official Flax code: LeCun-normal mixing weights, zero biases, zero head.
* ``"gaussian"``: mixing weights N(0, 1/fan_in), zero biases (the Marchenko-Pastur setting of E3).

Seeds (:mod:`widesparse.models.seeds`): ``seed`` fixes the permutations only (the RP variants; the plain Mixer
has no random structure), as does ``perm_seed``, which overrides it. The weights come from the global torch RNG
unless ``init_seed`` is given; then from a generator seeded with it, independent of the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from widesparse.layers import PermutedKronLinear
from widesparse.layers.activation import resolve_act_layer
from widesparse.layers.drop import drop_path_rates
from widesparse.layers.init import lecun_normal_
from widesparse.layers.norm import LayerNorm
from widesparse.layers.patch_embed import PatchEmbed
from widesparse.models.base import MixerSurface
from widesparse.models.blocks import MixerBlock
from widesparse.models.registry import register_preset
from widesparse.models.seeds import draw_, init_generator, layer_seeds

__all__ = ["MlpMixer"]

InitMode = Literal["mixer", "jax", "gaussian"]


class MlpMixer(MixerSurface):
    """The Mixer family on images ``(B, in_chans, H, W)``: patch embedding, ``depth`` blocks, LN, mean, head.

    ``seed``/``perm_seed`` fix the permutations, ``init_seed`` the weights (module docstring, "Seeds").
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        dim: int = 128,
        depth: int = 8,
        token_expansion: float = 2.0,
        channel_expansion: float = 4.0,
        token_hidden: int | None = None,
        channel_hidden: int | None = None,
        act_layer: str | Callable[[], nn.Module] = "gelu",
        norm: bool = True,
        residual: bool = True,
        outer_act: bool = False,
        mixing_layers: int = 2,
        permutation: Literal["identity", "random"] = "identity",
        seed: int = 0,
        perm_seed: int | None = None,
        init_seed: int | None = None,
        drop_path_rate: float = 0.0,
        drop_path_schedule: Literal["linear", "uniform"] = "linear",
        drop_path_rescale: bool = True,
        init_mode: InitMode = "mixer",
        head_bias: float = 0.0,
        ln_eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if depth < 1 or dim < 1 or num_classes < 0:
            raise ValueError(f"need depth >= 1, dim >= 1, num_classes >= 0; got {depth}, {dim}, {num_classes}")
        if mixing_layers not in (1, 2):
            raise ValueError(f"mixing_layers must be 1 or 2, got {mixing_layers}")
        self.stem = PatchEmbed(image_size, patch_size, in_chans, dim, **fk)
        S = self.num_tokens = self.stem.num_patches
        self.dim = self.num_features = dim
        self.num_classes = num_classes
        self.permutation = permutation
        if mixing_layers == 1:
            self.token_hidden = self.channel_hidden = None
        else:
            self.token_hidden = int(token_hidden) if token_hidden is not None else _width(token_expansion, S, "token")
            self.channel_hidden = (
                int(channel_hidden) if channel_hidden is not None else _width(channel_expansion, dim, "channel")
            )
        act = resolve_act_layer(act_layer)
        norm_layer = partial(LayerNorm, eps=ln_eps) if norm else None
        rates = drop_path_rates(drop_path_rate, depth, drop_path_schedule)
        perm_seed = seed if perm_seed is None else perm_seed
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    S, dim, self.token_hidden, self.channel_hidden, act, norm_layer, residual, outer_act,
                    rates[i], drop_path_rescale, permutation, layer_seeds(perm_seed, i, 2), **fk,
                )
                for i in range(depth)
            ]
        )
        self.norm = LayerNorm(dim, eps=ln_eps, **fk)
        self.head = nn.Linear(dim, num_classes, **fk) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights(init_mode, head_bias, seed=init_seed)

    # ---------------------------------------------------------------------------------------------- init
    def init_weights(self, mode: InitMode = "mixer", head_bias: float = 0.0, seed: int | None = None) -> None:
        """Re-initialise every parameter (see the module docstring for the modes).

        ``seed``: draw the weights from a generator seeded with it (the constructor's ``init_seed``), in module
        order; ``None`` draws from the global RNG.
        """
        if mode not in ("mixer", "jax", "gaussian"):
            raise ValueError(f"unknown init_mode {mode!r}; valid: mixer, jax, gaussian")
        g = init_generator(seed)
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, PermutedKronLinear):
                    if mode == "mixer":
                        draw_(m.weight, nn.init.xavier_uniform_, g)
                    elif mode == "jax":
                        draw_(m.weight, lecun_normal_, g)
                    else:
                        draw_(m.weight, nn.init.normal_, g, std=1.0 / math.sqrt(m.in_block))
                    if m.bias is not None:
                        draw_(m.bias, nn.init.normal_, g, std=1e-6) if mode == "mixer" else nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv2d):
                    draw_(m.weight, lecun_normal_, g)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear) and name == "head":
                    nn.init.zeros_(m.weight)
                    nn.init.constant_(m.bias, head_bias)


def _width(expansion: float, n: int, what: str) -> int:
    w = int(round(expansion * n))
    if w < 1:
        raise ValueError(f"{what} hidden width round({expansion} * {n}) = {w} < 1; raise {what}_expansion")
    return w


# ------------------------------------------------------------------------------------------------ registry
_S_MIXER = {"norm": False, "residual": False, "outer_act": True, "mixing_layers": 1}
_RP = {"permutation": "random"}


def _register(name: str, preset: dict[str, Any], doc: str) -> None:
    register_preset(name, MlpMixer, preset, doc)


_register("mixer", {}, "MLP-Mixer; sizes from keyword arguments (defaults: 32 px, patch 4, C=128, depth 8).")
_register("s_mixer", _S_MIXER, "S-Mixer (docs/theory.md (3)): no LayerNorm, no skip, one matrix per mixing step.")
_register("rp_mixer", _RP, "RP-Mixer: the Mixer with fixed random permutations around every mixing MLP.")
_register("rp_s_mixer", {**_S_MIXER, **_RP}, "RP S-Mixer: the S-Mixer with fixed random permutations.")

# Original Mixer widths (Tolstikhin et al., Table 1): C, depth, D_S, D_C. 224 px, 1000 classes.
_IMAGENET = {"image_size": 224, "in_chans": 3, "num_classes": 1000}
_SIZES = {
    "s": {"dim": 512, "depth": 8, "token_hidden": 256, "channel_hidden": 2048},
    "b": {"dim": 768, "depth": 12, "token_hidden": 384, "channel_hidden": 3072},
    "l": {"dim": 1024, "depth": 24, "token_hidden": 512, "channel_hidden": 4096},
}
_PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    f"mixer_{size}{patch}": ({**_IMAGENET, **_SIZES[size], "patch_size": patch}, f"Mixer-{size.upper()}/{patch}.")
    for size in ("s", "b", "l")
    for patch in (32, 16)
}
_PRESETS["mixer_b_w"] = (
    {**_IMAGENET, **_SIZES["b"], "patch_size": 14, "dim": 588},
    "Mixer-B-W (docs/theory.md E9): S = 256 (patch 14 on 224 px), C = 588, so m = S*C = 150,528 as in Mixer-B/16. "
    "Choice (the paper does not give them): D_S = 384, D_C = 3072 as in B/16, so Omega = m (D_S + D_C)/2 is "
    "exactly B/16's.",
)
_CIFAR = {"image_size": 32, "in_chans": 3, "num_classes": 10}
_PRESETS["mixer_cifar_nano"] = (
    {**_CIFAR, "patch_size": 4, "dim": 128, "depth": 8, "token_hidden": 64, "channel_hidden": 512},
    "CIFAR Mixer-nano (omihub777/MLP-Mixer-CIFAR): S = 64, C = 128, D_S = 64, D_C = 512, depth 8.",
)
_PRESETS["mixer_cifar_s64"] = (
    {**_CIFAR, "patch_size": 4, "dim": 64, "depth": 8, "token_expansion": 2.0, "channel_expansion": 2.0},
    "The widest Mixer at Omega = 2^19, gamma = 2 on CIFAR (docs/theory.md §3.6, E2): S = C = 64, depth 8.",
)
for _name, (_variant, _doc) in _PRESETS.items():
    _register(_name, _variant, _doc)
    _register("rp_" + _name, {**_variant, **_RP}, "RP twin of " + _doc)
