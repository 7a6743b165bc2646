"""Tests of widesparse.integrations.timm: every widesparse model through timm's registry, create_model kwargs,
data config, optimizer factory, checkpoint loading and the ``python -m widesparse.timm_compat SCRIPT`` runner.

Skipped where timm does not import (the CPU-wheel venv: torchvision breaks there). Run them in a venv with timm:
``PYTHONPATH=src /work/venv-timm/bin/python -m pytest tests/test_timm_compat.py -p no:cacheprovider``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import timm
    import timm.data
    import timm.optim
except Exception as e:  # ImportError, or torchvision built for another torch
    pytest.skip(f"timm does not import here ({type(e).__name__}: {e})", allow_module_level=True)

from widesparse.integrations.timm import register_timm_models, timm_kwargs_to_widesparse
from widesparse.models import create_model, list_models

from helpers import assert_loss_falls, train_steps

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"img_size": 16, "patch_size": 4, "in_chans": 3, "num_classes": 5, "dim": 8, "depth": 2}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_timm_models()


def test_every_model_is_registered_once(registered):
    assert registered == ["widesparse_" + n for n in list_models()]
    assert timm.list_models("widesparse_*") == sorted(registered)
    assert register_timm_models() == registered  # idempotent: timm would warn on a second registration
    with pytest.raises(ValueError, match="unknown widesparse model.*'nope'.*valid: .*mixer_b16"):
        register_timm_models(["nope"])


def test_mixer_b16_through_timm_has_the_reference_size_and_cfg():
    model = timm.create_model("widesparse_mixer_b16", num_classes=1000, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 59_880_472  # timm's own mixer_b16_224
    cfg = model.pretrained_cfg
    assert (cfg["num_classes"], cfg["input_size"], cfg["first_conv"], cfg["classifier"]) == (
        1000, (3, 224, 224), "stem.proj", "head")
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]).out_features == 1000
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["mean"] == (0.485, 0.456, 0.406)
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bilinear"
    assert timm.models.get_pretrained_cfg("widesparse_mixer_b16").input_size == (3, 224, 224)


def test_timm_kwargs_are_mapped_or_refused():
    model = timm.create_model("widesparse_mixer", **SMALL, drop_path_rate=0.3, drop_rate=0.0, drop_block_rate=None,
                              global_pool="avg", bn_momentum=0.1, bn_eps=1e-5, scriptable=False, exportable=False,
                              no_jit=True)
    ref = create_model("mixer", image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=8, depth=2,
                       drop_path_rate=0.3)
    assert str(model) == str(ref)  # same modules, same linear drop-path schedule
    rates = [m.p for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3) and rates == sorted(rates)
    assert model.pretrained_cfg["input_size"] == (3, 16, 16) and model.pretrained_cfg["num_classes"] == 5
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="pretrained=True, but widesparse ships no pretrained weights"):
        timm.create_model("widesparse_mixer_b16", pretrained=True)
    with pytest.raises(ValueError, match="drop_rate=0.1 is not supported"):
        timm.create_model("widesparse_mixer", **SMALL, drop_rate=0.1)
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        timm.create_model("widesparse_mixer", **SMALL, global_pool="max")
    with pytest.raises(ValueError, match="features_only is not supported"):
        timm.create_model("widesparse_mixer", **SMALL, features_only=True)
    with pytest.raises(TypeError, match="unknown keyword argument.*'widht'"):
        timm.create_model("widesparse_mixer", **SMALL, widht=3)
    mapped = timm_kwargs_to_widesparse("x", {"img_size": 8, "drop_path_rate": 0.0, "cache_dir": "/c", "bn_tf": True})
    assert mapped == {"image_size": 8}


def test_cifar_and_pixel_models_get_their_own_cfg():
    nano = timm.create_model("widesparse_mixer_cifar_nano", device="meta")
    assert nano.pretrained_cfg["input_size"] == (3, 32, 32) and nano.pretrained_cfg["mean"][0] == 0.4914
    monarch = timm.create_model("widesparse_monarch_mlp", device="meta")
    assert monarch.pretrained_cfg["first_conv"] is None and monarch.pretrained_cfg["input_size"] == (1, 28, 28)
    overlay = timm.create_model("widesparse_mixer", **SMALL, pretrained_cfg_overlay={"crop_pct": 1.0})
    assert overlay.pretrained_cfg["crop_pct"] == 1.0


def test_timm_optimizer_and_a_few_training_steps(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("widesparse_rp_mixer", **SMALL)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.stem.proj.weight) in decayed and id(model.head.bias) not in decayed
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 5
    assert_loss_falls(train_steps(model, x, y, steps=15, opt=opt))
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    again = timm.create_model("widesparse_rp_mixer", **SMALL, checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_module_runs_a_training_script_with_the_models_registered(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, timm\n"
        "m = timm.create_model(sys.argv[2], img_size=8, patch_size=2, num_classes=3, dim=4, depth=1)\n"
        "print('built', type(m).__name__, sys.argv[1:], __name__)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "widesparse.integrations.timm", str(script), "--model", "widesparse_s_mixer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built MlpMixer ['--model', 'widesparse_s_mixer'] __main__" in proc.stdout
