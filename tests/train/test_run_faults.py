"""Faults around run folders and devices: each ends in one clear line, never a traceback or torch's advice."""

from __future__ import annotations

import pickle

import pytest
import torch

from widesparse.cli import main
from widesparse.train.checkpoint import CheckpointError, load_checkpoint, read_torch_file
from widesparse.train.device import DeviceError, check_device
from widesparse.train.run_folder import load_run

pytestmark = pytest.mark.faults


def one_error_line(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> str:
    code = main([command, *args])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("widesparse: ")]  # the package's INFO lines
    assert code == 2 and len(err) == 1 and err[0].startswith(f"widesparse {command}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--model", "mixer", "--epochs", "1", "--out-dir", str(out), "--run-name", "r",
                 "--no-progress", "--dim", "8", "--depth", "1", "--num-threads", "1"])
    assert code == 0
    return out / "r"


def _damage(kind: str, path) -> None:
    good = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a torch file " * 64)
    else:  # a pickle that needs code to load
        path.write_bytes(pickle.dumps(pickle.Pickler))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "code"])
def test_a_damaged_model_pt_is_one_line_naming_the_file(trained_run, tmp_path, capsys, kind) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json", "model.pt"):
        (run / f).write_bytes((trained_run / f).read_bytes())
    _damage(kind, run / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt cannot be read") as e:
        load_run(run)
    assert "weights_only" not in str(e.value)
    line = one_error_line(capsys, "spectra", str(run))
    assert "model.pt cannot be read" in line and "weights_only" not in line


@pytest.mark.parametrize("kind", ["truncated", "garbage", "code"])
def test_a_damaged_checkpoint_never_passes_on_torchs_advice(tmp_path, kind) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "x": torch.ones(1000)}, path)
    _damage(kind, path)
    with pytest.raises(CheckpointError, match="checkpoint .* cannot be read") as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="weights .* not found"):
        read_torch_file(tmp_path / "none.pt", "weights")


def test_a_run_path_that_does_not_exist_is_not_an_unknown_model(capsys, tmp_path) -> None:
    for target in (str(tmp_path / "no" / "such"), "./nope"):
        assert one_error_line(capsys, "spectra", target).endswith(f"no such run folder: {target}")
    line = one_error_line(capsys, "cka", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset", "digits")
    assert "no such run folder" in line
    assert "unknown model 'mixr'" in one_error_line(capsys, "spectra", "mixr")


def test_a_device_torch_cannot_use_stops_before_anything_starts(monkeypatch, capsys, tmp_path) -> None:
    assert check_device("cpu") == torch.device("cpu") and check_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        check_device("gpu7")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="this torch build has no CUDA"):
        check_device("cuda")
    out = tmp_path / "sweep"
    line = one_error_line(capsys, "reproduce", "E4", "--scale", "tiny", "--device", "cuda", "--out", str(out))
    assert "no CUDA" in line and not out.exists()  # nothing started, no report of failures
    assert "no CUDA" in one_error_line(capsys, "train", "--device", "cuda", "--epochs", "1", "--no-progress",
                                       "--out-dir", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match="no GPU is visible .CUDA_VISIBLE_DEVICES=''"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 GPUs are visible"):
        check_device("cuda:3")
