"""Invariants over every registered model, plus the Mixer family's specific properties."""

from __future__ import annotations

import io

import pytest
import torch

from widesparse.models import create_model, list_models, model_defaults

from helpers import PIXEL_MLPS, assert_loss_falls, make_small, small_kwargs, train_steps


def _x(batch: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 2, 8, 8, generator=g, dtype=dtype)


def test_required_names_registered() -> None:
    names = set(list_models())
    required = {"mixer", "s_mixer", "rp_mixer", "rp_s_mixer", "mixer_s16", "mixer_s32", "mixer_b16", "mixer_b32",
                "mixer_l16", "mixer_b_w", "mixer_cifar_nano"}
    assert required <= names
    for n in ("mixer_s16", "mixer_s32", "mixer_b16", "mixer_b32", "mixer_l16", "mixer_b_w", "mixer_cifar_nano"):
        assert "rp_" + n in names


def test_forward_no_nan_and_shapes(model_name: str) -> None:
    model = make_small(model_name)
    out = model(_x())
    assert out.shape == (3, 4)
    assert torch.isfinite(out).all()
    feats = model.forward_features(_x())
    assert feats.shape == (3, model.num_tokens, model.dim)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)


def test_every_parameter_gets_a_gradient(model_name: str) -> None:
    model = make_small(model_name, dtype=torch.float64)
    model(_x(dtype=torch.float64)).logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("mlp_tokens.fc2.bias") and _token_bias_is_dead(model):
            # Known dead parameter (as in timm and the original Mixer): the token MLP's output bias adds one
            # constant per token, which every following per-token LayerNorm removes, so its gradient is 0.
            assert p.grad.abs().max() < 1e-12, name
            continue
        assert p.grad.abs().sum() > 1e-8, f"{name} got an all-zero gradient"


def test_every_model_learns_a_learnable_batch(model_name: str) -> None:
    """20 AdamW steps on one batch whose labels are a linear function of the pixels lower the loss by 30%."""
    torch.manual_seed(0)
    model = make_small(model_name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, small_kwargs(model_name)["in_chans"], 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), 4, generator=g)).argmax(1)
    assert_loss_falls(train_steps(model, x, y, steps=20))


def test_save_load_round_trip_keeps_outputs(model_name: str) -> None:
    model = make_small(model_name, seed=3).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = create_model(model_name, **small_kwargs(model_name, seed=11)).eval()  # other weights and perms
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(other(_x()), model(_x()), rtol=0, atol=0)


def test_random_permutations_are_saved_and_differ_by_seed() -> None:
    a = create_model("rp_mixer", **small_kwargs("rp_mixer", seed=0))
    b = create_model("rp_mixer", **small_kwargs("rp_mixer", seed=1))
    c = create_model("rp_mixer", **small_kwargs("rp_mixer", seed=0))
    perms_a = {k: v for k, v in a.state_dict().items() if "perm" in k}
    assert len(perms_a) == 2 * 2 * 2  # depth 2, token + channel, J_1 + J_2
    assert all(v.dtype == torch.int64 for v in perms_a.values())
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in perms_a.items())
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in perms_a.items())
    # the permutation seed does not touch the weight-init RNG: same global seed, same weights
    torch.manual_seed(5)
    w0 = create_model("rp_mixer", **small_kwargs("rp_mixer", seed=0)).blocks[0].mlp_tokens.fc1.weight
    torch.manual_seed(5)
    w1 = create_model("rp_mixer", **small_kwargs("rp_mixer", seed=1)).blocks[0].mlp_tokens.fc1.weight
    assert torch.equal(w0, w1)


def test_masked_nothing_and_perms_unchanged_after_a_step() -> None:
    model = make_small("rp_mixer")
    before = {k: v.clone() for k, v in model.state_dict().items() if "perm" in k}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(_x()).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        if "perm" in k:
            assert torch.equal(v, before[k])


def _token_bias_is_dead(model: torch.nn.Module) -> bool:
    """A Mixer with LayerNorm: the token MLP's bias is one constant per token, broadcast over channels.

    (Not so in the RP-Mixer: its output permutation scatters the bias over tokens and channels.)
    """
    from widesparse.models.blocks import MixingMlp

    blk = model.blocks[0]
    plain = isinstance(blk.mlp_tokens, MixingMlp) and blk.mlp_tokens.layers[-1].perm_out is None
    return plain and isinstance(blk.norm2, torch.nn.LayerNorm) and blk.residual


@pytest.mark.parametrize(
    ("name", "params"),
    [("mixer_b16", 59_880_472), ("mixer_s16", 18_528_264), ("mixer_l16", 208_196_168), ("mixer_cifar_nano", 1_132_170)],
)
def test_parameter_counts_match_timm(name: str, params: int) -> None:
    model = create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == params


