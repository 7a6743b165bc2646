"""Monarch matrices (Dao et al., ICML 2022) and the Mixer-Monarch correspondence (docs/theory.md (13), §3.8, §4.5).

A Monarch matrix is ``M = P L P^T R`` with ``R`` and ``L`` block-diagonal. On ``x = vec X`` (column-major,
``X`` of shape ``(p, k)``: ``k`` column blocks of length ``p``) the shapes are

* ``R = diag(R_0, ..., R_{k-1})``, blocks ``(q, p)``: ``Z[:, c] = R_c X[:, c]`` (the Mixer's token step),
* ``P^T = K_{q,k}`` turns ``vec Z`` into ``vec Z^T``,
* ``L = diag(L_0, ..., L_{q-1})``, blocks ``(s, k)``: row ``r`` of ``Z`` goes to ``L_r Z[r, :]^T`` (channel step),
* ``P = K_{s,q}`` turns the result back into ``vec Y`` with ``Y`` of shape ``(q, s)``,

so ``M[j*q + r, c*p + i] = L_r[j, c] R_c[r, i]`` with ``in_features = k*p`` and ``out_features = q*s``
(docs/theory.md §4.5). ``nblocks = k`` and ``out_blocks = q`` (default ``p``, square ``R`` blocks); at ``n = b^2`` and
``nblocks = b`` this is Dao et al.'s square Monarch and torch-structured's ``MonarchLinear(n, n, nblocks=b)``.

Tying every ``R_c = W`` and every ``L_r = V^T`` gives ``M = V^T ⊗ W``: the linear S-Mixer layer
``vec(W X V)`` (docs/theory.md (4), (13)), :class:`TiedMonarchLinear`. The effective matrix of either is dense
(every entry is one product ``L_r[j, c] R_c[r, i]``), so ``connections = in_features * out_features``;
``factor_connections`` counts the non-zeros of the two factors.

Other block counts follow this transpose form; fly/torch-structured's ``nblocks`` instead gives both factors
``nblocks`` blocks (a coarser ``L``), so the two agree only at ``nblocks = sqrt(n)``.

Both layers compute ``M x`` through :func:`widesparse.ops.monarch.monarch_multiply` (the speed routes: batched
matmuls with a hand-written backward, or grouped 1x1 convolutions on the float32 CPU route);
:func:`monarch_multiply_reference` is the plain einsum beside it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from widesparse.layers.base import StructuredLinear
from widesparse.linalg import commutation_matrix_dense
from widesparse.ops.monarch import monarch_multiply

__all__ = [
    "MonarchShape",
    "monarch_shape",
    "MonarchLinear",
    "TiedMonarchLinear",
    "monarch_multiply",
    "monarch_multiply_reference",
    "monarch_effective",
    "monarch_factors_dense",
    "project_monarch",
    "project_kron",
    "projection_error",
]


class MonarchShape(NamedTuple):
    """Block sizes: ``R`` has ``k`` blocks ``(q, p)``, ``L`` has ``q`` blocks ``(s, k)``; in ``k*p``, out ``q*s``."""

    k: int
    p: int
    q: int
    s: int


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def monarch_shape(in_features: int, out_features: int, nblocks: int, out_blocks: int | None = None) -> MonarchShape:
    """Validate and resolve the block sizes; errors name the numbers that do not divide."""
    for name, v in (("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"Monarch: {name} must be a positive integer, got {v!r}")
    if in_features % nblocks:
        raise ValueError(
            f"Monarch: nblocks={nblocks} does not divide in_features={in_features} "
            f"(the input is split into nblocks blocks of in_features/nblocks); valid nblocks: {_divisors(in_features)}"
        )
    p = in_features // nblocks
    q = p if out_blocks is None else out_blocks
    if isinstance(q, bool) or int(q) != q or q < 1:
        raise ValueError(f"Monarch: out_blocks must be a positive integer, got {out_blocks!r}")
    if out_features % q:
        what = f"out_blocks={q}" if out_blocks is not None else f"out_blocks={q} (default: in_features/nblocks)"
        raise ValueError(
            f"Monarch: {what} does not divide out_features={out_features}; pass out_blocks, one of "
            f"{_divisors(out_features)}"
        )
    return MonarchShape(int(nblocks), int(p), int(q), int(out_features // q))


# ------------------------------------------------------------------------------------------------ kernels
def monarch_multiply_reference(x: Tensor, weight_r: Tensor, weight_l: Tensor) -> Tensor:
    """Slow einsum reference of :func:`monarch_multiply` (the oracle beside the fast kernel)."""
    k, q, p = weight_r.shape
    s = weight_l.shape[1]
    z = torch.einsum("...ci,cri->...cr", x.reshape(*x.shape[:-1], k, p), weight_r)
    y = torch.einsum("...cr,rjc->...jr", z, weight_l)
    return y.reshape(*x.shape[:-1], s * q)


def monarch_effective(weight_r: Tensor, weight_l: Tensor) -> Tensor:
    """Dense ``M`` with ``M[j*q + r, c*p + i] = L_r[j, c] R_c[r, i]`` (closed form of ``P L P^T R``)."""
    k, q, p = weight_r.shape
    s = weight_l.shape[1]
    return torch.einsum("rjc,cri->jrci", weight_l, weight_r).reshape(s * q, k * p)


def monarch_factors_dense(weight_r: Tensor, weight_l: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four dense factors ``(P, L, P^T, R)`` of ``M = P L P^T R`` (docs/theory.md (13)); oracle only.

    ``R = diag(R_c)``, ``P^T = K_{q,k}``, ``L = diag(L_r)``, ``P = K_{s,q}`` (``= K_{q,k}^T`` when ``s = k``).
    """
    k, q, p = weight_r.shape
    s = weight_l.shape[1]
    dt = weight_r.dtype
    return (
        commutation_matrix_dense(s, q, dt).to(weight_r.device),
        torch.block_diag(*weight_l.unbind(0)),
        commutation_matrix_dense(q, k, dt).to(weight_r.device),
        torch.block_diag(*weight_r.unbind(0)),
    )


