"""Tests of widesparse.train: a 2-epoch run of a tiny model on digits, the run folder and its files."""

import json
import math

import pytest
import torch

import widesparse.train as train_mod
from widesparse.train import TrainConfig, make_run_dir, param_groups, train, warmup_cosine

TIMING_KEYS = {"epoch_seconds", "train_seconds", "images_per_s"}
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr"} | TIMING_KEYS


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
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt"):
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


def test_nonfinite_loss_raises(tmp_path, monkeypatch):
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
    with pytest.raises(RuntimeError, match=r"non-finite loss .* epoch 1, step 2"):
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
    from widesparse.data import load_dataset
    from widesparse.train import evaluate, load_run

    tmp_path, summary = tiny_run
    model, saved = load_run(summary["run_dir"])
    assert saved["config"]["model"] == "mixer"
    _, test, _ = load_dataset("digits", seed=saved["config"]["seed"])
    _, acc = evaluate(model, test, 128)
    assert acc == summary["test_acc"]
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        load_run(tmp_path / "nope")
