"""The executable effective expression: every model equals its explicit wide MLP (docs/theory.md (8)-(9))."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from widesparse.effective import (
    ModelTooLargeError,
    channel_mixing_effective,
    dense_bytes,
    describe,
    format_report,
    to_wide_mlp,
    token_mixing_effective,
)
from widesparse.linalg import vec
from widesparse.models import create_model

from helpers import PIXEL_MLPS, make_small, small_kwargs


def _x(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("act", ["gelu", "relu", "identity", "tanh"])
def test_wide_mlp_reproduces_every_model(model_name: str, act: str) -> None:
    if model_name in PIXEL_MLPS:
        pytest.skip("not a Mixer-family model; tests/test_monarch.py checks it against its explicit MLP")
    model = make_small(model_name, dtype=torch.float64, act_layer=act).eval()
    wide = to_wide_mlp(model)
    err = (wide(_x()) - model(_x())).abs().max().item()
    assert err < 1e-10, f"{model_name}/{act}: max abs error {err:.3e}"
    assert wide.width == model.num_tokens * model.dim


def test_wide_mlp_intermediates_are_vec_of_model_intermediates() -> None:
    model = make_small("rp_mixer", dtype=torch.float64).eval()
    wide = to_wide_mlp(model)
    feats = model.forward_intermediates(_x(), output_fmt="vec", intermediates_only=True)
    _, wide_feats = wide.forward_vec(vec(model.stem(_x())), return_intermediates=True)
    assert len(feats) == len(wide_feats)
    for a, b in zip(feats, wide_feats, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_wide_mlp_of_float32_model_in_float64() -> None:
    model = make_small("mixer").eval()
    wide = to_wide_mlp(model, dtype=torch.float64)
    assert wide.steps[0].linears[0].weight.dtype == torch.float64
    ref = make_small("mixer").double().eval()
    ref.load_state_dict(model.state_dict())
    assert (wide(_x()) - ref(_x())).abs().max() < 1e-10


def test_effective_weights_are_the_kronecker_forms_of_the_paper() -> None:
    model = make_small("mixer", dtype=torch.float64)
    S, C = model.num_tokens, model.dim
    tok, ch = model.blocks[0].mlp_tokens, model.blocks[0].mlp_channels
    # token mixing: I_C ⊗ W_1 (PAPER (5)); channel mixing: W_3^T ⊗ I_S with V = W_3 = fc1.weight^T (PAPER (6))
    torch.testing.assert_close(tok.fc1.effective_weight(), token_mixing_effective(tok.fc1.weight.detach(), C))
    V = ch.fc1.weight.detach().T
    torch.testing.assert_close(ch.fc1.effective_weight(), channel_mixing_effective(V, S))
    # and the channel form is J^T (I_S ⊗ V^T) J with commutation matrices (PAPER (9))
    from widesparse.linalg import commutation_matrix_dense as K

    hidden = ch.fc1.out_block
    rhs = K(hidden, S) @ torch.kron(torch.eye(S, dtype=V.dtype), V.T) @ K(S, C)
    torch.testing.assert_close(ch.fc1.effective_weight(), rhs)


def test_mixer_densities_are_exactly_one_over_C_and_one_over_S() -> None:
    model = make_small("mixer")
    S, C = model.num_tokens, model.dim
    rep = describe(model)
    for row in rep.layers:
        expected = Fraction(1, C) if "mlp_tokens" in row.name else Fraction(1, S)
        assert row.density == expected, row
    # and the dense oracle agrees: count non-zeros of the materialised matrices
    for layer in (model.blocks[0].mlp_tokens.fc1, model.blocks[0].mlp_channels.fc2):
        w = layer.effective_weight(torch.float64)
        assert torch.count_nonzero(w).item() == layer.connections


def test_rp_mixer_same_params_connections_and_singular_values() -> None:
    mixer = make_small("mixer", dtype=torch.float64)
    rp = create_model("rp_mixer", **small_kwargs("rp_mixer", dtype=torch.float64))
    rp.load_state_dict(mixer.state_dict(), strict=False)
    assert sum(p.numel() for p in rp.parameters()) == sum(p.numel() for p in mixer.parameters())
    rep_m, rep_r = describe(mixer), describe(rp)
    assert [r.connections for r in rep_m.layers] == [r.connections for r in rep_r.layers]
    mods_m = dict(mixer.named_modules())
    for name, layer in rp.named_modules():
        if hasattr(layer, "effective_weight") and name in mods_m:
            wr, wm = layer.effective_weight(), mods_m[name].effective_weight()
            assert not torch.equal(wr, wm) or "fc" not in name
            torch.testing.assert_close(torch.linalg.svdvals(wr), torch.linalg.svdvals(wm))
            # non-zeros per row/column are unchanged by the permutations
            assert sorted((wr != 0).sum(1).tolist()) == sorted((wm != 0).sum(1).tolist())


def test_describe_mixer_b16_without_materialising() -> None:
    model = create_model("mixer_b16", device="meta")
    rep = describe(model, "mixer_b16")
    assert rep.width == 150_528
    tok2 = next(r for r in rep.layers if r.name.endswith("mlp_tokens.fc2"))
    assert tok2.out_width == 150_528 and tok2.density == Fraction(1, 768)
    ch1 = next(r for r in rep.layers if r.name.endswith("mlp_channels.fc1"))
    assert ch1.density == Fraction(1, 196) and ch1.out_width == 602_112
    text = format_report(rep)
    assert "150,528" in text and "1/768" in text and "1/196" in text
    # Omega = m (D_S + D_C) / 2 (PAPER (10) with unequal expansions)
    assert rep.omega == pytest.approx(150_528 * (384 + 3072) / 2)


def test_too_big_to_materialise_says_how_big() -> None:
    model = create_model("mixer_b16", device="meta")
    need = dense_bytes(model, torch.float32)
    assert need > 12e12  # about 13 TB in float32 (PAPER E10)
    with pytest.raises(ModelTooLargeError, match=r"TiB.*describe\(\)"):
        to_wide_mlp(model)


def test_to_wide_mlp_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="Mixer-family"):
        to_wide_mlp(torch.nn.Linear(3, 3))
