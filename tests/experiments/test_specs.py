"""Spec expansion of E1-E10: counts, seeds, shared runs, and the fixed-Ω points against widesparse.budget."""

from __future__ import annotations

import math

import pytest

from widesparse import budget
from widesparse.budget import nearest_tokens, patch_for_tokens, reachable_tokens, tokens_for_patch
from widesparse.data.datasets import image_geometry
from widesparse.experiments import expand, get_experiment, list_experiments, unique_runs
from widesparse.experiments.scales import SCALES, get_scale
from widesparse.experiments.specs import Run
from widesparse.models import create_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_registry_lists_e1_to_e10_and_unknown_names_list_valid_ones():
    assert list_experiments() == [f"E{i}" for i in range(1, 11)]
    assert get_experiment("e7").id == "E7"
    with pytest.raises(ValueError, match="valid: E1, E2"):
        get_experiment("E11")
    with pytest.raises(ValueError, match="valid: tiny, small, paper"):
        get_scale("huge")


def test_token_grid_on_digits_and_cifar():
    assert reachable_tokens(8) == [1, 2, 4, 8, 16, 32, 64]
    for img in (8, 28, 32):
        for S in reachable_tokens(img):
            assert tokens_for_patch(img, patch_for_tokens(img, S)) == S
    assert patch_for_tokens(32, 64) == 4 and patch_for_tokens(32, 128) in ((2, 4), (4, 2))
    assert nearest_tokens(28, [16, 64, 60]) == [16, 56]  # 56 = (28/2)(28/7)
    with pytest.raises(ValueError, match="reachable: 1, 2, 4"):
        patch_for_tokens(8, 3)


def test_run_ids_hash_inputs():
    a = Run("train", {"config": {"model": "mixer", "seed": 0}})
    assert a == Run("train", {"config": {"seed": 0, "model": "mixer"}}) and a.id.startswith("train-mixer-")
    assert a != Run("train", {"config": {"model": "mixer", "seed": 1}})
    assert a == Run("train", {"config": {"model": "mixer", "seed": 0, "data_dir": "/moved/data"}})
    with pytest.raises(ValueError, match="valid: train"):
        Run("bake", {})


@pytest.fixture(scope="module")
def tiny():
    return expand(None, "tiny")


def _points(points, exp, **where):
    return [p for p in points if p.experiment == exp and all(p.meta.get(k) == v for k, v in where.items())]


def test_tiny_counts_and_seeds(tiny):
    seeds = SCALES["tiny"].seeds
    s = SCALES["tiny"].experiments
    assert len(_points(tiny, "E1", role="cka")) == seeds * len(s["E1"]["sizes"]) * len(s["E1"]["densities"])
    assert len(_points(tiny, "E4")) == 2 * s["E4"]["seeds"]
    assert len(_points(tiny, "E7")) == 2 * seeds * len(s["E7"]["tokens"])
    assert len(_points(tiny, "E8")) == 2 * seeds * len(s["E8"]["depths"])
    assert {p.meta["seed"] for p in _points(tiny, "E7")} == set(range(seeds))
    runs = unique_runs(tiny)
    assert len({r.id for r in runs}) == len(runs)
    kinds = [r.kind for r in runs]
    assert kinds.index("cka") > max(i for i, k in enumerate(kinds) if k == "train")  # cka after its inputs


def test_shared_runs_are_trained_once(tiny):
    e2 = {p.run.id for p in _points(tiny, "E2", series="mixer")}
    e7 = {p.run.id for p in _points(tiny, "E7", series="mixer")}
    assert e2 <= e7  # same Ω, γ, depth, recipe: the same runs
    e1_mixer = {p.run.id for p in _points(tiny, "E1", role="train", model="mixer", C=16)}
    assert e1_mixer and e1_mixer <= e7  # S = C = 16 lies on E7's fixed-Ω curve
    for p in _points(tiny, "E1", role="cka"):
        assert set(p.run.needs) <= {q.run.id for q in tiny if q.run.kind == "train"}


