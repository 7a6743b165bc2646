"""The run protocol under faults: claims (exclusive, stale takeover, release), two sweeps on one folder, and runs
whose results fail verification (quarantined, reported by name, rerun)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from widesparse.experiments import expand, run_sweep, unique_runs
from widesparse.experiments import tasks as tasks_mod
from widesparse.experiments.claims import claim_path, claim_run, claim_status
from widesparse.experiments.report import build_report
from widesparse.experiments.reproduce import reproduce
from widesparse.experiments.runner import write_plan
from widesparse.experiments.table import load_rows
from widesparse.experiments.tasks import RESULT, InvalidRun, is_done, read_result

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("single_thread")]


def _quiet(msg: str) -> None:
    pass


# --- claims ------------------------------------------------------------------------------------------------------

def test_a_claim_is_exclusive_until_released(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    first = claim_run(run_dir)
    assert first is not None and claim_path(run_dir).is_file()
    st = claim_status(run_dir)
    assert st.state == "held" and st.holder["pid"] == os.getpid() and {"host", "started", "job"} <= set(st.holder)
    assert claim_run(run_dir) is None
    first.release()
    assert claim_status(run_dir).state == "free" and not claim_path(run_dir).exists()
    with claim_run(run_dir) as again:
        assert again is not None and claim_run(run_dir) is None
    assert claim_status(run_dir).state == "free"


def test_the_heartbeat_touches_the_claim(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    claim = claim_run(run_dir, heartbeat=0.05)
    os.utime(claim_path(run_dir), (0, 0))
    time.sleep(0.3)
    assert time.time() - claim_path(run_dir).stat().st_mtime < 5
    claim.release()


def test_slurm_job_id_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with claim_run(tmp_path / "runs" / "r"):
        assert claim_status(tmp_path / "runs" / "r").holder["job"] == "77_3"


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "runs" / "r"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    claim_path(run_dir).parent.mkdir(parents=True)
    claim_path(run_dir).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old"}))
    assert claim_status(run_dir).state == "stale"
    with caplog.at_level(logging.WARNING):
        claim = claim_run(run_dir)
    assert claim is not None and claim_status(run_dir).holder["pid"] == os.getpid()
    assert sum("stale claim" in r.getMessage() for r in caplog.records) == 1
    claim.release()


def test_a_claim_from_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    claim_path(run_dir).parent.mkdir(parents=True)
    claim_path(run_dir).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    assert claim_run(run_dir) is None  # fresh heartbeat: a live holder we cannot check
    old = time.time() - 3600
    os.utime(claim_path(run_dir), (old, old))
    assert claim_status(run_dir).state == "stale"
    claim = claim_run(run_dir)
    assert claim is not None
    claim.release()


# --- two sweeps on one folder ------------------------------------------------------------------------------------

def _counting_train(counter):
    """A stand-in for training that behaves like it on disk: starts over (rmtree) without a checkpoint, writes its
    files with a pause between them, and appends to ``counter`` each time it executes."""
    lock = threading.Lock()

    def fake(params, run_dir, threads):
        with lock:
            with open(counter, "a") as f:
                f.write(run_dir.name + "\n")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(params))
        time.sleep(0.3)
        (run_dir / "model.pt").write_bytes(b"weights of " + run_dir.name.encode())
        (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
        return {"test_acc": 0.5, "test_err": 0.5, "train_acc": 0.5}

    return fake


def test_two_sweeps_on_one_folder_run_every_run_exactly_once(tmp_path, monkeypatch):
    points = expand(["E4"], "tiny", seeds=2, epochs=1)
    runs = unique_runs(points)
    counter = tmp_path / "count.txt"
    monkeypatch.setitem(tasks_mod._TASKS, "train", _counting_train(counter))
    out = tmp_path / "out"
    out.mkdir()
    write_plan(points, out, {"scale": "tiny"})
    results, errors = [], []

    def sweep():
        try:
            results.append(run_sweep(points, out, log=_quiet, poll=0.05))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and all(not r.failed for r in results)
    executed = counter.read_text().split()
    assert sorted(executed) == sorted(r.id for r in runs)  # each run once
    assert sum(r.ran for r in results) == len(runs)
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.id for r in runs)  # no -1, no claims left
    for r in runs:
        assert {"config.json", "model.pt", "metrics.jsonl", RESULT} <= {p.name for p in (out / "runs" / r.id).iterdir()}
        assert is_done(out / "runs" / r.id)
    single = tmp_path / "single"
    single.mkdir()
    write_plan(points, single, {"scale": "tiny"})
    run_sweep(points, single, log=_quiet)

    def table(o):
        return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in load_rows(o)]

    assert table(out) == table(single)


def test_a_sweep_takes_over_a_run_whose_holder_died(tmp_path, monkeypatch):
    points = expand(["E4"], "tiny", seeds=1, epochs=1)
    counter = tmp_path / "count.txt"
    monkeypatch.setitem(tasks_mod._TASKS, "train", _counting_train(counter))
    run = unique_runs(points)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    path = claim_path(tmp_path / "runs" / run.id)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old"}))
    res = run_sweep(points, tmp_path, log=_quiet, poll=0.05)
    assert res.ran == 2 and not res.failed and not path.exists()


def test_a_sweep_waits_for_a_held_run_and_takes_it_over_when_its_heartbeat_stops(tmp_path, monkeypatch):
    from widesparse.experiments import claims

    points = expand(["E4"], "tiny", seeds=1, epochs=1)
    counter = tmp_path / "count.txt"
    monkeypatch.setitem(tasks_mod._TASKS, "train", _counting_train(counter))
    monkeypatch.setattr(claims, "STALE_AFTER", 1.0)
    run = unique_runs(points)[0]
    path = claim_path(tmp_path / "runs" / run.id)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))  # alive, then silent
    logs: list[str] = []
    res = run_sweep(points, tmp_path, log=logs.append, poll=0.05)
    assert any("waiting for 1 runs" in m for m in logs)
    assert res.ran == 2 and not res.failed and sorted(counter.read_text().split()) == sorted(
        r.id for r in unique_runs(points))


# --- verified results --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One real tiny sweep (E4, one seed, one epoch: two training runs), made once and copied per test."""
    base = tmp_path_factory.mktemp("done") / "out"
    with pytest.MonkeyPatch.context():
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        reproduce(["E4"], scale="tiny", seeds=1, epochs=1, out=base, log=_quiet)
        torch.set_num_threads(n)
    return base


