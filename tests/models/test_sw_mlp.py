"""The SW-MLP and dense MLP models (docs/theory.md §4.2, (10)): sizes, Mixer matching, backends, the Mixer
surface."""

from __future__ import annotations

import math

import pytest
import torch

import widesparse.models.sw_mlp  # noqa: F401  (registers sw_mlp and mlp)
from widesparse.budget import connections_per_layer
from widesparse.effective import describe, to_wide_mlp
from widesparse.layers.sparse import MaskedLinear, SparseLinear
from widesparse.models import create_model, list_models

from helpers import assert_loss_falls, train_steps

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def images(batch: int = 3, size: int = 8, chans: int = 2, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)


def test_registered() -> None:
    assert {"sw_mlp", "mlp"} <= set(list_models())


# ------------------------------------------------------------------------------------------ Mixer matching
def test_matched_to_mixer_has_m_sc_density_and_omega_of_the_mixer() -> None:
    kw = {"image_size": 16, "patch_size": 2, "in_chans": 3, "dim": 16, "depth": 2}  # S = 64, C = 16
    sw = create_model("sw_mlp", match="mixer", gamma=2, **kw)
    mixer = create_model("mixer", token_expansion=2, channel_expansion=2, device="meta", **kw)
    S, C = 64, 16
    assert (sw.num_tokens, sw.dim, sw.width) == (S, C, S * C)
    assert sw.density == pytest.approx((1 / S + 1 / C) / 2, rel=1e-12)
    assert sw.sizes.hidden == (2 * S * C, 2 * S * C)
    rep, rep_mixer = describe(sw), describe(mixer)
    assert len(rep.layers) == len(rep_mixer.layers) == 8
    assert rep_mixer.omega == connections_per_layer(S, C, 2)
    assert abs(rep.omega / rep_mixer.omega - 1) < 0.01
    for row in rep.layers:  # every layer at the matched density (Bernoulli: within 5 binomial std)
        n = row.in_width * row.out_width
        assert abs(row.connections - n * sw.density) < 5 * math.sqrt(n * sw.density)


def test_matched_with_unequal_expansions_keeps_the_mixer_omega() -> None:
    kw = {"image_size": 16, "patch_size": 4, "in_chans": 1, "dim": 32, "depth": 2, "token_hidden": 32,
          "channel_hidden": 128}  # S = 16, C = 32, D_S = 2S, D_C = 4C
    sw = create_model("sw_mlp", **kw)
    mixer = create_model("mixer", device="meta", **kw)
    assert sw.sizes.hidden == (32 * 32, 128 * 16)  # D_S * C and D_C * S: the Mixer's effective hidden widths
    assert sw.density == pytest.approx((2 / 32 + 4 / 16) / 6, rel=1e-12)
    assert abs(describe(sw).omega / describe(mixer).omega - 1) < 0.01
    fixed = create_model("sw_mlp", mask="fan_in", **kw)
    assert abs(describe(fixed).omega / describe(mixer).omega - 1) < 0.01


