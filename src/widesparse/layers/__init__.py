"""Structured linear layers; each returns the dense matrix it equals via ``effective_weight()``."""

from widesparse.layers.base import StructuredLinear
from widesparse.layers.kron import PermutedKronLinear

__all__ = ["StructuredLinear", "PermutedKronLinear"]
