"""Implicit L1 regularisation of weight decay on Kronecker factors, executable (docs/theory.md (12), §3.7).

For ``B = V^T ⊗ W`` (``W`` ``(S', S)``, ``V`` ``(C, C')``) and any loss ``L``:

    min_{W,V} L(V^T ⊗ W) + (λ/2)(||W||_F^2 + ||V||_F^2)  >=  min_B L(B) + λ̃ ||B||_1,   λ̃ = λ / sqrt(S S' C C')

(``λ / (C S)`` for square factors). The pointwise step behind it, ``(λ/2)(||W||^2 + ||V||^2) >= λ ||W|| ||V||
>= λ̃ ||V^T ⊗ W||_1``, is :func:`factor_bound` (on random, fitted or trained factors, e.g. a
:class:`~widesparse.layers.monarch.TiedMonarchLinear`). :func:`bilinear_l1_experiment` solves both sides for the
bilinear regression ``Y ≈ W X V``: the left by alternating ridge regressions (exact block minimisation, best of
several restarts: an upper bound on the non-convex minimum), the right (a LASSO) by FISTA to a certified duality
gap (a lower bound). :func:`tight_instance` builds a loss on which (12) holds with equality, so that any larger
``λ̃`` breaks it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from widesparse.layers.monarch import TiedMonarchLinear, projection_error
from widesparse.linalg import vec

__all__ = [
    "l1_lambda",
    "FactorBound",
    "factor_bound",
    "layer_factor_bound",
    "BilinearProblem",
    "make_bilinear_problem",
    "fit_factors",
    "fit_l1",
    "BilinearResult",
    "bilinear_l1_experiment",
    "format_results",
    "soft_threshold_objective",
    "tight_instance",
]


def l1_lambda(lam: float, S: int, C: int, S_out: int | None = None, C_out: int | None = None) -> float:
    """``λ̃ = λ / sqrt(S S' C C')`` of (12); ``λ / (C S)`` for square ``W``, ``V``."""
    S_out, C_out = S if S_out is None else S_out, C if C_out is None else C_out
    if min(S, C, S_out, C_out) < 1 or lam < 0:
        raise ValueError(f"need positive sizes and λ >= 0, got S={S}, C={C}, S'={S_out}, C'={C_out}, λ={lam}")
    return lam / math.sqrt(S * S_out * C * C_out)


@dataclass(frozen=True)
class FactorBound:
    """Both sides of the pointwise bound at one ``(W, V)``: ``penalty >= balanced >= l1``."""

    lam: float
    lam_tilde: float
    penalty: float  # (λ/2)(||W||_F^2 + ||V||_F^2)
    balanced: float  # λ ||W||_F ||V||_F, the penalty after the best rescaling (aW, V/a)
    l1: float  # λ̃ ||V^T ⊗ W||_1 = λ̃ ||V||_1 ||W||_1

    @property
    def holds(self) -> bool:
        """``penalty >= l1`` up to rounding."""
        return self.penalty >= self.l1 * (1 - 1e-12) - 1e-300

    @property
    def tightness(self) -> float:
        """``l1 / penalty`` in ``[0, 1]``: 1 when every entry of ``W`` and ``V`` has one magnitude, balanced norms."""
        return self.l1 / self.penalty if self.penalty > 0 else 1.0


def factor_bound(W: Tensor, V: Tensor, lam: float, lam_tilde: float | None = None) -> FactorBound:
    """Both sides of ``(λ/2)(||W||^2 + ||V||^2) >= λ̃ ||V^T ⊗ W||_1`` without forming the Kronecker product.

    ``lam_tilde`` defaults to (12)'s ``λ / sqrt(S S' C C')``; pass a larger one to see the bound fail.
    """
    if W.ndim != 2 or V.ndim != 2:
        raise ValueError(f"W and V must be matrices, got shapes {tuple(W.shape)} and {tuple(V.shape)}")
    W, V = W.detach().double(), V.detach().double()
    lt = l1_lambda(lam, W.shape[1], V.shape[0], W.shape[0], V.shape[1]) if lam_tilde is None else lam_tilde
    fw, fv = torch.linalg.matrix_norm(W).item(), torch.linalg.matrix_norm(V).item()
    return FactorBound(
        lam=lam,
        lam_tilde=lt,
        penalty=0.5 * lam * (fw**2 + fv**2),
        balanced=lam * fw * fv,
        l1=lt * W.abs().sum().item() * V.abs().sum().item(),
    )


def layer_factor_bound(layer: TiedMonarchLinear, lam: float) -> FactorBound:
    """:func:`factor_bound` on a tied Monarch layer's ``W`` and ``V`` (e.g. a trained ``kron_mlp`` layer)."""
    return factor_bound(layer.W, layer.V, lam)


