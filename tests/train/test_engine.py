"""Tests of widesparse.train.engine: tiny runs on digits and on a tiny CIFAR-10 written to disk; the run folder, exact
resume after Ctrl-C (mid-epoch and between epochs), NaN handling, augmentation, precision, clipping, logging."""

import csv
import json
import math
import os
import signal
import sys
import types

import pytest
import torch

import widesparse.train.engine as train_mod
from widesparse.data.augment import apply_crop_flip, draw_crop_flip, normalize
from widesparse.data.datasets import get_dataset_info, load_pixels
from widesparse.train.checkpoint import load_checkpoint
from widesparse.train.engine import (
    METRIC_COLUMNS,
    TIMING_KEYS,
    NonFiniteLossError,
    TrainConfig,
    make_run_dir,
    param_groups,
    resolve_model_kwargs,
    train,
    warmup_cosine,
)

from fake_datasets import make_dataset

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_err", "lr"} | TIMING_KEYS


def tiny_config(tmp_path, **overrides):
    kwargs = dict(
        epochs=2,
        batch_size=128,
        warmup_epochs=1,
        out_dir=str(tmp_path / "runs"),
        run_name="tiny",
        model_kwargs={"dim": 16, "depth": 1},
        progress=False,
        num_threads=1,
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("train")
    summary = train(tiny_config(tmp_path))
    return tmp_path, summary


def read_metrics(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_config_defaults_and_dict():
    cfg = TrainConfig()
    assert (cfg.model, cfg.dataset, cfg.seed) == ("mixer", "digits", 0)
    d = cfg.to_dict()
    assert d["model_kwargs"] == {} and d["progress"] is None
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(TypeError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_run_folder_files(tiny_run, capsys):
    tmp_path, summary = tiny_run
    run_dir = tmp_path / "runs" / "tiny"
    assert summary["run_dir"] == str(run_dir)
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "summary.json", "model.pt"):
        assert (run_dir / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["model_kwargs"] == {"dim": 16, "depth": 1}
    assert config["model_kwargs"]["patch_size"] == 2  # digits' default patch size
    assert config["model_kwargs"]["seed"] == 0
    assert config["params"] == summary["params"] > 0
    assert config["torch_version"] == torch.__version__

    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert sum(v.numel() for k, v in state.items() if torch.is_floating_point(v)) >= summary["params"] > 0


def test_metrics_and_summary(tiny_run):
    tmp_path, summary = tiny_run
    rows = read_metrics(tmp_path / "runs" / "tiny")
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) >= METRIC_KEYS
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert math.isfinite(row["train_loss"]) and row["images_per_s"] > 0
    for key in ("run_dir", "test_acc", "test_err", "train_acc", "epochs", "seconds", "params"):
        assert key in summary
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["test_err"] == pytest.approx(1.0 - summary["test_acc"])
    assert summary["test_acc"] == rows[-1]["test_acc"]
    assert summary["epochs"] == 2 and summary["seconds"] > 0
    assert summary["test_acc"] > 0.2  # two epochs already beat chance (0.1) by far
    on_disk = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert on_disk == summary


def test_same_seed_same_metrics_and_no_overwrite(tiny_run, capsys):
    tmp_path, first = tiny_run
    second = train(tiny_config(tmp_path))
    assert second["run_dir"] == str(tmp_path / "runs" / "tiny-1")  # never overwrites "tiny"
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(tmp_path / "runs" / "tiny")]
    again = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(tmp_path / "runs" / "tiny-1")]
    assert strip == again
    assert second["test_acc"] == first["test_acc"] and second["train_acc"] == first["train_acc"]
    out = capsys.readouterr().out
    assert "test accuracy" in out and "run folder" in out and "tiny-1" in out


def test_default_run_name(tmp_path):
    summary = train(tiny_config(tmp_path, run_name=None, epochs=1, seed=3))
    name = summary["run_dir"].rsplit("/", 1)[-1]
    assert name.startswith("mixer-digits-s3-")


def test_make_run_dir_suffixes(tmp_path):
    names = [make_run_dir(tmp_path, "a").name for _ in range(3)]
    assert names == ["a", "a-1", "a-2"]


