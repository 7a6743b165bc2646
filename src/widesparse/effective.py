"""The effective expression, executable: a Mixer-family model as the explicit wide MLP it equals.

On ``x = vec X`` (column-major, width ``m = S*C``) every mixing step of a Mixer is a dense layer of an ordinary
MLP (docs/theory.md (8)-(9)): token mixing ``I_C ⊗ W`` (density 1/C), channel mixing
``V^T ⊗ I_S = J_c^T (I_S ⊗ V^T) J_c`` (density 1/S), RP-Mixers with their permutations folded in. LayerNorm acts
in matrix form (unvec -> LN over channels -> vec) and the residual stream is ``vec X`` itself.

:func:`to_wide_mlp` materialises those dense matrices from each layer's ``effective_weight()`` (nothing else of
a layer is used) and returns a :class:`WideMLP` that reproduces the model's logits; :func:`describe` reports
widths, densities and connections without materialising anything.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor, nn

from widesparse.layers import StructuredLinear
from widesparse.linalg import kron_dense, unvec, vec

__all__ = [
    "WideMLP",
    "WideStep",
    "ModelTooLargeError",
    "to_wide_mlp",
    "check_materialisable",
    "dense_bytes",
    "describe",
    "LayerReport",
    "ModelReport",
    "format_report",
    "token_mixing_effective",
    "channel_mixing_effective",
]

DEFAULT_MAX_BYTES = 4 * 2**30


class ModelTooLargeError(ValueError):
    """Raised when the dense effective matrices would not fit the allowed memory."""


def token_mixing_effective(w: Tensor, C: int) -> Tensor:
    """Dense ``I_C ⊗ W`` (docs/theory.md (5)): token mixing ``vec(W X)`` for ``W`` of shape ``(S', S)``. Oracle only."""
    return kron_dense(torch.eye(C, dtype=w.dtype, device=w.device), w)


def channel_mixing_effective(v: Tensor, S: int) -> Tensor:
    """Dense ``V^T ⊗ I_S`` (docs/theory.md (6)): channel mixing ``vec(X V)`` for ``V`` of shape ``(C, C')``.

    Oracle only."""
    return kron_dense(v.T, torch.eye(S, dtype=v.dtype, device=v.device))


class WideStep(nn.Module):
    """One mixing step as dense layers on ``vec X``: ``x -> x + L_k(act(...L_1(vec LN(unvec x))))``."""

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        linears: list[nn.Linear],
        act: nn.Module | None,
        outer_act: nn.Module | None,
        norm: nn.Module | None,
        residual: bool,
    ) -> None:
        super().__init__()
        self.num_tokens, self.dim, self.residual = num_tokens, dim, residual
        self.norm = norm if norm is not None else nn.Identity()
        self.linears = nn.ModuleList(linears)
        self.act = act
        self.outer_act = outer_act

    def forward(self, x: Tensor) -> Tensor:
        h = vec(self.norm(unvec(x, self.num_tokens, self.dim)))
        for i, lin in enumerate(self.linears):
            if i > 0:
                h = self.act(h)
            h = lin(h)
        if self.outer_act is not None:
            h = self.outer_act(h)
        return x + h if self.residual else h


