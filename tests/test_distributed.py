"""Tests of widesparse.distributed and of data-parallel training: 2 processes (torchrun, gloo, CPU) give the same
run as 1 process with the same global batch; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fake_datasets import make_dataset

from widesparse.distributed import Dist, setup
from widesparse.train import TIMING_KEYS, TrainConfig, train


def test_world_of_one_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, device = setup("cpu")
    assert d == Dist() and not d.enabled and d.is_main and device == torch.device("cpu")
    x = torch.arange(5.0)
    assert d.shard(x) is x and d.all_sum(x) is x and torch.equal(x, torch.arange(5.0))
    assert d.any(True, device) and not d.any(False, device) and d.broadcast({"a": 1}) == {"a": 1}


def test_shards_are_contiguous_and_cover_the_batch():
    pos = torch.arange(10, 17)  # a last, short global batch of 7
    parts = [Dist(rank=r, world=3).shard(pos) for r in range(3)]
    assert [p.tolist() for p in parts] == [[10, 11, 12], [13, 14], [15, 16]]
    assert not Dist(rank=2, world=3).is_main


def run_config(data, out, **kw):
    return dict(dataset="cifar10", data_dir=str(data), epochs=3, batch_size=16, lr=1e-2, warmup_epochs=0,
                out_dir=str(out), num_threads=1, progress=False, model_kwargs={"dim": 8, "depth": 1}, **kw)


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process(tmp_path):
    data = tmp_path / "data"
    make_dataset("cifar10", data, n_train=40, n_test=20)  # 3 global batches per epoch: 16, 16, 8
    one = train(TrainConfig(**run_config(data, tmp_path / "one", run_name="r")))
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--epochs", "3", "--batch-size", "16", "--lr", "0.01",
            "--warmup-epochs", "0", "--out-dir", str(tmp_path / "two"), "--run-name", "r", "--num-threads", "1",
            "--no-progress", "--dim", "8", "--depth", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "widesparse",
         "train", *args], capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # the summary line comes from rank 0 only
    run_one, run_two = tmp_path / "one" / "r", tmp_path / "two" / "r"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r"]  # one folder, not one per rank
    assert json.loads((run_two / "config.json").read_text())["world_size"] == 2
    rows_one, rows_two = read_rows(run_one), read_rows(run_two)
    assert len(rows_one) == len(rows_two) == 3
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in set(a) - TIMING_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert rows_one[-1]["train_loss"] < rows_one[0]["train_loss"] - 0.05  # it learned: the comparison means something
    s1 = torch.load(run_one / "model.pt", weights_only=True)
    s2 = torch.load(run_two / "model.pt", weights_only=True)
    assert s1.keys() == s2.keys()
    for k in s1:
        diff, norm = (s1[k] - s2[k]).double().norm().item(), s1[k].double().norm().item()
        # The token MLP's output bias has an exactly zero gradient (the next LayerNorm removes it), so Adam moves
        # it by summation-order noise only: it stays tiny (|b| ~ 1e-4) but differs between the runs.
        assert diff <= 1e-5 * norm or (k.endswith("mlp_tokens.fc2.bias") and norm < 1e-3), (k, diff, norm)
    summary = json.loads((run_two / "summary.json").read_text())
    assert summary["test_acc"] == one["test_acc"] and summary["train_acc"] == pytest.approx(one["train_acc"])
