"""The product ``P L P^T R x + b`` of a Monarch matrix (docs/theory.md §4.5, (13)) on its fast routes.

Two batched matmuls with the batch as the innermost axis: the input is read in place, every ``bmm`` writes a
contiguous result and so takes the batched-GEMM path (a strided ``out=``, as fly and torch-structured use, makes
CPU ``bmm`` loop over the blocks), and the output and the incoming gradient each cost one transpose; the backward
pass is hand-written in the same layout (first derivatives only). On the float32 CPU route of
:mod:`widesparse.ops.matmul` the two factors run as grouped 1x1 convolutions (oneDNN) instead. Under autocast the
product runs in the ambient autocast dtype. ``widesparse.layers.monarch.monarch_multiply_reference`` is the einsum
every route is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from widesparse.ops.matmul import autocast_dtype, use_onednn

__all__ = ["monarch_multiply"]


class _MonarchMultiply(torch.autograd.Function):
    """``y = P L P^T R x + b``: ``x`` ``(B, k*p)``, ``R`` ``(k, q, p)``, ``L`` ``(q, s, k)``, ``b`` ``(q*s,)``/None."""

    @staticmethod
    def forward(ctx, x: Tensor, wr: Tensor, wl: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        B = x.shape[0]
        k, q, p = wr.shape
        s = wl.shape[1]
        z = torch.bmm(wr, x.view(B, k, p).permute(1, 2, 0))  # (k, q, B); x blocks read as transposed slices
        if bias is None:
            y = torch.bmm(wl, z.transpose(0, 1))  # (q, s, B): row r of Z through L_r, batch innermost
        else:  # the bias rides in the second GEMM: y[r, j, :] += b[j*q + r]
            y = torch.baddbmm(bias.view(s, q).t().unsqueeze(-1).expand(q, s, B), wl, z.transpose(0, 1))
        ctx.save_for_backward(x, wr, wl, z)
        ctx.has_bias = bias is not None
        return y.transpose(0, 1).reshape(s * q, B).t().contiguous()  # out[b, j*q + r] = y[r, j, b]

    @staticmethod
    @once_differentiable  # z was computed without a graph: a second derivative would be silently wrong
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, wr, wl, z = ctx.saved_tensors
        B = x.shape[0]
        k, q, p = wr.shape
        s = wl.shape[1]
        dyt = dy.t().contiguous().view(s, q, B)  # the one transpose of the backward pass
        dx = dwr = dwl = db = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dyt.sum(-1).view(s * q)
        dyt = dyt.transpose(0, 1)  # (q, s, B)
        if ctx.needs_input_grad[2]:
            dwl = torch.bmm(dyt, z.transpose(0, 1).transpose(1, 2))  # (q, s, k)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dz = torch.bmm(wl.transpose(1, 2), dyt).transpose(0, 1)  # (k, q, B)
            if ctx.needs_input_grad[1]:
                dwr = torch.bmm(dz, x.view(B, k, p).transpose(0, 1))  # (k, q, p)
            if ctx.needs_input_grad[0]:
                dx = torch.bmm(dz.transpose(1, 2), wr).transpose(0, 1).reshape(B, k * p)
        return dx, dwr, dwl, db


def monarch_multiply(x: Tensor, weight_r: Tensor, weight_l: Tensor, bias: Tensor | None = None) -> Tensor:
    """``P L P^T R x + b`` on the last dimension of ``x`` (any leading shape), by two batched matmuls.

    ``weight_r``: ``(k, q, p)`` blocks of ``R``; ``weight_l``: ``(q, s, k)`` blocks of ``L``; ``bias``: ``(q*s,)``
    or None. Under autocast the operands are cast to the ambient autocast dtype (never a hard-coded one) and the
    kernel runs in it.
    """
    k, q, p = weight_r.shape
    if weight_l.shape[0] != q or weight_l.shape[2] != k:
        raise ValueError(f"Monarch: L blocks {tuple(weight_l.shape)} do not fit R blocks {tuple(weight_r.shape)}")
    if x.shape[-1] != k * p:
        raise ValueError(f"Monarch: input has {x.shape[-1]} features, the layer expects k*p = {k}*{p} = {k * p}")
    lead, s = x.shape[:-1], weight_l.shape[1]
    # under autocast (never for float64 inputs, which autocast leaves alone) every operand goes to the dtype a
    # linear map would compute in, so the two GEMMs below run in it
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        dt = autocast_dtype(x)
        x, weight_r, weight_l = x.to(dt), weight_r.to(dt), weight_l.to(dt)
        bias = None if bias is None else bias.to(dt)
    x2 = x.reshape(-1, k * p).contiguous()
    if use_onednn(x2, q) and weight_r.dtype == weight_l.dtype == x2.dtype:
        return _monarch_grouped_conv(x2, weight_r, weight_l, bias).reshape(*lead, q * s)
    with torch.autocast(x.device.type, enabled=False):
        y = _MonarchMultiply.apply(x2, weight_r, weight_l, bias)
    return y.reshape(*lead, q * s)


def _monarch_grouped_conv(x: Tensor, wr: Tensor, wl: Tensor, bias: Tensor | None) -> Tensor:
    """The float32 CPU route: ``R`` and ``L`` as grouped 1x1 convolutions over the rows of ``x`` (oneDNN, see
    :mod:`widesparse.ops.matmul`), with one transposed copy for ``P^T`` and one for ``P``: faster forward +
    backward than the batched matmuls there (benchmarks/bench_monarch.py). Plain autograd."""
    B = x.shape[0]
    k, q, p = wr.shape
    s = wl.shape[1]
    img = x.view(1, B, 1, k * p).permute(0, 3, 1, 2)  # (1, k*p, B, 1) channels-last: rows are the batch
    z = F.conv2d(img, wr.reshape(k * q, p, 1, 1), groups=k)  # channels-last (1, k*q, B, 1), i.e. (B, k, q)
    zt = z.permute(0, 2, 3, 1).reshape(B, k, q).transpose(1, 2).contiguous()  # P^T: (B, q, k)
    img = zt.view(1, B, 1, q * k).permute(0, 3, 1, 2)
    b = None if bias is None else bias.view(s, q).t().reshape(-1)  # y[b, r, j] takes bias[j*q + r]
    y = F.conv2d(img, wl.reshape(q * s, k, 1, 1), b, groups=q)  # (B, q, s)
    return y.permute(0, 2, 3, 1).reshape(B, q, s).transpose(1, 2).reshape(B, s * q)  # P: out[b, j*q + r]
