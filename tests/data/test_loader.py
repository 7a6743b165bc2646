"""Tests of widesparse.data.loader (streaming image folders: crops, per-example seeding, multi-worker loading) and of
streaming training runs (equal to the in-memory run, exact mid-epoch resume, worker-count independence)."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import widesparse.train.engine as train_mod
import widesparse.train.feed as train_data
from widesparse.data.loader import (
    ImageFolderDataset,
    StreamLoader,
    decode_train,
    default_num_workers,
    random_resized_box,
)
from widesparse.data.readers import DataFormatError, ImageFolderIndex, decode_image
from widesparse.train.checkpoint import load_checkpoint
from widesparse.train.engine import TIMING_KEYS, TrainConfig, train

from fake_datasets import make_dataset, write_png

pytest.importorskip("PIL.Image", reason="image folders need Pillow")
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes, 5 images each, of varied non-square sizes (so crops and resizes matter)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee", "cow"]):
        for i in range(5):
            h, w = [(12, 20), (20, 12), (16, 16), (9, 30), (24, 18)][i]
            write_png(root / "train" / name / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2 + 40 * c)
    return root


def test_random_resized_box_stays_inside_and_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for w, h in [(40, 30), (30, 40), (17, 17), (500, 375)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_box(w, h, rng)
            bw, bh = right - left, bottom - top
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            # the rounded box keeps the area fraction and aspect near their ranges (rounding: +-1 pixel per side)
            assert (bw - 1) * (bh - 1) <= w * h and (bw + 1) * (bh + 1) >= 0.08 * w * h
            assert 3 / 4 * (bh - 1) <= bw + 1 and bw - 1 <= 4 / 3 * (bh + 1)


def test_random_resized_box_falls_back_to_a_clamped_centre_crop():
    # No box with aspect in [3/4, 4/3] fits a 1000 x 10 strip in 10 tries: centre crop of aspect 4/3.
    box = random_resized_box(1000, 10, np.random.default_rng(0))
    assert box == (493, 0, 493 + 13, 10)
    assert random_resized_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 493 + 13)
    # scale (1, 1) with a square ratio on a square image: the whole image
    assert random_resized_box(20, 20, np.random.default_rng(1), scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 20, 20)


def test_decode_train_is_seeded_and_resize_random_is_a_window_of_the_resized_image(folder):
    path = folder / "train" / "ant" / "0.png"  # 20 wide, 12 high
    a = decode_train(path, 8, np.random.default_rng([5, 0]))
    assert a.shape == (3, 8, 8) and a.dtype == np.uint8
    assert np.array_equal(a, decode_train(path, 8, np.random.default_rng([5, 0])))
    assert any(not np.array_equal(a, decode_train(path, 8, np.random.default_rng([s, 0]))) for s in range(6, 10))
    # resize_random: shorter side to ceil(8 / 0.875) = 10, so the image becomes 17 x 10; a random 8 x 8 window
    with Image.open(path) as im:
        resized = np.asarray(im.convert("RGB").resize((17, 10), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    flips = set()
    for seed in range(12):
        out = decode_train(path, 8, np.random.default_rng(seed), crop="resize_random")
        windows = {(t, lft, f) for t in range(3) for lft in range(10) for f in (0, 1)
                   if np.array_equal(out, resized[:, t : t + 8, lft : lft + 8][:, :, :: (-1 if f else 1)])}
        assert windows, seed
        flips |= {f for *_, f in windows}
    assert flips == {0, 1}
    with pytest.raises(ValueError, match="unknown train crop 'inception'; valid: random_resized, resize_random"):
        decode_train(path, 8, np.random.default_rng(0), crop="inception")


def test_dataset_keys_eval_equals_decode_image_and_train_is_order_free(folder):
    index = ImageFolderIndex(folder / "train")
    ds = ImageFolderDataset([index], 8)
    assert len(ds) == 15 and ds.labels(0).tolist() == [0] * 5 + [1] * 5 + [2] * 5
    x, y = ds[(0, 7, None)]
    assert y == 1 and torch.equal(x, torch.from_numpy(np.array(decode_image(index.samples[7][0], 8))))
    first = [ds[(0, i, 123)][0] for i in range(15)]
    backwards = [ds[(0, i, 123)][0] for i in reversed(range(15))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards, strict=True))
    assert not torch.equal(ds[(0, 3, 123)][0], ds[(0, 3, 124)][0]) or not torch.equal(
        ds[(0, 4, 123)][0], ds[(0, 4, 124)][0]
    )
    xb, yb = ds.collate([])
    assert xb.shape == (0, 3, 8, 8) and xb.dtype == torch.uint8 and yb.shape == (0,)
    with pytest.raises(ValueError, match="unknown train crop"):
        ImageFolderDataset([index], 8, crop="nope")
    bad = folder / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="broken.png: cannot decode"):
        ImageFolderDataset([ImageFolderIndex(folder / "bad")], 8)[(0, 0, 1)]


def plan(n=15, bs=4, seed=7):
    return [[(0, i, seed) for i in range(s, min(s + bs, n))] for s in range(0, n, bs)]


def test_workers_decode_the_same_batches_and_survive_ctrl_c(folder):
    ds = ImageFolderDataset([ImageFolderIndex(folder / "train")], 8)
    ref = list(StreamLoader(ds, 0).run(plan()))
    rng_before = torch.get_rng_state()
    loader = StreamLoader(ds, 2)
    try:
        it = loader.run(plan())
        got = [next(it)]
        pids = [w.pid for w in loader.loader._iterator._workers]
        for pid in pids:  # Ctrl-C reaches the workers too: they ignore it, the main process decides
            os.kill(pid, signal.SIGINT)
        got += list(it)
        assert len(got) == len(ref) == 4
        for (x, y), (rx, ry) in zip(got, ref, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        # A second pass (a half-read one abandoned first) reuses the same persistent workers.
        next(loader.run(plan(seed=8)))
        again = list(loader.run(plan(bs=5) + [[]]))
        assert [w.pid for w in loader.loader._iterator._workers] == pids
        assert [len(y) for _, y in again] == [5, 5, 5, 0]
        assert torch.equal(torch.cat([x for x, _ in again]), torch.cat([x for x, _ in ref]))
    finally:
        loader.close()
    assert torch.equal(torch.get_rng_state(), rng_before)  # iterators draw their base seed elsewhere
    assert 1 <= default_num_workers() <= 8
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        StreamLoader(ds, -1)


# ------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_dataset("imagefolder", root, n_train=40, n_test=20)  # 8x8 PNGs, 3 classes
    return root


def config(images, out, **kw):
    base = dict(dataset="imagefolder", data_dir=str(images), image_size=8, epochs=3, batch_size=16, warmup_epochs=1,
                out_dir=str(out), run_name="s", progress=False, num_threads=1, stream=True, num_workers=0,
                model_kwargs={"dim": 8, "depth": 2, "drop_path_rate": 0.5})
    return TrainConfig(**{**base, **kw})


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unaugmented_stream_equals_the_in_memory_run(images, tmp_path):
    mem = train(config(images, tmp_path, run_name="mem", stream=False, augment=False))
    streamed = train(config(images, tmp_path, run_name="str", augment=False))
    assert rows(tmp_path / "mem") == rows(tmp_path / "str")
    assert same_weights(weights(tmp_path / "mem"), weights(tmp_path / "str"))
    saved = json.loads((tmp_path / "str" / "config.json").read_text())
    assert saved["streaming"] and not json.loads((tmp_path / "mem" / "config.json").read_text())["streaming"]
    assert saved["num_train"] == 40 and saved["num_test"] == 20 and saved["num_workers"] == 0
    # Streaming skips the extra pass over the train split: the last epoch's running numbers stand in.
    last = rows(tmp_path / "str")[-1]
    assert (streamed["train_acc"], streamed["train_loss"], streamed["train_acc_from"]) == (
        last["train_acc"], last["train_loss"], "last_epoch")
    assert mem["train_acc_from"] == "final_eval" and mem["test_acc"] == streamed["test_acc"]
    forced = train(config(images, tmp_path, run_name="full", augment=False, final_train_eval=True))
    assert (forced["train_acc"], forced["train_loss"]) == (mem["train_acc"], mem["train_loss"])


@pytest.fixture(scope="module")
def stream_reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("sref")
    summary = train(config(images, out))
    return summary, rows(out / "s"), weights(out / "s")


def test_augmented_stream_resumes_mid_epoch_exactly(images, stream_reference, tmp_path, monkeypatch):
    calls = []
    real = train_mod.create_model

    def create(*a, **k):
        model = real(*a, **k)

        def ctrl_c(module, args):
            if module.training:
                calls.append(1)
                if len(calls) == 5:  # epoch 2, step 1 (3 steps per epoch)
                    os.kill(os.getpid(), signal.SIGINT)

        model.register_forward_pre_hook(ctrl_c)
        return model

    monkeypatch.setattr(train_mod, "create_model", create)
    with pytest.raises(KeyboardInterrupt):
        train(config(images, tmp_path))
    ckpt = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert (ckpt["epochs_done"], ckpt["step"]) == (1, 2)
    monkeypatch.undo()
    summary = train(TrainConfig(resume=str(tmp_path / "s"), progress=False, num_threads=1, num_workers=2))
    ref_summary, ref_rows, ref_weights = stream_reference
    assert rows(tmp_path / "s") == ref_rows and same_weights(weights(tmp_path / "s"), ref_weights)
    assert summary["test_acc"] == ref_summary["test_acc"] and summary["train_acc"] == ref_summary["train_acc"]
    assert ref_rows[-1]["train_loss"] < math.log(3)  # it learns: the equality is not one of untrained models


def test_the_streamed_model_sees_random_crops_and_channels_last_on_request(images, tmp_path, monkeypatch):
    seen = []
    real = train_mod.create_model

    def create(*a, **k):
        model = real(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0])))
        return model

    monkeypatch.setattr(train_mod, "create_model", create)
    train(config(images, tmp_path, epochs=1, model_kwargs={"dim": 8, "depth": 1}, channels_last=True))
    assert [len(x) for t, x in seen if t] == [16, 16, 8]
    assert all(x.is_contiguous(memory_format=torch.channels_last) for _, x in seen)
    # the first batch: epoch 1's order and per-example crops, whatever process decodes them
    es = train_data.epoch_seed(0, 1)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(es))[:16].tolist()
    from widesparse.data.augment import normalize
    from widesparse.data.datasets import get_dataset_info, image_folder_splits

    train_index, _, _ = image_folder_splits(images, 8)
    ds = ImageFolderDataset([train_index], 8)
    want = torch.stack([ds[(0, i, es)][0] for i in order])
    info = get_dataset_info("imagefolder")
    assert torch.equal(seen[0][1], normalize(want, info.mean, info.std))
    unaugmented = torch.stack([ds[(0, i, None)][0] for i in order])
    assert not torch.equal(want, unaugmented)
    seen.clear()
    train(config(images, tmp_path, run_name="plain", epochs=1, model_kwargs={"dim": 8, "depth": 1},
                 train_crop="resize_random"))  # channels_last=None: only on CUDA
    assert not seen[0][1].is_contiguous(memory_format=torch.channels_last) and seen[0][1].is_contiguous()


def test_stream_choice_and_errors(images, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="stream=True streams image folders only; 'digits' is small"):
        train(TrainConfig(stream=True, out_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="unknown train_crop 'x'; valid: random_resized, resize_random"):
        train(config(images, tmp_path, train_crop="x"))
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        train(config(images, tmp_path, num_workers=-2))
    # stream=None: streams only above the size threshold (both splits decoded: 60 * 3 * 8 * 8 = 11,520 bytes)
    for limit, want in ((11_520, False), (11_519, True)):
        monkeypatch.setattr(train_data, "STREAM_ABOVE_BYTES", limit)
        summary = train(config(images, tmp_path, run_name=f"auto{limit}", stream=None, epochs=1))
        saved = json.loads((tmp_path / f"auto{limit}" / "config.json").read_text())
        assert saved["streaming"] is want and summary["train_acc_from"] == ("last_epoch" if want else "final_eval")


def test_stream_feed_shards_each_global_batch_like_one_process(images):
    from widesparse.data.datasets import image_folder_splits
    from widesparse.train.distributed import Dist

    train_index, test_index, info = image_folder_splits(images, 8)

    def feed(rank, world):
        return train_data.StreamFeed(train_index, test_index, info, torch.device("cpu"), Dist(rank, world), 15, seed=3)

    one, parts = feed(0, 1), [feed(r, 2) for r in range(2)]
    whole = list(one.train_batches(2, 0))
    assert [len(y) for _, y in whole] == [15, 15, 10]
    shards = [list(p.train_batches(2, 0)) for p in parts]
    assert [len(y) for _, y in shards[0]] == [8, 8, 5] and [len(y) for _, y in shards[1]] == [7, 7, 5]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)
    tail = list(one.train_batches(2, 1))  # a resumed epoch starts at its step
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(tail, whole[1:], strict=True))
    assert not torch.equal(next(one.train_batches(3, 0))[0], whole[0][0])  # another epoch, another order
    evals = [torch.cat([y for _, y in p.eval_batches("test")]) for p in parts]
    assert [len(e) for e in evals] == [10, 10] and torch.equal(torch.cat(evals), labels_of(test_index))


def labels_of(index):
    return torch.tensor([label for _, label in index.samples])