# --------------------------------------------------------------------------------------- bilinear regression
@dataclass(frozen=True)
class BilinearProblem:
    """``L(B) = (1/2N) sum_i ||vec Y_i - B vec X_i||^2`` for ``X`` ``(N, S, C)``, ``Y`` ``(N, S', C')``."""

    X: Tensor
    Y: Tensor

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """``(S, C, S', C')``."""
        return self.X.shape[1], self.X.shape[2], self.Y.shape[1], self.Y.shape[2]

    def loss(self, B: Tensor) -> float:
        r = vec(self.Y) - vec(self.X) @ B.T
        return 0.5 * r.pow(2).sum().item() / self.X.shape[0]

    def loss_factors(self, W: Tensor, V: Tensor) -> float:
        return 0.5 * (self.Y - W @ self.X @ V).pow(2).sum().item() / self.X.shape[0]


def make_bilinear_problem(
    S: int = 4,
    C: int = 4,
    n_samples: int = 256,
    noise: float = 0.5,
    seed: int = 0,
    S_out: int | None = None,
    C_out: int | None = None,
) -> BilinearProblem:
    """``Y_i = W* X_i V* + noise``, Gaussian ``X_i`` and factors (variance ``1/fan_in``), float64, seeded."""
    S_out, C_out = S if S_out is None else S_out, C if C_out is None else C_out
    g = torch.Generator().manual_seed(int(seed))
    X = torch.randn(n_samples, S, C, generator=g, dtype=torch.float64)
    W = torch.randn(S_out, S, generator=g, dtype=torch.float64) / math.sqrt(S)
    V = torch.randn(C, C_out, generator=g, dtype=torch.float64) / math.sqrt(C)
    Y = W @ X @ V + noise * torch.randn(n_samples, S_out, C_out, generator=g, dtype=torch.float64)
    return BilinearProblem(X, Y)


def fit_factors(
    problem: BilinearProblem, lam: float, restarts: int = 4, max_iter: int = 1000, tol: float = 1e-12, seed: int = 0
) -> tuple[Tensor, Tensor, float]:
    """Left side of (12): ``min L(V^T ⊗ W) + (λ/2)(||W||^2 + ||V||^2)`` by alternating ridge regressions.

    Each half-step is an exact ridge regression, computed from the second moments of ``(X, Y)`` (cost independent
    of ``N``). Returns the best ``(W, V, objective)`` over ``restarts`` random starts (an upper bound on the
    minimum); stationary points have ``||W||_F = ||V||_F``.
    """
    X, Y = problem.X, problem.Y
    N, (S, C, S_out, C_out) = X.shape[0], problem.sizes
    mxx = torch.einsum("nsc,ntd->sctd", X, X) / N  # E[X_sc X_td]
    mxy = torch.einsum("nsc,ntd->sctd", X, Y) / N  # E[X_sc Y_td]
    yy = Y.pow(2).sum().item() / N
    sxx, syx = vec(X).T @ vec(X) / N, vec(Y).T @ vec(X) / N
    g = torch.Generator().manual_seed(int(seed))
    eye_s, eye_c = torch.eye(S, dtype=X.dtype), torch.eye(C, dtype=X.dtype)

    def objective(W: Tensor, V: Tensor) -> float:
        B = torch.kron(V.T.contiguous(), W)  # L(B) = (yy - 2 <B, E[y x^T]> + <B, B E[x x^T]>) / 2
        fit = 0.5 * yy - (B * syx).sum().item() + 0.5 * (B * (B @ sxx)).sum().item()
        return fit + 0.5 * lam * (W.pow(2).sum() + V.pow(2).sum()).item()

    best: tuple[Tensor, Tensor, float] | None = None
    for _ in range(restarts):
        V = torch.randn(C, C_out, generator=g, dtype=X.dtype) / math.sqrt(C)
        prev = math.inf
        for _ in range(max_iter):
            # W-step: W (E[Z Z^T] + λ) = E[Y Z^T] with Z = X V
            gram = torch.einsum("sctd,ce,de->st", mxx, V, V)
            W = torch.linalg.solve(gram + lam * eye_s, torch.einsum("sctd,cd->st", mxy, V)).T
            # V-step: (E[U^T U] + λ) V = E[U^T Y] with U = W X
            gram = torch.einsum("sctd,as,at->cd", mxx, W, W)
            V = torch.linalg.solve(gram + lam * eye_c, torch.einsum("sctd,ts->cd", mxy, W))
            a = math.sqrt(torch.linalg.matrix_norm(V).item() / max(torch.linalg.matrix_norm(W).item(), 1e-300))
            if a > 0:  # the best rescaling (aW, V/a): same loss, smallest penalty (kills ALS's slow scale drift)
                W, V = W * a, V / a
            obj = objective(W, V)
            if prev - obj <= tol * max(1.0, abs(obj)):
                break
            prev = obj
        if best is None or obj < best[2]:
            best = (W, V, obj)
    assert best is not None and best[0].shape == (S_out, S)
    return best


