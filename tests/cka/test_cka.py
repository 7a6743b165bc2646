"""Tests of widesparse.cka: linear and mini-batch CKA (docs/theory.md §4.4), feature taps, compare, run_comparison.

Oracles are written here from the formulas, independently of the code under test: HSIC_1 by explicit loops
over K~ (Nguyen et al. eq. 3), the feature-space linear CKA of Kornblith et al. (||Y^T X||_F^2 / ...), and
the ``center_gram``/``cka`` functions of Kornblith's notebook. Identities run in float64.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from widesparse import cka
from widesparse.cka import MinibatchCKA, features, gram_matrices, linear_cka, u_center

F64 = torch.float64
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("single_thread")


def _rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _related(n: int, widths: list[int], seed: int, shared: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-layer features that share a common signal (so that CKA values are far from 0 and from 1)."""
    base = _rand(n, 3, seed=seed + 1000) if shared is None else shared
    out = []
    for i, p in enumerate(widths):
        mix = _rand(3, p, seed=seed + 10 * i)
        out.append(base @ mix + (0.5 + 0.3 * i) * _rand(n, p, seed=seed + 10 * i + 1) + 2.0)
    return out


# ------------------------------------------------------------------------------------------------ oracles
def hsic1_loops(k: np.ndarray, l_: np.ndarray) -> float:
    """Unbiased HSIC_1 of Nguyen et al. (docs/theory.md §4.4) by explicit loops over K~, L~ (zero diagonals)."""
    n = k.shape[0]
    tr = s_k = s_l = kl = 0.0
    for i in range(n):
        row_k = row_l = 0.0
        for j in range(n):
            if i != j:
                tr += k[i, j] * l_[i, j]
                row_k += k[i, j]
                row_l += l_[i, j]
        s_k += row_k
        s_l += row_l
        kl += row_k * row_l
    return (tr + s_k * s_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl) / (n * (n - 3))


def minibatch_cka_loops(batches_a: list[list[np.ndarray]], batches_b: list[list[np.ndarray]]) -> np.ndarray:
    """Sum HSIC_1 over minibatches for every pair and both self terms, then divide once."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    cross, sa, sb = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for fa, fb in zip(batches_a, batches_b, strict=True):
        ka = [x.reshape(len(x), -1) @ x.reshape(len(x), -1).T for x in fa]
        kb = [y.reshape(len(y), -1) @ y.reshape(len(y), -1).T for y in fb]
        for i, j in itertools.product(range(la), range(lb)):
            cross[i, j] += hsic1_loops(ka[i], kb[j])
        sa += [hsic1_loops(k, k) for k in ka]
        sb += [hsic1_loops(k, k) for k in kb]
    return cross / np.sqrt(np.outer(sa, sb))


def notebook_cka(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """``cka(gram_linear(x), gram_linear(y), debiased)`` of Kornblith et al.'s representation_similarity notebook."""

    def center_gram(g: np.ndarray) -> np.ndarray:
        g = g.copy()
        n = g.shape[0]
        if debiased:
            np.fill_diagonal(g, 0)
            means = np.sum(g, 0) / (n - 2)
            means -= np.sum(means) / (2 * (n - 1))
            g -= means[:, None]
            g -= means[None, :]
            np.fill_diagonal(g, 0)
        else:
            means = np.mean(g, 0)
            means -= np.mean(means) / 2
            g -= means[:, None]
            g -= means[None, :]
        return g

    gx, gy = center_gram(x @ x.T), center_gram(y @ y.T)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA in feature space: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred features."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _np(batches: list[list[torch.Tensor]]) -> list[list[np.ndarray]]:
    return [[t.numpy() for t in b] for b in batches]


# ---------------------------------------------------------------------------------------- full-batch CKA
@pytest.mark.parametrize("n,p,q", [(12, 5, 9), (30, 40, 7), (9, 3, 3)])
def test_linear_cka_matches_oracles(n: int, p: int, q: int) -> None:
    x, y = _related(n, [p, q], seed=n + p)
    xn, yn = x.numpy(), y.numpy()
    assert linear_cka(x, y) == pytest.approx(feature_space_cka(xn, yn), abs=TOL)
    assert linear_cka(x, y) == pytest.approx(notebook_cka(xn, yn, False), abs=TOL)
    assert linear_cka(x, y, debiased=True) == pytest.approx(notebook_cka(xn, yn, True), abs=TOL)
    # debiased = ratio of unbiased HSIC_1 terms (loops)
    kx, ky = xn @ xn.T, yn @ yn.T
    ratio = hsic1_loops(kx, ky) / np.sqrt(hsic1_loops(kx, kx) * hsic1_loops(ky, ky))
    assert linear_cka(x, y, debiased=True) == pytest.approx(ratio, abs=TOL)
    assert abs(linear_cka(x, y) - linear_cka(x, y, debiased=True)) > 1e-4  # the two estimators differ


