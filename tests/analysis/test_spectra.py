"""Top singular values of effective mixing weights (docs/theory.md §3.9, E3): exact for the Mixer, Lanczos for
the SW-MLP."""

from __future__ import annotations

import math

import pytest
import torch

import widesparse.models.sw_mlp  # noqa: F401  (registers sw_mlp)
from widesparse.analysis.spectra import (
    format_spectra,
    marchenko_pastur_edge,
    spectra_table,
    top_singular_value,
)
from widesparse.layers import PermutedKronLinear
from widesparse.layers.sparse import MaskedLinear, SparseLinear
from widesparse.models import create_model

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", ["mixer", "rp_mixer", "s_mixer"])
def test_mixer_top_singular_value_is_the_small_factors(name: str) -> None:
    model = create_model(name, image_size=8, patch_size=(2, 4), in_chans=2, dim=5, depth=2, dtype=F64)
    rows = spectra_table(model)
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, PermutedKronLinear))
    assert [r.name for r in rows] == list(layers)
    for r in rows:
        exact = torch.linalg.svdvals(layers[r.name].effective_weight())[0].item()
        assert abs(r.sigma_max - exact) < 1e-10, r.name
        assert r.method == "svdvals of the small factor"
        # the generic operator path (forward + vector-Jacobian product) agrees
        assert abs(top_singular_value(layers[r.name], "lanczos")[0] - exact) < 1e-9


def test_mixer_at_gaussian_init_sits_at_the_marchenko_pastur_edge() -> None:
    # S = 256 tokens, token MLP 256 -> 512 -> 256 (γ = 2): σ_max(W_1) -> 1 + sqrt(2) = 2.414 from below (2.40 at
    # S = 1024 per docs/theory.md §3.9); seeds 0-5 gave 2.38-2.45 (Tracy-Widom spread). Xavier init would give
    # 2.414 * sqrt(2/3) = 1.97 and nn.Linear's default 1.39, far outside the band.
    torch.manual_seed(0)
    model = create_model("mixer", image_size=32, patch_size=2, in_chans=1, dim=3, depth=2, token_expansion=2,
                         init_mode="gaussian")
    rows = [r for r in spectra_table(model) if "mlp_tokens" in r.name]
    for r in rows:
        if r.name.endswith("fc1"):
            assert r.mp_edge == pytest.approx(1 + math.sqrt(2))
            assert 2.33 < r.sigma_max < 2.50, r
        else:
            assert r.mp_edge == pytest.approx(1 + 1 / math.sqrt(2))
            assert 1.62 < r.sigma_max < 1.79, r


def test_sw_mlp_top_singular_value_grows_with_width_at_fixed_omega() -> None:
    # Ω = 2^17, γ = 2, Golubeva init: m = sqrt(Ω/(γp)). Measured means 2.41 (p=1), 2.69 (1/256), 2.99 (1/1024),
    # seed-to-seed spread about 0.03.
    omega, sigmas = 2**17, []
    for p in (1.0, 1 / 256, 1 / 1024):
        m = round(math.sqrt(omega / (2 * p)))
        vals = []
        for seed in range(2):
            torch.manual_seed(seed)
            vals.append(top_singular_value(SparseLinear(m, 2 * m, p, seed=seed))[0])
        sigmas.append(sum(vals) / 2)
    assert abs(sigmas[0] - (1 + math.sqrt(2))) < 0.06
    assert sigmas[1] > sigmas[0] + 0.15 and sigmas[2] > sigmas[1] + 0.15, sigmas


def test_lanczos_and_power_iteration_on_sparse_operators_match_dense_svd() -> None:
    torch.manual_seed(0)
    for layer in (SparseLinear(300, 700, 0.03, seed=1, dtype=F64), MaskedLinear(500, 200, 0.05, seed=2, dtype=F64)):
        exact = torch.linalg.svdvals(layer.effective_weight())[0].item()
        assert abs(top_singular_value(layer, "lanczos")[0] - exact) < 1e-9 * exact
        assert abs(top_singular_value(layer, "power", tol=1e-12)[0] - exact) < 1e-5 * exact
        assert abs(top_singular_value(layer, "dense")[0] - exact) < 1e-12 * exact


def test_table_with_init_reference_and_formatting() -> None:
    kw = {"image_size": 8, "patch_size": 2, "in_chans": 1, "dim": 8, "depth": 1, "num_classes": 3, "gamma": 2}
    torch.manual_seed(0)
    init = create_model("sw_mlp", **kw)
    torch.manual_seed(0)
    trained = create_model("sw_mlp", **kw)
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        trained.forward_features(x).square().mean().backward()
        opt.step()
    rows = spectra_table(trained, reference=init)
    init_rows = spectra_table(init)
    assert len(rows) == 4 and all(r.method == "lanczos on the SparseLinear operator" for r in rows)
    for r, r0 in zip(rows, init_rows, strict=True):
        assert r.sigma_init == pytest.approx(r0.sigma_max, rel=1e-9)
        assert r.sigma_max != pytest.approx(r.sigma_init, rel=1e-6)
        assert r.mp_edge == marchenko_pastur_edge(r.out_features, r.in_features)
        assert r.to_dict()["density"] == pytest.approx(r.connections / (r.out_features * r.in_features))
    text = format_spectra(rows, title="sw_mlp")
    assert text.splitlines()[0] == "sw_mlp" and "σ_max init" in text and "blocks.0.mlp_tokens.fc1" in text
    assert "128 x 256" in text  # m = 16 * 8 = 128 -> γm = 256
    with pytest.raises(ValueError, match="unknown method 'svd'; valid: auto, factor, dense, lanczos, power"):
        top_singular_value(init.blocks[0].mlp_tokens.fc1, "svd")
    with pytest.raises(ValueError, match="method='factor' needs a PermutedKronLinear, got SparseLinear"):
        top_singular_value(init.blocks[0].mlp_tokens.fc1, "factor")