# ------------------------------------------------------------------------------------------------- layers
class _MonarchBase(StructuredLinear):
    """Shape handling, init and counts shared by the free and the tied layer (arguments: see MonarchLinear)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        *,
        out_blocks: int | None = None,
        bias: bool = True,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = monarch_shape(in_features, out_features, nblocks, out_blocks)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.nblocks, self.out_blocks = self.shape.k, self.shape.q
        self._make_parameters(bias, {"device": device, "dtype": dtype})
        self.reset_parameters(generator)

    def _make_parameters(self, bias: bool, fk: dict) -> None:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Each factor LeCun-uniform (so the effective weight has variance ``1/in_features``); zero biases."""
        self._init_uniform(self.weight_r, self.shape.p, generator)
        self._init_uniform(self.weight_l, self.shape.k, generator)
        for name, b in self.named_parameters(recurse=False):
            if name.startswith("bias"):
                nn.init.zeros_(b)

    @property
    def connections(self) -> int:
        """The effective matrix is dense: every entry is one product ``L_r[j, c] R_c[r, i]``."""
        return self.in_features * self.out_features

    @property
    def factor_connections(self) -> int:
        """Non-zeros of the block-diagonal factors ``R`` and ``L`` (``k q p + q s k``)."""
        k, p, q, s = self.shape
        return k * q * p + q * s * k

    def _init_uniform(self, t: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
        # LeCun-uniform per factor (variance 1/fan_in): the product has variance 1/in_features, as a dense layer
        bound = math.sqrt(3.0 / fan_in)
        with torch.no_grad():
            if t.device.type == "meta":
                return
            t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=generator))

    def extra_repr(self) -> str:
        k, p, q, s = self.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, R: {k} blocks {q}x{p}, "
            f"L: {q} blocks {s}x{k}"
        )


