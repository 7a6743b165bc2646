"""Largest singular values of the effective mixing weights, against the Marchenko-Pastur edge (docs/theory.md §3.9, E3).

For a Mixer the effective weights are ``J_2 (I_k ⊗ A) J_1`` (docs/theory.md (14)); permutations and identical diagonal
blocks keep singular values, so ``σ_max`` is exactly ``svdvals(A)[0]`` of the small factor. An SW-MLP layer has no
such structure: its ``σ_max`` comes from Golub-Kahan-Lanczos bidiagonalization (or plain power iteration) on the
sparse operator, never a dense matrix. With i.i.d. entries of variance ``1/in`` an ``(out, in)`` matrix has
``σ_max -> 1 + sqrt(out/in)`` (Marchenko-Pastur), i.e. ``1 + sqrt(γ)`` for an expanding ``γm x m`` layer; the
Mixer stays there at any width, while an SW-MLP at fixed Ω grows with width (docs/theory.md §3.9).

Uses layers only (``effective_weight``, ``connections``, and the sparse layer's CSR operators).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from widesparse.layers.base import StructuredLinear
from widesparse.layers.kron import PermutedKronLinear
from widesparse.layers.sparse import MaskedLinear, SparseLinear

__all__ = [
    "SpectrumRow",
    "marchenko_pastur_edge",
    "top_singular_value",
    "lanczos_top_singular_value",
    "power_top_singular_value",
    "spectra_table",
    "format_spectra",
]

Op = Callable[[Tensor], Tensor]
DENSE_LIMIT = 2**22  # effective matrices up to this many entries are decomposed exactly (svdvals)


def marchenko_pastur_edge(out_features: int, in_features: int) -> float:
    """``1 + sqrt(out/in)``: the limit of ``σ_max`` of an ``(out, in)`` matrix with i.i.d. entries of variance ``1/in``.

    An expanding layer ``γm x m`` gives ``1 + sqrt(γ)``; the contracting ``m x γm`` gives ``1 + 1/sqrt(γ)``.
    """
    return 1.0 + math.sqrt(out_features / in_features)


def lanczos_top_singular_value(
    matvec: Op, rmatvec: Op, n: int, *, dtype: torch.dtype = torch.float64, max_iter: int = 300,
    tol: float = 1e-10, seed: int = 0, device: torch.device | str | None = None,
) -> float:
    """``σ_max`` of the operator ``A`` (``matvec = A v``, ``rmatvec = A^T u``, ``A`` with ``n`` columns).

    Golub-Kahan-Lanczos bidiagonalization with full reorthogonalization; stops when the estimate changes by less
    than ``tol`` (relative) over 5 steps, or after ``max_iter`` steps (or when the Krylov space is exhausted).
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=dtype).to(device)
    v /= v.norm()
    vs, us, alphas, betas = [v], [], [], []
    history: list[float] = []
    beta, u_prev = 0.0, None
    for _ in range(min(max_iter, n)):
        u = matvec(v) - (beta * u_prev if u_prev is not None else 0.0)
        if us:
            q = torch.stack(us)
            u = u - q.T @ (q @ u)
        alpha = float(u.norm())
        alphas.append(alpha)
        if alpha == 0.0:
            break
        u = u / alpha
        us.append(u)
        w = rmatvec(u) - alpha * v
        q = torch.stack(vs)
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        history.append(_bidiag_top(alphas, betas))
        if beta <= 1e-14 * max(alpha, 1.0):
            break
        betas.append(beta)
        v, u_prev = w / beta, u
        vs.append(v)
        if len(history) > 5 and abs(history[-1] - history[-6]) <= tol * history[-1]:
            break
    return history[-1] if history else 0.0


def _bidiag_top(alphas: list[float], betas: list[float]) -> float:
    k = len(alphas)
    b = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        b += torch.diag(torch.tensor(betas[: k - 1], dtype=torch.float64), 1)
    return float(torch.linalg.svdvals(b)[0])


