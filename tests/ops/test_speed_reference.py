"""Every route of the Mixer family's forward (widesparse.ops.route / ops.mixer) against a slow float64 reference
written from the equations (docs/theory.md (1)-(3), §4.3), and the router's choice in each case."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from widesparse.models import create_model
from widesparse.ops import mixer as ops_mixer
from widesparse.ops.route import Route, fast_routes

F64 = torch.float64
BF16 = torch.bfloat16
NAMES = ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer"]
KW = {"image_size": 8, "patch_size": 2, "in_chans": 3, "dim": 6, "depth": 2, "token_hidden": 5,
      "channel_hidden": 7, "num_classes": 4, "dtype": F64}

# every executor configuration; "chain" only for the S-Mixers (the router never picks it elsewhere)
ONEDNN = {"onednn_token": True, "onednn_channel": True}  # the 1x1-convolution products (any float dtype)
ROUTES = {
    "plain": Route("plain"),
    "plain+ckpt": Route("plain", checkpoint=True),
    "bsc": Route("bsc"),
    "bsc+onednn": Route("bsc", **ONEDNN),
    "bsc+token_last": Route("bsc", token_last=True),
    "bsc+token_last+onednn": Route("bsc", token_last=True, **ONEDNN),
    "bsc+fused": Route("bsc", fuse_norm_j1=True, fuse_j2_add=True),
    "bsc+token_last+fused": Route("bsc", token_last=True, fuse_norm_j1=True, fuse_j2_add=True, **ONEDNN),
    "bsc+ckpt": Route("bsc", token_last=True, checkpoint=True, fuse_norm_j1=True, fuse_j2_add=True, **ONEDNN),
    "sbc": Route("sbc"),
    "sbc+onednn": Route("sbc", **ONEDNN),
    "sbc+ckpt": Route("sbc", checkpoint=True),
    "bsc+chain": Route("bsc", chain=True),
    "bsc+chain+onednn": Route("bsc", chain=True, **ONEDNN),
    "sbc+chain": Route("sbc", chain=True),
}


def _routes(name: str) -> list[str]:
    return [r for r in ROUTES if "chain" not in r or "s_mixer" in name]


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


def forward_on(model, x: torch.Tensor, route: Route) -> torch.Tensor:
    """The model's forward on a given route (forward_features with the router's choice replaced)."""
    specs = model.mixing_specs()
    sbc = route.layout == "sbc"
    h = model.stem.forward_sbc(x) if sbc else model.stem(x)
    h = model.norm(ops_mixer.run_blocks(route, model.blocks, specs, h))
    return model.forward_head(h.transpose(0, 1) if sbc else h)


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


def _x(seed: int = 1, batch: int = 3, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _grads(out: torch.Tensor, model) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out.float().square().sum() if out.dtype != F64 else out.square().sum(),
                                    list(model.parameters())))


@pytest.mark.parametrize("name", NAMES)
def test_every_route_matches_the_reference_in_float64(name: str) -> None:
    m = _model(name)
    x = _x()
    ref = reference_forward(m, x)
    g_ref = _grads(ref, m)
    for r in _routes(name):
        out = forward_on(m, x, ROUTES[r])
        assert torch.allclose(out, ref, rtol=0, atol=1e-10), (r, (out - ref).abs().max())
        for (n, _), a, b in zip(m.named_parameters(), _grads(out, m), g_ref, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-10 * max(1.0, b.abs().max().item())), (r, n)


@pytest.mark.parametrize("name", NAMES)
def test_every_route_matches_the_reference_in_float32(name: str, onednn_route: bool) -> None:
    """The float32 CPU route (oneDNN 1x1 convolutions, the compiled J_2 + residual) on every executor."""
    m = _model(name)
    m32 = copy.deepcopy(m).float()
    x = _x(4)
    ref = reference_forward(m, x)
    g_ref = _grads(ref, m)
    for r in _routes(name):
        out = forward_on(m32, x.float(), ROUTES[r])
        assert torch.allclose(out.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item()), r
        for (n, _), a, b in zip(m32.named_parameters(), _grads(out, m32), g_ref, strict=True):
            assert torch.allclose(a.double(), b, rtol=0, atol=1e-3 * max(1.0, b.abs().max().item())), (r, n)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_every_route_matches_the_reference_in_bf16(name: str, precision: str) -> None:
    """bf16 autocast over a float32 model and a bf16 model (the compiled LayerNorm + J_1 and J_2 + residual
    where built): every route within bf16 rounding of the float64 reference, forward and backward."""
    m = _model(name)
    low = copy.deepcopy(m).float() if precision == "autocast" else copy.deepcopy(m).to(BF16)
    x = _x(5, batch=4)
    ref = reference_forward(m, x)
    g_ref = _grads(ref, m)
    xin = x.float() if precision == "autocast" else x.to(BF16)
    scale = ref.abs().max().item()
    for r in _routes(name):
        with torch.autocast("cpu", dtype=BF16, enabled=precision == "autocast"):
            out = forward_on(low, xin, ROUTES[r])
        assert out.dtype == BF16
        assert torch.allclose(out.double(), ref, rtol=0, atol=0.05 * scale), (r, (out.double() - ref).abs().max())
        for (n, _), a, b in zip(low.named_parameters(), _grads(out, low), g_ref, strict=True):
            tol = 0.1 * max(1.0, b.abs().max().item())
            assert torch.allclose(a.double(), b, rtol=0, atol=tol), (r, n, (a.double() - b).abs().max())


def test_the_fused_kernels_run_where_the_route_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RP-Mixer's bf16 bsc route runs the compiled LayerNorm + J_1 and J_2 + residual passes (where built)
    and gives the values of the unfused route."""
    from widesparse.ops import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip("the CPU kernels did not build here")
    m = _model("rp_mixer", dtype=torch.float32)
    x = _x(6, dtype=torch.float32)
    calls = {"ln": 0, "add": 0}
    real_ln, real_add = ops_mixer.permuted_layer_norm, ops_mixer.permute_add
    monkeypatch.setattr(ops_mixer, "permuted_layer_norm", lambda *a: calls.__setitem__("ln", calls["ln"] + 1)
                        or real_ln(*a))
    monkeypatch.setattr(ops_mixer, "permute_add", lambda *a: calls.__setitem__("add", calls["add"] + 1)
                        or real_add(*a))
    with torch.autocast("cpu", dtype=BF16):
        route = m.route(x)
        fused = m(x)
        unfused = forward_on(m, x, route._replace(fuse_norm_j1=False, fuse_j2_add=False))
    assert route.fuse_norm_j1 and route.fuse_j2_add
    assert calls == {"ln": 4, "add": 4}  # two blocks, two sublayers each
    assert torch.allclose(fused.float(), unfused.float(), rtol=0, atol=0.02 * unfused.abs().max().item())


