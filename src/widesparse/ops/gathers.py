"""Per-example permutations of an ``(S, C)`` token grid, as gathers on the Mixer's two memory layouts.

The RP-Mixer's ``J_1``/``J_2`` (docs/theory.md §4.3) act on every example's row-major ``(S, C)`` positions. On
the batch-major layout ``(B, S, C)`` that is one gather along the flattened last axes; on the token-major layout
``(S, B, C)`` it needs the batch-major view, so the transposed copies are folded into as few passes as
possible. The gather indices come from :mod:`widesparse.ops.tables`. Every function is differentiable through
a second gather with the inverse index (no scatter-add).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from widesparse.linalg import invert_perm
from widesparse.ops.cpu_kernels import permute_columns, take_columns

__all__ = [
    "compose_gathers",
    "gather_bits",
    "gather_sbc_to_bsc",
    "permute_bsc",
    "permute_last",
    "permute_sbc",
    "permute_with",
]


Gather = Callable[[Tensor, Tensor], Tensor]


def gather_bits(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``torch.gather(x, dim, index)``; 16-bit floats are moved as int16 (pure data movement, the same bits), whose
    integer gather kernel is faster than the bfloat16 one on CPU.

    Under ``torch.compile`` on the CPU it is one opaque call of that kernel: Inductor would otherwise fuse the
    gather into the neighbouring LayerNorm and GELU kernels as scalar indirect loads, which made the compiled
    RP-Mixer step slower than eager.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return _opaque_gather(x, dim, index)
    return _gather_bits(x, dim, index)


def _gather_bits(x: Tensor, dim: int, index: Tensor) -> Tensor:
    if x.dim() == 2 and dim in (1, -1) and index.dim() == 2 and index.shape[0] == x.shape[0] and index.stride(0) == 0:
        # one index broadcast over the rows (the permutations): the compiled column gather, where it is built
        out = take_columns(x, index[0])
        if out is not None:
            return out
    if x.dtype in (torch.bfloat16, torch.float16):
        return torch.gather(x.view(torch.int16), dim, index).view(x.dtype)
    return torch.gather(x, dim, index)


@torch.library.custom_op("widesparse::gather", mutates_args=())
def _opaque_gather(x: Tensor, dim: int, index: Tensor) -> Tensor:
    return _gather_bits(x, dim, index)


@_opaque_gather.register_fake
def _(x: Tensor, dim: int, index: Tensor) -> Tensor:
    return x.new_empty(index.shape)


def _gather_last(x: Tensor, idx: Tensor) -> Tensor:
    # torch.gather with a broadcast (expanded, not copied) index: faster on CPU than index_select on the last
    # dimension, whose strided column copies are cache-unfriendly.
    return gather_bits(x, -1, idx.expand(*x.shape[:-1], idx.numel()))


class _Permute(torch.autograd.Function):
    """``gather(x, perm)`` whose backward is ``gather(grad, inv)`` (a second gather, not a scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor, gather: Gather) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        ctx.gather = gather
        return gather(x, perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return ctx.gather(grad.contiguous(), inv), None, None, None


def permute_with(x: Tensor, perm: Tensor, inv: Tensor | None, gather: Gather) -> Tensor:
    """A permutation applied by ``gather(x, perm)``, differentiable through ``gather(grad, inv)``.

    ``gather`` must be linear in ``x`` and ``gather(gather(x, perm), inv) == x``; it picks the memory route (e.g.
    the Mixer's ``(S, B, C)`` layout in :mod:`widesparse.ops.mixer`).
    """
    return _Permute.apply(x, perm, invert_perm(perm) if inv is None else inv, gather)


def permute_last(x: Tensor, perm: Tensor, inv: Tensor | None = None) -> Tensor:
    """``x[..., perm]`` for a permutation ``perm`` (``inv`` its inverse, computed if not given).

    Same values as :func:`apply_perm`; the backward pass is a second gather, not the scatter-add autograd
    uses for general indexing (several times faster on CPU). On the CPU it is one compiled autograd function where
    :mod:`widesparse.ops.cpu_kernels` is built (:func:`~widesparse.ops.cpu_kernels.permute_columns`).
    """
    inv = invert_perm(perm) if inv is None else inv
    out = permute_columns(x, perm, inv)
    return permute_with(x, perm, inv, _gather_last) if out is None else out


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
    one transposed copy out (the fastest route on CPU)."""
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