def fit_l1(
    problem: BilinearProblem, lam_tilde: float, max_iter: int = 20000, tol: float = 1e-10
) -> tuple[Tensor, float, float]:
    """Right side of (12): ``min_B L(B) + λ̃ ||B||_1`` (a LASSO) by FISTA with adaptive restart.

    Returns ``(B, primal, dual)``: ``dual <= min <= primal``, stopping when ``primal - dual <= tol * |primal|``.
    """
    N = problem.X.shape[0]
    x, y = vec(problem.X), vec(problem.Y)  # (N, d_in), (N, d_out)
    sxx, syx, yy = x.T @ x / N, y.T @ x / N, y.pow(2).sum().item() / N
    step = 1.0 / torch.linalg.eigvalsh(sxx)[-1].item()
    B = torch.zeros(y.shape[1], x.shape[1], dtype=x.dtype)
    Z, t = B.clone(), 1.0

    def primal_dual(B: Tensor) -> tuple[float, float]:
        grad = B @ sxx - syx
        fit = 0.5 * yy - (B * syx).sum().item() + 0.5 * (B * (B @ sxx)).sum().item()  # L(B)
        r2 = 2 * fit * N  # ||R||^2
        ry = N * (yy - (B * syx).sum().item())  # <R, Y>
        a = min(1.0, lam_tilde / max(grad.abs().max().item(), 1e-300)) / N  # θ = a R, ||θ X^T||_inf <= λ̃
        return fit + lam_tilde * B.abs().sum().item(), a * ry - 0.5 * N * a * a * r2

    primal, dual = primal_dual(B)
    for _ in range(max_iter):
        G = Z - step * (Z @ sxx - syx)
        B_new = torch.sign(G) * (G.abs() - step * lam_tilde).clamp_min(0)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        if ((Z - B_new) * (B_new - B)).sum() > 0:  # gradient restart (O'Donoghue and Candès)
            t_new, Z = 1.0, B_new.clone()
        else:
            Z = B_new + ((t - 1) / t_new) * (B_new - B)
        B, t = B_new, t_new
        primal, dual = primal_dual(B)
        if primal - dual <= tol * max(abs(primal), 1e-300):
            break
    return B, primal, dual


@dataclass(frozen=True)
class BilinearResult:
    """One ``λ`` of :func:`bilinear_l1_experiment` (all values in the units of the objectives)."""

    lam: float
    lam_tilde: float
    left: float  # factor objective at the fitted (W, V): >= the left minimum
    right: float  # LASSO primal at the FISTA solution: >= the right minimum
    right_lower: float  # certified lower bound on the right minimum (dual)
    penalty: float  # (λ/2)(||W||^2 + ||V||^2) at the fitted factors
    l1_at_factors: float  # λ̃ ||V^T ⊗ W||_1 at the fitted factors
    l1_density: float  # fraction of non-zero entries of the LASSO solution B
    l1_kron_error: float  # relative distance of the LASSO solution to the nearest V^T ⊗ W

    @property
    def holds(self) -> bool:
        """(12) at this λ: the left value is not below the certified lower bound of the right minimum."""
        return self.left >= self.right_lower - 1e-12 * max(1.0, abs(self.left))

    @property
    def gap(self) -> float:
        """``left - right``: how much (12) gives away (0 when tight) = ``penalty_slack + structure_gap``."""
        return self.left - self.right

    @property
    def penalty_slack(self) -> float:
        """``(λ/2)(||W||^2 + ||V||^2) - λ̃ ||B||_1`` at the fitted factors: the slack of the pointwise bound."""
        return self.penalty - self.l1_at_factors

    @property
    def structure_gap(self) -> float:
        """``L(B_f) + λ̃ ||B_f||_1 - right`` for ``B_f = V^T ⊗ W``: the price of the Kronecker structure (>= 0)."""
        return self.gap - self.penalty_slack

    def to_dict(self) -> dict[str, float | bool]:
        extra = {"gap": self.gap, "penalty_slack": self.penalty_slack, "structure_gap": self.structure_gap}
        return {**asdict(self), "holds": self.holds, **extra}


