"""Per-example permutations of an ``(S, C)`` token grid, as gathers on the Mixer's two memory layouts.

The RP-Mixer's ``J_1``/``J_2`` (PAPER.md §4.3) act on every example's row-major ``(S, C)`` positions. On the
batch-major layout ``(B, S, C)`` that is one gather along the flattened last axes; on the token-major layout
``(S, B, C)`` it needs the batch-major view, so the transposed copies are folded into as few passes as
measured possible. Every function is differentiable through a second gather with the inverse index (no
scatter-add).
"""

from __future__ import annotations

import torch
from torch import Tensor

from widesparse.linalg import gather_bits, permute_last, permute_with

__all__ = ["compose_gathers", "gather_sbc_to_bsc", "permute_bsc", "permute_sbc"]


def gather_sbc_to_bsc(x: Tensor, idx: Tensor, inv: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(S, B, C)`` -> ``(B, S*C)``, ``out[b, j] = x[idx[j] // C, b, idx[j] % C]``, cast to ``dtype`` on the way."""
    return _GatherFromSbc.apply(x, idx, inv, x.dtype if dtype is None else dtype)


class _GatherFromSbc(torch.autograd.Function):
    """``(S, B, C)`` tensor -> per-example gather of its row-major ``(S, C)`` positions, batch-major ``(B, S*C)``
    out; the cast to ``dtype`` and the transposed copy share one pass. Backward: one gather, one copy back."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, inv: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        S, B, C = x.shape
        ctx.save_for_backward(inv)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        t = torch.empty((B, S, C), dtype=dtype, device=x.device)
        t.copy_(x.transpose(0, 1))
        return gather_bits(t.view(B, S * C), 1, idx.expand(B, S * C))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        S, B, C = ctx.shape
        g = gather_bits(grad.contiguous(), 1, inv.expand(B, S * C)).view(B, S, C)
        out = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device)
        out.copy_(g.transpose(0, 1))
        return out, None, None, None


def _gather_sbc(x: Tensor, idx: Tensor) -> Tensor:
    """``y[s, b, c] = x[idx(s, c), b]`` per example on ``(S, B, C)``: one transposed copy in, the broadcast gather,
    one transposed copy out (the fastest route measured on CPU)."""
    S, B, C = x.shape
    y = gather_bits(x.transpose(0, 1).reshape(B, S * C), 1, idx.expand(B, S * C))
    return y.view(B, S, C).transpose(0, 1).contiguous()


def permute_sbc(x: Tensor, idx: Tensor, inv: Tensor | None) -> Tensor:
    """Per-example permutation of row-major ``(S, C)`` positions on an ``(S, B, C)`` tensor (one autograd node)."""
    return permute_with(x, idx, inv, _gather_sbc)


def permute_bsc(x: Tensor, idx: Tensor, inv: Tensor | None) -> Tensor:
    """The same permutation on a batch-major ``(B, S, C)`` tensor: one gather on the ``(B, S*C)`` view."""
    B, S, C = x.shape
    return permute_last(x.reshape(B, S * C), idx, inv).view(B, S, C)


def compose_gathers(first: Tensor | None, then: Tensor | None) -> Tensor | None:
    """The gather index of ``y = z[..., first]`` followed by ``y[..., then]`` (``None`` is the identity)."""
    if first is None or then is None:
        return then if first is None else first
    return first[then]
