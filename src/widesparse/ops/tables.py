"""Gather tables of a vec-space permutation on the Mixer's storage layouts, derived on demand and cached.

A permutation ``pi`` of ``vec X`` (column-major, docs/theory.md §2; ``(J x)[i] = x[pi[i]]``) of an ``(S, C)``
token grid acts on the row-major storage of ``X`` (the ``(B, S*C)`` view of ``(B, S, C)``) as one gather with
``idx[s*C + c] = rowmajor(pi[s + c*S])``; the RP-Mixer's ``J_1``/``J_2`` (docs/theory.md §4.3) run as such
gathers. :func:`perm_tables` derives every index the executors of :mod:`widesparse.ops.mixer` need, with
inverses (the gathers' backward), straight from the permutation buffer.

The tables are never stored beside the buffer (a copy could go stale); they are cached here, keyed on the
buffer's identity, ``data_ptr()``, version counter (bumped by every in-place edit and by ``load_state_dict``'s
``copy_``), device and grid shape. While ``torch.compile`` traces, and for inference tensors (no version
counter), they are computed afresh each call: a few index operations on ``S*C`` integers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from widesparse.linalg import invert_perm, vec_positions, vec_to_rowmajor

__all__ = ["PermTables", "perm_tables", "clear_cache"]


class PermTables(NamedTuple):
    """``(idx, inv)`` pairs of one vec-space permutation on an ``(S, C)`` grid, for gathers on ``(B, S*C)`` views.

    * ``rm``: row-major source, row-major target (``(B, S, C)`` in and out).
    * ``to_cm``: row-major source, channel-major ``(B, C, S)`` target (``J_1`` before token mixing over the
      channel-major storage: it writes its targets in ``(c, s)`` order).
    * ``from_cm``: channel-major source, row-major target (``J_2`` after it: it reads its sources in that order).
    """

    rm: tuple[Tensor, Tensor]
    to_cm: tuple[Tensor, Tensor]
    from_cm: tuple[Tensor, Tensor]


def compute_tables(perm: Tensor, rows: int, cols: int) -> PermTables:
    """The tables of ``perm`` (length ``rows * cols``) without the cache."""
    idx = vec_to_rowmajor(perm[vec_positions(rows, cols, device=perm.device)], rows, cols)
    to_cm = idx.view(rows, cols).t().reshape(-1)
    from_cm = (idx % cols) * rows + torch.div(idx, cols, rounding_mode="floor")
    return PermTables((idx, invert_perm(idx)), (to_cm, invert_perm(to_cm)), (from_cm, invert_perm(from_cm)))


# id(perm) -> (weak reference to perm, {stamp: tables}); an entry dies with its tensor
_CACHE: dict[int, tuple[weakref.ref, dict[tuple, PermTables]]] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def drop(ref: weakref.ref) -> None:
        slot = _CACHE.get(key)
        if slot is not None and slot[0] is ref:
            del _CACHE[key]

    return drop


def perm_tables(perm: Tensor, rows: int, cols: int) -> PermTables:
    """:class:`PermTables` of ``perm``, from the cache while the buffer is unchanged (see the module docstring)."""
    if torch.compiler.is_compiling() or perm.is_inference():
        return compute_tables(perm, rows, cols)
    key = id(perm)
    slot = _CACHE.get(key)
    if slot is None or slot[0]() is not perm:
        slot = (weakref.ref(perm, _forget(key)), {})
        _CACHE[key] = slot
    stamp = (perm.data_ptr(), perm._version, perm.device, rows, cols)
    tables = slot[1].get(stamp)
    if tables is None:
        for old in [s for s in slot[1] if s[:3] != stamp[:3]]:  # the buffer changed: its old tables are stale
            del slot[1][old]
        with torch.inference_mode(False):  # normal tensors: a later forward may save them for backward
            tables = slot[1][stamp] = compute_tables(perm, rows, cols)
    return tables


def clear_cache() -> None:
    """Drop every cached table (they are rebuilt on the next forward)."""
    _CACHE.clear()