def bilinear_l1_experiment(
    lams: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    problem: BilinearProblem | None = None,
    restarts: int = 4,
    seed: int = 0,
) -> list[BilinearResult]:
    """Both sides of (12) on a bilinear regression for each ``λ`` (default problem: :func:`make_bilinear_problem`)."""
    problem = problem or make_bilinear_problem(seed=seed)
    S, C, S_out, C_out = problem.sizes
    out = []
    for lam in lams:
        lt = l1_lambda(lam, S, C, S_out, C_out)
        W, V, left = fit_factors(problem, lam, restarts=restarts, seed=seed)
        B, right, lower = fit_l1(problem, lt)
        fb = factor_bound(W, V, lam)
        nnz = (B != 0).double().mean().item()
        kerr = projection_error(B, C, S_out, tied=True) if B.abs().sum() > 0 else 0.0
        out.append(BilinearResult(lam, lt, left, right, lower, fb.penalty, fb.l1, nnz, kerr))
    return out


def format_results(results: list[BilinearResult]) -> str:
    """A printable table of :func:`bilinear_l1_experiment` (gap = penalty slack + structure gap)."""
    head = (
        f"{'λ':>8} {'λ̃':>10} {'left':>11} {'right':>11} {'gap':>9} {'gap/right':>9} {'slack':>9} {'structure':>9} "
        f"{'l1/pen':>6} {'nnz(B)':>6}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        ratio = r.l1_at_factors / r.penalty if r.penalty > 0 else 1.0
        rows.append(
            f"{r.lam:>8.3g} {r.lam_tilde:>10.3g} {r.left:>11.6g} {r.right:>11.6g} {r.gap:>9.3g} "
            f"{r.gap / abs(r.right):>9.2%} {r.penalty_slack:>9.3g} {r.structure_gap:>9.3g} {ratio:>6.3f} "
            f"{r.l1_density:>6.2f}"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------- a tight instance
def soft_threshold_objective(T: Tensor, lam_tilde: float) -> float:
    """``min_B (1/2)||B - T||_F^2 + λ̃ ||B||_1`` in closed form (entrywise soft thresholding)."""
    a = T.abs().double()
    return torch.where(a > lam_tilde, lam_tilde * a - 0.5 * lam_tilde**2, 0.5 * a * a).sum().item()


def tight_instance(S: int, C: int, lam: float, t: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, float]:
    """A denoising loss ``L(B) = (1/2)||B - T||_F^2`` on which (12) is an equality.

    ``T = t (Σ_V^T ⊗ Σ_W)`` for random sign matrices; the balanced factors ``W = a Σ_W``, ``V = c Σ_V`` with
    ``a S = c C`` and ``a c = t - λ/(CS)`` reach the right-hand minimum (:func:`soft_threshold_objective`), so
    the left minimum equals it. Returns ``(T, W, V, left)`` with ``left`` the factor objective at ``(W, V)``; requires
    ``t > λ/(CS)``.
    """
    lt = l1_lambda(lam, S, C)
    if t <= lt:
        raise ValueError(f"tight_instance needs t > λ/(CS) = {lt:.4g}, got t={t}")
    g = torch.Generator().manual_seed(int(seed))
    sw = torch.randint(0, 2, (S, S), generator=g).double() * 2 - 1
    sv = torch.randint(0, 2, (C, C), generator=g).double() * 2 - 1
    T = t * torch.kron(sv.T.contiguous(), sw)
    beta = t - lt
    W, V = math.sqrt(beta * C / S) * sw, math.sqrt(beta * S / C) * sv
    left = (
        0.5 * (torch.kron(V.T.contiguous(), W) - T).pow(2).sum().item()
        + 0.5 * lam * (W.pow(2).sum() + V.pow(2).sum()).item()
    )
    return T, W, V, left
