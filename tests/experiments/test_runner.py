"""The sweep runner: resume after interruption (no run repeated, none lost), failures, data checks, Ray, CLI."""

from __future__ import annotations

import json
import os

import pytest

from widesparse.cli import main
from widesparse.experiments import check_data, expand, run_sweep, unique_runs
from widesparse.experiments.reproduce import reproduce
from widesparse.experiments.specs import Point, Run
from widesparse.experiments.tasks import ERROR, RESULT, execute

pytestmark = pytest.mark.usefixtures("single_thread")


def _e4(seeds: int = 2):
    return expand(["E4"], "tiny", seeds=seeds, epochs=1)


def _mtimes(out, runs):
    return {r.id: os.stat(out / "runs" / r.id / RESULT).st_mtime_ns for r in runs}


def test_interrupted_sweep_resumes_without_repeating(tmp_path):
    points = _e4()
    runs = unique_runs(points)
    assert len(runs) == 4
    logs: list[str] = []

    def stop_after_two(msg: str) -> None:
        logs.append(msg)
        if sum("done in" in m for m in logs) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path, log=stop_after_two)
    finished = [r for r in runs if (tmp_path / "runs" / r.id / RESULT).is_file()]
    assert len(finished) == 2
    before = _mtimes(tmp_path, finished)
    res = run_sweep(points, tmp_path, log=lambda m: None)
    assert (res.total, res.cached, res.ran, res.failed) == (4, 2, 2, [])
    for r in runs:  # finished runs keep their weights, not their resume checkpoints
        assert (tmp_path / "runs" / r.id / "model.pt").is_file()
        assert not (tmp_path / "runs" / r.id / "checkpoint.pt").exists()
    assert _mtimes(tmp_path, finished) == before  # nothing repeated
    assert all((tmp_path / "runs" / r.id / RESULT).is_file() for r in runs)  # nothing lost
    again = run_sweep(points, tmp_path, log=lambda m: None)
    assert (again.cached, again.ran) == (4, 0)


def test_training_run_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    run = next(r for r in unique_runs(expand(["E9"], "tiny", seeds=1, epochs=2)) if r.kind == "train")
    payload = {"id": run.id, "kind": run.kind, "params": run.params}
    assert execute(payload, str(tmp_path), 1, keep_checkpoints=True)["ok"]
    run_dir = tmp_path / "runs" / run.id
    assert (run_dir / "checkpoint.pt").is_file()
    first = json.loads((run_dir / RESULT).read_text())["result"]
    # simulate a crash after the last epoch's checkpoint: the final files were never written
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    for name in (RESULT, "summary.json", "model.pt"):
        (run_dir / name).unlink()
    info = execute(payload, str(tmp_path), 1)
    assert info["ok"] and not info["cached"]
    second = json.loads((run_dir / RESULT).read_text())["result"]
    assert second["test_acc"] == first["test_acc"] and second["train_loss"] == first["train_loss"]
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == lines  # no epoch logged twice


def test_a_failing_run_is_recorded_and_its_dependents_skipped(tmp_path):
    bad = Run("train", {"config": {"model": "mixer", "dataset": "digits", "epochs": 1, "seed": 0,
                                   "model_kwargs": {"patch_size": 3}}})
    cka = Run("cka", {"a": bad.id, "b": bad.id, "dataset": "digits", "batch_size": 64, "passes": 1, "seed": 0},
              needs=(bad.id,))
    pts = [Point("E1", bad, {"role": "train"}), Point("E1", cka, {"role": "cka"})]
    res = run_sweep(pts, tmp_path, log=lambda m: None)
    assert len(res.failed) == 2 and res.ran == 0
    err = json.loads((tmp_path / "runs" / bad.id / ERROR).read_text())
    assert "patch" in err["error"] and "Traceback" in err["traceback"]
    assert res.failed[1]["error"] == "a run it needs failed"


def test_paper_scale_without_data_names_the_missing_files_before_starting(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10: missing .*data_batch_1.*cs.toronto.edu"):
        reproduce(["E2"], scale="paper", data_dir=str(tmp_path), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing started
    with pytest.raises(FileNotFoundError, match="mnist: no --data-dir given"):
        check_data(expand(["E4"], "small"))
    assert main(["reproduce", "E7", "--scale", "paper", "--out", str(tmp_path / "o")]) == 2


def test_data_check_accepts_present_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"")
    check_data(expand(["E8"], "paper", data_dir=str(tmp_path), dataset="cifar10"))


def test_cli_plan_and_unknown_experiment(tmp_path, capsys):
    assert main(["reproduce", "E4", "E9", "--plan", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train-monarch_mlp-" in out and "runs (" in out and "todo" in out
    assert not tmp_path.joinpath("plan.json").exists()
    assert main(["reproduce", "E42"]) == 2
    assert "valid: E1, E2, E3" in capsys.readouterr().err


def test_cli_reproduce_then_report(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["reproduce", "E4", "--epochs", "1", "--seeds", "1", "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| E4 |" in text and (out / "report.html").is_file() and (out / "figures" / "E4.png").is_file()
    assert main(args) == 0  # everything cached
    assert main(["report", str(out)]) == 0
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.distributed
def test_local_worker_processes(tmp_path):
    res = run_sweep(_e4(1), tmp_path, workers=2, log=lambda m: None)
    assert (res.ran, res.failed) == (2, [])


@pytest.mark.distributed
def test_ray_backend_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'widesparse[ray]')")
    try:
        res = run_sweep(_e4(1), tmp_path, backend="ray", workers=2, threads=1, log=lambda m: None)
    finally:
        ray.shutdown()
    assert (res.total, res.ran, res.failed) == (2, 2, [])
    assert all((tmp_path / "runs" / r.id / RESULT).is_file() for r in unique_runs(_e4(1)))


def test_small_scale_reads_mnist_files_from_data_dir(tmp_path):
    """--scale small on the standard MNIST files (written here in the IDX format): E4 runs and reports."""
    from fake_datasets import make_dataset

    make_dataset("mnist", tmp_path / "data", n_train=64, n_test=32)
    res = reproduce(["E4"], scale="small", data_dir=str(tmp_path / "data"), out=tmp_path / "out", seeds=1, epochs=1,
                    log=lambda m: None)
    assert res["sweep"].ran == 2 and not res["sweep"].failed
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in rows} == {"mnist"} and {r["S"] for r in rows} == {28}
    assert all(0.0 <= r["test_err"] <= 1.0 for r in rows)


def test_spectra_of_a_trained_run_has_its_init_as_reference(tmp_path):
    run = next(r for r in unique_runs(expand(["E9"], "tiny", seeds=1, epochs=1)) if r.kind == "train")
    assert execute({"id": run.id, "kind": "train", "params": run.params}, str(tmp_path), 1)["ok"]
    spec = Run("spectra", {"run": run.id}, needs=(run.id,))
    assert execute({"id": spec.id, "kind": "spectra", "params": spec.params}, str(tmp_path), 1)["ok"]
    res = json.loads((tmp_path / "runs" / spec.id / RESULT).read_text())["result"]
    assert res["sigma_max"] > 0 and res["sigma_init"] > 0 and res["sigma_max"] != res["sigma_init"]
    assert len(res["layers"]) == 4 * run.params["config"]["model_kwargs"]["depth"]
