"""Tests of widesparse.train.checkpoint: atomic writes survive simulated crashes; checkpoints load safely; Ctrl-C."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import widesparse.train.checkpoint as ck
from widesparse.train.checkpoint import (
    CheckpointError,
    DeferredInterrupt,
    atomic_write,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_json,
)


def test_roundtrip_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3), "mask": torch.tensor([True, False])}, "epoch": 3,
             "history": [{"epoch": 1, "acc": 0.5}], "partial": None, "rng": get_rng_state()}
    save_checkpoint(tmp_path / "c.pt", state)
    got = load_checkpoint(tmp_path / "c.pt")
    assert got["format"] == ck.CHECKPOINT_FORMAT and got["epoch"] == 3 and got["history"] == state["history"]
    assert torch.equal(got["model"]["w"], state["model"]["w"]) and got["model"]["mask"].dtype == torch.bool
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})
    real_save = torch.save

    def crash_halfway(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(100)  # half-written bytes, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    got = load_checkpoint(path)
    assert got["epoch"] == 1 and torch.equal(got["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_hard_kill_leftover_temp_file_is_harmless(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    # A SIGKILL between writing the temporary file and the rename leaves a partial temporary file behind.
    (tmp_path / ".checkpoint.pt.stale.tmp").write_bytes(b"garbage")
    assert load_checkpoint(path)["epoch"] == 1
    save_checkpoint(path, {"epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3


def test_atomic_write_text_and_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n'
    assert len(synced) == 2  # the file, then its folder
    atomic_write(tmp_path / "a.json", lambda f: f.write("new"))
    assert (tmp_path / "a.json").read_text() == "new"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(100)})
    raw = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt cannot be read"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt is not a widesparse checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_rng_state_roundtrip():
    state = get_rng_state()
    a = torch.rand(5)
    torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


def test_deferred_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with DeferredInterrupt() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only sets the flag
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):  # a second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