class MonarchLinear(_MonarchBase):
    """Free Monarch layer ``x -> P L P^T R x + b`` (Dao et al. 2022; docs/theory.md §4.5).

    Args:
        in_features, out_features: sizes of ``x`` and ``y``.
        nblocks: blocks ``k`` of ``R`` (must divide ``in_features``); ``p = in_features / nblocks``.
        out_blocks: blocks ``q`` of ``L`` (must divide ``out_features``); default ``p``.
        bias: a bias of length ``out_features``.
        generator: optional generator for a reproducible init.

    Parameters: ``weight_r`` ``(k, q, p)``, ``weight_l`` ``(q, s, k)``; ``2 n^1.5`` of them at ``n = b^2``,
    ``nblocks = b``.
    """

    def _make_parameters(self, bias: bool, fk: dict) -> None:
        k, p, q, s = self.shape
        self.weight_r = nn.Parameter(torch.empty(k, q, p, **fk))
        self.weight_l = nn.Parameter(torch.empty(q, s, k, **fk))
        self.bias = nn.Parameter(torch.empty(q * s, **fk)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return monarch_multiply(x, self.weight_r, self.weight_l, self.bias)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        dt = dtype or self.weight_r.dtype
        return monarch_effective(self.weight_r.detach().to(dt), self.weight_l.detach().to(dt))

    def effective_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        return None if self.bias is None else self.bias.detach().to(dtype or self.bias.dtype)

    @classmethod
    def from_dense(
        cls, weight: Tensor, nblocks: int, out_blocks: int | None = None, bias: Tensor | None = None
    ) -> MonarchLinear:
        """The Monarch layer nearest to ``weight`` in Frobenius norm (:func:`project_monarch`)."""
        wr, wl = project_monarch(weight, nblocks, out_blocks)
        fk = {"out_blocks": out_blocks, "bias": bias is not None, "device": weight.device, "dtype": weight.dtype}
        layer = cls(weight.shape[1], weight.shape[0], nblocks, **fk)
        with torch.no_grad():
            layer.weight_r.copy_(wr)
            layer.weight_l.copy_(wl)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer


class TiedMonarchLinear(_MonarchBase):
    """Monarch layer with tied blocks, ``M = V^T ⊗ W``: the linear S-Mixer layer ``vec(W X V)`` (docs/theory.md (13)).

    ``x = vec X`` with ``X`` of shape ``(S, C)``, ``S = in_features / nblocks``, ``C = nblocks``;
    ``W = weight_r`` ``(S', S)`` with ``S' = out_blocks`` (default ``S``), ``V^T = weight_l`` ``(C', C)``.
    With ``bias`` the map is ``vec((W X + b_r 1^T) V + 1 b_l^T)``: the S-Mixer's token bias ``bias_r`` (length
    ``S'``) and channel bias ``bias_l`` (length ``C'``).
    """

    def _make_parameters(self, bias: bool, fk: dict) -> None:
        k, p, q, s = self.shape
        self.weight_r = nn.Parameter(torch.empty(q, p, **fk))
        self.weight_l = nn.Parameter(torch.empty(s, k, **fk))
        self.bias_r = nn.Parameter(torch.empty(q, **fk)) if bias else None
        self.bias_l = nn.Parameter(torch.empty(s, **fk)) if bias else None

    @classmethod
    def from_factors(cls, W: Tensor, V: Tensor, bias: bool = False) -> TiedMonarchLinear:
        """The layer ``vec X -> vec(W X V)`` for ``W`` of shape ``(S', S)`` and ``V`` of shape ``(C, C')``."""
        (s_out, S), (C, c_out) = W.shape, V.shape
        layer = cls(S * C, s_out * c_out, C, out_blocks=s_out, bias=bias, device=W.device, dtype=W.dtype)
        with torch.no_grad():
            layer.weight_r.copy_(W)
            layer.weight_l.copy_(V.T)
        return layer

    @property
    def W(self) -> Tensor:
        """Token factor ``W`` ``(S', S)``."""
        return self.weight_r

    @property
    def V(self) -> Tensor:
        """Channel factor ``V`` ``(C, C')`` (``weight_l = V^T``)."""
        return self.weight_l.T

    def forward(self, x: Tensor) -> Tensor:
        k, p, q, s = self.shape
        if x.shape[-1] != k * p:
            raise ValueError(f"Monarch: input has {x.shape[-1]} features, the layer expects {k * p}")
        lead = x.shape[:-1]
        z = nn.functional.linear(x.reshape(-1, k, p), self.weight_r, self.bias_r)  # (B, C, S') = (W X + b 1^T)^T
        y = torch.matmul(self.weight_l, z)  # (B, C', S') = (Z V)^T, i.e. vec(Z V) row-major
        if self.bias_l is not None:
            y = y + self.bias_l[:, None].to(y.dtype)
        return y.reshape(*lead, s * q)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        dt = dtype or self.weight_r.dtype
        return torch.kron(self.weight_l.detach().to(dt), self.weight_r.detach().to(dt))

    def effective_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        if self.bias_r is None or self.bias_l is None:
            return None
        dt = dtype or self.bias_r.dtype
        br, bl, wl = self.bias_r.detach().to(dt), self.bias_l.detach().to(dt), self.weight_l.detach().to(dt)
        return (torch.outer(wl.sum(1), br) + bl[:, None]).reshape(-1)  # vec(b_r 1^T V + 1 b_l^T)

    @classmethod
    def from_dense(cls, weight: Tensor, nblocks: int, out_blocks: int | None = None) -> TiedMonarchLinear:
        """The nearest ``V^T ⊗ W`` to ``weight`` in Frobenius norm (:func:`project_kron`), no bias."""
        W, Vt = project_kron(weight, nblocks, out_blocks)
        return cls.from_factors(W, Vt.T)


# --------------------------------------------------------------------------------------------- projection
def _blocks_of(weight: Tensor, nblocks: int, out_blocks: int | None) -> tuple[MonarchShape, Tensor]:
    if weight.ndim != 2:
        raise ValueError(f"projection needs a matrix, got shape {tuple(weight.shape)}")
    shape = monarch_shape(weight.shape[1], weight.shape[0], nblocks, out_blocks)
    k, p, q, s = shape
    return shape, weight.reshape(s, q, k, p)  # [j, r, c, i] = M[j*q + r, c*p + i]


def _rank1(a: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-1 factors of a batch of matrices, the singular value split evenly: ``a ≈ u v^T``."""
    u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    root = sv[..., :1].sqrt()
    return u[..., :, 0] * root, vh[..., 0, :] * root


def project_monarch(weight: Tensor, nblocks: int, out_blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest Monarch matrix to ``weight`` in Frobenius norm: ``(weight_r, weight_l)`` (Dao et al. 2022).

    ``M[j*q + r, c*p + i] = L_r[j, c] R_c[r, i]``: the ``(s, p)`` slice of ``weight`` at ``(r, c)`` depends only on
    ``L_r[:, c]`` and ``R_c[r, :]``, so the best fit is a rank-1 SVD per slice; exact on Monarch matrices.
    """
    (k, p, q, s), m = _blocks_of(weight, nblocks, out_blocks)
    u, v = _rank1(m.permute(1, 2, 0, 3))  # slices (q, k, s, p) -> u (q, k, s), v (q, k, p)
    return v.permute(1, 0, 2).contiguous(), u.permute(0, 2, 1).contiguous()  # R (k, q, p), L (q, s, k)


def project_kron(weight: Tensor, nblocks: int, out_blocks: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest ``A ⊗ B`` to ``weight`` in Frobenius norm (Van Loan and Pitsianis): ``(W, V^T) = (B, A)``.

    Shapes as :class:`TiedMonarchLinear` (``W`` ``(q, p)``, ``V^T`` ``(s, k)``); the factors are balanced,
    ``||W||_F = ||V||_F`` (the smallest ``(||W||_F^2 + ||V||_F^2)/2`` of all factorisations, docs/theory.md (12)).
    """
    (k, p, q, s), m = _blocks_of(weight, nblocks, out_blocks)
    u, v = _rank1(m.permute(0, 2, 1, 3).reshape(s * k, q * p))  # rearranged: [(j, c), (r, i)] = A[j,c] B[r,i]
    return v.reshape(q, p), u.reshape(s, k)


def projection_error(
    weight: Tensor, nblocks: int, out_blocks: int | None = None, *, tied: bool = False, relative: bool = True
) -> float:
    """``||weight - proj(weight)||_F`` (divided by ``||weight||_F`` when ``relative``) onto Monarch or ``V^T ⊗ W``."""
    if tied:
        W, Vt = project_kron(weight, nblocks, out_blocks)
        approx = torch.kron(Vt, W)
    else:
        approx = monarch_effective(*project_monarch(weight, nblocks, out_blocks))
    err = torch.linalg.matrix_norm(weight - approx).item()
    if not relative:
        return err
    norm = torch.linalg.matrix_norm(weight).item()
    return err / norm if norm > 0 else 0.0