@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_fixed_omega_points_match_budget(scale):
    pts = expand(["E2", "E7"], scale, data_dir="/nonexistent")
    s = SCALES[scale].experiments["E7"]
    shapes = budget.shapes_for_budget(s["omega"], s["gamma"], sorted({p.meta["S"] for p in _points(pts, "E7")}),
                                      round_channels=True)
    want = {(sh.S, int(sh.C)): sh for sh in shapes}
    for p in _points(pts, "E7"):
        sh = want[(p.meta["S"], p.meta["C"])]
        assert p.meta["m"] == sh.m and p.meta["p"] == pytest.approx(sh.p)
        assert p.meta["omega"] == pytest.approx(budget.connections_per_layer(sh.S, sh.C, s["gamma"]))
        assert p.meta["connections"] == pytest.approx(4 * p.meta["L"] * p.meta["omega"])
    for p in _points(pts, "E2", series="sw_mlp"):
        m_want = budget.sw_mlp_width(SCALES[scale].experiments["E2"]["omega"], 2, p.meta["p"])
        assert abs(p.meta["m"] - m_want) <= p.meta["S"] / 2


def test_paper_scale_e2_is_the_worked_table():
    """docs/theory.md §3.6: Ω = 2^19, γ = 2: S = C = 64 is the widest Mixer (γm = 8192); SW-MLP m = 512 ... 4096."""
    pts = expand(["E2"], "paper", data_dir="/nonexistent")
    mixer = {p.meta["S"]: p.meta for p in _points(pts, "E2", series="mixer")}
    assert mixer[64]["C"] == 64 and mixer[64]["gamma_m"] == 8192
    assert mixer[8]["C"] == 252 and mixer[4]["C"] == 360
    assert max(mixer.values(), key=lambda m: m["m"])["S"] == 64
    assert sorted({p.meta["m"] for p in _points(pts, "E2", series="sw_mlp")}) == [512, 1024, 2048, 4096]
    assert {p.meta["seed"] for p in pts} == {0, 1, 2, 3}  # 4 seeds for the width experiments


def test_paper_scale_settings():
    pts = expand(None, "paper", data_dir="/nonexistent")
    e8 = _points(pts, "E8")
    assert sorted({p.meta["L"] for p in e8}) == [4, 8, 12, 16, 20]
    assert {(p.meta["S"], p.meta["C"]) for p in e8} == {(128, 128)}
    assert {p.meta["dataset"] for p in e8} == {"cifar10", "cifar100", "stl10"}
    e5 = _points(pts, "E5", series="s_mixer")
    assert {p.meta["budget"] for p in e5} == {"2^18", "2^21", "2^27"}
    assert {p.meta["budget"] for p in _points(pts, "E5", series="sw_mlp")} == {"2^18"}
    assert {p.meta["seed"] for p in _points(pts, "E4")} == set(range(5))
    assert {p.meta["dataset"] for p in _points(pts, "E4")} == {"mnist"}


def test_overrides():
    pts = expand(["E8"], "tiny", seeds=1, epochs=2)
    assert {p.meta["seed"] for p in pts} == {0}
    assert {p.run.params["config"]["epochs"] for p in pts} == {2}
    pts = expand(["E8"], "small", dataset="fashion_mnist", data_dir="/d")
    assert {p.run.params["config"]["dataset"] for p in pts} == {"fashion_mnist"}
    assert {p.run.params["config"]["data_dir"] for p in pts} == {"/d"}


@pytest.mark.slow
def test_every_tiny_model_builds_with_its_recorded_sizes(tiny):
    """Each training run's model is constructible and its sizes are the recorded coordinates."""
    for p in tiny:
        if p.run.kind != "train":
            continue
        cfg = p.run.params["config"]
        img, chans, classes = image_geometry(cfg["dataset"])
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["model_kwargs"].items()}
        model = create_model(cfg["model"], image_size=img, in_chans=chans, num_classes=classes, **kw)
        if cfg["model"] in ("mixer", "rp_mixer", "s_mixer", "rp_s_mixer"):
            assert model.num_tokens == p.meta["S"] and model.dim == p.meta["C"]
            assert len(model.blocks) == p.meta["L"]
        elif cfg["model"] in ("sw_mlp", "mlp"):
            assert model.sizes.m == p.meta["m"] and model.sizes.S == p.meta["S"]
            assert model.sizes.p == pytest.approx(p.meta["p"])
            assert math.isclose(model.sizes.omega, p.meta["omega"], rel_tol=0.05)


def test_e3_trained_spectra_reuse_e2_runs(tiny):
    e2 = {p.run.id for p in _points(tiny, "E2")}
    trained = [p for p in _points(tiny, "E3") if p.run.kind == "spectra" and "run" in p.run.params]
    assert trained and {p.run.params["run"] for p in trained} == e2
    assert all(p.run.needs == (p.run.params["run"],) for p in trained)
    assert {p.meta["series"] for p in trained} == {"mixer (trained)", "sw_mlp (trained)"}
