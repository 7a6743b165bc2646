"""Streaming image folders: lazy Pillow decoding in DataLoader worker processes, seeded per example.

Imports only :mod:`widesparse.data.readers`; no torchvision. For data sets too large to hold decoded in
memory (ImageNet-1k: 1.28M images); the small data sets stay in memory (:mod:`widesparse.data.datasets`).

Every example is addressed by a key ``(split, index, seed)``: ``seed=None`` is the evaluation transform
(:func:`widesparse.data.readers.decode_image`: shorter side to ``size``, centre crop), an integer seed the training
transform drawn from ``numpy.random.default_rng([seed, index])``: a random crop (:data:`TRAIN_CROPS`) and a
horizontal flip. The image an example becomes is thus a pure function of its key, whichever worker decodes
it: with the key ``seed`` a function of ``(run seed, epoch)``, a resumed run and a run split over several
processes decode exactly the images of an uninterrupted single-process run.

Images leave the workers as ``uint8`` ``(B, 3, size, size)`` batches (4x less to move than float32) and are
normalised on the device. :class:`StreamLoader` keeps one set of persistent workers for all passes (train
epochs and evaluations of both splits): each pass hands it the list of key batches to decode, in order.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from widesparse.data.readers import DataFormatError, ImageFolderIndex, decode_image

__all__ = [
    "ImageFolderDataset",
    "Key",
    "StreamLoader",
    "TRAIN_CROPS",
    "decode_train",
    "default_num_workers",
    "random_resized_box",
]

TRAIN_CROPS = ("random_resized", "resize_random")
"""``random_resized``: Inception-style crop (area ``scale``, aspect ``ratio``, as torchvision's
``RandomResizedCrop``) resized to ``size``; ``resize_random``: shorter side to ``ceil(size / 0.875)`` (256 for
224), then a random ``size`` square (torchvision's ``Resize`` + ``RandomCrop``)."""

Key = tuple[int, int, int | None]
"""``(split, index, seed)``: split number in the data set, example index, training-transform seed or ``None``."""


def random_resized_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, right, bottom)`` as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio log-uniform in ``ratio``; if
    none fits, the centre crop of the whole image with the aspect ratio clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def decode_train(
    path: str | os.PathLike[str], size: int, rng: np.random.Generator, crop: str = "random_resized", hflip: bool = True
) -> np.ndarray:
    """Decode to RGB with a random ``crop`` (see :data:`TRAIN_CROPS`) and flip (p = 1/2): ``(3, size, size)`` uint8.

    The draws happen in a fixed order (crop, then flip) so that the result is a function of ``rng``'s seed.
    """
    from PIL import Image

    if crop not in TRAIN_CROPS:
        raise ValueError(f"unknown train crop {crop!r}; valid: {', '.join(TRAIN_CROPS)}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if crop == "random_resized":
                box = random_resized_box(w, h, rng)
            else:
                short = math.ceil(size / 0.875)
                s = short / min(w, h)
                w, h = max(short, round(w * s)), max(short, round(h * s))
                im = im.resize((w, h), Image.Resampling.BILINEAR)
                top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                box = (left, top, left + size, top + size)
            im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
            if hflip and rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        raise DataFormatError(f"{path}: cannot decode ({e}); expected an image Pillow can decode") from None
    return arr.transpose(2, 0, 1)


class ImageFolderDataset(Dataset):
    """Images of one or more :class:`~widesparse.data.readers.ImageFolderIndex` splits, decoded when asked.

    ``dataset[(split, index, seed)]`` is ``(uint8 (3, size, size), label)``: the evaluation transform for
    ``seed=None``, else the training transform (``crop``, ``hflip``) seeded by ``[seed, index]``.
    """

    def __init__(
        self, splits: Sequence[ImageFolderIndex], size: int, crop: str = "random_resized", hflip: bool = True
    ) -> None:
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if crop not in TRAIN_CROPS:
            raise ValueError(f"unknown train crop {crop!r}; valid: {', '.join(TRAIN_CROPS)}")
        self.splits, self.size, self.crop, self.hflip = list(splits), int(size), crop, bool(hflip)

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits)

    def __getitem__(self, key: Key) -> tuple[Tensor, int]:
        split, index, seed = key
        path, label = self.splits[split].samples[index]
        if seed is None:
            arr = decode_image(path, self.size)
        else:
            arr = decode_train(path, self.size, np.random.default_rng([seed, index]), self.crop, self.hflip)
        return torch.from_numpy(np.require(arr, requirements=["C", "W"])), label

    def labels(self, split: int) -> Tensor:
        """All labels of ``split`` (``int64``), without decoding."""
        return torch.tensor([label for _, label in self.splits[split].samples], dtype=torch.int64)

    def collate(self, batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        """Stack examples into ``(uint8 (B, 3, size, size), int64 (B,))``; an empty batch gives empty tensors."""
        if not batch:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return torch.stack([x for x, _ in batch]), torch.tensor([y for _, y in batch], dtype=torch.int64)


class _Plan:
    """The DataLoader's batch sampler: yields the key batches of the current pass (set before each pass)."""

    def __init__(self) -> None:
        self.batches: Iterable[list[Key]] = ()

    def __iter__(self) -> Iterator[list[Key]]:
        return iter(self.batches)


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the workers must outlive it, so that the main process can finish
    # its step and write a checkpoint (widesparse.train.checkpoint.DeferredInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_num_workers() -> int:
    """Workers per process when unset: the CPUs this process may use, over the processes on this machine
    (``LOCAL_WORLD_SIZE`` under torchrun), at most 8, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


class StreamLoader:
    """One multi-worker ``DataLoader`` over an :class:`ImageFolderDataset` for every pass of a run.

    Args:
        dataset: The images.
        num_workers: Worker processes (persistent across passes); ``0`` decodes in this process.
        pin_memory: Page-locked batches (for fast asynchronous copies to a CUDA device).
        prefetch_factor: Batches each worker decodes ahead.
    """

    def __init__(
        self, dataset: ImageFolderDataset, num_workers: int, pin_memory: bool = False, prefetch_factor: int = 2
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self._plan = dataset, _Plan()
        extra: dict[str, Any] = {}
        if num_workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "worker_init_fn": _ignore_sigint}
        # Its own generator: creating an iterator draws a base seed, which must not move torch's global RNG
        # (drop path draws from it, and a resumed run must see the same draws).
        self.loader = DataLoader(
            dataset, batch_sampler=self._plan, num_workers=num_workers, collate_fn=dataset.collate,
            pin_memory=pin_memory, generator=torch.Generator(), **extra,
        )  # fmt: skip

    def run(self, batches: Iterable[list[Key]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Decode ``batches`` (lists of keys) in order; yields ``(uint8 images, int64 labels)`` per batch."""
        self._plan.batches = batches
        starting = self.loader.num_workers > 0 and getattr(self.loader, "_iterator", None) is None
        if not starting or threading.current_thread() is not threading.main_thread():
            return iter(self.loader)
        # The workers start here: they inherit an ignored SIGINT, so a Ctrl-C cannot reach one before its
        # worker_init_fn has run (seen to kill a worker that had just been forked).
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return iter(self.loader)
        finally:
            signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage-collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
