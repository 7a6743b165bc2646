"""Structured linear layers; each returns the dense matrix it equals via ``effective_weight()``."""

from widesparse.layers.base import StructuredLinear
from widesparse.layers.kron import PermutedKronLinear
from widesparse.layers.monarch import MonarchLinear, TiedMonarchLinear
from widesparse.layers.sparse import MaskedLinear, SparseLinear

__all__ = [
    "StructuredLinear",
    "PermutedKronLinear",
    "MonarchLinear",
    "TiedMonarchLinear",
    "MaskedLinear",
    "SparseLinear",
]