@pytest.mark.parametrize("name", ["mixer", "rp_mixer"])
def test_routes_agree_with_drop_path_and_checkpointing(name: str) -> None:
    m = _model(name, drop_path_rate=0.4)
    x = _x(2, batch=5)
    outs = []
    for layout, ckpt in (("plain", False), ("bsc", False), ("sbc", False), ("sbc", True), ("bsc", True)):
        m.layout = layout
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(7)  # the same drop-path draws on every route
        out = m(x)
        outs.append((out, torch.autograd.grad(out.sum(), m.blocks[0].mlp_tokens.fc1.weight)[0]))
    for out, grad in outs[1:]:
        assert torch.allclose(out, outs[0][0], rtol=0, atol=1e-10)
        assert torch.allclose(grad, outs[0][1], rtol=0, atol=1e-10)
    m.eval()  # dropping must have happened: eval mode differs
    assert not torch.allclose(m(x), outs[0][0], atol=1e-6)


def _expected(name: str, case: str, onednn: bool, kernels: bool) -> Route:
    rp, smixer = name.startswith("rp_"), "s_mixer" in name
    chain = rp and smixer
    if case == "fp32":
        return Route("bsc", token_last=onednn, chain=chain, fuse_j2_add=rp and kernels, onednn_token=onednn,
                     onednn_channel=onednn)
    # bf16 (autocast or tensors): token-major, except the RP-Mixer (its gathers land in each product's storage)
    if rp and not smixer:
        return Route("bsc", token_last=True, fuse_norm_j1=kernels, fuse_j2_add=kernels)
    return Route("sbc", chain=chain)


