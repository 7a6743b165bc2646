"""Seeded random masks of the SW-MLP's sparse layers, sampled straight into CSR form (docs/theory.md §4.2).

A mask of an ``(out_features, in_features)`` layer is ``"bernoulli"`` (i.i.d. Bernoulli(p) entries, the paper's;
rows may be empty) or ``"fan_in"`` (exactly ``k = max(1, round(p * in))`` connections per output row, or
``fan_in=k``). The same ``seed`` gives the same mask (a ``torch.Generator`` of its own, apart from the weights').
:func:`mask_indices` returns its CSR ``(crow_indices, col_indices)``, :func:`indices_to_mask` the dense ``bool``
matrix, :func:`init_std` the weight scale that goes with it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["MaskKind", "InitRule", "mask_row_counts", "mask_indices", "indices_to_mask", "init_std"]

MaskKind = Literal["bernoulli", "fan_in"]
InitRule = Literal["golubeva", "plain"]
INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------------------------------ masks
def check_layer_args(in_features: int, out_features: int, density: float, mask: str, init: str) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(density, bool) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if mask not in ("bernoulli", "fan_in"):
        raise ValueError(f"unknown mask {mask!r}; valid: 'bernoulli', 'fan_in'")
    if init not in ("golubeva", "plain"):
        raise ValueError(f"unknown init {init!r}; valid: 'golubeva', 'plain'")


def resolve_fan_in(in_features: int, density: float, mask: str, fan_in: int | None) -> int | None:
    if fan_in is None:
        return max(1, round(density * in_features)) if mask == "fan_in" else None
    if mask != "fan_in":
        raise ValueError(f"fan_in={fan_in!r} needs mask='fan_in' (got mask={mask!r})")
    if isinstance(fan_in, bool) or int(fan_in) != fan_in or not 1 <= fan_in <= in_features:
        raise ValueError(
            f"fixed fan-in {fan_in!r} is invalid: need 1 <= fan_in <= in_features = {in_features} "
            "(fan_in 0 would leave every output row with no connection)"
        )
    return int(fan_in)


def mask_row_counts(
    out_features: int, in_features: int, density: float, mask: MaskKind = "bernoulli", seed: int = 0,
    fan_in: int | None = None,
) -> Tensor:
    """Connections per output row (int64): Binomial(in, p) for ``"bernoulli"``, ``k`` for ``"fan_in"``.

    The first draw of the mask's generator, so the count (and ``connections``) is known without sampling columns.
    """
    return _counts(out_features, in_features, density, mask, seed, fan_in)[0]


def _counts(o: int, n: int, density: float, mask: str, seed: int, fan_in: int | None) -> tuple[Tensor, torch.Generator]:
    check_layer_args(n, o, density, mask, "golubeva")
    k, g = resolve_fan_in(n, density, mask, fan_in), torch.Generator().manual_seed(int(seed))
    if k is not None:
        return torch.full((o,), k, dtype=torch.int64), g
    trials = torch.full((o,), float(n), dtype=torch.float64)
    return torch.binomial(trials, torch.full_like(trials, float(density)), generator=g).long(), g


def mask_indices(
    out_features: int, in_features: int, density: float, mask: MaskKind = "bernoulli", seed: int = 0,
    fan_in: int | None = None,
) -> tuple[Tensor, Tensor]:
    """CSR ``(crow_indices, col_indices)`` of a seeded random mask, columns sorted within rows.

    Row counts come from :func:`mask_row_counts`; each row's columns are then a uniform subset of that size,
    sampled without ever forming the dense ``out x in`` matrix: draw with replacement, redraw the duplicates until
    none remain (the result is invariant under column permutations, hence uniform); rows denser than 1/2 draw
    their complement instead. Cost O(connections log connections). Index dtype: int32 where it fits, else int64.
    """
    counts, g = _counts(out_features, in_features, density, mask, seed, fan_in)
    n_in = int(in_features)
    comp = counts > n_in // 2
    draw = torch.where(comp, n_in - counts, counts)
    rows = torch.repeat_interleave(torch.arange(out_features), draw)
    keys = _unique_per_row(rows, n_in, g)
    if bool(comp.any()):
        dense = comp[:, None].expand(out_features, n_in).clone()  # complement rows start full, others empty
        dense[keys // n_in, keys % n_in] = ~dense[keys // n_in, keys % n_in]
        keys = dense.flatten().nonzero().squeeze(1)
    crow = torch.zeros(out_features + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    cols = keys % n_in
    itype = torch.int32 if max(int(crow[-1]), out_features, in_features) <= INT32_MAX else torch.int64
    return crow.to(itype), cols.to(itype)


def _unique_per_row(rows: Tensor, n: int, g: torch.Generator) -> Tensor:
    """Sorted keys ``row * n + col`` with distinct uniform columns per row (rows given with multiplicity)."""
    keys = torch.from_numpy(np.sort((rows * n + torch.randint(n, rows.shape, generator=g)).numpy()))
    dup = torch.zeros(keys.shape, dtype=torch.bool)
    dup[1:] = keys[1:] == keys[:-1]
    redraw_rows = keys[dup] // n  # one redraw per surplus copy, in the same row
    if redraw_rows.numel() == 0:
        return keys
    keys = keys[~dup]
    accepted = keys.new_empty(0)
    while redraw_rows.numel():  # few entries: check them against keys and the accepted ones by binary search
        new = torch.sort(redraw_rows * n + torch.randint(n, redraw_rows.shape, generator=g)).values
        clash = _contains(keys, new) | _contains(accepted, new)
        clash[1:] |= new[1:] == new[:-1]
        accepted = torch.sort(torch.cat([accepted, new[~clash]])).values
        redraw_rows = new[clash] // n
    merged = torch.empty(keys.numel() + accepted.numel(), dtype=keys.dtype)  # merge two sorted arrays, O(nnz)
    merged[torch.searchsorted(accepted, keys) + torch.arange(keys.numel())] = keys
    merged[torch.searchsorted(keys, accepted) + torch.arange(accepted.numel())] = accepted
    return merged


def _contains(sorted_keys: Tensor, q: Tensor) -> Tensor:
    if sorted_keys.numel() == 0:
        return torch.zeros(q.shape, dtype=torch.bool)
    pos = torch.searchsorted(sorted_keys, q).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == q


def indices_to_mask(crow: Tensor, col: Tensor, out_features: int, in_features: int) -> Tensor:
    """Dense ``bool`` mask ``(out, in)`` of CSR indices."""
    rows = torch.repeat_interleave(torch.arange(out_features, device=crow.device), crow.long().diff())
    m = torch.zeros(out_features, in_features, dtype=torch.bool, device=crow.device)
    m[rows, col.long()] = True
    return m


def init_std(in_features: int, density: float, rule: InitRule = "golubeva", fan_in: int | None = None) -> float:
    """Init std: ``1/sqrt(in * p)`` (``1/sqrt(k)`` for fixed fan-in ``k``) for ``"golubeva"``, ``1/sqrt(in)`` else."""
    if rule == "plain":
        return 1.0 / math.sqrt(in_features)
    if rule != "golubeva":
        raise ValueError(f"unknown init {rule!r}; valid: 'golubeva', 'plain'")
    return 1.0 / math.sqrt(fan_in if fan_in is not None else in_features * density)


def check_indices(crow: Tensor, col: Tensor, out_features: int, in_features: int) -> None:
    if crow.shape != (out_features + 1,) or col.ndim != 1:
        raise ValueError(
            f"CSR indices of an ({out_features}, {in_features}) mask need crow of shape ({out_features + 1},) and a "
            f"1-D col; got {tuple(crow.shape)} and {tuple(col.shape)}"
        )
    c, k = crow.long(), col.long()
    if c[0] != 0 or c[-1] != k.numel() or bool((c.diff() < 0).any()):
        raise ValueError(f"crow must rise from 0 to nnz = {k.numel()}, got {c[0].item()} .. {c[-1].item()}")
    if k.numel() and (k.min() < 0 or k.max() >= in_features):
        raise ValueError(f"column indices must lie in [0, {in_features}), got {k.min().item()} .. {k.max().item()}")
    rows = torch.repeat_interleave(torch.arange(out_features, device=c.device), c.diff())
    key = rows * in_features + k
    if k.numel() > 1 and bool((key.diff() <= 0).any()):
        raise ValueError("column indices must be strictly increasing within each row (sorted, no duplicates)")
