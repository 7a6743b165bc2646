"""Inequality (12): weight decay on Kronecker factors bounds an L1 penalty with λ̃ = λ/(CS) (docs/theory.md §3.7)."""

from __future__ import annotations

import math

import pytest
import torch

import widesparse.models.monarch_mlp  # noqa: F401  (registers kron_mlp)
from widesparse.analysis.theory import (
    BilinearProblem,
    bilinear_l1_experiment,
    factor_bound,
    fit_factors,
    fit_l1,
    format_results,
    l1_lambda,
    layer_factor_bound,
    make_bilinear_problem,
    soft_threshold_objective,
    tight_instance,
)
from widesparse.linalg import vec
from widesparse.models import create_model

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_l1_lambda() -> None:
    assert l1_lambda(0.6, 4, 5) == pytest.approx(0.6 / 20)
    assert l1_lambda(1.0, 2, 3, 8, 12) == pytest.approx(1 / math.sqrt(2 * 8 * 3 * 12))
    with pytest.raises(ValueError, match="S=0"):
        l1_lambda(1.0, 0, 3)


@pytest.mark.parametrize(("S", "C", "S_out", "C_out"), [(4, 4, 4, 4), (3, 7, 3, 7), (2, 5, 6, 3)])
def test_pointwise_bound_holds_on_random_factors_and_matches_dense(S: int, C: int, S_out: int, C_out: int) -> None:
    for seed in range(20):
        W, V = _randn(S_out, S, seed=2 * seed), _randn(C, C_out, seed=2 * seed + 1) * (seed + 1) / 7
        fb = factor_bound(W, V, lam=0.3)
        dense_l1 = torch.kron(V.T.contiguous(), W).abs().sum().item() * l1_lambda(0.3, S, C, S_out, C_out)
        assert fb.l1 == pytest.approx(dense_l1, rel=1e-12)
        assert fb.penalty == pytest.approx(0.15 * (W.pow(2).sum() + V.pow(2).sum()).item(), rel=1e-12)
        assert fb.penalty >= fb.balanced >= fb.l1 > 0
        assert fb.holds and 0 < fb.tightness < 1


def test_pointwise_bound_is_tight_and_fails_for_a_larger_lambda() -> None:
    S, C = 3, 5
    g = torch.Generator().manual_seed(0)
    sw = torch.randint(0, 2, (S, S), generator=g).double() * 2 - 1
    sv = torch.randint(0, 2, (C, C), generator=g).double() * 2 - 1
    W, V = sw * math.sqrt(C / S), sv * math.sqrt(S / C)  # equal magnitudes, ||W||_F = ||V||_F
    fb = factor_bound(W, V, lam=0.7)
    assert fb.tightness == pytest.approx(1.0, abs=1e-12) and fb.holds
    too_big = factor_bound(W, V, lam=0.7, lam_tilde=1.01 * 0.7 / (C * S))
    assert not too_big.holds


@pytest.mark.parametrize(("S", "C"), [(4, 4), (3, 5)])
def test_inequality_12_is_an_equality_on_the_tight_instance_and_fails_beyond(S: int, C: int) -> None:
    lam = 0.7
    lt = l1_lambda(lam, S, C)
    T, W, V, left = tight_instance(S, C, lam, t=1.0)
    # the left objective recomputed independently, and equal to the closed-form right minimum
    B = torch.kron(V.T.contiguous(), W)
    assert left == pytest.approx(0.5 * (B - T).pow(2).sum().item() + 0.5 * lam * (W.norm() ** 2 + V.norm() ** 2).item())
    assert left == pytest.approx(soft_threshold_objective(T, lt), rel=1e-12)
    # a larger λ̃ raises the right-hand minimum above a value the left side attains: (12) fails
    for factor in (1.05, 1.5):
        assert soft_threshold_objective(T, factor * lt) > left + 1e-6
    # and the solvers agree: as a regression (X_i = sqrt(N) E_i) the loss is (1/2)||B - T||^2
    n = S * C
    eye = torch.eye(n, dtype=F64) * math.sqrt(n)
    problem = BilinearProblem(
        X=eye.reshape(n, C, S).transpose(1, 2), Y=(T.T * math.sqrt(n)).reshape(n, C, S).transpose(1, 2)
    )
    Bl, primal, dual = fit_l1(problem, lt)
    assert primal == pytest.approx(left, rel=1e-9) and dual <= primal
    _, _, als = fit_factors(problem, lam, restarts=2)
    assert als >= dual - 1e-9  # (12): nothing on the left goes below the right minimum