@pytest.mark.parametrize("name", NAMES)
def test_the_router_picks_the_expected_route(name: str, onednn_route: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from widesparse.ops import cpu_kernels

    m = _model(name, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    for kernels in (True, False):
        monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "1" if kernels else "0")
        assert cpu_kernels.enabled() == kernels
        assert m.route(x) == _expected(name, "fp32", onednn_route, kernels)
        with torch.autocast("cpu", dtype=BF16):
            assert m.route(x) == _expected(name, "bf16", onednn_route, kernels)
        assert copy.deepcopy(m).to(BF16).route(x.to(BF16)) == _expected(name, "bf16", onednn_route, kernels)
    monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "1")
    with torch.autocast("cpu", dtype=BF16):
        m.layout = "bsc"
        assert m.route(x).layout == "bsc" and m.route(x).token_last
        m.layout = "sbc"
        assert m.route(x).layout == "sbc"
    assert m.route(x).layout == "sbc"  # forced, also in float32
    m.layout = "plain"
    assert m.route(x) == Route("plain")
    m.layout = "auto"
    with fast_routes(False):
        assert m.route(x) == Route("plain")
    assert m.route(x).layout == "bsc"
    m.set_grad_checkpointing(True)
    assert m.route(x).checkpoint and not m.route(x).chain
    with torch.no_grad():
        assert not m.route(x).checkpoint and not m.route(x).chain
    m.layout = "columns"
    with pytest.raises(ValueError, match="'auto', 'bsc', 'sbc' or 'plain', got 'columns'"):
        m(x)


def test_the_router_calls_hooked_modules_and_drops_the_chain_for_them() -> None:
    m = _model("rp_s_mixer", dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    assert m.route(x).chain
    seen = []
    handle = m.blocks[1].mlp_channels.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    assert not m.route(x).chain and m.mixing_specs()[1][1].mlp.module is m.blocks[1].mlp_channels
    with torch.autocast("cpu", dtype=BF16):
        assert m.route(x).layout == "bsc"  # an RP S-Mixer that cannot chain runs as the RP-Mixer does
        m(x)
        m.layout = "sbc"
        m(x)
    m(x)
    handle.remove()
    assert seen == [(2, 16, 6)] * 3
    handle = m.blocks[0].register_forward_hook(lambda mod, i, o: seen.append("block"))
    assert m.mixing_specs()[0] is None
    m(x)
    m.layout = "bsc"
    m(x)
    handle.remove()
    assert seen[3:] == ["block", "block"]


# dynamo itself instantiates autograd.Function classes while tracing the RP gathers (a torch-internal warning)
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
@pytest.mark.parametrize("layout", ["bsc", "sbc", "plain"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_has_no_graph_breaks(layout: str, precision: str, onednn_route: bool) -> None:
    """Every route (the float32 oneDNN one included: its size and thread checks) traces as one graph."""
    m = _model("rp_mixer", dtype=torch.float32)
    m.layout = layout
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=BF16, enabled=precision == "bf16"):
        explanation = torch._dynamo.explain(m)(torch.randn(2, 3, 8, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("sbc", [False, True])
@pytest.mark.parametrize("mixing_layers", [1, 2])
def test_rp_s_mixer_chain_composes_consecutive_permutations(sbc: bool, mixing_layers: int) -> None:
    """J_1' act(J_2 z) = act(J_1' J_2 z): the chained executor equals block by block, forward and backward."""
    torch.manual_seed(0)
    m = create_model("rp_s_mixer", image_size=8, in_chans=1, patch_size=2, dim=6, depth=3,
                     mixing_layers=mixing_layers, dtype=F64)
    x = torch.randn(5, 1, 8, 8, dtype=F64)
    h = m.stem.forward_sbc(x) if sbc else m.stem(x)
    specs = m.mixing_specs()
    chained = ops_mixer.run_chain(specs, h, Route("sbc" if sbc else "bsc", chain=True))
    with mock.patch.object(ops_mixer, "run_chain", side_effect=AssertionError("no chain")):
        plain = ops_mixer.run_blocks(Route("sbc" if sbc else "bsc"), m.blocks, specs, h)
    assert torch.equal(chained, plain)
    w = torch.randn_like(plain)
    g1 = torch.autograd.grad((chained * w).sum(), list(m.parameters()), allow_unused=True, retain_graph=True)
    g2 = torch.autograd.grad((plain * w).sum(), list(m.parameters()), allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=0, atol=1e-12)