class WideMLP(nn.Module):
    """The explicit wide MLP a Mixer-family model equals: stem -> vec -> dense steps -> LN -> token mean -> head."""

    def __init__(self, stem: nn.Module, steps: list[WideStep], norm: nn.Module, head: nn.Module, S: int, C: int):
        super().__init__()
        self.stem, self.steps, self.norm, self.head = stem, nn.ModuleList(steps), norm, head
        self.num_tokens, self.dim = S, C

    @property
    def width(self) -> int:
        """The effective width ``m = S*C``."""
        return self.num_tokens * self.dim

    def forward_vec(self, x: Tensor, return_intermediates: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """From ``vec`` of the embedded features ``(B, S*C)`` to logits (and every step's output)."""
        feats = []
        for step in self.steps:
            x = step(x)
            feats.append(x)
        logits = self.head(self.norm(unvec(x, self.num_tokens, self.dim)).mean(dim=1))
        return (logits, feats) if return_intermediates else logits

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_vec(vec(self.stem(images)))


def dense_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes the dense effective matrices (weights and biases) of every structured layer would take."""
    itemsize = torch.tensor([], dtype=dtype or _model_dtype(model)).element_size()
    total = 0
    for _, layer in _structured_layers(model):
        total += (layer.out_features * layer.in_features + layer.out_features) * itemsize
    return total


def check_materialisable(model: nn.Module, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Raise :class:`ModelTooLargeError`, stating the estimate, if the dense effective matrices exceed ``max_bytes``.

    Needs only the layer shapes, so it works on a model built on the ``meta`` device.
    """
    need = dense_bytes(model, dtype)
    if need > max_bytes:
        n = len(_structured_layers(model))
        raise ModelTooLargeError(
            f"to_wide_mlp would materialise {n} dense effective matrices taking {_fmt_bytes(need)} in {dtype} "
            f"(limit {_fmt_bytes(max_bytes)}); use describe() for widths and connections, or pass a larger max_bytes"
        )


def to_wide_mlp(model: nn.Module, dtype: torch.dtype | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> WideMLP:
    """The explicit wide MLP equal to ``model`` (a Mixer-family model) in eval mode.

    Args:
        model: a model with ``stem``, ``blocks`` of ``MixerBlock``, ``norm`` and ``head`` (every Mixer-family model).
        dtype: dtype of the wide MLP (default: the model's); float64 for exact comparisons.
        max_bytes: refuse to materialise more than this; the error states the estimate.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "mlp_tokens") and hasattr(b, "mlp_channels") for b in blocks):
        raise TypeError(f"to_wide_mlp needs a Mixer-family model (blocks of MixerBlock), got {type(model).__name__}")
    dtype = dtype or _model_dtype(model)
    check_materialisable(model, dtype, max_bytes)
    S, C = model.num_tokens, model.dim
    steps = []
    for blk in blocks:
        for norm, mlp in ((blk.norm1, blk.mlp_tokens), (blk.norm2, blk.mlp_channels)):
            linears = [_dense_linear(layer, dtype) for layer in mlp.layers]
            steps.append(
                WideStep(
                    S, C, linears,
                    act=_copy(mlp.act, dtype),
                    outer_act=_copy(blk.act, dtype),
                    norm=_copy(norm, dtype),
                    residual=blk.residual,
                )
            )
    wide = WideMLP(_copy(model.stem, dtype), steps, _copy(model.norm, dtype), _copy(model.head, dtype), S, C)
    return wide.eval()


def _dense_linear(layer: StructuredLinear, dtype: torch.dtype) -> nn.Linear:
    w = layer.effective_weight(dtype)
    b = layer.effective_bias(dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w)
    if b is not None:
        lin.bias = nn.Parameter(b)
    return lin


def _copy(module: nn.Module | None, dtype: torch.dtype) -> nn.Module | None:
    return None if module is None else copy.deepcopy(module).to(dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _structured_layers(model: nn.Module) -> list[tuple[str, StructuredLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StructuredLinear)]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


# ------------------------------------------------------------------------------------------------ describe
@dataclass(frozen=True)
class LayerReport:
    """One structured layer on ``vec X``: effective shape, density, connections, stored parameters."""

    name: str
    in_width: int
    out_width: int
    connections: int
    parameters: int

    @property
    def density(self) -> Fraction:
        return Fraction(self.connections, self.in_width * self.out_width)


@dataclass
class ModelReport:
    """:func:`describe`'s result: per-layer rows and totals."""

    model: str
    num_tokens: int | None
    dim: int | None
    layers: list[LayerReport] = field(default_factory=list)
    total_parameters: int = 0

    @property
    def width(self) -> int | None:
        """Effective width ``m = S*C``."""
        return None if self.num_tokens is None or self.dim is None else self.num_tokens * self.dim

    @property
    def connections(self) -> int:
        return sum(r.connections for r in self.layers)

    @property
    def omega(self) -> float:
        """Average connections per effective mixing layer (docs/theory.md (10))."""
        return self.connections / len(self.layers) if self.layers else 0.0

    @property
    def dense_weights(self) -> int:
        return sum(r.in_width * r.out_width for r in self.layers)


def describe(model: nn.Module, name: str | None = None) -> ModelReport:
    """Per structured layer: effective input/output width, density, connections, parameters; and totals."""
    report = ModelReport(
        model=name or type(model).__name__,
        num_tokens=getattr(model, "num_tokens", None),
        dim=getattr(model, "dim", None),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    for lname, layer in _structured_layers(model):
        params = sum(p.numel() for p in layer.parameters(recurse=False))
        report.layers.append(LayerReport(lname, layer.in_features, layer.out_features, layer.connections, params))
    return report


def _fmt_density(d: Fraction) -> str:
    s = f"1/{d.denominator}" if d.numerator == 1 else f"{float(d):.3g}"
    return f"{s} ({float(d):.3g})"


def format_report(report: ModelReport, max_rows: int | None = 8) -> str:
    """A printable table of :func:`describe`'s report (``max_rows`` layers shown, ``None`` for all)."""
    lines = [f"{report.model}: S = {report.num_tokens}, C = {report.dim}, effective width m = S*C = "
             f"{report.width:,}" if report.width else f"{report.model}"]
    head = f"{'layer':<28} {'in width':>11} {'out width':>11} {'density':>22} {'connections':>15} {'params':>11}"
    lines += [head, "-" * len(head)]
    rows = report.layers if max_rows is None else report.layers[:max_rows]
    for r in rows:
        lines.append(
            f"{r.name:<28} {r.in_width:>11,} {r.out_width:>11,} {_fmt_density(r.density):>22} "
            f"{r.connections:>15,} {r.parameters:>11,}"
        )
    if len(rows) < len(report.layers):
        lines.append(f"... {len(report.layers) - len(rows)} more layers (same pattern per block; --all shows them)")
    lines.append("-" * len(head))
    lines.append(f"mixing layers: {len(report.layers)}, connections: {report.connections:,} "
                 f"(dense would be {report.dense_weights:,}), Omega per layer (eq. 10): {report.omega:,.1f}")
    lines.append(f"parameters: {report.total_parameters:,} in all, "
                 f"{sum(r.parameters for r in report.layers):,} in mixing layers")
    return "\n".join(lines)
