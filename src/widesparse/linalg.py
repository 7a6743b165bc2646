"""Column-major vectorisation, commutation permutations and Kronecker products applied without building them.

Conventions (docs/theory.md §2):

* ``vec`` is column-major: ``X[s, c]`` of an ``(S, C)`` matrix goes to position ``s + c * S``.
* A permutation ``J`` is stored as an index tensor ``pi`` over positions with ``(J x)[i] = x[pi[i]]``,
  i.e. ``J = I[pi]`` and ``J^T x = x[argsort(pi)]``.
* The commutation matrix ``K_{m,n}`` maps ``vec(A)`` to ``vec(A^T)`` for ``A`` of shape ``(m, n)``;
  ``J_c = K_{S,C}``.

Everything that acts on vectors works on batches (leading dimensions) and never materialises a Kronecker
product. Dense matrices exist only in the functions whose names end in ``_dense``: they are the oracle
for tests and analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "vec",
    "unvec",
    "commutation_perm",
    "commutation_matrix_dense",
    "perm_matrix_dense",
    "invert_perm",
    "compose_perms",
    "apply_perm",
    "random_perm",
    "is_identity_perm",
    "kron_dense",
    "apply_kron_identity",
    "apply_identity_kron",
    "apply_permuted_kron",
    "permuted_kron_dense",
    "vec_positions",
    "vec_to_rowmajor",
]


def vec(x: Tensor) -> Tensor:
    """Column-major vectorisation of the last two dims: ``(..., S, C) -> (..., S*C)``."""
    s, c = x.shape[-2:]
    return x.transpose(-1, -2).reshape(*x.shape[:-2], s * c)


def unvec(x: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec`: ``(..., rows*cols) -> (..., rows, cols)``."""
    if x.shape[-1] != rows * cols:
        raise ValueError(f"unvec: last dimension {x.shape[-1]} != rows*cols = {rows}*{cols} = {rows * cols}")
    return x.reshape(*x.shape[:-1], cols, rows).transpose(-1, -2)


def commutation_perm(m: int, n: int, device: torch.device | str | None = None) -> Tensor:
    """Index form of ``K_{m,n}``: ``K_{m,n} x == x[..., commutation_perm(m, n)]`` (maps vec(A) to vec(A^T))."""
    if m < 1 or n < 1:
        raise ValueError(f"commutation_perm needs positive sizes, got m={m}, n={n}")
    return torch.arange(m * n, device=device).reshape(n, m).T.reshape(-1)