def power_top_singular_value(
    matvec: Op, rmatvec: Op, n: int, *, dtype: torch.dtype = torch.float64, max_iter: int = 2000,
    tol: float = 1e-9, seed: int = 0, device: torch.device | str | None = None,
) -> float:
    """``σ_max`` by power iteration on ``A^T A`` (slow near a dense spectral edge; a lower bound if stopped early)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=dtype).to(device)
    v /= v.norm()
    sigma = 0.0
    for _ in range(max_iter):
        w = rmatvec(matvec(v))
        lam = float(w.norm())
        if lam == 0.0:
            return 0.0
        v = w / lam
        new = math.sqrt(lam)
        if abs(new - sigma) <= tol * new:
            return new
        sigma = new
    return sigma


def _operators(layer: StructuredLinear, dtype: torch.dtype) -> tuple[Op, Op]:
    if isinstance(layer, SparseLinear):
        w, wt = layer.weight_csr(dtype), layer.weight_t_csr(dtype)
        return (lambda v: torch.mv(w, v)), (lambda u: torch.mv(wt, u))
    if isinstance(layer, MaskedLinear):
        w = layer.effective_weight(dtype)
        return (lambda v: w @ v), (lambda u: w.T @ u)
    bias = layer.effective_bias(dtype)
    ref = layer if dtype == layer._param_dtype() else copy.deepcopy(layer).to(dtype)  # generic: forward and its VJP

    def mv(v: Tensor) -> Tensor:
        with torch.no_grad():
            y = ref(v[None])[0]
        return y - bias if bias is not None else y

    def rmv(u: Tensor) -> Tensor:
        x = torch.zeros(1, layer.in_features, dtype=dtype, requires_grad=True)
        return torch.autograd.grad(ref(x), x, u[None])[0][0]

    return mv, rmv


def top_singular_value(layer: StructuredLinear, method: str = "auto", **kwargs) -> tuple[float, str]:
    """``(σ_max, how)`` of a layer's effective weight.

    ``method``: ``"auto"`` (exact via the small factor for :class:`PermutedKronLinear`, Lanczos for
    :class:`SparseLinear`, ``svdvals`` of the effective weight for small other layers, else Lanczos),
    ``"factor"``, ``"dense"``, ``"lanczos"`` or ``"power"``. ``kwargs`` go to the iterative solvers.
    """
    valid = ("auto", "factor", "dense", "lanczos", "power")
    if method not in valid:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(valid)}")
    if method == "auto":
        if isinstance(layer, PermutedKronLinear):
            method = "factor"
        elif isinstance(layer, SparseLinear) or layer.in_features * layer.out_features > DENSE_LIMIT:
            method = "lanczos"
        else:
            method = "dense"
    if method == "factor":
        if not isinstance(layer, PermutedKronLinear):
            raise ValueError(f"method='factor' needs a PermutedKronLinear, got {type(layer).__name__}")
        return float(torch.linalg.svdvals(layer.weight.detach().double())[0]), "svdvals of the small factor"
    if method == "dense":
        return float(torch.linalg.svdvals(layer.effective_weight(torch.float64))[0]), "svdvals of the dense weight"
    mv, rmv = _operators(layer, torch.float64)
    solver = lanczos_top_singular_value if method == "lanczos" else power_top_singular_value
    return solver(mv, rmv, layer.in_features, **kwargs), f"{method} on the {type(layer).__name__} operator"


def _frobenius_sq(layer: StructuredLinear) -> float:
    if isinstance(layer, PermutedKronLinear):
        return layer.k * float(layer.weight.detach().double().pow(2).sum())
    if isinstance(layer, SparseLinear):
        return float(layer.values.detach().double().pow(2).sum())
    if isinstance(layer, MaskedLinear):
        return float(layer.effective_weight(torch.float64).pow(2).sum())
    return float(layer.effective_weight(torch.float64).pow(2).sum())


@dataclass(frozen=True)
class SpectrumRow:
    """One effective mixing weight: shape, density, ``σ_max`` (and at init), and the Marchenko-Pastur references.

    ``mp_edge`` is ``1 + sqrt(out/in)`` (variance ``1/in``); ``mp_scaled`` is the edge of an i.i.d. matrix with this
    weight's mean square entry, ``rms * (sqrt(out) + sqrt(in))``, which applies to any init scale and to trained
    weights.
    """

    name: str
    out_features: int
    in_features: int
    connections: int
    sigma_max: float
    mp_edge: float
    mp_scaled: float
    method: str
    sigma_init: float | None = None

    @property
    def density(self) -> float:
        return self.connections / (self.out_features * self.in_features)

    def to_dict(self) -> dict:
        return {**asdict(self), "density": self.density}


def spectra_table(model: nn.Module, reference: nn.Module | None = None, method: str = "auto",
                  **kwargs) -> list[SpectrumRow]:
    """One :class:`SpectrumRow` per structured layer of ``model``.

    ``reference`` (the same architecture, e.g. the model at init with the run's seed) fills ``sigma_init``.
    """
    ref_layers = dict(_structured(reference)) if reference is not None else {}
    rows = []
    for name, layer in _structured(model):
        sigma, how = top_singular_value(layer, method, **kwargs)
        init = None
        if name in ref_layers:
            init = top_singular_value(ref_layers[name], method, **kwargs)[0]
        o, n = layer.out_features, layer.in_features
        rms = math.sqrt(_frobenius_sq(layer) / (o * n))
        rows.append(SpectrumRow(name, o, n, layer.connections, sigma, marchenko_pastur_edge(o, n),
                                rms * (math.sqrt(o) + math.sqrt(n)), how, init))
    return rows


def _structured(model: nn.Module) -> list[tuple[str, StructuredLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StructuredLinear)]


def format_spectra(rows: list[SpectrumRow], title: str | None = None) -> str:
    """A printable table: layer, effective shape, density, σ_max (init, and trained if given), MP references."""
    has_init = any(r.sigma_init is not None for r in rows)
    head = f"{'layer':<28} {'out x in':>17} {'density':>9} " + (f"{'σ_max init':>11} " if has_init else "")
    head += f"{'σ_max':>9} {'1+sqrt(out/in)':>15} {'MP(rms)':>9} {'σ/MP(rms)':>10}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        line = f"{r.name:<28} {f'{r.out_features:,} x {r.in_features:,}':>17} {r.density:>9.4g} "
        if has_init:
            line += f"{r.sigma_init:>11.4f} " if r.sigma_init is not None else f"{'-':>11} "
        ratio = r.sigma_max / r.mp_scaled if r.mp_scaled > 0 else float("nan")
        line += f"{r.sigma_max:>9.4f} {r.mp_edge:>15.4f} {r.mp_scaled:>9.4f} {ratio:>10.3f}"
        lines.append(line)
    methods = sorted({r.method for r in rows})
    lines.append("-" * len(head))
    lines.append("σ_max by: " + "; ".join(methods) + ". 1+sqrt(out/in): Marchenko-Pastur edge at variance 1/in "
                 "(1+sqrt(γ) for m -> γm); MP(rms): the edge for i.i.d. entries of this weight's mean square.")
    return "\n".join(lines)