def _truncate(run_dir):
    text = (run_dir / RESULT).read_text()
    (run_dir / RESULT).write_text(text[: len(text) // 2])


def _garbage_result(run_dir):
    (run_dir / RESULT).write_bytes(os.urandom(300))


def _edited_result(run_dir):
    rec = json.loads((run_dir / RESULT).read_text())
    rec["result"]["test_acc"] = 1.0
    (run_dir / RESULT).write_text(json.dumps(rec))


def _garbage_model(run_dir):
    size = (run_dir / "model.pt").stat().st_size
    (run_dir / "model.pt").write_bytes(os.urandom(size))


def _changed_metrics(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 99}\n')


def _missing_model(run_dir):
    (run_dir / "model.pt").unlink()


FAULTS = {"truncated result.json": (_truncate, "result.json is not valid JSON"),
          "garbage result.json": (_garbage_result, "result.json"),
          "edited result.json": (_edited_result, "checksum mismatch"),
          "garbage model.pt": (_garbage_model, "model.pt changed"),
          "changed metrics.jsonl": (_changed_metrics, "metrics.jsonl changed"),
          "missing model.pt": (_missing_model, "model.pt is missing")}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_run_is_reported_by_name_quarantined_and_rerun(fault, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    points = expand(["E4"], "tiny", seeds=1, epochs=1)
    run = unique_runs(points)[0]
    run_dir = out / "runs" / run.id
    damage, words = FAULTS[fault]
    damage(run_dir)
    assert not is_done(run_dir)
    with pytest.raises(InvalidRun, match=words):
        read_result(run_dir)
    rep = build_report(out)  # never stops on one bad run
    assert rep["status"]["invalid"] == 1 and rep["status"]["done"] == 1
    bad = [r for r in load_rows(out) if r["run_id"] == run.id]
    assert bad and all(r["status"] == "invalid" and words in r["error"] and str(run_dir) in r["error"] for r in bad)
    assert run.id in (out / "report.md").read_text()
    res = run_sweep(points, out, log=_quiet)
    assert (res.cached, res.ran, res.failed) == (1, 1, [])
    assert is_done(run_dir)
    moved = list((out / "quarantine").iterdir())
    assert len(moved) == 1 and (moved[0] / run.id).is_dir()
    assert words in (moved[0] / "REASON.txt").read_text()
    assert build_report(out)["status"]["invalid"] == 0


def test_an_old_result_without_checksum_is_accepted(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    run_dir = out / "runs" / unique_runs(expand(["E4"], "tiny", seeds=1, epochs=1))[0].id
    rec = json.loads((run_dir / RESULT).read_text())
    del rec["checksum"], rec["artefacts"]
    (run_dir / RESULT).write_text(json.dumps(rec))
    assert is_done(run_dir) and read_result(run_dir)["result"] == rec["result"]


def test_a_result_records_every_artefact(finished):
    run_dir = finished / "runs" / unique_runs(expand(["E4"], "tiny", seeds=1, epochs=1))[0].id
    rec = read_result(run_dir)
    assert {"model.pt", "config.json", "metrics.jsonl", "summary.json"} <= set(rec["artefacts"])
    assert all(len(a["sha256"]) == 64 and a["size"] > 0 for a in rec["artefacts"].values())


@pytest.mark.slow
def test_two_reproduce_commands_on_one_folder(tmp_path):
    """The reported case end to end: two `widesparse reproduce` processes started together on one --out."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "widesparse", "reproduce", "E4", "--scale", "tiny", "--seeds", "1", "--epochs", "1",
           "--out", str(out), "--threads", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = 0
    for _, err in outputs:
        last = next(line for line in err.splitlines() if " cached, " in line and " ran, " in line)
        ran += int(last.split(" ran,")[0].rsplit(" ", 1)[1])
        assert " 0 failed" in last
    runs = unique_runs(expand(["E4"], "tiny", seeds=1, epochs=1))
    assert ran == len(runs)  # each run executed by exactly one of the two
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(r.id for r in runs)
    for r in runs:
        rec = read_result(out / "runs" / r.id)
        assert {"model.pt", "config.json", "metrics.jsonl", "summary.json"} <= set(rec["artefacts"])
