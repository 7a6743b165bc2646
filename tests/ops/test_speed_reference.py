"""The fast paths of the Mixer family (token-major (S, B, C) layout, fused GEMM biases, gathers) against a slow
float64 reference written from the equations (PAPER.md (1)-(2), §4.3), to 1e-10."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from widesparse.models import create_model

F64 = torch.float64
KW = {"image_size": 8, "patch_size": 2, "in_chans": 3, "dim": 6, "depth": 2, "token_hidden": 5,
      "channel_hidden": 7, "num_classes": 4, "dtype": F64}


def _vec(X: torch.Tensor) -> torch.Tensor:  # (B, S, C) -> column-major vec (B, S*C)
    return X.transpose(1, 2).reshape(X.shape[0], -1)


def _unvec(x: torch.Tensor, S: int, C: int) -> torch.Tensor:
    return x.reshape(x.shape[0], C, S).transpose(1, 2)


def _mlp(mlp, X: torch.Tensor) -> torch.Tensor:
    """Reference mixing MLP: J_2 (layers) J_1 on vec X, with explicit einsums over the small matrices."""
    S, C = X.shape[1:]
    layers = mlp.layers
    if layers[0].perm_in is not None:
        X = _unvec(_vec(X)[:, layers[0].perm_in], S, C)
    for i, layer in enumerate(layers):
        w, b = layer.weight, layer.bias
        if mlp.axis == "token":
            X = torch.einsum("ds,bsc->bdc", w, X) + (0 if b is None else b[None, :, None])
        else:
            X = torch.einsum("bsc,dc->bsd", X, w) + (0 if b is None else b[None, None, :])
        if i < len(layers) - 1:
            X = mlp.act(X)
    if layers[-1].perm_out is not None:
        X = _unvec(_vec(X)[:, layers[-1].perm_out], X.shape[1], X.shape[2])
    return X


def reference_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Slow Mixer forward: explicit patch cutting, per-block equations, LayerNorm, mean, head."""
    B, K, H, W = x.shape
    p = model.stem.patch_size[0]
    patches = x.reshape(B, K, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, K * p * p)
    w = model.stem.proj.weight.reshape(model.dim, -1)
    X = torch.einsum("bsk,ck->bsc", patches, w) + model.stem.proj.bias
    for blk in model.blocks:
        for norm, mlp in ((blk.norm1, blk.mlp_tokens), (blk.norm2, blk.mlp_channels)):
            h = norm(X) if isinstance(norm, torch.nn.LayerNorm) else X
            y = _mlp(mlp, h)
            if blk.act is not None:
                y = blk.act(y)
            X = X + y if blk.residual else y
    X = F.layer_norm(X, (model.dim,), model.norm.weight, model.norm.bias, model.norm.eps)
    return X.mean(1) @ model.head.weight.T + model.head.bias


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model(name, **{**KW, **kw})
    with torch.no_grad():
        torch.nn.init.normal_(m.head.weight)  # the zero-initialised head would hide every difference
        for mod in m.modules():  # non-trivial biases and LayerNorm parameters
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
            elif getattr(mod, "bias", None) is not None and mod is not m.head:
                mod.bias.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("name", ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer"])
@pytest.mark.parametrize("layout", ["bsc", "sbc"])
def test_forward_and_gradients_match_reference(name: str, layout: str) -> None:
    m = _model(name)
    m.layout = layout
    x = torch.randn(3, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = reference_forward(m, x)
    out = m(x)
    assert out.shape == (3, 4)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10), (out - ref).abs().max()
    g = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    for (n, _), a, b in zip(m.named_parameters(), g, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10 * max(1.0, b.abs().max().item())), n


@pytest.mark.parametrize("name", ["mixer", "rp_mixer"])
def test_layouts_agree_with_drop_path_and_checkpointing(name: str) -> None:
    m = _model(name, drop_path_rate=0.4)
    x = torch.randn(5, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    outs = []
    for layout, ckpt in (("bsc", False), ("sbc", False), ("sbc", True)):
        m.layout = layout
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(7)  # the same drop-path draws in both layouts
        out = m(x)
        outs.append((out, torch.autograd.grad(out.sum(), m.blocks[0].mlp_tokens.fc1.weight)[0]))
    for out, grad in outs[1:]:
        assert torch.allclose(out, outs[0][0], rtol=0, atol=1e-10)
        assert torch.allclose(grad, outs[0][1], rtol=0, atol=1e-10)
    # dropping must have happened: eval mode differs
    m.eval()
    assert not torch.allclose(m(x), outs[0][0], atol=1e-6)


def test_auto_layout_picks_token_major_under_autocast_only() -> None:
    m = _model("mixer", dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    assert not m._token_major(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m._token_major(x)
        low = m(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), m(x), atol=0.1 * m(x).abs().max().item())
    m.layout = "columns"
    with pytest.raises(ValueError, match="'auto', 'sbc' or 'bsc', got 'columns'"):
        m(x)


@pytest.mark.parametrize("name", ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer"])
def test_auto_layout_keeps_the_rp_mixer_batch_major_in_cpu_bf16(name: str) -> None:
    """In bf16 on the CPU the RP-Mixer stays batch-major, its token mixing over channel-major storage; the Mixer
    and the (chained) S-Mixers go token-major. Both under autocast and for a bfloat16 model."""
    from unittest import mock

    from widesparse.models.blocks import MixingMlp

    m = _model(name, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    for low, inp in ((m, x), (copy.deepcopy(m).bfloat16(), x.bfloat16())):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low is m):
            assert low._token_major(inp) == (name != "rp_mixer")
            with mock.patch.object(MixingMlp, "_after_input", autospec=True,
                                   side_effect=MixingMlp._after_input) as spy:
                out = low(inp)
        assert any(c.args[3] for c in spy.call_args_list) == (name == "rp_mixer")  # token_last
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer"])
def test_float32_cpu_route_matches_float64_reference(name: str, onednn_route: bool) -> None:
    """The float32 CPU route (oneDNN 1x1 convolutions, token mixing over channel-major storage) in both layouts."""
    from unittest import mock

    from widesparse.models.blocks import MixingMlp

    m = _model(name)
    m32 = copy.deepcopy(m).float()
    x = torch.randn(3, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    ref = reference_forward(m, x)
    g_ref = torch.autograd.grad(ref.square().sum(), list(m.parameters()))
    for layout in ("bsc", "sbc"):
        m32.layout = layout
        with mock.patch.object(MixingMlp, "_after_input", autospec=True,
                               side_effect=MixingMlp._after_input) as spy:
            out = m32(x.float())
        # the RP S-Mixer composes its permutations in sublayer_chain instead
        token_last = any(c.args[3] for c in spy.call_args_list)
        assert token_last == (layout == "bsc" and onednn_route and name != "rp_s_mixer")
        assert torch.allclose(out.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
        g = torch.autograd.grad(out.square().sum(), list(m32.parameters()))
        for (n, _), a, b in zip(m32.named_parameters(), g, g_ref, strict=True):
            assert torch.allclose(a.double(), b, rtol=0, atol=1e-3 * max(1.0, b.abs().max().item())), (layout, n)


@pytest.mark.parametrize("name", ["mixer", "rp_mixer"])
def test_layouts_agree_under_bf16_autocast(name: str) -> None:
    """The token-major path casts inside its first RP gather: same values as the batch-major path up to bf16."""
    m = _model(name, dtype=torch.float32)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = {}
    for layout in ("bsc", "sbc"):
        m.layout = layout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        grads = torch.autograd.grad(out.float().square().sum(), list(m.parameters()))
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        outs[layout] = out.float()
    scale = outs["bsc"].abs().max().item()
    assert torch.allclose(outs["sbc"], outs["bsc"], rtol=0, atol=0.05 * scale)


# dynamo itself instantiates autograd.Function classes while tracing the RP gathers (a torch-internal warning)
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
@pytest.mark.parametrize("layout", ["bsc", "sbc"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_has_no_graph_breaks(layout: str, precision: str, onednn_route: bool) -> None:
    """Every route (the float32 oneDNN one included: its size and thread checks) traces as one graph."""
    m = _model("rp_mixer", dtype=torch.float32)
    m.layout = layout
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        explanation = torch._dynamo.explain(m)(torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("layout", ["bsc", "sbc"])
@pytest.mark.parametrize("mixing_layers", [1, 2])
def test_rp_s_mixer_composes_consecutive_permutations(layout: str, mixing_layers: int) -> None:
    """J_1' act(J_2 z) = act(J_1' J_2 z): the chained forward equals block-by-block, forward and backward."""
    from widesparse.models.chain import sublayer_chain

    torch.manual_seed(0)
    m = create_model("rp_s_mixer", image_size=8, in_chans=1, patch_size=2, dim=6, depth=3,
                     mixing_layers=mixing_layers, dtype=torch.float64)
    m.layout = layout
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    sbc = layout == "sbc"
    stem = (lambda t: m.stem.forward_sbc(t)) if sbc else m.stem
    h = stem(x)
    chained = sublayer_chain(m.blocks, h, sbc)
    assert chained is not None
    plain = h
    for blk in m.blocks:
        plain = blk.forward_sbc(plain) if sbc else blk(plain)
    assert torch.equal(chained, plain)
    w = torch.randn_like(plain)
    g1 = torch.autograd.grad((chained * w).sum(), list(m.parameters()), allow_unused=True, retain_graph=True)
    g2 = torch.autograd.grad((plain * w).sum(), list(m.parameters()), allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=0, atol=1e-12)
    assert sublayer_chain(create_model("rp_mixer", image_size=8, in_chans=1, patch_size=2, dim=6, depth=1).blocks,
                          torch.randn(2, 16, 6), False) is None  # LayerNorm and skips: nothing to compose
