"""Writers of tiny data sets in their real distributed formats and folder layouts (test helpers, not tests)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, type_byte: int = 0x08) -> Path:
    """The IDX format as MNIST ships it: 0 0 type ndim, big-endian uint32 sizes, big-endian data."""
    header = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_cifar(path: Path, x: np.ndarray, y, label_key: str = "labels", legacy: bool = False) -> Path:
    """A CIFAR python batch; ``legacy`` names numpy's module as the original (numpy 1, python 2) files do."""
    d = {
        b"batch_label": b"test",
        label_key.encode(): [int(v) for v in y],
        b"data": x.reshape(len(x), -1),
        b"filenames": [b"f%d.png" % i for i in range(len(x))],
    }
    raw = pickle.dumps(d, protocol=2)
    if legacy:
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)
    return path


def write_svhn(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An SVHN .mat file: X as (32, 32, 3, N), y as (N, 1) with 10 for the digit 0."""
    import scipy.io

    scipy.io.savemat(path, {"X": x.transpose(2, 3, 1, 0), "y": y.reshape(-1, 1).astype(np.uint8)})
    return path


def write_png(path: Path, arr_hwc: np.ndarray) -> Path:
    import pytest

    Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (an optional dependency)")

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr_hwc).save(path)
    return path


def images(rng: np.random.Generator, n: int, c: int, h: int, w: int | None = None) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, h, w or h), dtype=np.uint8)


def make_dataset(name: str, root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``name`` under ``root`` in the layout torchvision downloads to; return the arrays written.

    Labels cycle through the classes so every class occurs; images are random bytes brightened by
    ``19 * (label % 10)``, so that a model can learn the labels.
    """
    rng = np.random.default_rng(seed)
    classes = {"cifar100": 100, "imagefolder": 3}.get(name, 10)
    y_tr, y_te = np.arange(n_train) % classes, (np.arange(n_test) * 7) % classes
    c, size = {"mnist": (1, 28), "fashion_mnist": (1, 28), "stl10": (3, 96), "imagefolder": (3, 8)}.get(name, (3, 32))
    x_tr = _learnable(images(rng, n_train, c, size), y_tr)
    x_te = _learnable(images(rng, n_test, c, size), y_te)
    if name in ("mnist", "fashion_mnist"):
        folder = root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw"
        folder.mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", x_tr, y_tr), ("t10k", x_te, y_te)):
            write_idx(folder / f"{split}-images-idx3-ubyte.gz", x[:, 0], gz=True)
            write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y.astype(np.uint8), gz=True)
    elif name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (xs, ys) in enumerate(zip(np.array_split(x_tr, 5), np.array_split(y_tr, 5), strict=True)):
            write_cifar(folder / f"data_batch_{i + 1}", xs, ys)
        write_cifar(folder / "test_batch", x_te, y_te)
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        write_cifar(folder / "train", x_tr, y_tr, "fine_labels")
        write_cifar(folder / "test", x_te, y_te, "fine_labels")
    elif name == "stl10":
        folder = root / "stl10_binary"
        folder.mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
            (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    elif name == "svhn":
        root.mkdir(parents=True, exist_ok=True)
        write_svhn(root / "train_32x32.mat", x_tr, np.where(y_tr == 0, 10, y_tr))
        write_svhn(root / "test_32x32.mat", x_te, np.where(y_te == 0, 10, y_te))
    elif name == "imagefolder":
        names = ["ant", "bee", "cow"]
        for split, x, y in (("train", x_tr, y_tr), ("val", x_te, y_te)):
            for i, (img, label) in enumerate(zip(x, y, strict=True)):
                write_png(root / split / names[label] / f"{i:04d}.png", img.transpose(1, 2, 0))
        # The folder lists images per class in file-name order: reorder the arrays the same way.
        order_tr, order_te = np.argsort(y_tr, kind="stable"), np.argsort(y_te, kind="stable")
        x_tr, y_tr, x_te, y_te = x_tr[order_tr], y_tr[order_tr], x_te[order_te], y_te[order_te]
    else:
        raise ValueError(name)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def _learnable(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x // 4 + 19 * (y.reshape(shape) % 10)).astype(np.uint8)