def test_fit_l1_satisfies_the_lasso_optimality_conditions() -> None:
    problem = make_bilinear_problem(S=3, C=2, n_samples=64, noise=0.3, seed=1)
    lt = 0.02
    B, primal, dual = fit_l1(problem, lt)
    assert 0 <= primal - dual <= 1e-9 * primal
    x, y = vec(problem.X), vec(problem.Y)
    grad = (B @ x.T - y.T) @ x / x.shape[0]
    nz = B != 0
    assert nz.any() and (~nz).any()
    assert (grad[nz] + lt * B[nz].sign()).abs().max() < 1e-6
    assert grad[~nz].abs().max() <= lt * (1 + 1e-6)
    assert primal == pytest.approx(problem.loss(B) + lt * B.abs().sum().item(), rel=1e-12)
    # past λ̃ = max |gradient at 0| the solution is zero
    big = (y.T @ x / x.shape[0]).abs().max().item() * 1.01
    assert torch.count_nonzero(fit_l1(problem, big)[0]) == 0


def test_fit_factors_reaches_a_balanced_stationary_point() -> None:
    problem = make_bilinear_problem(S=3, C=4, n_samples=80, noise=0.3, seed=2, S_out=2, C_out=5)
    lam = 0.05
    W, V, obj = fit_factors(problem, lam, restarts=2)
    assert W.shape == (2, 3) and V.shape == (4, 5)
    assert obj == pytest.approx(problem.loss_factors(W, V) + 0.5 * lam * (W.norm() ** 2 + V.norm() ** 2).item())
    assert W.norm().item() == pytest.approx(V.norm().item(), rel=1e-6)
    W, V = W.clone().requires_grad_(), V.clone().requires_grad_()
    f = 0.5 * (problem.Y - W @ problem.X @ V).pow(2).sum() / problem.X.shape[0]
    f = f + 0.5 * lam * (W.pow(2).sum() + V.pow(2).sum())
    gw, gv = torch.autograd.grad(f, (W, V))
    assert max(gw.abs().max().item(), gv.abs().max().item()) < 1e-5


def test_bilinear_experiment_bound_holds_and_decomposes() -> None:
    problem = make_bilinear_problem(S=3, C=3, n_samples=96, noise=0.5, seed=0)
    results = bilinear_l1_experiment(lams=(0.01, 0.3), problem=problem, restarts=2)
    for r in results:
        assert r.holds and r.left >= r.right >= r.right_lower
        assert r.lam_tilde == pytest.approx(r.lam / 9)
        assert r.penalty_slack >= 0 and r.structure_gap >= -1e-9
        assert r.gap == pytest.approx(r.penalty_slack + r.structure_gap)
        assert 0 < r.l1_density <= 1 and 0 <= r.l1_kron_error < 1
        assert set(r.to_dict()) >= {"lam", "left", "right", "holds", "gap", "structure_gap"}
    assert results[1].penalty_slack > results[0].penalty_slack  # the slack grows with λ
    table = format_results(results)
    assert "gap/right" in table and len(table.splitlines()) == 4


def test_bound_holds_on_trained_kron_mlp_factors() -> None:
    torch.manual_seed(0)
    model = create_model("kron_mlp", image_size=8, in_chans=1, num_classes=3, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(32) % 3
    before = [layer_factor_bound(layer, 0.1) for layer in model.layers]
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = [layer_factor_bound(layer, 0.1) for layer in model.layers]
    for a, b in zip(before, after, strict=True):
        assert a.holds and b.holds and b.lam_tilde == pytest.approx(0.1 / 64)
        assert a.penalty != b.penalty  # the factors did change
