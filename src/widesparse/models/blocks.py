"""Building blocks of the Mixer family: mixing MLPs (plain or randomly permuted) and the Mixer block.

A mixing MLP holds its linear maps as :class:`~widesparse.layers.PermutedKronLinear` layers and its forward is the
math on ``x = vec X`` (column-major, docs/theory.md §2): token mixing ``(I_C ⊗ W)`` (docs/theory.md (5)), channel
mixing ``(V^T ⊗ I_S)`` (6), each layer a PK map ``J_2 (I_k ⊗ A) J_1`` (14) whose permutations are the RP-Mixer's
(docs/theory.md §4.3). A block is (1)-(2) or, without LayerNorm and skips, the S-Mixer's (3). The model runs the
same values on faster memory layouts through :mod:`widesparse.ops.route` (see :meth:`MixerBlock.mixing_specs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

from widesparse.layers import PermutedKronLinear
from widesparse.layers.activation import ACT_LAYERS, GELU, resolve_act_layer
from widesparse.layers.drop import DropPath, drop_path_rates
from widesparse.layers.init import lecun_normal_
from widesparse.layers.norm import LayerNorm
from widesparse.layers.patch_embed import PatchEmbed, to_2tuple
from widesparse.linalg import unvec, vec
from widesparse.ops.route import MlpSpec, SublayerSpec, hooked

# (the parts are re-exported: models and outside scripts import them from here)
__all__ = [
    "PatchEmbed",
    "DropPath",
    "MixingMlp",
    "MixerBlock",
    "resolve_act_layer",
    "ACT_LAYERS",
    "to_2tuple",
    "drop_path_rates",
    "lecun_normal_",
    "TwoSublayerBlock",
]


class MixingMlp(nn.Module):
    """One mixing step over the token or the channel axis of ``X`` (B, S, C): ``unvec(fc2(act(fc1(vec X))))``.

    ``hidden=None``: a single matrix, ``unvec(fc1(vec X))`` (the S-Mixer's theory form, docs/theory.md (3));
    otherwise ``fc1 -> act -> fc2`` with ``hidden`` units. ``permutation="random"`` puts fixed random ``J_1`` on
    the input vec (``fc1.perm_in``) and ``J_2`` on the output vec (the last layer's ``perm_out``): the RP-Mixer,
    docs/theory.md §4.3; ``"identity"`` is the plain Mixer.

    Effective weights on ``vec X``: token ``fc`` = ``J (I_C ⊗ W)``, channel ``fc`` = ``J (W ⊗ I_S)`` where ``W`` is
    ``fc.weight`` (so ``W = V^T`` in the paper's ``X V`` notation).
    """

    def __init__(
        self,
        axis: Literal["token", "channel"],
        num_tokens: int,
        dim: int,
        hidden: int | None,
        act_layer: Callable[[], nn.Module] = GELU,
        permutation: Literal["identity", "random"] = "identity",
        seed: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
        if permutation not in ("identity", "random"):
            raise ValueError(f"permutation must be 'identity' or 'random', got {permutation!r}")
        self.axis, self.num_tokens, self.dim = axis, num_tokens, dim
        n, k = (num_tokens, dim) if axis == "token" else (dim, num_tokens)
        blocks = "contiguous" if axis == "token" else "interleaved"
        perm = None if permutation == "identity" else "random"
        kw = {"blocks": blocks, "device": device, "dtype": dtype}
        if hidden is None:
            self.fc1 = PermutedKronLinear(n, n, k, perm_in=perm, perm_out=perm, seed=seed, **kw)
            self.act = None
            self.fc2 = None
        else:
            if int(hidden) != hidden or hidden < 1:
                raise ValueError(f"{axis} hidden width must be a positive integer, got {hidden!r}")
            self.fc1 = PermutedKronLinear(n, int(hidden), k, perm_in=perm, seed=seed, **kw)
            self.act = act_layer()
            self.fc2 = PermutedKronLinear(int(hidden), n, k, perm_out=perm, seed=seed, **kw)

    @property
    def layers(self) -> list[PermutedKronLinear]:
        """The structured linear maps in order (one or two)."""
        return [self.fc1] if self.fc2 is None else [self.fc1, self.fc2]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, S, C) -> (B, S, C)``: the layers' own forwards on ``vec X`` (docs/theory.md (5), (6), (14))."""
        h = self.fc1(vec(x))
        if self.fc2 is not None:
            h = self.fc2(self.act(h))
        return unvec(h, self.num_tokens, self.dim)

    def spec(self) -> MlpSpec:
        """This MLP for the executors of :mod:`widesparse.ops.mixer`: its factors, ``J_1``, ``J_2``; ``module`` set
        (so it is called) where it or a part has hooks, or a permutation sits between its layers."""
        layers = self.layers
        inner = any(f.perm_out is not None for f in layers[:-1]) or any(f.perm_in is not None for f in layers[1:])
        called = inner or hooked(self) or any(m is not None and hooked(m) for m in self._modules.values())
        return MlpSpec(self.axis, self.num_tokens, self.dim, tuple(f.weight for f in layers),
                       tuple(f.bias for f in layers), self.act, layers[0].perm_in, layers[-1].perm_out,
                       self if called else None)


class TwoSublayerBlock(nn.Module):
    """A block of two mixing sublayers: ``_step(x, norm1, mlp_tokens)`` then ``_step(x, norm2, mlp_channels)``."""

    norm1: nn.Module
    norm2: nn.Module
    mlp_tokens: nn.Module
    mlp_channels: nn.Module

    def _step(self, x: Tensor, norm: nn.Module, mlp: Callable[[Tensor], Tensor]) -> Tensor:
        raise NotImplementedError

    def forward_token(self, x: Tensor) -> Tensor:
        """The first sublayer, at the Mixer's token-mixing position (its output is one intermediate feature)."""
        return self._step(x, self.norm1, self.mlp_tokens)

    def forward_channel(self, x: Tensor) -> Tensor:
        """The second sublayer, at the Mixer's channel-mixing position."""
        return self._step(x, self.norm2, self.mlp_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_channel(self.forward_token(x))


class MixerBlock(TwoSublayerBlock):
    """Token mixing then channel mixing on ``X`` (B, S, C).

    Mixer (docs/theory.md (1)-(2)): ``U = X + MLP_tok(LN(X))``, ``Y = U + MLP_ch(LN(U))``, with stochastic depth
    (``drop_path``) on each branch. S-Mixer (docs/theory.md (3)), ``norm_layer=None, residual=False,
    outer_act=True``: ``H = act(mix_tok(X))``, ``Y = act(mix_ch(H))``.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        token_hidden: int | None,
        channel_hidden: int | None,
        act_layer: Callable[[], nn.Module] = GELU,
        norm_layer: Callable[[int], nn.Module] | None = None,
        residual: bool = True,
        outer_act: bool = False,
        drop_path: float = 0.0,
        drop_path_rescale: bool = True,
        permutation: Literal["identity", "random"] = "identity",
        seeds: tuple[int, int] = (0, 0),
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.residual = residual
        self.norm1 = norm_layer(dim, **fk) if norm_layer is not None else nn.Identity()
        mk = {"act_layer": act_layer, "permutation": permutation, **fk}
        self.mlp_tokens = MixingMlp("token", num_tokens, dim, token_hidden, seed=seeds[0], **mk)
        self.norm2 = norm_layer(dim, **fk) if norm_layer is not None else nn.Identity()
        self.mlp_channels = MixingMlp("channel", num_tokens, dim, channel_hidden, seed=seeds[1], **mk)
        self.act = act_layer() if outer_act else None
        self.drop_path = DropPath(drop_path, drop_path_rescale) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.residual:  # docs/theory.md (1)-(2)
            u = x + self.drop_path(self._outer(self.mlp_tokens(self.norm1(x))))
            return u + self.drop_path(self._outer(self.mlp_channels(self.norm2(u))))
        h = self._outer(self.mlp_tokens(self.norm1(x)))  # docs/theory.md (3)
        return self._outer(self.mlp_channels(self.norm2(h)))

    def _outer(self, y: Tensor) -> Tensor:
        return y if self.act is None else self.act(y)

    def _step(self, x: Tensor, norm: nn.Module, mlp: Callable[[Tensor], Tensor]) -> Tensor:
        """One sublayer of :meth:`forward` (``forward_token``/``forward_channel``)."""
        y = self._outer(mlp(norm(x)))
        return x + self.drop_path(y) if self.residual else y

    def mixing_specs(self) -> tuple[SublayerSpec, SublayerSpec] | None:
        """The two sublayers for the executors of :mod:`widesparse.ops.mixer` (the router,
        :func:`widesparse.ops.route.choose_route`, picks one per forward); ``None`` where the block has hooks of
        its own (it is then called)."""
        if hooked(self):
            return None
        return self._spec(self.norm1, self.mlp_tokens), self._spec(self.norm2, self.mlp_channels)

    def _spec(self, norm: nn.Module, mlp: MixingMlp) -> SublayerSpec:
        plain_norm = not hooked(norm)
        ln = None
        if (plain_norm and isinstance(norm, LayerNorm) and tuple(norm.normalized_shape) == (mlp.dim,)
                and norm.weight is not None and norm.bias is not None):
            ln = (norm.weight, norm.bias, norm.eps)
        drop = self.drop_path if isinstance(self.drop_path, DropPath) else None
        return SublayerSpec(mlp.spec(), None if plain_norm and isinstance(norm, nn.Identity) else norm, ln,
                            self.act, self.residual, drop)
