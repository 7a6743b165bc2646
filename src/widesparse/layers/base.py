"""The base of every structured layer: a linear map that can show the dense matrix it equals.

Modelled on HazyResearch/fly's ``StructuredLinear``: each layer computes with its own fast structure and
returns ``effective_weight()``, the dense ``(out_features, in_features)`` matrix it equals, as the oracle for
tests and for analysis (``widesparse.effective``, spectra). ``connections`` counts the structural non-zeros of
that matrix (the paper's connections, docs/theory.md §3.5-3.6).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StructuredLinear"]


class StructuredLinear(nn.Module):
    """A linear map ``x -> W_eff x + b_eff`` on vectors of length ``in_features``, stored in structured form."""

    in_features: int
    out_features: int

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense ``(out_features, in_features)`` matrix this layer equals (``dtype`` e.g. float64 for oracles).

        The default pushes the identity through :meth:`forward`; subclasses override it with a closed form.
        """
        dtype = dtype or self._param_dtype()
        with torch.no_grad():
            eye = torch.eye(self.in_features, dtype=dtype, device=self._param_device())
            out = self._forward_as(dtype, eye)
            bias = self.effective_bias(dtype)
            if bias is not None:
                out = out - bias
        return out.T.contiguous()

    def effective_bias(self, dtype: torch.dtype | None = None) -> Tensor | None:
        """Dense bias vector of length ``out_features`` (``None`` when the layer has none)."""
        return None

    @property
    def connections(self) -> int:
        """Number of structurally non-zero entries of the effective weight."""
        raise NotImplementedError

    @property
    def density(self) -> float:
        """``connections / (out_features * in_features)``."""
        return self.connections / (self.in_features * self.out_features)

    def dense_forward(self, x: Tensor) -> Tensor:
        """Oracle forward through the dense effective weight (slow; for tests)."""
        w = self.effective_weight(x.dtype)
        b = self.effective_bias(x.dtype)
        return nn.functional.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, connections={self.connections}"

    # helpers -------------------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def _param_device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _forward_as(self, dtype: torch.dtype, x: Tensor) -> Tensor:
        if dtype == self._param_dtype():
            return self(x)
        clone = _cast_copy(self, dtype)
        return clone(x)


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    clone = copy.deepcopy(module)
    return clone.to(dtype)
