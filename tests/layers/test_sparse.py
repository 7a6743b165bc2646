"""MaskedLinear and SparseLinear (docs/theory.md §4.2): one layer, two storages, the same mask from the same seed.

Oracles: the dense masked product ``x (W ⊙ M)^T + b`` written out with plain tensors, and each layer's
``effective_weight()``; float64 throughout for identities.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from widesparse.layers.sparse import (
    MaskedLinear,
    SparseLinear,
    indices_to_mask,
    init_std,
    mask_indices,
    mask_row_counts,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def twins(n_in: int, n_out: int, density: float, **kw) -> tuple[SparseLinear, MaskedLinear]:
    """The two storages built under the same mask seed and the same global RNG state."""
    torch.manual_seed(123)
    s = SparseLinear(n_in, n_out, density, seed=7, dtype=F64, **kw)
    torch.manual_seed(123)
    m = MaskedLinear(n_in, n_out, density, seed=7, dtype=F64, **kw)
    with torch.no_grad():  # non-zero biases so that the bias path is exercised
        b = torch.randn(n_out, generator=torch.Generator().manual_seed(5), dtype=F64)
        s.bias.copy_(b)
        m.bias.copy_(b)
    return s, m


# ------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("mask", ["bernoulli", "fan_in"])
@pytest.mark.parametrize(("n_in", "n_out"), [(17, 40), (40, 9)])
@pytest.mark.parametrize("batch", [1, 33])
def test_sparse_and_masked_agree_in_outputs_and_gradients(mask: str, n_in: int, n_out: int, batch: int) -> None:
    s, m = twins(n_in, n_out, 0.3, mask=mask)
    assert torch.equal(s.effective_weight(), m.effective_weight())
    w_oracle = m.weight.detach() * m.mask  # the mask, written out
    x = torch.randn(batch, n_in, dtype=F64, generator=torch.Generator().manual_seed(batch), requires_grad=True)
    g = torch.randn(batch, n_out, dtype=F64, generator=torch.Generator().manual_seed(2))
    ys = s(x)
    gx_s, gv_s, gb_s = torch.autograd.grad(ys, (x, s.values, s.bias), g)
    ym = m(x)
    gx_m, gw_m, gb_m = torch.autograd.grad(ym, (x, m.weight, m.bias), g)
    oracle = x.detach() @ w_oracle.T + m.bias.detach()
    for a, b in ((ys, oracle), (ym, oracle), (gx_s, g @ w_oracle), (gx_m, g @ w_oracle), (gb_s, gb_m)):
        assert (a - b).abs().max() < 1e-10
    assert (gv_s - gw_m[m.mask]).abs().max() < 1e-10  # values are stored in CSR (row-major) order
    assert torch.count_nonzero(gw_m[~m.mask]) == 0
    assert (gv_s - (g.T @ x.detach())[m.mask]).abs().max() < 1e-10  # the sampled product g^T x on the mask


def test_leading_batch_dimensions_and_float32() -> None:
    torch.manual_seed(0)
    s = SparseLinear(12, 20, 0.25, seed=1)
    m = s.to_masked()
    x = torch.randn(2, 3, 12)
    y = s(x)
    assert y.shape == (2, 3, 20) and y.dtype == torch.float32
    torch.testing.assert_close(y, m(x), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert s.values.grad.shape == (s.connections,)


def test_conversions_round_trip_exactly() -> None:
    s, m = twins(30, 11, 0.2, mask="fan_in")
    s2 = m.to_sparse()
    assert torch.equal(s2.crow_indices, s.crow_indices) and torch.equal(s2.col_indices, s.col_indices)
    assert torch.equal(s2.values, s.values) and torch.equal(s2.bias, s.bias)
    m2 = s.to_masked()
    assert torch.equal(m2.mask, m.mask) and torch.equal(m2.weight, m.weight)


def test_transposed_structure_is_w_transpose() -> None:
    s, _ = twins(23, 31, 0.2)
    assert s.col_indices.dtype == torch.int32 and s.perm_t.dtype == torch.int32
    assert torch.equal(s.weight_t_csr().to_dense(), s.effective_weight().T)
    assert torch.equal(s.weight_csr().to_dense(), s.effective_weight())


# ------------------------------------------------------------------------------------------------ masks
def test_same_seed_same_mask_in_both_layers_and_in_the_state_dict() -> None:
    a = SparseLinear(50, 60, 0.1, seed=3)
    b = MaskedLinear(50, 60, 0.1, seed=3)
    c = SparseLinear(50, 60, 0.1, seed=4)
    mask_a = indices_to_mask(a.crow_indices, a.col_indices, 60, 50)
    assert torch.equal(mask_a, b.mask)
    assert not torch.equal(mask_a, indices_to_mask(c.crow_indices, c.col_indices, 60, 50))
    assert {"values", "bias", "crow_indices", "col_indices"} == set(a.state_dict())
    assert {"weight", "bias", "mask"} == set(b.state_dict()) and b.state_dict()["mask"].dtype == torch.bool
    crow, col = mask_indices(60, 50, 0.1, seed=3)
    assert torch.equal(crow, a.crow_indices) and torch.equal(col, a.col_indices)


def test_bernoulli_mask_statistics() -> None:
    o, n, p = 400, 300, 0.05
    crow, col = mask_indices(o, n, p, seed=11)
    nnz = col.numel()
    mean, sd = o * n * p, math.sqrt(o * n * p * (1 - p))
    assert abs(nnz - mean) < 5 * sd
    counts = crow.long().diff()
    assert torch.equal(counts, mask_row_counts(o, n, p, seed=11))
    assert abs(counts.double().var().item() / (n * p * (1 - p)) - 1) < 0.25  # binomial rows, not fixed
    per_col = torch.bincount(col.long(), minlength=n).double()  # uniform columns: Poisson-like spread
    assert abs(per_col.var().item() / per_col.mean().item() - (1 - p)) < 0.3


@pytest.mark.parametrize("density", [0.3, 0.9])  # 0.9 draws the complement of each row
def test_fixed_fan_in_rows_are_exact_and_uniform(density: float) -> None:
    o, n = 3000, 10
    k = round(density * n)
    crow, col = mask_indices(o, n, density, mask="fan_in", seed=2)
    assert torch.equal(crow.long().diff(), torch.full((o,), k))
    rows = col.long().view(o, k)
    assert bool((rows.diff(dim=1) > 0).all())  # sorted, no duplicates
    per_col = torch.bincount(col.long(), minlength=n).double()
    expected = o * k / n
    sd = math.sqrt(o * (k / n) * (1 - k / n))
    assert (per_col - expected).abs().max() < 5 * sd


def test_dense_rows_via_complement_are_distinct_for_bernoulli() -> None:
    crow, col = mask_indices(200, 40, 0.8, seed=0)
    m = indices_to_mask(crow, col, 200, 40)
    assert m.sum().item() == col.numel()
    assert abs(m.double().mean().item() - 0.8) < 5 * math.sqrt(0.8 * 0.2 / 8000)


def test_connections_equal_mask_nonzeros_and_meta_agrees() -> None:
    s, m = twins(64, 48, 0.1)
    assert s.connections == m.connections == int(m.mask.sum()) == torch.count_nonzero(s.effective_weight())
    assert SparseLinear(64, 48, 0.1, seed=7, device="meta").connections == s.connections
    assert MaskedLinear(64, 48, 0.1, seed=7, device="meta").connections == s.connections
    dense = MaskedLinear(5, 4, 1.0)
    assert dense.mask is None and dense.connections == 20 and "mask" not in dense.state_dict()


def test_empty_layer_and_empty_rows_are_allowed_for_bernoulli() -> None:
    s = SparseLinear(3, 4, 1e-9, seed=0, dtype=F64)
    assert s.connections == 0
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    y = s(x)
    y.sum().backward()
    assert torch.equal(y, s.bias.expand(2, 4)) and torch.count_nonzero(x.grad) == 0


# ------------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize(("mask", "init", "expected"), [
    ("bernoulli", "golubeva", 1 / math.sqrt(2000 / 16)),
    ("bernoulli", "plain", 1 / math.sqrt(2000)),
    ("fan_in", "golubeva", 1 / math.sqrt(125)),
])
def test_init_std_follows_the_rule(mask: str, init: str, expected: float) -> None:
    torch.manual_seed(0)
    s = SparseLinear(2000, 400, 1 / 16, mask=mask, init=init, seed=1)
    n = s.connections  # about 50,000: relative sampling error of the std about 1/sqrt(2n) = 0.3%
    assert abs(s.values.std().item() / expected - 1) < 6 / math.sqrt(2 * n)
    assert abs(s.values.mean().item()) < 6 * expected / math.sqrt(n)
    assert torch.count_nonzero(s.bias) == 0
    assert init_std(2000, 1 / 16, init, 125 if mask == "fan_in" else None) == pytest.approx(expected)
    torch.manual_seed(0)
    m = MaskedLinear(2000, 400, 1 / 16, mask=mask, init=init, seed=1)
    assert torch.equal(m.weight[m.mask], s.values)


# ------------------------------------------------------------------------------------ training and storage
def test_masked_entries_stay_exactly_zero_under_optimizers() -> None:
    for make_opt in (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)):
        _, m = twins(25, 30, 0.2)
        opt = make_opt(m.parameters())
        before = m.weight.detach().clone()
        for step in range(3):
            x = torch.randn(8, 25, dtype=F64, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
        assert torch.count_nonzero(m.weight[~m.mask]) == 0
        assert not torch.equal(m.weight[m.mask], before[m.mask])


def test_optimizer_state_is_sized_by_connections() -> None:
    s = SparseLinear(300, 500, 1 / 32, seed=0)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-3)
    s(torch.randn(4, 300)).sum().backward()
    opt.step()
    state = opt.state[s.values]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == s.connections < 300 * 500 / 16
    assert [p.numel() for p in s.parameters()] == [s.connections, 500]


def test_state_dict_into_a_layer_with_another_mask_resizes_it() -> None:
    a = SparseLinear(40, 30, 0.2, seed=1).eval()
    b = SparseLinear(40, 30, 0.2, seed=2)
    assert a.connections != b.connections
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 40)
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.weight_t_csr().to_dense(), a.weight_t_csr().to_dense())
    bad = dict(a.state_dict())
    bad["col_indices"] = bad["col_indices"].flip(0)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        b.load_state_dict(bad)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(density: float) -> None:
    for cls in (SparseLinear, MaskedLinear):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got " + str(density)):
            cls(4, 5, density)


def test_other_bad_arguments_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="fixed fan-in 0 is invalid.*no connection"):
        SparseLinear(8, 4, 0.5, mask="fan_in", fan_in=0)
    with pytest.raises(ValueError, match="fixed fan-in 9 is invalid: need 1 <= fan_in <= in_features = 8"):
        MaskedLinear(8, 4, 0.5, mask="fan_in", fan_in=9)
    with pytest.raises(ValueError, match="fan_in=3 needs mask='fan_in'"):
        SparseLinear(8, 4, 0.5, fan_in=3)
    with pytest.raises(ValueError, match="unknown mask 'random'; valid: 'bernoulli', 'fan_in'"):
        SparseLinear(8, 4, 0.5, mask="random")
    with pytest.raises(ValueError, match="unknown init 'xavier'; valid: 'golubeva', 'plain'"):
        SparseLinear(8, 4, 0.5, init="xavier")
    with pytest.raises(ValueError, match="in_features must be a positive integer, got 0"):
        SparseLinear(0, 4, 0.5)
    with pytest.raises(ValueError, match="input has 7 features, expected 8"):
        SparseLinear(8, 4, 0.5)(torch.zeros(2, 7))
    crow, col = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([1, 1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing within each row"):
        SparseLinear(3, 2, indices=(crow, col))
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\), got 0 .. 5"):
        SparseLinear(3, 2, indices=(crow, torch.tensor([0, 5, 1], dtype=torch.int32)))
