"""Where the training engine's batches come from: a data set held on the device, or a streaming image folder.

Imports :mod:`widesparse.data.datasets`, :mod:`widesparse.data.readers`, :mod:`widesparse.data.augment`,
:mod:`widesparse.data.loader` and :class:`widesparse.train.distributed.Dist`.

Both feeds offer the same three things to the train loop: ``train_batches(epoch, start_step)`` (this rank's
``uint8`` share of every global batch of the epoch, on the device, from ``start_step`` on),
``eval_batches(split)`` (this rank's contiguous shard of ``"train"`` or ``"test"``, unaugmented) and
``close()``. The epoch order is ``torch.randperm`` from a generator seeded by ``(seed, epoch)``
(:func:`epoch_seed`) in both, so that a resumed run (even mid-epoch) and a run over several processes see the
same examples in the same batches as an uninterrupted single-process run.

* :class:`DeviceFeed`: the images stay on the device as ``uint8``; each batch is gathered there and
  cropped/flipped by :mod:`widesparse.data.augment` (the data set's ``crop_padding``/``hflip``).
* :class:`StreamFeed`: an image folder decoded lazily by DataLoader workers (:mod:`widesparse.data.loader`); the
  training transform is a random (resized) crop and a flip, seeded per example by ``(epoch seed, index)``.

:func:`open_feed` picks one: ``stream=None`` streams an ``imagefolder`` whose decoded images would exceed
:data:`STREAM_ABOVE_BYTES`; every other data set is small and lives on the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from widesparse.data import readers
from widesparse.data.augment import apply_crop_flip, draw_crop_flip
from widesparse.data.datasets import DatasetInfo, Split, image_folder_splits, iterate_batches, load_pixels
from widesparse.data.loader import ImageFolderDataset, Key, StreamLoader, default_num_workers
from widesparse.train.distributed import Dist

__all__ = ["STREAM_ABOVE_BYTES", "DeviceFeed", "Feed", "StreamFeed", "epoch_seed", "open_feed"]

STREAM_ABOVE_BYTES = 4 << 30
"""``stream=None``: an image folder whose decoded ``uint8`` images (both splits) exceed this streams (4 GiB:
ImageNet-1k at 64 px and above; at 32 px, 3.9 GB, it is decoded once into memory)."""

SplitName = Literal["train", "test"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s order and augmentation: a function of ``(seed, epoch)`` only."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class Feed(Protocol):
    """What the train loop needs of a data source (see the module docstring)."""

    info: DatasetInfo
    num_train: int
    num_test: int
    streaming: bool

    def train_batches(self, epoch: int, start_step: int) -> Iterator[tuple[Tensor, Tensor]]: ...

    def eval_batches(self, split: SplitName) -> Iterator[tuple[Tensor, Tensor]]: ...

    def close(self) -> None: ...


def eval_batch_size(batch_size: int) -> int:
    """Examples per evaluation batch on each rank (both feeds: equal batches give equal sums)."""
    return max(batch_size, 256)


def _global_positions(step: int, batch_size: int, n: int) -> Tensor:
    return torch.arange(step * batch_size, min((step + 1) * batch_size, n))


class DeviceFeed:
    """A data set held on ``device`` as ``uint8``; batches are gathered and augmented there."""

    streaming = False

    def __init__(
        self, train: Split, test: Split, info: DatasetInfo, device: torch.device, d: Dist, batch_size: int,
        seed: int, augment: bool = True,
    ) -> None:  # fmt: skip
        self.train = Split(train.x.to(device), train.y.to(device))
        self.test = Split(test.x.to(device), test.y.to(device))
        self.info, self.device, self.dist, self.batch_size, self.seed = info, device, d, batch_size, seed
        self.num_train, self.num_test = self.train.num_examples, self.test.num_examples
        self.padding = info.crop_padding if augment else 0
        self.hflip = info.hflip and augment

    def train_batches(self, epoch: int, start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs, d, device = self.num_train, self.batch_size, self.dist, self.device
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=gen).to(device)
        aug = draw_crop_flip(n, self.padding, self.hflip, gen) if (self.padding or self.hflip) else None
        for step in range(start_step, math.ceil(n / bs)):
            local = d.shard(_global_positions(step, bs, n))
            idx = order[local.to(device)]
            xb, yb = self.train.x[idx], self.train.y[idx]
            if aug is not None:
                xb = apply_crop_flip(xb, aug.take(local), self.padding)
            yield xb, yb

    def eval_batches(self, split: SplitName) -> Iterator[tuple[Tensor, Tensor]]:
        data, d = (self.train if split == "train" else self.test), self.dist
        return iterate_batches(d.shard(data.x), d.shard(data.y), eval_batch_size(self.batch_size))

    def close(self) -> None:
        pass


class StreamFeed:
    """An image folder decoded on the fly by ``num_workers`` persistent DataLoader workers per process."""

    streaming = True

    def __init__(
        self, train: readers.ImageFolderIndex, test: readers.ImageFolderIndex, info: DatasetInfo,
        device: torch.device, d: Dist, batch_size: int, seed: int, augment: bool = True,
        crop: str = "random_resized", num_workers: int | None = None,
    ) -> None:  # fmt: skip
        self.info, self.device, self.dist, self.batch_size, self.seed = info, device, d, batch_size, seed
        self.num_train, self.num_test, self.augment = len(train), len(test), augment
        self.dataset = ImageFolderDataset([train, test], info.image_size, crop, hflip=info.hflip)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.loader = StreamLoader(self.dataset, self.num_workers, pin_memory=device.type == "cuda")

    def _to_device(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        for xb, yb in batches:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, start_step: int) -> Iterator[tuple[Tensor, Tensor]]:
        n, bs, d = self.num_train, self.batch_size, self.dist
        es = epoch_seed(self.seed, epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(es))
        aug_seed = es if self.augment else None

        def plan() -> Iterator[list[Key]]:
            for step in range(start_step, math.ceil(n / bs)):
                yield [(0, i, aug_seed) for i in order[d.shard(_global_positions(step, bs, n))].tolist()]

        return self._to_device(self.loader.run(plan()))

    def eval_batches(self, split: SplitName) -> Iterator[tuple[Tensor, Tensor]]:
        which = 0 if split == "train" else 1
        idx = self.dist.shard(torch.arange(self.num_train if which == 0 else self.num_test)).tolist()
        ebs = eval_batch_size(self.batch_size)
        keys = [[(which, i, None) for i in idx[s : s + ebs]] for s in range(0, len(idx), ebs)]
        return self._to_device(self.loader.run(keys))

    def close(self) -> None:
        self.loader.close()


def open_feed(
    dataset: str, *, data_dir: str | None, seed: int, image_size: int | None, download: bool, device: torch.device,
    d: Dist, batch_size: int, augment: bool, stream: bool | None, crop: str, num_workers: int | None,
) -> Feed:  # fmt: skip
    """The feed of a run's data set (the arguments are :class:`~widesparse.train.config.TrainConfig` fields)."""
    if dataset != "imagefolder":
        if stream:
            raise ValueError(
                f"stream=True streams image folders only; {dataset!r} is small and is held in memory (use "
                "dataset='imagefolder', or stream=None/False)"
            )
        train, test, info = load_pixels(dataset, data_dir=data_dir, seed=seed, image_size=image_size, download=download)
        return DeviceFeed(train, test, info, device, d, batch_size, seed, augment)
    train_index, test_index, info = image_folder_splits(data_dir, image_size)
    decoded = (len(train_index) + len(test_index)) * info.in_chans * info.image_size**2
    if stream or (stream is None and decoded > STREAM_ABOVE_BYTES):
        return StreamFeed(train_index, test_index, info, device, d, batch_size, seed, augment, crop, num_workers)
    size = info.image_size
    train = Split(*(torch.from_numpy(a) for a in readers.read_image_folder(train_index, size)))
    test = Split(*(torch.from_numpy(a) for a in readers.read_image_folder(test_index, size)))
    return DeviceFeed(train, test, info, device, d, batch_size, seed, augment)