def test_linear_cka_flattens_any_shape_per_example() -> None:
    x = _rand(10, 3, 4, 2, seed=1)
    y = _rand(10, 5, seed=2) + x.flatten(1)[:, :5]
    assert linear_cka(x, y, debiased=True) == pytest.approx(linear_cka(x.reshape(10, -1), y, debiased=True), abs=0)


def test_u_center_matches_hsic1_formula_and_notebook() -> None:
    x, y = _related(11, [6, 4], seed=3)
    kx, ky = x @ x.T, y @ y.T
    kx_before = kx.clone()
    ux, uy = u_center(kx), u_center(ky)
    assert torch.equal(kx, kx_before)  # a copy unless asked for in place
    n = 11
    assert float((ux * uy).sum()) / (n * (n - 3)) == pytest.approx(hsic1_loops(kx.numpy(), ky.numpy()), abs=TOL)
    assert torch.all(ux.diagonal() == 0) and torch.allclose(ux, ux.T, rtol=0, atol=1e-12)
    # U-centring removes every a 1^T + 1 b^T term: a feature shift leaves K^U unchanged
    shifted = x + _rand(1, 6, seed=4) * 5
    torch.testing.assert_close(u_center(shifted @ shifted.T), ux, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- Grams
@pytest.mark.parametrize("blocks", [1, 2, 3, 5, 6, 9])
def test_gram_matrices_symmetric_blocks_equal_dense(blocks: int) -> None:
    n = 200  # blocks of >= 32 rows: up to 6 blocks, uneven edges for 3 and 6 (9 is capped at 6)
    feats = [_rand(n, 9, seed=5), _rand(n, 3, 4, seed=6), _rand(n, 9, seed=7)]  # widths 9, 12, 9: two groups
    buffers: dict = {}
    g = gram_matrices(feats, blocks=blocks, center=False, buffers=buffers)
    assert g.shape == (3, n, n) and g.dtype == F64
    for i, f in enumerate(feats):
        x = f.reshape(n, -1)
        torch.testing.assert_close(g[i], x @ x.T, rtol=0, atol=1e-12)
    gc = gram_matrices(feats, blocks=blocks, center=True, buffers=buffers)  # reuses the stacks
    assert len(buffers) == 2
    for i, f in enumerate(feats):
        x = f.reshape(n, -1) - f.reshape(n, -1).mean(0)
        torch.testing.assert_close(gc[i], x @ x.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(u_center(gc), u_center(g), rtol=0, atol=1e-10)


def test_float32_grams_with_centring_are_accurate_despite_large_offsets() -> None:
    fa = [f.float() + 50.0 for f in _related(256, [300, 200, 300], seed=8)]
    fb = [f.float() - 30.0 for f in _related(256, [100, 300], seed=9)]
    ref = MinibatchCKA(3, 2)
    ref.update([f.double() for f in fa], [f.double() for f in fb])
    results = {}
    for center in (True, False):
        m = MinibatchCKA(3, 2, gram_dtype=torch.float32, center=center)
        m.update(fa, fb)
        results[center] = (m.compute() - ref.compute()).abs().max().item()
    assert results[True] < 1e-6
    assert results[False] > 10 * results[True]  # centring is what removes the float32 cancellation


# ------------------------------------------------------------------------------------------ mini-batch CKA
@pytest.mark.parametrize(
    "la,lb,widths_a,widths_b,sizes",
    [(1, 1, [4], [6], [8]), (3, 2, [5, 2, 7], [3, 9], [8, 12, 5]), (4, 3, [6, 6, 6, 6], [2, 2, 10], [10, 4, 7, 9])],
)
def test_minibatch_matches_loop_reference(la: int, lb: int, widths_a: list, widths_b: list, sizes: list) -> None:
    ba, bb = [], []
    for k, n in enumerate(sizes):
        shared = _rand(n, 3, seed=100 + k)
        ba.append(_related(n, widths_a, seed=200 + k, shared=shared))
        bb.append(_related(n, widths_b, seed=300 + k, shared=shared))
    m = MinibatchCKA(la, lb)
    for fa, fb in zip(ba, bb, strict=True):
        m.update(fa, fb)
    ref = minibatch_cka_loops(_np(ba), _np(bb))
    np.testing.assert_allclose(m.compute().numpy(), ref, rtol=0, atol=TOL)
    assert m.num_batches == len(sizes) and m.num_examples == sum(sizes)
    assert np.abs(ref).min() > 1e-3 and ref.max() < 0.999  # a non-trivial matrix


def test_one_minibatch_equals_full_batch_debiased_cka() -> None:
    fa, fb = _related(40, [7, 20], seed=11), _related(40, [5], seed=11)
    m = MinibatchCKA(2, 1)
    m.update(fa, fb)
    got = m.compute()
    for i in range(2):
        assert got[i, 0].item() == pytest.approx(linear_cka(fa[i], fb[0], debiased=True), abs=TOL)


def test_accumulation_is_ratio_of_summed_hsic_not_last_batch_or_mean_of_ratios() -> None:
    sizes = [6, 10, 8, 12, 7]
    ba = [_related(n, [5], seed=20 + k) for k, n in enumerate(sizes)]
    bb = [
        [f[0] @ _rand(5, 4, seed=40 + k) + 2 * _rand(n, 4, seed=60 + k)]
        for k, (f, n) in enumerate(zip(ba, sizes, strict=True))
    ]
    m = MinibatchCKA(1, 1)
    for fa, fb in zip(ba, bb, strict=True):
        m.update(fa, fb)
    got = m.compute().item()
    xs, ys = [f[0].numpy() for f in ba], [f[0].numpy() for f in bb]
    cross = sum(hsic1_loops(x @ x.T, y @ y.T) for x, y in zip(xs, ys, strict=True))
    sx = sum(hsic1_loops(x @ x.T, x @ x.T) for x in xs)
    sy = sum(hsic1_loops(y @ y.T, y @ y.T) for y in ys)
    assert got == pytest.approx(cross / np.sqrt(sx * sy), abs=TOL)
    # the peers' defects give other numbers, so this test catches them
    per_batch = [
        hsic1_loops(x @ x.T, y @ y.T) / np.sqrt(hsic1_loops(x @ x.T, x @ x.T) * hsic1_loops(y @ y.T, y @ y.T))
        for x, y in zip(xs, ys, strict=True)
    ]
    assert abs(got - per_batch[-1]) > 1e-3  # ckatorch: overwritten, last batch only
    assert abs(got - float(np.mean(per_batch))) > 1e-3  # averaging ratios


def test_batch_order_does_not_matter_and_reset_forgets() -> None:
    batches = [(_related(n, [4, 6], seed=n), _related(n, [3], seed=n + 50)) for n in (5, 9, 7, 11)]
    results = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        m = MinibatchCKA(2, 1)
        for k in order:
            m.update(*batches[k])
        results.append(m.compute())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-13)
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    m.update(*batches[0])
    assert m.num_batches == 1


def test_self_similarity_is_one_and_self_mode_equals_two_model_mode() -> None:
    batches = [_related(n, [4, 6, 3], seed=n) for n in (8, 13)]
    solo, duo = MinibatchCKA(3), MinibatchCKA(3, 3)
    for f in batches:
        solo.update(f)
        duo.update(f, [t.clone() for t in f])
    torch.testing.assert_close(solo.compute(), duo.compute(), rtol=0, atol=1e-13)
    torch.testing.assert_close(solo.compute().diagonal(), torch.ones(3, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(solo.compute(), solo.compute().T, rtol=0, atol=0.0)
    x = batches[0][1]
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-14)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-14)


def test_symmetry_between_models() -> None:
    batches = [(_related(n, [4, 6], seed=n), _related(n, [3, 5, 2], seed=n + 1)) for n in (9, 12)]
    ab, ba = MinibatchCKA(2, 3), MinibatchCKA(3, 2)
    for fa, fb in batches:
        ab.update(fa, fb)
        ba.update(fb, fa)
    torch.testing.assert_close(ab.compute(), ba.compute().T, rtol=0, atol=1e-14)


def test_invariance_to_orthogonal_maps_and_isotropic_scaling_but_not_per_feature_scaling() -> None:
    shared = _rand(30, 3, seed=69)
    fa, fb = _related(30, [8], seed=70, shared=shared), _related(30, [6], seed=71, shared=shared)
    q_a, _ = torch.linalg.qr(_rand(8, 8, seed=72))
    q_b, _ = torch.linalg.qr(_rand(6, 6, seed=73))
    base = MinibatchCKA(1, 1)
    base.update(fa, fb)
    moved = MinibatchCKA(1, 1)
    moved.update([fa[0] @ q_a * 3.7], [fb[0] @ q_b * 0.02])
    torch.testing.assert_close(moved.compute(), base.compute(), rtol=0, atol=TOL)
    for debiased in (False, True):
        ref = linear_cka(fa[0], fb[0], debiased=debiased)
        assert linear_cka(fa[0] @ q_a * 5.0, fb[0] @ q_b, debiased=debiased) == pytest.approx(ref, abs=TOL)
    # z-scoring (a per-feature rescaling, torchcka's defect) changes the value
    z = (fa[0] - fa[0].mean(0)) / fa[0].std(0) * torch.linspace(0.2, 3.0, 8, dtype=F64)
    zs = MinibatchCKA(1, 1)
    zs.update([z], fb)
    assert base.compute().item() > 0.3
    assert abs(zs.compute().item() - base.compute().item()) > 1e-2


def test_debiased_values_lie_in_unit_interval_up_to_noise() -> None:
    m = MinibatchCKA(3, 3)
    for k in range(4):
        m.update(
            [_rand(16, 5 + i, seed=k * 10 + i) for i in range(3)],
            [_rand(16, 4, seed=500 + k * 10 + i) for i in range(3)],
        )
    v = m.compute()
    assert v.dtype == F64 and v.shape == (3, 3)
    assert v.max() <= 1.0 and v.min() > -0.1  # independent features: near 0, slightly negative allowed
    assert v.min() < 0.05


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors() -> None:
    m = MinibatchCKA(2, 1, names_a=["first", "second"], names_b=["only"])
    good_a, good_b = _related(6, [3, 3], seed=1), _related(6, [2], seed=2)
    with pytest.raises(ValueError, match="n=3"):
        m.update([t[:3] for t in good_a], [t[:3] for t in good_b])
    with pytest.raises(ValueError, match="batch size 6, model B 5"):
        m.update(good_a, [good_b[0][:5]])
    with pytest.raises(ValueError, match=r"different batch sizes.*'first': 6, 'second': 5"):
        m.update([good_a[0], good_a[1][:5]], good_b)
    for bad_value in (float("nan"), float("inf")):
        broken = good_a[1].clone()
        broken[2, 1] = bad_value
        with pytest.raises(ValueError, match=r"NaN or Inf features in layer\(s\) \['A:second'\]"):
            m.update([good_a[0], broken], good_b)
        with pytest.raises(ValueError, match=r"NaN or Inf features in layer\(s\) \['B:only'\]"):
            m.update(good_a, [broken[:, :2]])
    with pytest.raises(ValueError, match="expected 2 feature tensors, got 1"):
        m.update(good_a[:1], good_b)
    with pytest.raises(ValueError, match="pass feats_b"):
        m.update(good_a)
    with pytest.raises(TypeError, match="list of per-layer"):
        m.update(good_a[0], good_b)
    with pytest.raises(ValueError, match="pass feats_a only"):
        MinibatchCKA(2).update(good_a, good_b)
    assert m.num_batches == 0 and m.cross is None  # nothing was half-added
    const = MinibatchCKA(1)
    const.update([torch.ones(5, 3, dtype=F64)])
    with pytest.raises(ValueError, match="HSIC"):
        const.compute()
    with pytest.raises(ValueError, match="n=3"):
        linear_cka(good_a[0][:3], good_a[1][:3], debiased=True)
    with pytest.raises(ValueError, match="x has 6 examples, y has 5"):
        linear_cka(good_a[0], good_a[1][:5])


def test_all_reduce_sums_accumulators_across_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    batches = [(_related(n, [4, 3], seed=n), _related(n, [5], seed=n + 9)) for n in (7, 9, 6, 8)]
    whole, rank0, rank1 = MinibatchCKA(2, 1), MinibatchCKA(2, 1), MinibatchCKA(2, 1)
    for k, b in enumerate(batches):
        whole.update(*b)
        (rank0 if k % 2 == 0 else rank1).update(*b)
    with pytest.raises(RuntimeError, match="process group"):
        rank0.compute(all_reduce=True)
    other = torch.cat([rank1.cross.flatten(), rank1.self_a, rank1.self_b])

    def fake_all_reduce(t: torch.Tensor, op: object = None, group: object = None) -> None:
        t += other  # what rank 1 contributes

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    torch.testing.assert_close(rank0.compute(all_reduce=True), whole.compute(), rtol=0, atol=1e-13)
    assert not torch.allclose(rank0.compute(), whole.compute())  # the local state is left alone


def test_all_reduce_with_a_real_gloo_group_of_one() -> None:
    import torch.distributed as dist

    m = MinibatchCKA(2)
    m.update(_related(8, [3, 4], seed=5))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.testing.assert_close(m.compute(all_reduce=True), m.compute(), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ feature taps
class Net(nn.Module):
    """A model from "another library": no forward_intermediates, a 4-d conv feature and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.Tanh())
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv(x))
        out, _ = self.lstm(h.unsqueeze(1))
        return self.head(out[:, -1])


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_capture_features_and_are_removed_even_on_error() -> None:
    torch.manual_seed(0)
    net = Net().double()
    x = _rand(5, 1, 4, 4, seed=3)
    with features(net, ["conv", "body.2", "lstm"]) as tap:
        assert not _no_hooks(net)
        f = tap(x)
    assert _no_hooks(net)
    assert [t.shape for t in f] == [(5, 2, 4, 4), (5, 6), (5, 1, 5)]
    torch.testing.assert_close(f[0], net.conv(x).detach())
    assert not any(t.requires_grad for t in f)
    with pytest.raises(KeyError):
        with features(net, ["conv", "head"]) as tap:
            tap(x)
            raise KeyError("boom")
    assert _no_hooks(net)
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['convv'\].*'conv'.*'body.1'"):
        with features(net, ["convv"]):
            pass
    with pytest.raises(ValueError, match="no forward_intermediates"):
        with features(net):
            pass
    assert _no_hooks(net)


def test_hook_that_does_not_fire_is_an_error() -> None:
    net = Net().double()
    net.unused = nn.Linear(2, 2)
    with features(net, ["conv", "unused"]) as tap:
        with pytest.raises(RuntimeError, match="'unused' ran 0 times"):
            tap(_rand(4, 1, 4, 4, seed=1))
    assert _no_hooks(net)


def test_outputs_changed_in_place_later_are_captured_as_returned() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
    x = _rand(6, 5, seed=9)
    with features(net, ["0", "1"]) as tap:
        for _ in range(2):  # the second call copies at capture directly
            lin, relu = tap(x)
            expected = net[0](x).detach()
            assert (expected < 0).any()
            torch.testing.assert_close(lin, expected, rtol=0, atol=0)  # not the ReLU'd tensor
            torch.testing.assert_close(relu, expected.clamp(min=0), rtol=0, atol=0)
        assert tap._clone == {"0"}


def _mixer(seed: int, drop_path_rate: float = 0.0) -> nn.Module:
    import widesparse.models.mixer  # noqa: F401  (registers the Mixer family)
    from widesparse.models import create_model

    torch.manual_seed(seed)
    kw = {"image_size": 8, "patch_size": 4, "in_chans": 1, "dim": 6, "depth": 2, "num_classes": 3}
    return create_model("mixer", drop_path_rate=drop_path_rate, dtype=F64, **kw)


def test_forward_intermediates_path_and_subsets() -> None:
    model = _mixer(0)
    x = _rand(6, 1, 8, 8, seed=2)
    with features(model) as tap:
        assert tap.names == model.feature_names()
        got = tap(x)
    ref = model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    with features(model, ["blocks.1.channel", "blocks.0.token"]) as tap:
        sub = tap(x)
    assert torch.equal(sub[0], ref[3]) and torch.equal(sub[1], ref[0])
    with features(model, ["blocks.0", "norm"]) as tap:  # module names go through hooks
        hooked = tap(x)
    assert torch.equal(hooked[0], ref[1])
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="feature names"):
        with features(model, ["blocks.9.token"]):
            pass


# ------------------------------------------------------------------------------------------------ compare
def test_compare_equals_manual_accumulation_and_restores_modes() -> None:
    # stochastic layers in train mode (drop path, dropout): compare must run both models in eval mode
    model_a = _mixer(0, drop_path_rate=0.5)
    model_b = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5), nn.Linear(10, 7)).double()
    model_a.train()
    model_b.eval()
    model_b[2].train()  # mixed modes come back as they were
    x = _rand(30, 1, 8, 8, seed=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=10, shuffle=False)
    res = cka.compare(model_a, model_b, loader, layers_b=["1", "2", "3"], passes=2, progress=False)
    assert all(m.training for m in model_a.modules())
    assert [m.training for m in model_b] == [False, False, True, False] and not model_b.training
    manual = MinibatchCKA(4, 3)
    model_a.eval()
    model_b.eval()
    for _ in range(2):
        for (b,) in loader:
            with torch.no_grad():
                h = model_b[1](model_b[0](b))
                manual.update(model_a.forward_intermediates(b, intermediates_only=True), [h, h, model_b(b)])
    model_a.train()
    np.testing.assert_allclose(res.matrix, manual.compute().numpy(), rtol=0, atol=1e-13)
    assert res.names_a == model_a.feature_names() and res.names_b == ["1", "2", "3"]
    assert (res.num_batches, res.num_examples) == (6, 60)
    assert res.diagonal_mean == pytest.approx(np.mean(np.diagonal(res.matrix)))
    solo = cka.compare(model_a, None, loader, passes=1, progress=False)
    np.testing.assert_allclose(np.diagonal(solo.matrix), 1.0, rtol=0, atol=1e-13)
    assert _no_hooks(model_a) and _no_hooks(model_b)


def test_run_comparison_writes_files(tmp_path: Path) -> None:
    from widesparse.analysis.plots import plot_cka

    model_a, model_b = _mixer(1), _mixer(2)
    x = _rand(22, 1, 8, 8, seed=5)  # batches of 8: 8 + 14 (a tail of 6 >= 4 stays), reshuffled per pass
    out = cka.run_comparison(
        model_a,
        model_b,
        x,
        tmp_path / "ab",
        batch_size=8,
        passes=3,
        progress=False,
        plot_fn=plot_cka,
        label_a="mixer 1",
        label_b="mixer 2",
    )
    mat = np.load(tmp_path / "ab" / "cka.npy")
    assert mat.shape == (4, 4) and out["names_b"] == model_b.feature_names()
    assert out["diag_mean"] == pytest.approx(float(np.mean(np.diagonal(mat))))
    assert (out["num_batches"], out["num_examples"]) == (9, 66)
    with open(tmp_path / "ab" / "cka.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[1]["layer_b"] == "blocks.0.channel"
    assert float(rows[5]["cka"]) == mat[1, 1]
    assert (tmp_path / "ab" / "cka.png").read_bytes()[:4] == b"\x89PNG"
    cka.run_comparison(model_a, model_b, x, tmp_path / "again", batch_size=8, passes=3, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "cka.npy"), mat)  # seeded
    assert not (tmp_path / "again" / "cka.png").exists()
    solo = cka.run_comparison(model_a, None, x, tmp_path / "self", batch_size=10, passes=1, progress=False)
    assert solo["diag_mean"] == pytest.approx(1.0, abs=1e-13) and solo["num_batches"] == 2  # tail of 2 merged
    with pytest.raises(ValueError, match="batch_size >= 4"):
        cka.run_comparison(model_a, None, x, tmp_path / "bad", batch_size=3, passes=1, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_grams_match_cpu_float64() -> None:
    batches = [(_related(64, [40, 30], seed=k), _related(64, [20], seed=k + 7)) for k in range(3)]
    cpu, gpu = MinibatchCKA(2, 1), MinibatchCKA(2, 1, gram_dtype=torch.float32)
    for fa, fb in batches:
        cpu.update(fa, fb)
        gpu.update([f.float().cuda() for f in fa], [f.float().cuda() for f in fb])
    assert gpu.cross.device.type == "cuda" and gpu.cross.dtype == F64
    torch.testing.assert_close(gpu.compute().cpu(), cpu.compute(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocks", [1, 4])
def test_float32_grams_on_the_onednn_route_match_float64(blocks, onednn_route):
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(130, 7, 3, generator=g), torch.randn(130, 21, generator=g), torch.randn(130, 5, generator=g)]
    got = gram_matrices(feats, dtype=torch.float32, blocks=blocks)
    ref = gram_matrices(feats, dtype=torch.float64, blocks=blocks)
    assert got.dtype == torch.float32 and got.shape == (3, 130, 130)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