def test_width_density_and_budget_constructions() -> None:
    base = {"image_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1}  # S = 16
    a = create_model("sw_mlp", width=256, density=1 / 16, gamma=2, **base)
    assert (a.width, a.dim, a.density, a.sizes.hidden) == (256, 16, 1 / 16, (512, 512))
    b = create_model("sw_mlp", omega=2**15, density=1 / 16, gamma=2, **base)  # m = sqrt(2^15 / (2/16)) = 512
    assert (b.width, b.dim) == (512, 32)
    assert b.sizes.omega == pytest.approx(2**15)
    c = create_model("sw_mlp", omega=2**15, width=512, gamma=2, **base)
    assert c.density == pytest.approx(1 / 16)
    d = create_model("mlp", width=64, gamma=2, **base)
    assert all(isinstance(m, MaskedLinear) and m.mask is None for m in d.modules() if isinstance(m, MaskedLinear))
    assert describe(d).connections == describe(d).dense_weights == 4 * 64 * 128


def test_bad_sizes_give_clear_errors() -> None:
    base = {"image_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1}  # S = 16
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0"):
        create_model("sw_mlp", density=0, **base)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 1.5"):
        create_model("sw_mlp", density=1.5, **base)
    with pytest.raises(ValueError, match="budget too small: omega=100 .* width m = 10.0 < S = 16"):
        create_model("sw_mlp", omega=100, density=0.5, gamma=2, **base)
    with pytest.raises(ValueError, match="budget too small for width 256: omega=100 .* need omega >= 512"):
        create_model("sw_mlp", omega=100, width=256, gamma=2, **base)
    with pytest.raises(ValueError, match="exceeds the dense count"):
        create_model("sw_mlp", omega=10**9, width=256, gamma=2, **base)
    with pytest.raises(ValueError, match="positive multiple of the number of tokens S = 16, got 100"):
        create_model("sw_mlp", width=100, density=0.1, **base)
    with pytest.raises(ValueError, match="match='mixer' fixes"):
        create_model("sw_mlp", match="mixer", density=0.1, **base)
    with pytest.raises(ValueError, match="unknown backend 'dense'; valid: sparse, masked"):
        create_model("sw_mlp", backend="dense", **base)
    with pytest.raises(ValueError, match="mlp is the dense MLP"):
        create_model("mlp", density=0.5, **base)
    with pytest.raises(ValueError, match="fixed fan-in 0 is invalid"):
        SparseLinear(8, 4, 0.5, mask="fan_in", fan_in=0)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['widht'\]; valid: .*width"):
        create_model("sw_mlp", widht=64, **base)


# ------------------------------------------------------------------------------------------------ backends
def test_sparse_and_masked_backends_are_the_same_model() -> None:
    kw = {"image_size": 8, "patch_size": 2, "in_chans": 2, "dim": 6, "depth": 2, "num_classes": 3, "seed": 4,
          "dtype": F64}
    torch.manual_seed(0)
    s = create_model("sw_mlp", backend="sparse", **kw)
    torch.manual_seed(0)
    m = create_model("sw_mlp", backend="masked", **kw)
    for mod in (s, m):
        with torch.no_grad():
            mod.head.weight.copy_(torch.linspace(-1, 1, mod.head.weight.numel(), dtype=F64).view_as(mod.head.weight))
    x = images()
    ys, ym = s(x), m(x)
    assert (ys - ym).abs().max() < 1e-10
    ys.square().sum().backward()
    ym.square().sum().backward()
    for (name, ls), lm in zip(
        [(n, mod) for n, mod in s.named_modules() if isinstance(mod, SparseLinear)],
        [mod for mod in m.modules() if isinstance(mod, MaskedLinear)], strict=True,
    ):
        assert torch.equal(ls.effective_weight(), lm.effective_weight()), name
        assert (ls.values.grad - lm.weight.grad[lm.mask]).abs().max() < 1e-10, name
        assert (ls.bias.grad - lm.bias.grad).abs().max() < 1e-10, name
    assert (s.stem.proj.weight.grad - m.stem.proj.weight.grad).abs().max() < 1e-10


@pytest.mark.parametrize("backend", ["sparse", "masked"])
def test_short_training_lowers_the_loss_and_keeps_masks(backend: str) -> None:
    torch.manual_seed(0)
    model = create_model("sw_mlp", image_size=8, patch_size=2, in_chans=1, dim=8, depth=2, num_classes=4,
                         backend=backend)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = (x.flatten(1) @ torch.randn(64, 4, generator=torch.Generator().manual_seed(2))).argmax(1)  # learnable
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    assert_loss_falls(train_steps(model, x, y, steps=20, opt=opt))
    if backend == "masked":
        for layer in (mod for mod in model.modules() if isinstance(mod, MaskedLinear)):
            assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
    else:
        n_values = sum(mod.values.numel() for mod in model.modules() if isinstance(mod, SparseLinear))
        assert n_values == describe(model).connections
        assert sum(s["exp_avg"].numel() for s in opt.state.values()) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- Mixer surface
@pytest.mark.parametrize("norm", ["token", "vec", None])
def test_effective_wide_mlp_reproduces_the_model(norm: str | None) -> None:
    model = create_model("sw_mlp", image_size=8, patch_size=(2, 4), in_chans=2, dim=5, depth=2, num_classes=4,
                         norm=norm, dtype=F64).eval()
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(3))
    assert (to_wide_mlp(model)(images()) - model(images())).abs().max() < 1e-10


def test_intermediates_align_with_the_mixer() -> None:
    kw = {"image_size": 8, "patch_size": 2, "in_chans": 2, "dim": 4, "depth": 3, "dtype": F64}
    sw, mixer = create_model("sw_mlp", **kw).eval(), create_model("mixer", **kw).eval()
    assert sw.feature_names() == mixer.feature_names()
    final, feats = sw.forward_intermediates(images())
    assert len(feats) == 6 and feats[0].shape == (3, 16, 4)
    vecs = sw.forward_intermediates(images(), output_fmt="vec", intermediates_only=True)
    for f, v in zip(feats, vecs, strict=True):
        assert torch.equal(v, f.transpose(1, 2).reshape(3, -1))
    x = sw.stem(images())  # each feature is the residual stream after one masked MLP on vec X
    blk = sw.blocks[0]
    mlp_out = blk.mlp_tokens(blk.norm1(x).transpose(1, 2).reshape(3, -1))
    assert (vecs[0] - (x.transpose(1, 2).reshape(3, -1) + mlp_out)).abs().max() < 1e-12
    sw.reset_classifier(0)
    assert sw(images()).shape == (3, 4)


def test_meta_device_describes_without_sampling_columns() -> None:
    kw = {"image_size": 8, "patch_size": 2, "in_chans": 1, "dim": 8, "depth": 2, "seed": 5}
    meta, real = create_model("sw_mlp", device="meta", **kw), create_model("sw_mlp", **kw)
    assert [r.connections for r in describe(meta).layers] == [r.connections for r in describe(real).layers]
