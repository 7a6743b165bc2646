"""Building blocks of the Mixer family: patch embedding, mixing MLPs (plain or randomly permuted), blocks.

Mixing MLPs hold their linear maps as :class:`~widesparse.layers.PermutedKronLinear` layers, so every mixing
weight can show its dense effective matrix on ``vec X`` (column-major, PAPER.md §2), while the forward pass
computes in the natural ``(B, S, C)`` layout: token mixing is a linear map over the token axis, channel mixing a
linear map over the channel axis, and the RP-Mixer's permutations ``J_1``/``J_2`` are one gather each on the
row-major storage (PAPER.md §4.3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from widesparse.layers import PermutedKronLinear
from widesparse.layers.norm import LayerNorm
from widesparse.layers.activation import ACT_LAYERS, GELU, resolve_act_layer
from widesparse.layers.drop import DropPath, drop_path_rates
from widesparse.layers.init import lecun_normal_
from widesparse.layers.patch_embed import PatchEmbed, to_2tuple
from widesparse.linalg import invert_perm, vec_positions, vec_to_rowmajor
from widesparse.ops.cpu_kernels import permute_add, permuted_layer_norm
from widesparse.ops.gathers import gather_sbc_to_bsc, permute_last
from widesparse.ops.matmul import (
    autocast_dtype,
    autocast_input,
    cpu_low_precision,
    linear_first,
    linear_last,
    use_onednn,
)

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
    """One mixing step over the token or the channel axis of ``X`` (B, S, C).

    ``hidden=None``: a single matrix (the S-Mixer's theory form, PAPER.md (3)); otherwise ``fc1 -> act -> fc2``
    with ``hidden`` units. ``permutation="random"`` puts fixed random ``J_1`` on the input vec and ``J_2`` on
    the output vec (RP-Mixer, PAPER.md §4.3); ``"identity"`` is the plain Mixer.

    Effective weights on ``vec X``: token ``fc`` = ``J (I_C ⊗ W)``, channel ``fc`` = ``J (W ⊗ I_S)`` where ``W`` is
    ``fc.weight`` (so ``W = V^T`` in the paper's ``X V`` notation).
    """

    idx_in: Tensor | None
    idx_out: Tensor | None
    inv_in: Tensor | None
    inv_out: Tensor | None

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
        for name in ("idx_in", "idx_out", "inv_in", "inv_out", "idx_in_t", "idx_out_t", "inv_in_t", "inv_out_t"):
            self.register_buffer(name, None, persistent=False)
        self.refresh_gather_indices()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def layers(self) -> list[PermutedKronLinear]:
        """The structured linear maps in order (one or two)."""
        return [self.fc1] if self.fc2 is None else [self.fc1, self.fc2]

    def refresh_gather_indices(self) -> None:
        """Turn the vec-space permutations into single gathers on row-major storage (after init or load).

        Both axes compute in the ``(B, S, C)`` layout, so ``unvec(vec(X)[pi])`` is ``X.flatten(1)[:, idx]`` with
        ``idx[s*C + c] = rowmajor(pi[s + c*S])``.
        """
        S, C = self.num_tokens, self.dim
        p_in, p_out = self.layers[0].perm_in, self.layers[-1].perm_out
        vp = vec_positions(S, C, device=self.fc1.weight.device)
        self.idx_in = None if p_in is None else vec_to_rowmajor(p_in[vp], S, C)
        self.idx_out = None if p_out is None else vec_to_rowmajor(p_out[vp], S, C)
        self.inv_in = None if self.idx_in is None else invert_perm(self.idx_in)
        self.inv_out = None if self.idx_out is None else invert_perm(self.idx_out)
        # token mixing over channel-major (B, C, S) storage: J_1 writes its targets in (c, s) order, J_2 reads its
        # sources from that order
        self.idx_in_t = self.idx_out_t = None
        if self.axis == "token" and self.idx_in is not None:
            self.idx_in_t = self.idx_in.view(S, C).t().reshape(-1)
        if self.axis == "token" and self.idx_out is not None:
            self.idx_out_t = (self.idx_out % C) * S + self.idx_out // C
        self.inv_in_t = None if self.idx_in_t is None else invert_perm(self.idx_in_t)
        self.inv_out_t = None if self.idx_out_t is None else invert_perm(self.idx_out_t)

    def _linear(self, h: Tensor, layer: PermutedKronLinear) -> Tensor:
        if self.axis == "token":  # W @ X on (B, S, C) as a 1x1 convolution: no transposed copies (measured faster)
            return F.conv1d(h, layer.weight.unsqueeze(-1), layer.bias)
        return linear_last(h, layer.weight, layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, None)

    def _forward(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if self.idx_in is not None:
            x = autocast_input(x)  # J_1 then gathers bf16
        token_last = self._token_last(x)
        B, S, C = x.shape
        if self.idx_in is None:
            h = x.transpose(1, 2).contiguous() if token_last else x
        else:
            h = permute_last(x.reshape(B, S * C), *self._input_gather(token_last))
        return self._after_input(h, x.shape, token_last, residual)

    def forward_from_norm(self, x: Tensor, norm: nn.Module, residual: Tensor | None = None) -> Tensor:
        """``self(norm(x))``, plus ``residual`` where given. In the RP-Mixer on the CPU, compiled passes join its
        permutations to their neighbours (:mod:`widesparse.ops.cpu_kernels`): LayerNorm and ``J_1`` in bf16 (step
        0.914x -> 0.928x of the Mixer's in an A/B), ``J_2`` and the residual add in bf16 and float32."""
        if self._forward_hooks or self._forward_pre_hooks:  # hooks see the module called
            y = self(norm(x))
            return y if residual is None else residual + y
        if self.idx_in is not None and x.dim() == 3 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            token_last = self._token_last(x)
            h = None
            if isinstance(norm, LayerNorm) and tuple(norm.normalized_shape) == (x.shape[-1],):
                h = permuted_layer_norm(x, norm.weight, norm.bias, norm.eps, *self._input_gather(token_last))
            if h is not None:
                return self._after_input(h, x.shape, token_last, residual)
        return self._forward(norm(x), residual)

    def _token_last(self, x: Tensor) -> bool:
        """Whether token mixing runs over channel-major ``(B, C, S)`` storage (:meth:`_after_input`). Against the
        1x1 convolution over ``(B, S, C)``: float32 CPU route (:mod:`widesparse.ops.matmul`), products 1.5x faster
        forward + backward; bf16 on the CPU, the whole Mixer step 1.07x. ``J_1``/``J_2`` gather straight into and
        out of that storage, so the RP-Mixer pays no transposed copy; the plain Mixer pays one each way."""
        return self.axis == "token" and (use_onednn(x, self.fc1.weight.shape[0]) or cpu_low_precision(x))

    def _input_gather(self, token_last: bool) -> tuple[Tensor, Tensor]:
        """``J_1`` as ``(idx, inv)`` on the ``(B, S*C)`` view: into channel-major storage where ``token_last``."""
        return (self.idx_in_t, self.inv_in_t) if token_last else (self.idx_in, self.inv_in)

    def _after_input(self, h: Tensor, shape: torch.Size, token_last: bool, residual: Tensor | None = None) -> Tensor:
        """The rest of :meth:`forward` after ``J_1`` (or the transposed copy): ``h`` holds ``(B, C, S)`` storage
        where ``token_last``, else ``(B, S, C)``; ``residual`` is added to the output (with ``J_2`` where it can)."""
        B, S, C = shape
        if token_last:
            h = self.forward_inner(h.view(B, C, S), last=True)
            idx, inv = self.idx_out_t, self.inv_out_t
            if idx is None:
                y = h.transpose(1, 2).contiguous()
        else:
            h = self.forward_inner(h.view(B, S, C))
            idx, inv = self.idx_out, self.inv_out
            if idx is None:
                y = h
        if idx is not None:
            out = None if residual is None else permute_add(h, idx, inv, residual)
            if out is not None:
                return out
            y = permute_last(h.reshape(B, S * C), idx, inv).view(B, S, C)
        return y if residual is None else residual + y

    def forward_inner(self, x: Tensor, sbc: bool = False, last: bool = False) -> Tensor:
        """``fc1 -> act -> fc2`` without ``J_1``/``J_2`` (:func:`sublayer_chain` applies them, composed).

        ``sbc``: ``x`` is token-major ``(S, B, C)``; ``last``: the mixed axis is ``x``'s last one."""
        lin = self._linear_last if last else self._linear_sbc if sbc else self._linear
        h = lin(x, self.fc1)
        return h if self.fc2 is None else lin(self.act(h), self.fc2)

    @staticmethod
    def _linear_last(h: Tensor, layer: PermutedKronLinear) -> Tensor:
        return linear_last(h, layer.weight, layer.bias)

    def _linear_sbc(self, h: Tensor, layer: PermutedKronLinear) -> Tensor:
        if self.axis == "token":  # W @ X for all examples at once: one product on the (S, B*C) view, bias fused
            S, B, C = h.shape
            return linear_first(layer.weight, h.reshape(S, B * C), layer.bias).view(-1, B, C)
        return linear_last(h, layer.weight, layer.bias)

    def forward_sbc(self, x: Tensor) -> Tensor:
        """:meth:`forward` on the token-major layout ``(S, B, C)``: the same values, no transposed copies.

        Token mixing becomes a single ``(D_S, S) @ (S, B*C)`` matrix product and channel mixing stays a
        ``(S*B, C) @ (C, D_C)`` one. RP permutations are gathers on the batch-major ``(B, S*C)`` view: ``J_1``
        casts, transposes and gathers in two passes, and channel mixing runs between ``J_1`` and ``J_2`` in
        that layout, so the channel sublayer transposes only on its way in and out.
        """
        if self.idx_in is None and self.idx_out is None:
            return self.forward_inner(x, sbc=True)
        S, B, C = x.shape
        token = self.axis == "token"
        h = x
        if self.idx_in is not None:
            # fc1 casts anyway: cast in the same pass
            h = gather_sbc_to_bsc(x, self.idx_in, self.inv_in, autocast_dtype(x)).view(B, S, C)
            if token:  # the token GEMM wants (S, B*C)
                h = h.transpose(0, 1).contiguous()
        # channel mixing takes any row order of (tokens x examples, C): it stays batch-major after J_1
        batch_major = self.idx_in is not None and not token
        h = self.forward_inner(h, sbc=not batch_major)
        if self.idx_out is None:
            return h.transpose(0, 1).contiguous() if batch_major else h
        flat = h.reshape(B, S * C) if batch_major else h.transpose(0, 1).reshape(B, S * C)
        # contiguous: a residual add of mixed dtypes over a strided operand measured 2x slower than this copy + add
        return permute_last(flat, self.idx_out, self.inv_out).view(B, S, C).transpose(0, 1).contiguous()


def _refresh_after_load(module: MixingMlp, _incompatible: object) -> None:
    module.refresh_gather_indices()


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
    """Token mixing then channel mixing (PAPER.md (1)-(2)); S-Mixer form with ``norm=False, residual=False``.

    Mixer: ``U = X + MLP_tok(LN(X))``, ``Y = U + MLP_ch(LN(U))``. S-Mixer (PAPER.md (3)): ``H = act(mix_tok(X))``,
    ``Y = act(mix_ch(H))`` (``outer_act=True``, no LN, no skip).
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

    def _step(self, x: Tensor, norm: nn.Module, mlp: Callable[[Tensor], Tensor], batch_dim: int = 0) -> Tensor:
        plain_residual = self.act is None and self.residual and not isinstance(self.drop_path, DropPath)
        if isinstance(mlp, MixingMlp) and plain_residual:
            return mlp.forward_from_norm(x, norm, residual=x)  # the residual add may join J_2
        y = mlp.forward_from_norm(x, norm) if isinstance(mlp, MixingMlp) else mlp(norm(x))
        if self.act is not None:
            y = self.act(y)
        if not self.residual:
            return y
        return x + (self.drop_path(y, batch_dim) if isinstance(self.drop_path, DropPath) else y)

    def forward_sbc(self, x: Tensor) -> Tensor:
        """:meth:`forward` on the token-major layout ``(S, B, C)`` (LayerNorm is over ``C`` in both layouts)."""
        x = self._step(x, self.norm1, self.mlp_tokens.forward_sbc, 1)
        return self._step(x, self.norm2, self.mlp_channels.forward_sbc, 1)
