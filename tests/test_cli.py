"""The command line: every command, with good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from widesparse.cli import main, parse_model_kwargs, parse_value


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_values_and_kwargs() -> None:
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("True") is True
    assert parse_value("2,4") == (2, 4) and parse_value("gelu") == "gelu" and parse_value("none") is None
    assert parse_model_kwargs(["--dim", "64", "--patch-size=2,4", "--act-layer", "relu", "--norm", "false"]) == {
        "dim": 64, "patch_size": (2, 4), "act_layer": "relu", "norm": False,
    }
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_model_kwargs(["64"])


def test_models(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0 and {"mixer", "rp_mixer", "s_mixer", "rp_s_mixer", "mixer_b16"} <= set(out.split())
    code, out, _ = run(capsys, "models", "rp_*")
    assert code == 0 and all(n.startswith("rp_") for n in out.split())
    code, _, err = run(capsys, "models", "nothing*")
    assert code == 1 and "no model matches" in err


def test_describe_mixer_b16(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "describe", "mixer_b16")
    assert code == 0
    assert "m = S*C = 150,528" in out
    assert "1/768" in out and "1/196" in out
    assert "59,880,472" in out


def test_describe_check_small_and_too_big(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "describe", "rp_mixer", "--image-size", "8", "--patch-size", "2", "--dim", "6",
                       "--depth", "2", "--act-layer", "relu", "--check")
    assert code == 0 and "max abs error" in out and "OK" in out
    code, _, err = run(capsys, "describe", "mixer_b16", "--check")
    assert code == 2 and "TiB" in err and "not possible" in err


def test_describe_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "describe", "mixr")
    assert code == 2 and "unknown model 'mixr'" in err and "rp_mixer" in err and "mixer_b16" in err
    code, _, err = run(capsys, "describe", "mixer", "--image-size", "30", "--patch-size", "4")
    assert code == 2 and "30" in err and "4" in err and "not divisible" in err
    code, _, err = run(capsys, "describe", "mixer", "--dimm", "4")
    assert code == 2 and "dimm" in err


def test_plan_marks_the_optimum(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--omega", "524288", "--gamma", "2")
    assert code == 0
    marked = [line for line in out.splitlines() if "optimum" in line and line.startswith("*")]
    assert len(marked) == 1
    assert marked[0].split()[1:5] == ["64", "64", "4096", "8192"]
    code, out2, _ = run(capsys, "plan", "--omega", "2**19", "--gamma", "2")
    assert out2 == out


def test_plan_explicit_S_and_rounding(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--omega", "2^19", "--S", "16,64,128", "--round")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.lstrip("* ").split(" ")[0] in ("16", "64", "128")]
    assert len(rows) == 3


def test_plan_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--omega", "1", "--gamma", "2")
    assert code == 2 and "too small" in err
    code, _, err = run(capsys, "plan", "--omega", "lots")
    assert code == 2 and "lots" in err


def test_train_tiny(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "train", "--model", "rp_mixer", "--dataset", "digits", "--epochs", "1",
                       "--out-dir", str(tmp_path), "--run-name", "t", "--no-progress", "--dim", "8", "--depth", "1")
    assert code == 0 and "test accuracy" in out
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["config"]["model"] == "rp_mixer" and cfg["model_kwargs"]["dim"] == 8
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1


def test_train_bad_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "--dataset", "imagenot", "--out-dir", str(tmp_path))
    assert code == 2 and "digits" in err


@pytest.mark.slow
def test_python_dash_m() -> None:
    res = subprocess.run([sys.executable, "-m", "widesparse", "models", "mixer_b*"], capture_output=True, text=True)
    assert res.returncode == 0 and "mixer_b16" in res.stdout


def test_train_from_config_file_with_cli_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "s_mixer"\nepochs = 3\nout_dir = "{tmp_path}"\nrun_name = "c"\n'
                   '[model_kwargs]\ndim = 8\ndepth = 1\n')
    code, out, _ = run(capsys, "train", "--config", str(cfg), "--epochs", "1", "--no-progress")
    assert code == 0
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["config"]["model"] == "s_mixer" and saved["config"]["epochs"] == 1
    assert saved["model_kwargs"]["dim"] == 8
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err


def test_train_options_come_from_the_config_dataclass(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--label-smoothing", "--seed", "--data-dir"):
        assert opt in out


@pytest.mark.slow
def test_spectra_of_a_name_and_of_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "spectra", "mixer", "--image-size", "8", "--patch-size", "2", "--dim", "16",
                       "--depth", "1")
    assert code == 0 and "mlp_tokens.fc1" in out and "mlp_channels.fc2" in out
    code, _, _ = run(capsys, "train", "--model", "sw_mlp", "--epochs", "1", "--out-dir", str(tmp_path),
                     "--run-name", "sw", "--no-progress", "--dim", "8", "--depth", "1")
    assert code == 0
    code, out, _ = run(capsys, "spectra", str(tmp_path / "sw"))
    assert code == 0 and "fc1" in out
    code, _, err = run(capsys, "spectra", "mixr")
    assert code == 2 and "unknown model" in err


@pytest.mark.slow
def test_cka_two_runs_and_self(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import numpy as np

    for model in ("mixer", "rp_mixer"):
        code, _, _ = run(capsys, "train", "--model", model, "--epochs", "1", "--out-dir", str(tmp_path),
                         "--run-name", model, "--no-progress", "--dim", "8", "--depth", "2")
        assert code == 0
    out = tmp_path / "cka"
    code, text, _ = run(capsys, "cka", str(tmp_path / "mixer"), str(tmp_path / "rp_mixer"), "--dataset", "digits",
                        "--batch-size", "64", "--passes", "2", "--out", str(out))
    assert code == 0 and "mean of the diagonal" in text
    mat = np.load(out / "cka.npy")
    assert mat.shape == (4, 4) and np.isfinite(mat).all()
    assert (out / "cka.png").stat().st_size > 0 and (out / "cka.csv").read_text().startswith("i,j")
    code, text, _ = run(capsys, "cka", str(tmp_path / "mixer"), "--self", "--batch-size", "64", "--passes", "1",
                        "--out", str(tmp_path / "self"))
    assert code == 0
    assert np.allclose(np.diag(np.load(tmp_path / "self" / "cka.npy")), 1.0)
    code, _, err = run(capsys, "cka", str(tmp_path / "mixer"))
    assert code == 2 and "--self" in err
    code, _, err = run(capsys, "cka", "mixer", "--self", "--batch-size", "3", "--out", str(tmp_path / "bad"))
    assert code == 2 and "3" in err


def test_bench_lists_the_benchmarks_and_passes_options_on(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("mixer", "memory", "sparse", "monarch", "cka", "train"):
        assert name in out
    assert main(["bench", "--only", "nonsense"]) == 2
    assert "valid: mixer" in capsys.readouterr().err