def test_nonfinite_loss_raises_in_the_first_epoch(tmp_path, monkeypatch):
    real_create = train_mod.create_model

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.inner(x)
            return out * float("nan") if self.calls > 2 else out

    monkeypatch.setattr(train_mod, "create_model", lambda *a, **k: Poisoned(real_create(*a, **k)))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 1, step 2 .*no checkpoint was written"):
        train(tiny_config(tmp_path, run_name="nan"))


def test_huge_lr_raises(tmp_path):
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train(tiny_config(tmp_path, lr=1e30, warmup_epochs=0, epochs=3, batch_size=64, run_name="huge"))


def test_param_groups_skip_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 3]


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(1, 12))
    assert warmup_cosine(5, 0)(0) == 1.0


def test_invalid_config(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        train(tiny_config(tmp_path, epochs=0))
    with pytest.raises(ValueError, match="unknown data set"):
        train(tiny_config(tmp_path, dataset="nope"))


def test_load_run_rebuilds_the_trained_model(tiny_run):
    from widesparse.data.datasets import load_dataset
    from widesparse.train.engine import evaluate, load_run

    tmp_path, summary = tiny_run
    model, saved = load_run(summary["run_dir"])
    assert saved["config"]["model"] == "mixer"
    _, test, _ = load_dataset("digits", seed=saved["config"]["seed"])
    _, acc = evaluate(model, test, 128)
    assert acc == summary["test_acc"]
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        load_run(tmp_path / "nope")


def test_metrics_csv_equals_jsonl(tiny_run):
    tmp_path, _ = tiny_run
    run_dir = tmp_path / "runs" / "tiny"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    jsonl = read_metrics(run_dir)
    assert list(rows[0]) == list(METRIC_COLUMNS) == list(jsonl[0])
    assert [{k: float(v) for k, v in r.items()} for r in rows] == [{k: float(v) for k, v in r.items()} for r in jsonl]


def test_checkpoint_after_the_last_epoch(tiny_run):
    tmp_path, summary = tiny_run
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pt")
    assert (ckpt["epochs_done"], ckpt["step"], ckpt["partial"], ckpt["scaler"]) == (2, 0, None, None)
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2] and ckpt["config"]["epochs"] == 2
    model_pt = torch.load(tmp_path / "runs" / "tiny" / "model.pt", weights_only=True)
    assert all(torch.equal(model_pt[k], v) for k, v in ckpt["model"].items())
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"]["last_epoch"] == 2 * math.ceil(1437 / 128)


# ------------------------------------------------------------------------------------- tiny CIFAR from disk
@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_dataset("cifar10", root, n_train=40, n_test=20)
    return root


