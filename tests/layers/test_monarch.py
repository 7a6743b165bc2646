"""Monarch layers, the Mixer-Monarch correspondence (docs/theory.md (13)) and the E4 models."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import widesparse.models.monarch_mlp  # noqa: F401  (registers monarch_mlp, kron_mlp)
from widesparse.layers.monarch import (
    MonarchLinear,
    TiedMonarchLinear,
    monarch_effective,
    monarch_factors_dense,
    monarch_multiply,
    monarch_multiply_reference,
    monarch_shape,
    project_kron,
    project_monarch,
    projection_error,
)
from widesparse.linalg import commutation_matrix_dense, unvec, vec
from widesparse.models import create_model
from widesparse.models.blocks import MixerBlock

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# (in, out, nblocks, out_blocks): square b^2, rectangular with the default out_blocks, non-square blocks both ways
SHAPES = [(16, 16, 4, None), (12, 32, 3, None), (12, 35, 4, 5), (20, 6, 5, 2), (6, 6, 1, None), (6, 6, 6, None)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def _random_monarch(i: int, o: int, nb: int, ob: int | None, seed: int = 0) -> MonarchLinear:
    layer = MonarchLinear(i, o, nb, out_blocks=ob, dtype=F64)
    with torch.no_grad():
        for k, p in enumerate(layer.parameters()):
            p.copy_(_randn(*p.shape, seed=seed + k))
    return layer


# ------------------------------------------------------------------------------------ equation (13)
@pytest.mark.parametrize(("S", "C", "S_out", "C_out"), [(4, 4, 4, 4), (3, 5, 3, 5), (5, 3, 5, 3), (3, 4, 2, 5)])
def test_equation_13_kron_is_tied_monarch(S: int, C: int, S_out: int, C_out: int) -> None:
    W, V, X = _randn(S_out, S, seed=1), _randn(C, C_out, seed=2), _randn(7, S, C, seed=3)
    kron = torch.kron(V.T.contiguous(), W)
    # J_c^T (I_S ⊗ V^T) J_c (I_C ⊗ W), with the commutations of the rectangular case: K_{C',S'} ... K_{S',C}
    mixer_form = (
        commutation_matrix_dense(C_out, S_out)
        @ torch.kron(torch.eye(S_out, dtype=F64), V.T.contiguous())
        @ commutation_matrix_dense(S_out, C)
        @ torch.kron(torch.eye(C, dtype=F64), W)
    )
    tied = TiedMonarchLinear.from_factors(W, V)
    blocks_r, blocks_l = W.expand(C, S_out, S), V.T.expand(S_out, C_out, C)  # all R_c = W, all L_r = V^T
    P, L, Pt, R = monarch_factors_dense(blocks_r, blocks_l)
    if S_out == S and C_out == C:  # the square case of docs/theory.md (13): P = J_c^T
        torch.testing.assert_close(P, commutation_matrix_dense(S, C).T, rtol=0, atol=0)
        torch.testing.assert_close(Pt, commutation_matrix_dense(S, C), rtol=0, atol=0)
    for other in (mixer_form, P @ L @ Pt @ R, monarch_effective(blocks_r, blocks_l), tied.effective_weight()):
        assert (other - kron).abs().max() < 1e-10
    # and the layers compute vec(W X V)
    free = MonarchLinear(S * C, S_out * C_out, C, out_blocks=S_out, bias=False, dtype=F64)
    with torch.no_grad():
        free.weight_r.copy_(blocks_r)
        free.weight_l.copy_(blocks_l)
    for layer in (tied, free):
        assert (layer(vec(X)) - vec(W @ X @ V)).abs().max() < 1e-10


def test_tied_layer_is_the_linear_s_mixer_layer() -> None:
    S, C = 4, 3
    block = MixerBlock(S, C, None, None, act_layer=nn.Identity, residual=False, outer_act=False, dtype=F64)
    tok, ch = block.mlp_tokens.fc1, block.mlp_channels.fc1
    W, V, b_tok, b_ch = _randn(S, S, seed=1), _randn(C, C, seed=2), _randn(S, seed=3), _randn(C, seed=4)
    with torch.no_grad():
        tok.weight.copy_(W)
        tok.bias.copy_(b_tok)
        ch.weight.copy_(V.T)  # channel mixing X V is F.linear with weight V^T
        ch.bias.copy_(b_ch)
    tied = TiedMonarchLinear.from_factors(W, V, bias=True)
    with torch.no_grad():
        tied.bias_r.copy_(b_tok)
        tied.bias_l.copy_(b_ch)
    X = _randn(5, S, C, seed=5)
    assert (tied(vec(X)) - vec(block(X))).abs().max() < 1e-12
    # same effective matrix and bias as the two Kronecker mixing steps composed
    torch.testing.assert_close(tied.effective_weight(), ch.effective_weight() @ tok.effective_weight())
    torch.testing.assert_close(
        tied.effective_bias(), ch.effective_weight() @ tok.effective_bias() + ch.effective_bias()
    )
    assert tied.factor_connections == S * S * C + C * C * S


# ------------------------------------------------------------------------------------ the free layer
@pytest.mark.parametrize(("i", "o", "nb", "ob"), SHAPES)
def test_free_layer_matches_its_effective_weight_with_gradients(i: int, o: int, nb: int, ob: int | None) -> None:
    layer = _random_monarch(i, o, nb, ob)
    x = _randn(2, 3, i, seed=9).requires_grad_()
    y = layer(x)
    assert y.shape == (2, 3, o)
    assert (y - layer.dense_forward(x)).abs().max() < 1e-10
    # gradients of the hand-written backward = gradients through the dense product of the factors
    g = _randn(2, 3, o, seed=10)
    grads = torch.autograd.grad(y, (x, layer.weight_r, layer.weight_l, layer.bias), g)
    dense = nn.functional.linear(x, monarch_effective(layer.weight_r, layer.weight_l), layer.bias)
    ref = torch.autograd.grad(dense, (x, layer.weight_r, layer.weight_l, layer.bias), g)
    for a, b in zip(grads, ref, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_kernel_gradcheck_reference_and_strided_input() -> None:
    wr, wl = _randn(3, 5, 4, seed=1).requires_grad_(), _randn(5, 2, 3, seed=2).requires_grad_()
    x = _randn(6, 12, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(monarch_multiply, (x, wr, wl))
    torch.testing.assert_close(monarch_multiply(x, wr, wl), monarch_multiply_reference(x, wr, wl))
    xt = _randn(12, 6, seed=4).T  # a non-contiguous input
    torch.testing.assert_close(monarch_multiply(xt, wr, wl), monarch_multiply_reference(xt, wr, wl))
    empty = monarch_multiply(x[:0], wr, wl)
    assert empty.shape == (0, 10)
    y = monarch_multiply(x, wr, wl)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()  # second derivatives are refused, not silently wrong


@pytest.mark.parametrize("bias", [True, False])
def test_float32_cpu_route_matches_the_float64_kernel(bias: bool, onednn_route: bool) -> None:
    """The float32 CPU route (grouped 1x1 convolutions on oneDNN) against the batched-matmul kernel in float64."""
    from widesparse.ops.matmul import use_onednn

    wr, wl = _randn(3, 5, 4, seed=5), _randn(5, 2, 3, seed=6)
    b = _randn(10, seed=7) if bias else None
    x = _randn(2, 6, 12, seed=8)
    g = _randn(2, 6, 10, seed=9)
    leaves64 = [t.clone().requires_grad_() for t in (x, wr, wl) + ((b,) if bias else ())]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    assert use_onednn(leaves32[0].reshape(-1, 12)) == onednn_route
    y64 = monarch_multiply(*leaves64[:3], leaves64[3] if bias else None)
    y32 = monarch_multiply(*leaves32[:3], leaves32[3] if bias else None)
    assert y32.dtype == torch.float32 and y32.shape == (2, 6, 10)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad(y32, leaves32, g.float()), torch.autograd.grad(y64, leaves64, g),
                    strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_autocast_follows_the_ambient_dtype() -> None:
    layer = MonarchLinear(64, 64, 8)
    x = torch.randn(4, 64, generator=_gen(1))
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert layer.weight_r.grad is not None and layer.weight_r.grad.dtype == torch.float32


def test_connections_parameters_and_repr() -> None:
    layer = _random_monarch(12, 35, 4, 5)
    assert layer.shape == monarch_shape(12, 35, 4, 5) == (4, 3, 5, 7)
    assert layer.connections == 12 * 35 == torch.count_nonzero(layer.effective_weight()).item()
    assert layer.density == 1.0
    assert layer.factor_connections == layer.weight_r.numel() + layer.weight_l.numel() == 4 * 5 * 3 + 5 * 7 * 4
    b = 28  # E4 on MNIST: 2 b^3 free weights, 2 b^2 tied
    assert MonarchLinear(b * b, b * b, b, bias=False, device="meta").factor_connections == 2 * b**3
    assert (
        sum(p.numel() for p in TiedMonarchLinear(b * b, b * b, b, bias=False, device="meta").parameters()) == 2 * b**2
    )
    assert "R: 4 blocks 5x3, L: 5 blocks 7x4" in repr(layer)


def test_init_gives_unit_effective_variance_and_is_seeded() -> None:
    layer = MonarchLinear(1024, 1024, 32, generator=_gen(3))
    var = layer.effective_weight(F64).var().item() * 1024
    assert 0.9 < var < 1.1
    again = MonarchLinear(1024, 1024, 32, generator=_gen(3))
    assert torch.equal(layer.weight_r, again.weight_r) and torch.equal(layer.weight_l, again.weight_l)


def test_torch_structured_parity_when_installed() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = pytest.importorskip("torch_structured.monarch.monarch_linear")
    b = 4
    ours = _random_monarch(b * b, b * b, b, None).float()
    theirs = ts.MonarchLinear(b * b, b * b, nblocks=b, bias=False)
    with torch.no_grad():
        theirs.w1.copy_(ours.weight_r)
        theirs.w2.copy_(ours.weight_l)
    x = torch.randn(3, b * b, generator=_gen(2))
    torch.testing.assert_close(ours(x) - ours.bias, theirs(x))


# ---------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize(("i", "o", "nb", "ob"), SHAPES)
def test_projection_returns_a_monarch_matrix_exactly(i: int, o: int, nb: int, ob: int | None) -> None:
    M = _random_monarch(i, o, nb, ob).effective_weight()
    wr, wl = project_monarch(M, nb, ob)
    assert (monarch_effective(wr, wl) - M).abs().max() < 1e-10
    assert projection_error(M, nb, ob) < 1e-12
    proj = MonarchLinear.from_dense(M, nb, ob)
    assert (proj.effective_weight() - M).abs().max() < 1e-10


def test_projection_error_is_the_blockwise_rank_one_residual() -> None:
    k, p, q, s = 3, 4, 5, 2
    M = _randn(q * s, k * p, seed=4)
    expected = 0.0
    for r in range(q):
        for c in range(k):
            block = torch.stack([M[j * q + r, c * p : (c + 1) * p] for j in range(s)])  # (s, p)
            sv = torch.linalg.svdvals(block)
            expected += (sv[1:] ** 2).sum().item()
    err = projection_error(M, k, q, relative=False)
    assert err == pytest.approx(expected**0.5, rel=1e-10)
    assert projection_error(M, k, q) == pytest.approx(err / M.norm().item(), rel=1e-12)
    # a random dense matrix is far from the class; a Monarch matrix is not Kronecker (tied projection loses)
    assert projection_error(M, k, q) > 0.3
    assert projection_error(_random_monarch(16, 16, 4, None).effective_weight(), 4, tied=True) > 0.3


def test_kron_projection_is_exact_and_balanced() -> None:
    W, V = _randn(3, 4, seed=1), _randn(5, 2, seed=2)
    M = torch.kron(V.T.contiguous(), W)
    W2, Vt2 = project_kron(M, 5, 3)
    assert (torch.kron(Vt2, W2) - M).abs().max() < 1e-10
    assert W2.norm().item() == pytest.approx(Vt2.norm().item(), rel=1e-12)
    assert projection_error(M, 5, 3, tied=True) < 1e-12
    tied = TiedMonarchLinear.from_dense(M, 5, 3)
    assert (tied.effective_weight() - M).abs().max() < 1e-10


def test_bad_block_counts_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"nblocks=3 does not divide in_features=10.*valid nblocks: 1, 2, 5, 10"):
        MonarchLinear(10, 10, 3)
    with pytest.raises(
        ValueError, match=r"out_blocks=4 \(default: in_features/nblocks\) does not divide out_features=10"
    ):
        TiedMonarchLinear(12, 10, 3)
    with pytest.raises(ValueError, match=r"out_blocks=3 does not divide out_features=10.*1, 2, 5, 10"):
        MonarchLinear(12, 10, 3, out_blocks=3)
    with pytest.raises(ValueError, match=r"nblocks must be a positive integer, got 0"):
        MonarchLinear(12, 12, 0)
    with pytest.raises(ValueError, match=r"input has 11 features, the layer expects k\*p = 3\*4 = 12"):
        MonarchLinear(12, 12, 3)(torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"input has 11 features, the layer expects 12"):
        TiedMonarchLinear(12, 12, 3)(torch.zeros(2, 11))
    with pytest.raises(ValueError, match=r"nblocks=5 does not divide in_features=12"):
        project_monarch(torch.zeros(12, 12), 5)


# ------------------------------------------------------------------------------------------ E4 models
def _images(batch: int = 3, chans: int = 1, size: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=_gen(0), dtype=dtype)


@pytest.mark.parametrize("name", ["monarch_mlp", "kron_mlp"])
@pytest.mark.parametrize("chans", [1, 2])
def test_model_is_the_explicit_mlp_of_its_effective_weights(name: str, chans: int) -> None:
    model = create_model(name, image_size=8, in_chans=chans, num_classes=4, patch_size=2, seed=1, dtype=F64).eval()
    for layer in model.layers:  # non-zero biases so that they are checked too
        for p in layer.parameters():
            if p.ndim == 1:
                with torch.no_grad():
                    p.copy_(_randn(*p.shape, seed=p.numel()))
    x = _images(chans=chans, dtype=F64)
    h = x.permute(0, 3, 1, 2).reshape(3, -1)  # vec X, X[h, w*chans + ch] = image[ch, h, w]
    for layer in model.layers:
        h = nn.functional.gelu(h @ layer.effective_weight().T + layer.effective_bias())
    assert (model(x) - model.head(h)).abs().max() < 1e-10
    assert (model.num_tokens, model.dim) == (8, 8 * chans)


def test_kron_mlp_layer_on_an_image_is_vec_w_x_v() -> None:
    model = create_model("kron_mlp", image_size=8, in_chans=1, num_classes=3, bias=False, dtype=F64)
    x = _images(dtype=F64)
    layer = model.layers[0]
    X = x[:, 0]  # (B, H, W): the image is X
    assert (layer(model.to_vec(x)) - vec(layer.W @ X @ layer.V)).abs().max() < 1e-12


def test_e4_parameter_counts() -> None:
    b, classes = 28, 10
    head = b * b * classes + classes
    m = create_model("monarch_mlp", device="meta")
    k = create_model("kron_mlp", device="meta")
    assert sum(p.numel() for p in m.parameters()) == 2 * (2 * b**3 + b * b) + head
    assert sum(p.numel() for p in k.parameters()) == 2 * (2 * b**2 + 2 * b) + head


@pytest.mark.parametrize("name", ["monarch_mlp", "kron_mlp"])
def test_model_surface(name: str) -> None:
    model = create_model(name, image_size=8, in_chans=2, num_classes=4, depth=3, seed=0).eval()
    x = _images(chans=2)
    feats = model.forward_features(x)
    assert feats.shape == (3, 8, 16)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 128)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(model.feature_names()) == 3
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(inter[-1], feats)
    vecs = model.forward_intermediates(x, indices=[0], output_fmt="vec", intermediates_only=True, stop_early=True)
    torch.testing.assert_close(vecs[0], vec(inter[0]))
    torch.testing.assert_close(unvec(vecs[0], 8, 16), inter[0])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])
    assert torch.equal(model.forward_intermediates(x, norm=True)[0], model.norm(feats))  # no norm: identity
    model.reset_classifier(0)
    assert model(x).shape == (3, 128)
    model.reset_classifier(7)
    assert model(x).shape == (3, 7)


@pytest.mark.parametrize("name", ["monarch_mlp", "kron_mlp"])
def test_gradients_save_load_and_seeds(name: str) -> None:
    model = create_model(name, image_size=8, in_chans=1, num_classes=4, seed=3)
    model(_images()).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = create_model(name, image_size=8, in_chans=1, num_classes=4, seed=11)
    assert not torch.equal(other.layers[0].weight_r, model.layers[0].weight_r)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other(_images()), model(_images()))
    # the seed fixes the weights whatever the global RNG
    torch.manual_seed(123)
    again = create_model(name, image_size=8, in_chans=1, num_classes=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(), strict=True))


def test_model_bad_input() -> None:
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['dim'\]; valid: .*'nblocks'"):
        create_model("monarch_mlp", dim=5)
    with pytest.raises(ValueError, match=r"nblocks=5 must divide the n = H\*W\*in_chans = 64 input pixels"):
        create_model("kron_mlp", image_size=8, nblocks=5)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\), got \(2, 1, 7, 7\)"):
        create_model("monarch_mlp", image_size=8)(torch.zeros(2, 1, 7, 7))
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        create_model("kron_mlp", depth=0)


def test_train_loop_runs_both_models_on_digits(tmp_path) -> None:
    from widesparse.train.engine import TrainConfig, train

    for name in ("monarch_mlp", "kron_mlp"):  # as `widesparse train --model NAME --dataset digits` calls them
        cfg = TrainConfig(
            model=name,
            epochs=4,
            warmup_epochs=0,
            lr=1e-2,
            weight_decay=0.0,
            out_dir=str(tmp_path),
            num_threads=1,
            progress=False,
        )
        summary = train(cfg)
        assert summary["test_acc"] > 0.85, (name, summary["test_acc"])