def test_mixer_b16_without_head() -> None:
    model = create_model("mixer_b16", num_classes=0, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 59_111_472


def test_preset_widths() -> None:
    b16 = create_model("mixer_b16", device="meta")
    assert (b16.num_tokens, b16.dim, b16.token_hidden, b16.channel_hidden, len(b16.blocks)) == (196, 768, 384, 3072, 12)
    bw = create_model("mixer_b_w", device="meta")
    assert (bw.num_tokens, bw.dim) == (256, 588)
    assert bw.num_tokens * bw.dim == b16.num_tokens * b16.dim == 150_528
    assert model_defaults("mixer_b16")["patch_size"] == 16


def test_expansions_set_hidden_widths() -> None:
    m = create_model("mixer", image_size=32, patch_size=4, dim=48, depth=1, token_expansion=1.5, channel_expansion=2.5)
    assert (m.num_tokens, m.token_hidden, m.channel_hidden) == (64, 96, 120)
    assert m.blocks[0].mlp_tokens.fc1.weight.shape == (96, 64)
    assert m.blocks[0].mlp_channels.fc1.weight.shape == (120, 48)


def test_rp_with_identity_permutations_equals_mixer_bit_for_bit() -> None:
    for base in ("mixer", "s_mixer"):
        ref = make_small(base).eval()
        rp = create_model("rp_" + base, **small_kwargs(base, permutation="identity")).eval()
        rp.load_state_dict(ref.state_dict())
        assert torch.equal(rp(_x()), ref(_x()))


def test_rp_random_differs_from_mixer_on_same_weights() -> None:
    ref = make_small("mixer").eval()
    rp = create_model("rp_mixer", **small_kwargs("mixer")).eval()
    rp.load_state_dict(ref.state_dict(), strict=False)
    assert not torch.allclose(rp(_x()), ref(_x()))


def test_forward_intermediates(model_name: str) -> None:
    model = make_small(model_name).eval()
    final, feats = model.forward_intermediates(_x())
    assert len(feats) == len(model.feature_names()) == (2 if model_name in PIXEL_MLPS else 4)
    torch.testing.assert_close(final, model.forward_features(_x()))
    # the last intermediate is the residual stream before the final norm
    torch.testing.assert_close(model.norm(feats[-1]), final)
    last2 = model.forward_intermediates(_x(), indices=2, intermediates_only=True)
    assert len(last2) == 2 and torch.equal(last2[1], feats[-1])
    vecs = model.forward_intermediates(_x(), indices=[0], output_fmt="vec", intermediates_only=True, stop_early=True)
    assert vecs[0].shape == (3, model.num_tokens * model.dim)
    torch.testing.assert_close(vecs[0], feats[0].transpose(1, 2).reshape(3, -1))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(_x(), indices=[7])


def test_grad_checkpointing_keeps_outputs_and_grads() -> None:
    model = make_small("rp_mixer")
    x = _x()
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n])


def test_drop_path_linear_schedule_and_eval_identity() -> None:
    m = create_model("mixer", **small_kwargs("mixer", depth=3, drop_path_rate=0.2))
    rates = [getattr(b.drop_path, "p", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    m.eval()
    assert torch.equal(m(_x()), m(_x()))


@pytest.mark.parametrize("mode", ["mixer", "jax", "gaussian"])
def test_init_modes(mode: str) -> None:
    m = create_model("mixer", image_size=32, patch_size=4, dim=256, depth=1, init_mode=mode)
    w = m.blocks[0].mlp_channels.fc1.weight  # (1024, 256)
    assert torch.count_nonzero(m.head.weight) == 0
    expected_std = {"mixer": (2 / (256 + 1024)) ** 0.5, "jax": (1 / 256) ** 0.5, "gaussian": (1 / 256) ** 0.5}[mode]
    assert w.std().item() == pytest.approx(expected_std, rel=0.05)
    b = m.blocks[0].mlp_channels.fc1.bias
    assert b.abs().max() < 1e-4 if mode == "mixer" else torch.count_nonzero(b) == 0


def test_device_and_dtype_factory_arguments() -> None:
    m = create_model("rp_mixer", **small_kwargs("rp_mixer", dtype=torch.float64, device="cpu"))
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(_x(dtype=torch.float64)).dtype == torch.float64


def test_reset_classifier_headless() -> None:
    m = make_small("mixer")
    m.reset_classifier(0)
    assert m(_x()).shape == (3, 5)
    m.reset_classifier(7)
    assert m(_x()).shape == (3, 7)


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'mixr'.*Valid models:.*mixer"):
        create_model("mixr")
    with pytest.raises(ValueError, match=r"image height 30 is not divisible by patch height 4"):
        create_model("mixer", image_size=30, patch_size=4)
    with pytest.raises(TypeError, match="unknown keyword argument"):
        create_model("mixer", widht=3)
    with pytest.raises(ValueError, match="activation"):
        create_model("mixer", act_layer="nope")
    with pytest.raises(ValueError, match="input image size"):
        create_model("mixer", image_size=8, patch_size=2, in_chans=2)(torch.zeros(1, 2, 16, 16))