def cifar_config(root, out, **overrides):
    kwargs = dict(
        dataset="cifar10", data_dir=str(root), epochs=3, batch_size=16, warmup_epochs=1, out_dir=str(out),
        run_name="c", progress=False, num_threads=1,
        # drop_path draws from torch's global RNG: resume must restore it to match.
        model_kwargs={"dim": 8, "depth": 2, "drop_path_rate": 0.5},
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def hook_models(monkeypatch, hook, kind="forward"):
    """Make train() build models with ``hook`` registered (a forward hook, or a pre-hook with kind='pre')."""
    real = train_mod.create_model

    def create(*args, **kwargs):
        model = real(*args, **kwargs)
        (model.register_forward_pre_hook if kind == "pre" else model.register_forward_hook)(hook)
        return model

    monkeypatch.setattr(train_mod, "create_model", create)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.fixture(scope="module")
def cifar_reference(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summary = train(cifar_config(cifar_dir, out))
    return summary, read_metrics(out / "c"), torch.load(out / "c" / "model.pt", weights_only=True)


def assert_same_as_reference(run_dir, summary, reference):
    ref_summary, ref_rows, ref_state = reference
    assert strip_timing(read_metrics(run_dir)) == strip_timing(ref_rows)
    for key in ("test_acc", "test_err", "test_loss", "train_acc", "train_loss", "best_test_acc", "params"):
        assert summary[key] == ref_summary[key], key
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


@pytest.mark.parametrize("when", ["mid_epoch", "between_epochs"])
def test_ctrl_c_then_resume_equals_uninterrupted_run(cifar_dir, cifar_reference, tmp_path, monkeypatch, capsys, when):
    calls = {"train": 0, "eval": 0}

    def ctrl_c(module, args):
        kind = "train" if module.training else "eval"
        calls[kind] += 1
        # mid_epoch: during epoch 2, step 0 (3 steps per epoch); between_epochs: while epoch 1 is evaluated.
        if (when, kind, calls[kind]) in (("mid_epoch", "train", 4), ("between_epochs", "eval", 1)):
            os.kill(os.getpid(), signal.SIGINT)

    hook_models(monkeypatch, ctrl_c, kind="pre")
    with pytest.raises(KeyboardInterrupt):
        train(cifar_config(cifar_dir, tmp_path))
    run_dir = tmp_path / "c"
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert (ckpt["epochs_done"], ckpt["step"]) == ((1, 1) if when == "mid_epoch" else (1, 0))
    assert len(read_metrics(run_dir)) == 1
    assert f"--resume {run_dir}" in capsys.readouterr().err
    monkeypatch.undo()
    # Only the run folder: everything else comes from the checkpoint.
    summary = train(TrainConfig(resume=str(run_dir), progress=False, num_threads=1))
    assert summary["run_dir"] == str(run_dir) and len(list(tmp_path.iterdir())) == 1
    assert_same_as_reference(run_dir, summary, cifar_reference)
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    # Resuming a finished run (here from the command line) only redoes the final evaluation: same results.
    from widesparse.cli import main

    assert main(["train", "--resume", str(run_dir), "--no-progress", "--num-threads", "1"]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert_same_as_reference(run_dir, again, cifar_reference)


def test_nan_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch):
    calls = []

    def poison(module, args, out):
        if module.training:
            calls.append(1)
            if len(calls) == 5:  # epoch 2, step 1
                return out * float("nan")
        return None

    hook_models(monkeypatch, poison)
    with pytest.raises(NonFiniteLossError) as err:
        train(cifar_config(cifar_dir, tmp_path))
    run_dir = tmp_path / "c"
    msg = str(err.value)
    assert "non-finite loss nan at epoch 2, step 1 (global step 4)" in msg
    assert f"the last good checkpoint is {run_dir / 'checkpoint.pt'} (after epoch 1)" in msg
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]


def test_huge_lr_stops(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Lower the lr, set grad_clip"):
        train(tiny_config(tmp_path, lr=1e30, warmup_epochs=0, epochs=3, batch_size=64, run_name="huge2"))


@pytest.mark.parametrize("augment", [True, False])
def test_the_model_sees_the_seeded_augmented_batch(cifar_dir, tmp_path, monkeypatch, augment):
    seen = []
    hook_models(monkeypatch, lambda m, args: seen.append(args[0].clone()) if m.training else None, kind="pre")
    train(cifar_config(cifar_dir, tmp_path, epochs=1, augment=augment, model_kwargs={"dim": 8, "depth": 1}))
    train_px, _, info = load_pixels("cifar10", data_dir=cifar_dir)
    gen = torch.Generator().manual_seed(train_mod._epoch_seed(0, 1))
    order = torch.randperm(40, generator=gen)
    x = train_px.x[order[:16]]
    if augment:
        x = apply_crop_flip(x, draw_crop_flip(40, 4, True, gen).take(torch.arange(16)), 4)
    assert torch.equal(seen[0], normalize(x, info.mean, info.std))
    assert len(seen) == 3 and [len(b) for b in seen] == [16, 16, 8]


def test_bf16_autocast_is_used(tmp_path, monkeypatch):
    dtypes = set()
    hook_models(monkeypatch, lambda m, a, out: dtypes.add(out.dtype))
    summary = train(tiny_config(tmp_path, precision="bf16", epochs=1))
    assert dtypes == {torch.bfloat16} and summary["test_acc"] > 0.1
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, bf16"):
        train(tiny_config(tmp_path, precision="fp16"))


def test_grad_clip_bounds_the_gradient_norm(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        out = real(params, max_norm, *a, **k)
        norms.append((out.item(), torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(tiny_config(tmp_path, grad_clip=0.01, epochs=1))
    assert len(norms) == math.ceil(1437 / 128)
    assert all(after <= 0.01 * (1 + 1e-5) for _, after in norms) and max(before for before, _ in norms) > 0.01
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        train(tiny_config(tmp_path, grad_clip=0.0))


def test_compile_on_request(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    train(tiny_config(tmp_path, compile=True, epochs=1))
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)


def test_tensorboard_when_available(tmp_path, monkeypatch):
    scalars = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", self.log_dir))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    summary = train(tiny_config(tmp_path, epochs=2))  # tensorboard=None: used when importable
    assert ("test_acc", 1) in scalars and ("train_loss", 2) in scalars and ("epoch", 1) not in scalars
    assert scalars[-1] == ("closed", str(tmp_path / "runs" / "tiny" / "tensorboard")) and summary
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="tensorboard=True needs the tensorboard package"):
        train(tiny_config(tmp_path, tensorboard=True, epochs=1))
    train(tiny_config(tmp_path, epochs=1, run_name="no_tb"))  # None and not installed: quietly without it


def test_model_that_does_not_fit_the_data_names_both(tmp_path):
    with pytest.raises(ValueError, match=r"image_size=32 does not fit data set 'digits', which has image_size=8"):
        train(tiny_config(tmp_path, model_kwargs={"image_size": 32}))
    with pytest.raises(ValueError, match=r"in_chans=3 does not fit .* in_chans=1 \(8x8 images, 1 channel"):
        train(tiny_config(tmp_path, model_kwargs={"in_chans": 3}))
    with pytest.raises(ValueError, match="image height 8 is not divisible by patch height 3"):
        train(tiny_config(tmp_path, model_kwargs={"patch_size": 3, "dim": 8}))
    with pytest.raises(ValueError, match="unknown model 'mixr'.*rp_mixer"):
        train(tiny_config(tmp_path, model="mixr"))


def test_resolve_model_kwargs_patch_size_precedence():
    cifar, digits = get_dataset_info("cifar10"), get_dataset_info("digits")
    assert resolve_model_kwargs(TrainConfig(model="mixer"), cifar)["patch_size"] == 4  # data set default
    assert resolve_model_kwargs(TrainConfig(model="mixer_b16"), cifar)["patch_size"] == 16  # preset
    kw = resolve_model_kwargs(TrainConfig(model="mixer_b16", model_kwargs={"patch_size": 8}), cifar)
    assert kw["patch_size"] == 8 and (kw["image_size"], kw["in_chans"], kw["num_classes"]) == (32, 3, 10)
    kw = resolve_model_kwargs(TrainConfig(model="mixer", seed=5, model_kwargs={"image_size": (8, 8)}), digits)
    assert kw["seed"] == 5 and kw["image_size"] == 8


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume: .*checkpoint.pt not found"):
        train(TrainConfig(resume=str(tmp_path)))


def test_cli_trains_mnist_from_the_standard_files(tmp_path, capsys):
    from widesparse.cli import main

    make_dataset("mnist", tmp_path / "data", n_train=30, n_test=10)
    code = main(["train", "--model", "mixer", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1", "--out-dir", str(tmp_path), "--run-name", "m", "--no-progress",
                 "--num-threads", "1", "--dim", "8", "--depth", "1"])
    assert code == 0 and "test accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["dataset"]["name"] == "mnist" and saved["model_kwargs"]["patch_size"] == 4
    assert saved["num_train"] == 30 and saved["num_test"] == 10
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path)])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_param_groups_decay_sparse_values_like_masked_weights():
    import widesparse.models.sw_mlp  # noqa: F401
    from widesparse.models import create_model

    for backend in ("sparse", "masked"):
        model = create_model("sw_mlp", image_size=8, patch_size=2, in_chans=1, dim=4, depth=1, backend=backend)
        decay, no_decay = param_groups(model, 0.1)
        decayed = {id(p) for p in decay["params"]}
        for name, p in model.named_parameters():
            is_weight = name.endswith(("fc1.values", "fc2.values", "fc1.weight", "fc2.weight", "proj.weight"))
            assert (id(p) in decayed) == (is_weight or name == "head.weight"), (backend, name)


def test_init_model_rebuilds_the_initial_weights(tmp_path):
    from widesparse.train.engine import init_model, load_run

    # lr = 0: AdamW leaves every weight where it started, so the trained model is the initial one
    summary = train(tiny_config(tmp_path, model="rp_mixer", lr=0.0, epochs=1, weight_decay=0.0))
    trained, _ = load_run(summary["run_dir"])
    init = init_model(summary["run_dir"])
    for (name, a), b in zip(trained.state_dict().items(), init.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
