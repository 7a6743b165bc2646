"""What each seed fixes: ``seed`` as before, ``perm_seed``/``mask_seed`` the structure, ``init_seed`` the weights."""

from __future__ import annotations

import hashlib

import pytest
import torch

from widesparse.models import create_model
from widesparse.models.seeds import layer_seeds

from helpers import small_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")

PERM = (".perm_in", ".perm_out")
MASK = (".crow_indices", ".col_indices", ".mask")


def _digest(tensors: list[torch.Tensor]) -> str:
    d = hashlib.sha1()
    for t in tensors:
        d.update(t.detach().cpu().contiguous().numpy().tobytes())
    return d.hexdigest()[:16]


def _buffers(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[torch.Tensor]:
    return [b for n, b in sorted(model.named_buffers()) if n.endswith(suffixes) and b is not None]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _build(name: str, global_seed: int = 0, **kw: object) -> torch.nn.Module:
    torch.manual_seed(global_seed)
    return create_model(name, **small_kwargs(name, **kw))


# Digests of the permutations, masks and seeded Monarch weights built by the code before the explicit seeds
# existed (small_kwargs sizes; SW-MLP at density 0.3): ``seed`` must keep giving exactly these.
_BEFORE = {
    ("rp_mixer", 0): "13f7d90b92870536", ("rp_mixer", 3): "fa1f2bd889760d98",
    ("rp_s_mixer", 0): "13f7d90b92870536", ("rp_s_mixer", 3): "fa1f2bd889760d98",
    ("sparse", 0): "f9ceb948f1b4e19b", ("sparse", 3): "e35a07ccd8e85288",
    ("masked", 0): "8e4e4d989c1dd3ac", ("masked", 3): "44c0efa9455dddb4",
    ("monarch_mlp", 0): "2af804bdb7d5fcd5", ("monarch_mlp", 3): "0382037291b8d276",
    ("kron_mlp", 0): "46f8bfd7fd34e24d", ("kron_mlp", 3): "e0caff2c91c8994f",
}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 3])
def test_seed_gives_the_same_structure_and_weights_as_before(seed: int) -> None:
    for name in ("rp_mixer", "rp_s_mixer"):
        assert _digest(_buffers(_build(name, seed=seed), PERM)) == _BEFORE[(name, seed)]
    for backend in ("sparse", "masked"):
        model = _build("sw_mlp", seed=seed, backend=backend, density=0.3)
        assert _digest(_buffers(model, MASK)) == _BEFORE[(backend, seed)]
    for name in ("monarch_mlp", "kron_mlp"):
        model = _build(name, global_seed=seed + 11, seed=seed)  # the seed fixes the weights, whatever the global RNG
        assert _digest([p for _, p in sorted(model.named_parameters())]) == _BEFORE[(name, seed)]


def test_layer_seeds_are_the_per_block_streams() -> None:
    assert layer_seeds(0, 1, 2) != layer_seeds(0, 2, 2) != layer_seeds(1, 1, 2)
    assert layer_seeds(5, 0, 4, 7)[:2] != layer_seeds(5, 0, 2)  # the salt separates the SW-MLP's streams
    assert all(0 <= s < 2**30 for s in layer_seeds(123, 4, 4, 7))


_NAMES = ["mixer", "rp_mixer", "s_mixer", "rp_s_mixer", "sw_mlp", "mlp", "monarch_mlp", "kron_mlp"]


@pytest.mark.parametrize("name", _NAMES)
def test_init_seed_fixes_the_weights_whatever_the_global_rng(name: str) -> None:
    a = _params(_build(name, global_seed=0, init_seed=5))
    b = _params(_build(name, global_seed=1, init_seed=5))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    c = _params(_build(name, global_seed=0, init_seed=6))
    assert any(not torch.equal(a[n], c[n]) for n in a)
    if name not in ("monarch_mlp", "kron_mlp"):  # without init_seed the weights follow the global RNG
        d, e = _params(_build(name, global_seed=0)), _params(_build(name, global_seed=1))
        assert any(not torch.equal(d[n], e[n]) for n in d)


def test_init_seed_with_the_masked_backend_and_meta_device() -> None:
    a = _params(_build("sw_mlp", global_seed=0, init_seed=2, backend="masked", density=0.4))
    b = _params(_build("sw_mlp", global_seed=9, init_seed=2, backend="masked", density=0.4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    for name in ("mixer_b16", "sw_mlp"):
        model = create_model(name, device="meta", init_seed=0)
        assert all(p.is_meta for p in model.parameters())


def test_perm_seed_overrides_seed_for_the_permutations_only() -> None:
    base = _build("rp_mixer", seed=3, init_seed=1)
    same = _build("rp_mixer", seed=0, perm_seed=3, init_seed=1)
    other = _build("rp_mixer", seed=3, perm_seed=4, init_seed=1)
    assert _digest(_buffers(same, PERM)) == _digest(_buffers(base, PERM))
    assert _digest(_buffers(other, PERM)) != _digest(_buffers(base, PERM))
    pa, po = _params(base), _params(other)
    assert all(torch.equal(pa[n], po[n]) for n in pa)  # the weights do not see the permutations
    plain = _params(_build("mixer", init_seed=1))
    assert all(torch.equal(pa[n], plain[n]) for n in plain)


def test_mask_seed_overrides_seed_for_the_masks_only() -> None:
    for backend in ("sparse", "masked"):
        kw = {"backend": backend, "density": 0.3}
        base = _build("sw_mlp", seed=3, **kw)
        same = _build("sw_mlp", seed=0, mask_seed=3, **kw)
        other = _build("sw_mlp", seed=3, mask_seed=4, **kw)
        assert _digest(_buffers(same, MASK)) == _digest(_buffers(base, MASK)) == _BEFORE[(backend, 3)]
        assert _digest(_buffers(other, MASK)) != _digest(_buffers(base, MASK))


def test_unknown_seed_names_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['mask_seed'\]"):
        create_model("mixer", mask_seed=1)
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['perm_seed'\]"):
        create_model("sw_mlp", perm_seed=1)