def perm_matrix_dense(perm: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense permutation matrix ``J = I[perm]`` (so that ``J @ x == x[perm]``). Oracle only."""
    n = perm.numel()
    return torch.eye(n, dtype=dtype, device=perm.device)[perm]


def commutation_matrix_dense(m: int, n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Dense ``K_{m,n}`` of shape ``(mn, mn)``. Oracle only: use :func:`commutation_perm` in code."""
    return perm_matrix_dense(commutation_perm(m, n), dtype)


def invert_perm(perm: Tensor) -> Tensor:
    """Index of ``J^T = J^{-1}``: ``x[perm][invert_perm(perm)] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def compose_perms(*perms: Tensor | None) -> Tensor | None:
    """Index of the product ``J_1 J_2 ... J_k`` (applied right to left); ``None`` stands for the identity.

    ``apply_perm(x, compose_perms(a, b)) == apply_perm(apply_perm(x, b), a)``.
    """
    out: Tensor | None = None
    for p in perms:
        if p is None:
            continue
        # (J_out J_p) x = (J_p x)[out] = x[p[out]]
        out = p if out is None else p[out]
    return out


def apply_perm(x: Tensor, perm: Tensor | None) -> Tensor:
    """``J x`` on the last dimension (a gather); ``None`` is the identity."""
    if perm is None:
        return x
    if perm.numel() != x.shape[-1]:
        raise ValueError(f"permutation of length {perm.numel()} applied to vectors of length {x.shape[-1]}")
    return x[..., perm]


def random_perm(n: int, seed: int | Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """A uniform random permutation from a dedicated generator (independent of the global RNG).

    ``seed`` may be a sequence of ints (e.g. ``(model_seed, layer, role)``): it is mixed by NumPy's
    ``SeedSequence``, so nearby seeds give independent streams.
    """
    entropy = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1))
    return torch.randperm(n, generator=g).to(device)


def is_identity_perm(perm: Tensor | None) -> bool:
    """True when ``perm`` is ``None`` or ``arange(n)``."""
    return perm is None or bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device)))


def kron_dense(a: Tensor, b: Tensor) -> Tensor:
    """Dense Kronecker product ``a ⊗ b``. Oracle only."""
    return torch.kron(a.contiguous(), b.contiguous())  # torch.kron rejects some non-contiguous inputs


def apply_kron_identity(a: Tensor, x: Tensor, k: int) -> Tensor:
    """``(I_k ⊗ A) x`` for ``A`` of shape ``(p, q)`` and ``x`` of shape ``(..., k*q)``: k diagonal blocks."""
    p, q = a.shape
    if x.shape[-1] != k * q:
        raise ValueError(f"(I_k ⊗ A) x: x has length {x.shape[-1]} but k*q = {k}*{q} = {k * q}")
    y = x.reshape(*x.shape[:-1], k, q) @ a.transpose(0, 1)
    return y.reshape(*x.shape[:-1], k * p)


def apply_identity_kron(a: Tensor, x: Tensor, k: int) -> Tensor:
    """``(A ⊗ I_k) x`` for ``A`` of shape ``(p, q)`` and ``x`` of shape ``(..., q*k)``.

    With ``k = S`` and ``A = V^T`` this is channel mixing ``vec(X V) = (V^T ⊗ I_S) vec X`` (docs/theory.md (6)).
    """
    p, q = a.shape
    if x.shape[-1] != q * k:
        raise ValueError(f"(A ⊗ I_k) x: x has length {x.shape[-1]} but q*k = {q}*{k} = {q * k}")
    y = a @ x.reshape(*x.shape[:-1], q, k)
    return y.reshape(*x.shape[:-1], p * k)


def apply_permuted_kron(
    a: Tensor, x: Tensor, k: int, perm_in: Tensor | None = None, perm_out: Tensor | None = None
) -> Tensor:
    """``J_2 (I_k ⊗ A) J_1 x`` (docs/theory.md (14)) by gather, batched matmul, gather."""
    return apply_perm(apply_kron_identity(a, apply_perm(x, perm_in), k), perm_out)


def permuted_kron_dense(a: Tensor, k: int, perm_in: Tensor | None = None, perm_out: Tensor | None = None) -> Tensor:
    """Dense ``J_2 (I_k ⊗ A) J_1``. Oracle only."""
    m = kron_dense(torch.eye(k, dtype=a.dtype, device=a.device), a)
    if perm_out is not None:
        m = m[perm_out]
    if perm_in is not None:
        m = m[:, invert_perm(perm_in)]
    return m


def vec_positions(rows: int, cols: int, device: torch.device | str | None = None) -> Tensor:
    """``v`` with ``v[r * cols + c] = r + c * rows``: the vec position of each row-major entry of a matrix."""
    return torch.arange(rows * cols, device=device).reshape(cols, rows).T.reshape(-1)


def vec_to_rowmajor(idx: Tensor, rows: int, cols: int) -> Tensor:
    """Map vec (column-major) positions of a ``(rows, cols)`` matrix to its row-major storage positions.

    ``vec(X)[..., idx] == X.reshape(..., rows * cols)[..., vec_to_rowmajor(idx, rows, cols)]``.
    """
    return (idx % rows) * cols + torch.div(idx, rows, rounding_mode="floor")
