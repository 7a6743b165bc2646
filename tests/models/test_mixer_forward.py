"""The Mixer family's forward is the math (docs/theory.md (1)-(3), (14)) on every route, and the permutation
buffers are the only truth: edited in place or loaded, the next forward uses them; invalid ones are refused."""

from __future__ import annotations

import re

import pytest
import torch

from widesparse.effective import to_wide_mlp
from widesparse.linalg import unvec, vec
from widesparse.models import create_model

from helpers import make_small, small_kwargs

F64 = torch.float64
NAMES = ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer"]
LAYOUTS = ["auto", "bsc", "sbc", "plain"]


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)


def _close_to_wide(model: torch.nn.Module, x: torch.Tensor) -> float:
    return (model(x) - to_wide_mlp(model)(x)).abs().max().item()


@pytest.mark.parametrize("name", ["rp_mixer", "rp_s_mixer"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_in_place_edit_of_a_permutation_reaches_the_next_forward(name: str, layout: str) -> None:
    model = make_small(name, dtype=F64).eval()
    model.layout = layout
    x = _x()
    assert _close_to_wide(model, x) < 1e-10  # also warms any cache of derived tables
    for mlp in (model.blocks[0].mlp_tokens, model.blocks[1].mlp_channels):
        p = mlp.fc1.perm_in
        with torch.no_grad():
            p[:2] = p[[1, 0]].clone()
        assert _close_to_wide(model, x) < 1e-10
        with torch.no_grad():
            mlp.layers[-1].perm_out.copy_(torch.roll(mlp.layers[-1].perm_out, 3))
        assert _close_to_wide(model, x) < 1e-10


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_loaded_permutation_reaches_the_next_forward(layout: str) -> None:
    a = make_small("rp_mixer", dtype=F64, seed=3).eval()
    b = make_small("rp_mixer", dtype=F64, seed=4).eval()
    a.layout = b.layout = layout
    x = _x()
    b(x)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-12)


def _perm_key(model: torch.nn.Module) -> tuple[str, int]:
    key = "blocks.0.mlp_tokens.fc1.perm_in"
    return key, model.state_dict()[key].numel()


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (lambda n: torch.zeros(n, dtype=torch.long), "not a permutation of 0..{last} (has duplicates)"),
        (lambda n: torch.arange(10), "length 10, expected {n}"),
        (lambda n: torch.arange(n) + 1, "not a permutation of 0..{last} (values outside 0..{last})"),
        (lambda n: torch.arange(n).float(), "not an integer index tensor (dtype torch.float32)"),
        (lambda n: torch.arange(n).view(1, n), "shape (1, {n}), expected ({n},)"),
    ],
)
def test_loading_refuses_what_is_not_a_permutation(bad, why: str) -> None:
    model = make_small("rp_mixer")
    key, n = _perm_key(model)
    before = model.state_dict()[key].clone()
    sd = model.state_dict()
    sd[key] = bad(n)
    with pytest.raises(RuntimeError, match=re.escape(f"{key}: " + why.format(n=n, last=n - 1))):
        model.load_state_dict(sd)
    assert torch.equal(model.state_dict()[key], before)  # nothing of that layer was loaded


def test_loading_names_the_key_of_a_permutation_given_to_a_plain_layer_or_taken_from_an_rp_one() -> None:
    rp, plain = make_small("rp_mixer"), make_small("mixer")
    key, _ = _perm_key(rp)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=re.escape(f"{key}: the state dict has a permutation but this layer "
                                                         "has none")):
            plain.load_state_dict(rp.state_dict(), strict=strict)
    sd = rp.state_dict()
    sd[key] = None
    with pytest.raises(RuntimeError, match=re.escape(f"{key}: the state dict has none (identity)")):
        rp.load_state_dict(sd)
    rp.load_state_dict(plain.state_dict(), strict=False)  # weights only: the layer keeps its permutations


def test_state_dict_keys_are_the_parameters_and_the_permutations() -> None:
    model = create_model("rp_mixer", **small_kwargs("rp_mixer", depth=1))
    per_mlp = ["fc1.weight", "fc1.bias", "fc1.perm_in", "fc2.weight", "fc2.bias", "fc2.perm_out"]
    expected = (["stem.proj.weight", "stem.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias"]
                + [f"blocks.0.mlp_tokens.{k}" for k in per_mlp]
                + ["blocks.0.norm2.weight", "blocks.0.norm2.bias"]
                + [f"blocks.0.mlp_channels.{k}" for k in per_mlp]
                + ["norm.weight", "norm.bias", "head.weight", "head.bias"])
    assert sorted(model.state_dict()) == sorted(expected)


@pytest.mark.parametrize("name", NAMES)
def test_mixing_mlp_forward_is_its_layers_on_vec_x(name: str) -> None:
    model = make_small(name, dtype=F64)
    X = torch.randn(3, model.num_tokens, model.dim, dtype=F64)
    for mlp in (model.blocks[0].mlp_tokens, model.blocks[0].mlp_channels):
        h = mlp.fc1(vec(X))
        if mlp.fc2 is not None:
            h = mlp.fc2(mlp.act(h))
        assert torch.equal(mlp(X), unvec(h, model.num_tokens, model.dim))


@pytest.mark.parametrize("name", NAMES)
def test_mixer_block_forward_is_equations_1_to_3(name: str) -> None:
    model = make_small(name, dtype=F64)
    blk = model.blocks[0]
    X = torch.randn(3, model.num_tokens, model.dim, dtype=F64)
    if blk.residual:  # (1)-(2)
        U = X + blk.mlp_tokens(blk.norm1(X))
        Y = U + blk.mlp_channels(blk.norm2(U))
    else:  # (3)
        H = blk.act(blk.mlp_tokens(X))
        Y = blk.act(blk.mlp_channels(H))
    assert torch.equal(blk(X), Y)
    assert torch.equal(blk.forward_channel(blk.forward_token(X)), Y)


@pytest.mark.parametrize("name", NAMES)
def test_every_layout_gives_the_plain_forward(name: str) -> None:
    model = make_small(name, dtype=F64).eval()
    x = _x()
    model.layout = "plain"
    ref = model(x)
    final, _ = model.forward_intermediates(x)  # the blocks' own sublayers: the plain math
    torch.testing.assert_close(model.forward_head(final), ref, rtol=0, atol=0)
    for layout in ("auto", "bsc", "sbc"):
        model.layout = layout
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-12)
