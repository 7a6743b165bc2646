"""Gram matrices, U-centring and full-batch linear CKA (docs/theory.md §4.4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from widesparse.ops.matmul import linear_last, use_onednn  # imports nothing of the package

F64 = torch.float64


def _flat(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{what}: a 0-d tensor has no example dimension")
    if x.is_complex():
        raise TypeError(f"{what}: complex features are not supported")
    return x.reshape(x.shape[0], -1)


def gram_matrices(
    feats: Sequence[Tensor],
    dtype: torch.dtype = F64,
    blocks: int = 4,
    center: bool = True,
    buffers: dict[Any, Tensor] | None = None,
) -> Tensor:
    """Linear Grams ``K_l = X_l X_l^T`` of per-layer features ``(n, ...)``, as one ``(L, n, n)`` tensor in ``dtype``.

    Layers of equal width are stacked (into ``buffers``, reused across calls when given) and multiplied in one
    batched product of which only the lower block triangle is computed (``blocks`` row blocks:
    ``(blocks + 1) / (2 blocks)`` of the FLOPs) and mirrored. ``center`` subtracts each layer's minibatch mean
    first: ``K^U`` is unchanged (U-centring removes every ``a 1^T + 1 b^T`` term, which is all a feature shift
    adds) but float32 Grams lose no digits to large feature means.
    """
    xs = [_flat(x, f"layer {i}") for i, x in enumerate(feats)]
    if not xs:
        raise ValueError("gram_matrices: no feature tensors given")
    n, dev = xs[0].shape[0], xs[0].device
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.shape[1], []).append(i)
    out = None if len(groups) == 1 else torch.empty(len(xs), n, n, dtype=dtype, device=dev)
    for width, idx in groups.items():
        shape = (len(idx), n, width)
        key = (shape, dtype, dev)
        stack = None if buffers is None else buffers.get(key)
        if stack is None:
            stack = torch.empty(shape, dtype=dtype, device=dev)
            if buffers is not None:
                buffers[key] = stack
        torch.stack([xs[i] for i in idx], out=stack)
        if center:  # mean and rank-1 subtraction as batched BLAS calls (cheaper than elementwise kernels here)
            ones = stack.new_ones(len(idx), n, 1)
            stack.baddbmm_(ones, torch.bmm(ones.mT, stack).div_(n), alpha=-1.0)
        g = _sym_gram(stack, blocks)
        if out is None:
            return g
        out[idx] = g
    assert out is not None
    return out


def _sym_gram(s: Tensor, blocks: int) -> Tensor:
    """``s @ s^T`` for a stack ``(g, n, p)``: block column ``j`` is ``s[:, lo_j:] @ s[:, lo_j:hi_j]^T``, mirrored."""
    g, n, _ = s.shape
    b = max(1, min(int(blocks), n // 32))
    if b == 1:
        return _bmm_nt(s, s)
    edges = [round(k * n / b) for k in range(b + 1)]
    out = s.new_empty(g, n, n)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        col = _bmm_nt(s[:, lo:], s[:, lo:hi])  # rows lo.., columns lo..hi
        out[:, lo:, lo:hi] = col
        if hi < n:
            out[:, lo:hi, hi:] = col[:, hi - lo :].mT
    return out


def _bmm_nt(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` per stack entry; float32 on the CPU through oneDNN (:mod:`widesparse.ops.matmul`: faster
    than the batched MKL product on AMD CPUs, see docs/speed.md), else one ``bmm``."""
    if use_onednn(a[0], b.shape[1]) and b.dtype == a.dtype:
        return torch.stack([linear_last(x, y) for x, y in zip(a, b, strict=True)])
    return torch.bmm(a, b.mT)


def u_center(gram: Tensor, inplace: bool = False) -> Tensor:
    """U-centred Gram matrices ``(..., n, n)`` in float64 (docs/theory.md §4.4; a copy unless ``inplace`` and the input
    is float64 already); needs ``n >= 4``. Row sums and the rank-2 correction are batched BLAS products."""
    n = gram.shape[-1]
    k = (
        gram
        if inplace and gram.dtype == F64 and gram.is_contiguous()
        else gram.to(F64, memory_format=torch.contiguous_format, copy=True)
    )
    k.diagonal(dim1=-2, dim2=-1).zero_()
    flat = k.view(-1, n, n)
    ones = k.new_ones(flat.shape[0], n, 1)
    r = torch.bmm(flat, ones).div_(n - 2)  # row sums of K~ / (n - 2)
    r -= r.sum(dim=1, keepdim=True) / (2 * (n - 1))
    flat.baddbmm_(torch.cat([r, ones], dim=2), torch.cat([ones, r], dim=2).mT, alpha=-1.0)  # K - r 1^T - 1 r^T
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> float:
    """Full-batch linear CKA of ``(n, ...)`` features (Kornblith et al. 2019), in float64.

    ``debiased=False``: ``<HKH, HLH> / (||HKH|| ||HLH||)``; ``debiased=True``: the same with U-centred Grams,
    i.e. unbiased HSIC_1 in every term (docs/theory.md §4.4).
    """
    a, b = _flat(x, "x").to(F64), _flat(y, "y").to(F64)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"linear_cka: x has {n} examples, y has {b.shape[0]}; rows must be the same examples")
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka: n={n} examples; need n >= {4 if debiased else 2} (debiased={debiased})")
    for name, t in (("x", a), ("y", b)):
        if not torch.isfinite(t).all():
            raise ValueError(f"linear_cka: {name} contains NaN or Inf")
    if debiased:
        k, l_ = u_center(a @ a.T), u_center(b @ b.T)
    else:
        a, b = a - a.mean(0), b - b.mean(0)
        k, l_ = a @ a.T, b @ b.T
    kk, ll = (k * k).sum(), (l_ * l_).sum()
    if kk <= 0 or ll <= 0:
        raise ValueError(f"linear_cka: constant features (HSIC(K,K)={float(kk):.3g}, HSIC(L,L)={float(ll):.3g})")
    return float((k * l_).sum() / torch.sqrt(kk * ll))
