"""The permuted-Kronecker (PK) layer ``x -> J_2 ((I_k ⊗ A) J_1 x + 1_k ⊗ b)`` of docs/theory.md (14).

``A`` is a small dense ``(p, q)`` matrix shared by ``k`` blocks. Two block arrangements:

* ``blocks="contiguous"``: ``I_k ⊗ A``. On ``x = vec X`` with ``X`` of shape ``(q, k)`` this is ``vec(A X)``:
  the Mixer's token mixing with ``k = C`` (docs/theory.md (5)).
* ``blocks="interleaved"``: ``A ⊗ I_k = K_{p,k} (I_k ⊗ A) K_{k,q}``. On ``x = vec X`` with ``X`` of shape
  ``(k, q)`` this is ``vec(X A^T)``: the Mixer's channel mixing with ``k = S`` and ``A = V^T`` (docs/theory.md (6)).

``J_1``/``J_2`` (``perm_in``/``perm_out``) are optional fixed permutations: ``None`` (identity), or random
(seeded, uniform, stored as persistent int64 buffers so they travel with the state dict): the RP-Mixer.
Loading a state dict checks them: a ``perm_in``/``perm_out`` that is not a permutation of ``arange(n)``, or one
given to a layer built without permutations, is refused with the buffer's key named.
Nothing here builds a Kronecker product; :meth:`effective_weight` does, for the oracle.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from widesparse.layers.base import StructuredLinear
from widesparse.linalg import (
    apply_identity_kron,
    apply_kron_identity,
    apply_perm,
    commutation_perm,
    compose_perms,
    invert_perm,
    kron_dense,
    random_perm,
)

__all__ = ["PermutedKronLinear", "PermSpec", "perm_problem"]

PermSpec = Literal["identity", "random"] | Tensor | None
Blocks = Literal["contiguous", "interleaved"]


class PermutedKronLinear(StructuredLinear):
    """``x -> J_2 (B J_1 x + bias)`` with ``B = I_k ⊗ A`` or ``A ⊗ I_k``, ``A`` of shape ``(out_block, in_block)``.

    Args:
        in_block: columns ``q`` of ``A``.
        out_block: rows ``p`` of ``A``.
        k: number of blocks (``in_features = k * q``, ``out_features = k * p``).
        bias: a bias of length ``p`` broadcast over the ``k`` blocks (effective bias ``1_k ⊗ b`` or ``b ⊗ 1_k``).
        blocks: ``"contiguous"`` (``I_k ⊗ A``) or ``"interleaved"`` (``A ⊗ I_k``).
        perm_in, perm_out: ``None``/``"identity"``, ``"random"`` or an index tensor (``(J x)[i] = x[perm[i]]``).
        seed: seed of the random permutations (``perm_in`` draws from ``(seed, 0)``, ``perm_out`` from
            ``(seed, 1)`` through NumPy's ``SeedSequence``: independent streams).
    """

    perm_in: Tensor | None
    perm_out: Tensor | None

    def __init__(
        self,
        in_block: int,
        out_block: int,
        k: int,
        *,
        bias: bool = True,
        blocks: Blocks = "contiguous",
        perm_in: PermSpec = None,
        perm_out: PermSpec = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_block", in_block), ("out_block", out_block), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"PermutedKronLinear: {name} must be a positive integer, got {v!r}")
        if blocks not in ("contiguous", "interleaved"):
            raise ValueError(f"blocks must be 'contiguous' or 'interleaved', got {blocks!r}")
        self.in_block, self.out_block, self.k, self.blocks = int(in_block), int(out_block), int(k), blocks
        self.in_features = self.k * self.in_block
        self.out_features = self.k * self.out_block
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_block, self.in_block, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_block, **factory)) if bias else None
        self.register_buffer("perm_in", _make_perm(perm_in, self.in_features, (seed, 0), device), persistent=True)
        self.register_buffer("perm_out", _make_perm(perm_out, self.out_features, (seed, 1), device), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init on the small factor ``A``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_block)
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuse a ``perm_in``/``perm_out`` that is no permutation of ``arange(n)`` of this layer's length, and one
        given to a layer without permutations (or ``None`` for one with), naming the key; nothing is loaded then."""
        problems = []
        for name, n in (("perm_in", self.in_features), ("perm_out", self.out_features)):
            key = prefix + name
            if key not in state_dict:
                continue
            value, mine = state_dict[key], getattr(self, name)
            if value is None and mine is None:
                continue
            if mine is None:
                problems.append(f"{key}: the state dict has a permutation but this layer has none (identity); "
                                "build the model with permutation='random' to load it")
            elif value is None:
                problems.append(f"{key}: the state dict has none (identity) but this layer has a permutation")
            else:
                problem = perm_problem(value, n)
                if problem is not None:
                    problems.append(f"{key}: {problem}")
        if problems:
            error_msgs.extend(problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """``J_2 (B J_1 x + bias)`` on ``x`` of shape ``(..., in_features)`` (docs/theory.md (14))."""
        x = apply_perm(x, self.perm_in)
        if self.blocks == "contiguous":
            y = apply_kron_identity(self.weight, x, self.k)
            if self.bias is not None:
                y = (y.unflatten(-1, (self.k, self.out_block)) + self.bias).flatten(-2)
        else:
            y = apply_identity_kron(self.weight, x, self.k)
            if self.bias is not None:
                y = (y.unflatten(-1, (self.out_block, self.k)) + self.bias[:, None]).flatten(-2)
        return apply_perm(y, self.perm_out)

    # the PK normal form ---------------------------------------------------------------------------------
    def canonical_perms(self) -> tuple[Tensor | None, Tensor | None]:
        """``(pi_1, pi_2)`` with this layer equal to ``J_2 (I_k ⊗ A) J_1 x`` + bias (docs/theory.md (14)).

        For interleaved blocks the commutations ``K_{k,q}`` and ``K_{p,k}`` are folded into the permutations.
        The bias then enters as ``J_2 (1_k ⊗ b)``: ``apply_perm(kron(ones(k), b), pi_2)``.
        """
        if self.blocks == "contiguous":
            return self.perm_in, self.perm_out
        dev = self.weight.device
        k_in = commutation_perm(self.k, self.in_block, dev)
        k_out = commutation_perm(self.out_block, self.k, dev)
        return compose_perms(k_in, self.perm_in), compose_perms(self.perm_out, k_out)

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        a = self.weight.detach().to(dtype or self.weight.dtype)
        eye = torch.eye(self.k, dtype=a.dtype, device=a.device)
        w = kron_dense(eye, a) if self.blocks == "contiguous" else kron_dense(a, eye)
        if self.perm_out is not None:
            w = w[self.perm_out]
        if self.perm_in is not None:
            w = w[:, invert_perm(self.perm_in)]
        return w

    def effective_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.detach().to(dtype or self.bias.dtype)
        ones = torch.ones(self.k, dtype=b.dtype, device=b.device)
        eb = kron_dense(ones, b) if self.blocks == "contiguous" else kron_dense(b, ones)
        return apply_perm(eb, self.perm_out)

    @property
    def connections(self) -> int:
        return self.k * self.out_block * self.in_block

    def extra_repr(self) -> str:
        rp = ", random perms" if self.perm_in is not None or self.perm_out is not None else ""
        return (
            f"A={self.out_block}x{self.in_block}, k={self.k}, blocks={self.blocks}, "
            f"effective={self.out_features}x{self.in_features}, bias={self.bias is not None}{rp}"
        )


def perm_problem(perm: object, n: int) -> str | None:
    """Why ``perm`` is not a permutation of ``arange(n)`` (``None`` where it is, or cannot be checked: meta)."""
    if not isinstance(perm, Tensor):
        return f"expected an index tensor, got {type(perm).__name__}"
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        return f"not an integer index tensor (dtype {perm.dtype})"
    if perm.dim() != 1:
        return f"shape {tuple(perm.shape)}, expected ({n},)"
    if perm.numel() != n:
        return f"length {perm.numel()}, expected {n}"
    if perm.is_meta or n == 0:
        return None
    if bool((perm < 0).any()) or bool((perm >= n).any()):
        return f"not a permutation of 0..{n - 1} (values outside 0..{n - 1})"
    if torch.unique(perm).numel() != n:
        return f"not a permutation of 0..{n - 1} (has duplicates)"
    return None


def _make_perm(spec: PermSpec, n: int, seed: tuple[int, int], device: torch.device | str | None) -> Tensor | None:
    if spec is None or (isinstance(spec, str) and spec == "identity"):
        return None
    if isinstance(spec, str):
        if spec != "random":
            raise ValueError(f"unknown permutation {spec!r}; valid: None, 'identity', 'random' or an index tensor")
        return random_perm(n, seed, device)
    perm = torch.as_tensor(spec, device=device)
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise ValueError(f"permutation must be an integer index tensor, got dtype {perm.dtype}")
    perm = perm.to(torch.long).clone()  # never alias the caller's tensor
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n, device=perm.device)):
        raise ValueError(f"permutation must be a rearrangement of arange({n}), got shape {tuple(perm.shape)}")
    return perm
