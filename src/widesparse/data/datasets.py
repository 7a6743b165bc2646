"""Image classification data sets by name, as in-memory tensors, with one table of per-data-set defaults.

Imports only :mod:`widesparse.data.readers` (file formats) and :mod:`widesparse.data.augment`
(normalisation); it knows no model. A model is sized from a :class:`DatasetInfo`
(image size, channels, classes, default patch size) by its caller.

Data sets: ``digits`` (scikit-learn's embedded 8x8 digits; the default, no files), and from disk in their
distributed formats (see :mod:`widesparse.data.readers`): ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``,
``stl10`` (labelled split), ``svhn`` and ``imagefolder`` (``train/`` and ``val/`` class folders, e.g.
ImageNet). ``data_dir`` is the folder holding the files, or the folder torchvision downloads into (its
sub-folders such as ``MNIST/raw`` or ``cifar-10-batches-py`` are searched too).

:func:`load_pixels` returns ``uint8`` images (what the training engine keeps on the device and augments per
batch); :func:`load_dataset` returns them normalised to float with the table's ``mean``/``std``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from widesparse.data import readers
from widesparse.data.augment import normalize

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Split",
    "download_dataset",
    "get_dataset_info",
    "image_geometry",
    "image_folder_splits",
    "iterate_batches",
    "list_datasets",
    "missing_files",
    "load_dataset",
    "load_pixels",
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
        pixel_max: Value of a white pixel in the stored ``uint8`` images (255; 16 for ``digits``).
        crop_padding: Default training augmentation: random crop after zero padding by this many pixels.
        hflip: Default training augmentation: random horizontal flip.
        files: The files (or folders) the data set is read from, relative to ``data_dir``; empty if embedded.
        source: Where to get the files.
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
    pixel_max: int = 255
    crop_padding: int = 0
    hflip: bool = False
    files: tuple[str, ...] = ()
    source: str = ""

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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(mean=list(self.mean), std=list(self.std), files=list(self.files))
        d["default_model_kwargs"] = dict(self.default_model_kwargs)
        return d


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        info.name: info
        for info in (
            DatasetInfo(
                "digits", 8, 1, 10,
                # Pixels 0..16 scaled to [0, 1]; mean/std over all 1797 images (all 64 pixels pooled).
                mean=(0.30526028624095713,), std=(0.3760492217920148,), default_patch_size=2, pixel_max=16,
                description="scikit-learn load_digits: 1797 grayscale 8x8 handwritten digits, 10 classes (embedded)",
            ),
            DatasetInfo(
                "mnist", 28, 1, 10, mean=(0.1307,), std=(0.3081,), default_patch_size=4,
                description="MNIST: 60k/10k grayscale 28x28 handwritten digits (IDX files, gzipped or not)",
                files=_IDX_FILES, source="https://ossci-datasets.s3.amazonaws.com/mnist/ (yann.lecun.com/exdb/mnist)",
            ),
            DatasetInfo(
                "fashion_mnist", 28, 1, 10, mean=(0.2860,), std=(0.3530,), default_patch_size=4,
                description="Fashion-MNIST: 60k/10k grayscale 28x28 clothing images (IDX files, gzipped or not)",
                files=_IDX_FILES, source="https://github.com/zalandoresearch/fashion-mnist#get-the-data",
            ),
            DatasetInfo(
                "cifar10", 32, 3, 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                default_patch_size=4, crop_padding=4, hflip=True,
                description="CIFAR-10: 50k/10k colour 32x32 images, 10 classes (python pickle batches)",
                files=tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
                + ("cifar-10-batches-py/test_batch",),
                source="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it in data_dir)",
            ),
            DatasetInfo(
                "cifar100", 32, 3, 100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                default_patch_size=4, crop_padding=4, hflip=True,
                description="CIFAR-100: 50k/10k colour 32x32 images, 100 fine classes (python pickle files)",
                files=("cifar-100-python/train", "cifar-100-python/test"),
                source="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it in data_dir)",
            ),
            DatasetInfo(
                "stl10", 96, 3, 10, mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
                # Patch 12 gives S = 64 tokens, as patch 4 on CIFAR; pad 12 as docs/theory.md §6.2.
                default_patch_size=12, crop_padding=12, hflip=True,
                description="STL-10 labelled split: 5k/8k colour 96x96 images, 10 classes (binary files)",
                files=tuple(f"stl10_binary/{s}_{k}.bin" for s in ("train", "test") for k in ("X", "y")),
                source="https://cs.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (extract it in data_dir)",
            ),
            DatasetInfo(
                "svhn", 32, 3, 10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
                default_patch_size=4, crop_padding=4, hflip=False,  # digits: no flip
                description="SVHN cropped digits: 73k/26k colour 32x32 house numbers (.mat files, via scipy)",
                files=("train_32x32.mat", "test_32x32.mat"),
                source="http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)",
            ),
            DatasetInfo(
                "imagefolder", 224, 3, 1000, mean=_IMAGENET_MEAN, std=_IMAGENET_STD, default_patch_size=16,
                hflip=True,
                description="train/ and val/ folders of class sub-folders of images (ImageNet layout; Pillow); "
                "num_classes comes from the folders",
                files=("train/<class>/<image>", "val/<class>/<image>"),
                source="your own images, or ImageNet from https://image-net.org (val sorted into class folders)",
            ),
        )
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
    """Loader output: ``uint8`` images of shape (N, C, H, W) in ``0 .. pixel_max``, integer labels."""

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


def image_geometry(name: str) -> tuple[int, int, int]:
    """``(image_size, in_chans, num_classes)`` of data set ``name``: what a model built for it needs."""
    info = get_dataset_info(name)
    return info.image_size, info.in_chans, info.num_classes


# ----------------------------------------------------------------------------------------------- loaders
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None, :, :]  # integer pixel values 0..16
    y = bunch.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_digits(seed: int, test_fraction: float) -> _RawSplits:
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, shuffle=True, stratify=y
    )
    return _RawSplits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


class _Disk(NamedTuple):
    """How an on-disk data set is read: the folder reader, the sub-folders of ``data_dir`` searched before
    ``data_dir`` itself (torchvision's download layouts first), and torchvision's downloader and its split
    argument."""

    read: Callable[[list[Path]], tuple[np.ndarray, ...]]
    subdirs: tuple[str, ...]
    torchvision: tuple[str, str]


_DISK: dict[str, _Disk] = {
    "mnist": _Disk(readers.read_idx_folder, ("MNIST/raw", "mnist", "MNIST"), ("MNIST", "train")),
    "fashion_mnist": _Disk(
        readers.read_idx_folder, ("FashionMNIST/raw", "fashion_mnist", "fashion-mnist"), ("FashionMNIST", "train")
    ),
    "cifar10": _Disk(readers.read_cifar_folder, ("cifar-10-batches-py",), ("CIFAR10", "train")),
    "cifar100": _Disk(
        functools.partial(readers.read_cifar_folder, cifar100=True), ("cifar-100-python",), ("CIFAR100", "train")
    ),
    "stl10": _Disk(readers.read_stl10_folder, ("stl10_binary",), ("STL10", "split")),
    "svhn": _Disk(readers.read_svhn_folder, ("svhn", "SVHN"), ("SVHN", "split")),
}


def _load_from_disk(info: DatasetInfo, root: Path) -> _RawSplits:
    disk = _DISK[info.name]
    try:
        raw = _RawSplits(*disk.read([root / sub for sub in disk.subdirs] + [root]))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{info.name}: {e}; expected the files {', '.join(info.files)}; get them from {info.source}, or pass "
            "download=True (--download true; needs torchvision)"
        ) from None
    for what, y in (("train", raw.y_train), ("test", raw.y_test)):
        if y.size and (y.min() < 0 or y.max() >= info.num_classes):
            raise readers.DataFormatError(
                f"{info.name} {what} labels: values {y.min()}..{y.max()} outside 0..{info.num_classes - 1}"
            )
    return raw


def missing_files(name: str, data_dir: str | os.PathLike[str]) -> list[str]:
    """The files of an on-disk data set that its reader would not find under ``data_dir`` (without reading them).

    Looks where the reader looks: ``data_dir``'s standard sub-folders, then ``data_dir`` itself, each file also
    gzipped (and IDX files under the ``.idx`` spelling some mirrors use). ImageFolder: ``train/`` and ``val/``
    (or ``test/``). Embedded data sets miss nothing.
    """
    info = get_dataset_info(name)
    root = Path(data_dir).expanduser()
    if name == "imagefolder":
        has_val = any((root / n).is_dir() for n in ("val", "test"))
        return [d for d, ok in (("train/", (root / "train").is_dir()), ("val/", has_val)) if not ok]
    if name not in _DISK:
        return []
    folders = [root / sub for sub in _DISK[name].subdirs] + [root]
    missing = []
    for rel in info.files:
        base = Path(rel).name
        dotted = base.replace("-idx", ".idx")
        if readers.find_file(folders, (base, base + ".gz", dotted, dotted + ".gz")) is None:
            missing.append(rel)
    return missing


def image_folder_splits(
    data_dir: str | os.PathLike[str] | None, image_size: int | None = None
) -> tuple[readers.ImageFolderIndex, readers.ImageFolderIndex, DatasetInfo]:
    """The ``train/`` and ``val/`` (or ``test/``) indexes of an image folder, without decoding, and its info.

    ``info`` carries the folder's class count, ``image_size`` (default 224) and the largest patch size up to 16
    dividing it. The streaming loader (:mod:`widesparse.data.loader`) decodes from these indexes.
    """
    info = get_dataset_info("imagefolder")
    root = _data_root(info, data_dir)
    size = info.image_size if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    train = readers.ImageFolderIndex(root / "train")
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), root / "val")
    val = readers.ImageFolderIndex(val_dir, classes=train.classes)
    patch = max(p for p in range(1, min(16, size) + 1) if size % p == 0)
    info = dataclasses.replace(info, image_size=size, num_classes=len(train.classes), default_patch_size=patch)
    return train, val, info


def _load_image_folder(root: Path, image_size: int | None) -> tuple[_RawSplits, DatasetInfo]:
    train, val, info = image_folder_splits(root, image_size)
    size = info.image_size
    return _RawSplits(*readers.read_image_folder(train, size), *readers.read_image_folder(val, size)), info


# ----------------------------------------------------------------------------------------------- loading
def _data_root(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is None:
        raise ValueError(
            f"data set {info.name!r} is read from disk: pass data_dir (--data-dir DIR), a folder holding "
            f"{', '.join(info.files)}; get them from {info.source}"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a folder; expected it to hold {', '.join(info.files)}")
    return root


def load_pixels(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    download: bool = False,
) -> tuple[Split, Split, DatasetInfo]:
    """Load a data set into memory as ``uint8`` images ``(N, C, H, W)`` (values ``0 .. info.pixel_max``).

    Args:
        name: A name from :func:`list_datasets`.
        data_dir: Folder holding the files of on-disk data sets; ignored by ``digits``.
        seed: Seed of the stratified train/test split (``digits``, which ships without a split).
        test_fraction: Fraction held out for testing, in (0, 1) (``digits`` only).
        image_size: Side images are resized to (``imagefolder`` only; default 224); other data sets accept
            only their own size.
        download: Fetch missing files with torchvision first (needs torchvision and network access).

    Returns:
        ``(train, test, info)``; for ``imagefolder`` ``info`` carries the folder's class count and image size.

    Raises:
        ValueError: Unknown name (the message lists the valid ones), bad arguments, or a missing ``data_dir``.
        FileNotFoundError: A file is missing (the message names it, the files expected and where to get them).
        readers.DataFormatError: A file is corrupt (a ``ValueError`` naming the file and the expected format).
    """
    info = get_dataset_info(name)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if name != "imagefolder" and image_size not in (None, info.image_size):
        raise ValueError(
            f"{name} images are {info.image_size}x{info.image_size}; image_size={image_size} is not supported "
            "(resizing is for imagefolder only)"
        )
    root = None
    if info.files:  # read from disk
        if download:
            download_dataset(name, data_dir)
        root = _data_root(info, data_dir)
    if name == "digits":
        raw = _load_digits(int(seed), float(test_fraction))
    elif name == "imagefolder":
        raw, info = _load_image_folder(root, image_size)  # type: ignore[arg-type]
    else:
        raw = _load_from_disk(info, root)  # type: ignore[arg-type]

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64)))

    return split(raw.x_train, raw.y_train), split(raw.x_test, raw.y_test), info


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
    download: bool = False,
) -> tuple[Split, Split, DatasetInfo]:
    """Load a data set into memory as normalised float tensors (see :func:`load_pixels` for the arguments).

    Returns:
        ``(train, test, info)``: two :class:`Split` pairs ``(x, y)`` with ``x`` of shape
        ``(N, in_chans, image_size, image_size)`` normalised by ``info.mean``/``info.std`` (after scaling
        pixels to [0, 1]) and ``y`` ``int64``, and the data set's :class:`DatasetInfo`.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype}")
    train, test, info = load_pixels(
        name, data_dir=data_dir, seed=seed, test_fraction=test_fraction, image_size=image_size, download=download
    )

    def norm(s: Split) -> Split:
        return Split(normalize(s.x, info.mean, info.std, info.pixel_max, dtype), s.y)

    return norm(train), norm(test), info


def download_dataset(name: str, data_dir: str | os.PathLike[str] | None) -> None:
    """Download ``name`` into ``data_dir`` with torchvision's downloaders (their layouts are searched on load)."""
    info = get_dataset_info(name)
    if name not in _DISK:
        raise ValueError(f"{name} cannot be downloaded; data sets with a downloader: {', '.join(sorted(_DISK))}")
    if data_dir is None:
        raise ValueError(f"downloading {name} needs data_dir (--data-dir DIR), the folder to download into")
    try:
        import torchvision.datasets as tvd
    except Exception as e:  # ImportError, or a torchvision built against another torch
        raise ImportError(
            f"download needs an importable torchvision ({type(e).__name__}: {e}); or fetch {name} yourself "
            f"from {info.source} into {data_dir}"
        ) from None
    cls, arg = _DISK[name].torchvision
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for split in (True, False) if arg == "train" else ("train", "test"):
        getattr(tvd, cls)(str(data_dir), **{arg: split}, download=True)


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
