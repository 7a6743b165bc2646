"""Image classification data sets as in-memory tensors, with one table of per-data-set defaults.

Floor 1: this module imports nothing from ``widesparse``. It knows no model; a model is sized from a
:class:`DatasetInfo` (image size, channels, classes, default patch size) by its caller.

Only the embedded ``digits`` set (scikit-learn's ``load_digits``: 1797 grayscale 8x8 images, 10
classes, no download) exists for now. Data sets read from disk (MNIST, CIFAR, ...) are added by
putting a :class:`DatasetInfo` into :data:`DATASETS` and a loader into ``_LOADERS``; a loader gets
``(data_dir, seed, test_fraction)`` and returns a fixed split, so sets that ship their own train/test
split simply ignore ``seed`` and ``test_fraction``.

Every tensor returned is normalised per channel with the table's ``mean``/``std`` (after scaling
pixels to [0, 1]), has shape ``(N, in_chans, H, W)``, and labels are ``int64``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Split",
    "get_dataset_info",
    "iterate_batches",
    "list_datasets",
    "load_dataset",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts and defaults of one data set.

    Attributes:
        name: Registry name, as passed to :func:`load_dataset`.
        image_size: Side of the (square) images in pixels.
        in_chans: Number of image channels.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        mean: Per-channel mean of the pixels scaled to [0, 1], used for normalisation.
        std: Per-channel standard deviation of the pixels scaled to [0, 1].
        default_patch_size: Patch side a patch-based model uses on this data set unless told otherwise.
        description: One line for listings.
        default_model_kwargs: Extra model keyword arguments the training loop applies for this data set
            (for example a smaller width/depth for a tiny data set); the user's own model kwargs win.
    """

    name: str
    image_size: int
    in_chans: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_patch_size: int
    description: str
    default_model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"{self.name}: mean/std need one entry per channel ({self.in_chans}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if self.image_size % self.default_patch_size:
            raise ValueError(
                f"{self.name}: default_patch_size {self.default_patch_size} does not divide image_size "
                f"{self.image_size}"
            )
        # Freeze the mapping so a shared table entry cannot be edited by accident.
        object.__setattr__(self, "default_model_kwargs", MappingProxyType(dict(self.default_model_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of the fields."""
        return {
            "name": self.name,
            "image_size": self.image_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "default_patch_size": self.default_patch_size,
            "description": self.description,
            "default_model_kwargs": dict(self.default_model_kwargs),
        }


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "digits": DatasetInfo(
            name="digits",
            image_size=8,
            in_chans=1,
            num_classes=10,
            # Pixels 0..16 scaled to [0, 1]; mean/std over all 1797 images (all 64 pixels pooled).
            mean=(0.30526028624095713,),
            std=(0.3760492217920148,),
            default_patch_size=2,
            description="scikit-learn load_digits: 1797 grayscale 8x8 handwritten digits, 10 classes (embedded)",
        ),
    }
)
"""Per-data-set defaults, keyed by name."""


class Split(NamedTuple):
    """One split of a data set: images ``x`` of shape ``(N, C, H, W)`` and ``int64`` labels ``y``."""

    x: Tensor
    y: Tensor

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])


class _RawSplits(NamedTuple):
    """Loader output: images as float arrays in [0, 1] of shape (N, C, H, W), integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def list_datasets() -> list[str]:
    """Sorted names of the known data sets."""
    return sorted(DATASETS)


def get_dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; raises ``ValueError`` listing the valid names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(list_datasets())}") from None


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x[:, None, :, :], y


def _stratified_split(x: np.ndarray, y: np.ndarray, *, seed: int, test_fraction: float) -> _RawSplits:
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, shuffle=True, stratify=y
    )
    return _RawSplits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def _load_digits(data_dir: str | os.PathLike[str] | None, seed: int, test_fraction: float) -> _RawSplits:
    del data_dir  # embedded in scikit-learn, nothing on disk
    x, y = _digits_arrays()
    return _stratified_split(x, y, seed=seed, test_fraction=test_fraction)


_LOADERS = {
    "digits": _load_digits,
}


def _to_tensors(x: np.ndarray, y: np.ndarray, info: DatasetInfo, dtype: torch.dtype) -> Split:
    mean = np.asarray(info.mean, dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(info.std, dtype=np.float64).reshape(1, -1, 1, 1)
    xn = (x.astype(np.float64) - mean) / std
    return Split(torch.from_numpy(xn).to(dtype), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> tuple[Split, Split, DatasetInfo]:
    """Load a data set into memory as normalised tensors.

    Args:
        name: A name from :func:`list_datasets`.
        data_dir: Folder holding the files of on-disk data sets; ignored by embedded ones (``digits``).
        seed: Seed of the stratified train/test split (data sets without a fixed split).
        test_fraction: Fraction of examples held out for testing, in (0, 1) (data sets without a fixed
            split).
        dtype: Floating dtype of the images.

    Returns:
        ``(train, test, info)``: two :class:`Split` pairs ``(x, y)`` with ``x`` of shape
        ``(N, in_chans, image_size, image_size)`` normalised by ``info.mean``/``info.std`` and ``y``
        ``int64``, and the data set's :class:`DatasetInfo`.

    Raises:
        ValueError: Unknown name (the message lists the valid ones), ``test_fraction`` outside (0, 1),
            or a non-floating ``dtype``.
    """
    info = get_dataset_info(name)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype}")
    raw = _LOADERS[name](data_dir, int(seed), float(test_fraction))
    train = _to_tensors(raw.x_train, raw.y_train, info, dtype)
    test = _to_tensors(raw.x_test, raw.y_test, info, dtype)
    return train, test, info


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x_batch, y_batch)`` slices of in-memory tensors, each example once per pass.

    Args:
        x: Inputs, examples along dim 0.
        y: Targets, same length as ``x``.
        batch_size: Examples per batch; the last batch is smaller unless ``drop_last``.
        shuffle: Visit the examples in a random order drawn from ``generator``.
        generator: Random source for ``shuffle`` (``None``: torch's global generator).
        drop_last: Skip a final incomplete batch.
    """
    n = int(x.shape[0])
    if int(y.shape[0]) != n:
        raise ValueError(f"x and y differ in length: {n} vs {int(y.shape[0])}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            yield x[start:end], y[start:end]
        else:
            idx = order[start:end]
            yield x[idx.to(x.device)], y[idx.to(y.device)]
