"""Readers of the standard on-disk formats of image data sets, without torchvision.

Imports nothing from ``widesparse``. Every reader returns images as ``uint8`` arrays of
shape ``(N, C, H, W)`` and labels as ``int64`` arrays; :mod:`widesparse.data.datasets` maps data-set names to them.

Formats, as the data sets are distributed:

* IDX (MNIST, Fashion-MNIST): big-endian header ``0 0 <type> <ndim>``, ``ndim`` uint32 sizes, then the
  data; files may be gzipped (detected by the gzip magic bytes, not by the name).
* CIFAR-10/100 "python version": pickled dicts with ``data`` (``N x 3072`` uint8, channel-major) and
  ``labels`` / ``fine_labels``. Unpickled with an allow-list (numpy arrays only), so a hostile file cannot
  run code.
* STL-10 binary: ``*_X.bin`` raw uint8 images of ``3 x 96 x 96`` in column-major order, ``*_y.bin`` uint8
  labels 1..10.
* SVHN cropped digits: MATLAB ``.mat`` files (scipy) with ``X`` ``(32, 32, 3, N)`` and ``y`` 1..10 (10 is 0).
* Image folders (ImageNet layout): ``split/<class>/<image>``, decoded with Pillow.

A missing file raises :class:`FileNotFoundError`, a corrupt one :class:`DataFormatError`; both name the
file and the expected format.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataFormatError",
    "IMAGE_EXTENSIONS",
    "ImageFolderIndex",
    "decode_image",
    "find_file",
    "read_cifar_batch",
    "read_cifar_folder",
    "read_idx",
    "read_idx_folder",
    "read_image_folder",
    "read_stl10_folder",
    "read_stl10_images",
    "read_stl10_labels",
    "read_svhn_folder",
    "read_svhn_mat",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataFormatError(ValueError):
    """A data file exists but does not hold what its format promises (the message names the file)."""


def _fail(path: Path, expected: str, problem: str) -> DataFormatError:
    return DataFormatError(f"{path}: {problem}; expected {expected}")


def find_file(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first ``folder / name`` that is a file, trying every name in every folder in order."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_maybe_gzip(path: Path, expected: str) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
        raise _fail(path, expected, f"corrupt or truncated gzip data ({e})") from None


# ---------------------------------------------------------------------------------------------------- IDX
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array of the shape its header gives.

    Args:
        path: The file.
        ndim: Required number of dimensions (3 for image files, 1 for label files), or ``None``.
    """
    path = Path(path)
    expected = "an IDX file (MNIST format: magic 0x0000 + type byte + ndim byte, big-endian uint32 sizes, data)"
    data = _read_maybe_gzip(path, expected)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise _fail(path, expected, f"bad magic bytes {data[:4].hex(' ') or '(empty file)'}")
    nd = data[3]
    if ndim is not None and nd != ndim:
        raise _fail(path, f"{expected} with {ndim} dimension(s)", f"header says {nd} dimension(s)")
    header = 4 + 4 * nd
    if len(data) < header:
        raise _fail(path, expected, f"truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{nd}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    if have != need:
        raise _fail(path, expected, f"header says shape {dims} ({need} data bytes) but the file holds {have}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# -------------------------------------------------------------------------------------------------- CIFAR
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy.core.multiarray":  # the files were written by old numpy; numpy 2 renamed the module
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(path: Path, expected: str) -> dict[str, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise _fail(path, expected, f"cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise _fail(path, expected, f"unpickled a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_cifar_batch(path: str | os.PathLike[str], label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64.

    Args:
        path: A batch file (``data_batch_1`` ... ``test_batch``, or CIFAR-100's ``train``/``test``).
        label_key: ``"labels"`` for CIFAR-10, ``"fine_labels"`` (or ``"coarse_labels"``) for CIFAR-100.
    """
    path = Path(path)
    expected = f"a CIFAR python batch (pickled dict with 'data' N x 3072 uint8 and '{label_key}')"
    d = _unpickle(path, expected)
    missing = [k for k in ("data", label_key) if k not in d]
    if missing:
        raise _fail(path, expected, f"missing key(s) {missing}; found {sorted(d)}")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise _fail(path, expected, f"'data' is {x.dtype} of shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise _fail(path, expected, f"{x.shape[0]} images but '{label_key}' has shape {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


# ------------------------------------------------------------------------------------------------- STL-10
STL10_SHAPE = (3, 96, 96)


def read_stl10_images(path: str | os.PathLike[str]) -> np.ndarray:
    """An STL-10 ``*_X.bin`` file: images ``(N, 3, 96, 96)`` uint8 (stored column-major, transposed here)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    size = int(np.prod(STL10_SHAPE))
    if raw.size == 0 or raw.size % size:
        raise _fail(
            path, f"STL-10 binary images (a multiple of 3*96*96 = {size} bytes)", f"file holds {raw.size} bytes"
        )
    return raw.reshape(-1, *STL10_SHAPE).transpose(0, 1, 3, 2)


def read_stl10_labels(path: str | os.PathLike[str], num_classes: int = 10) -> np.ndarray:
    """An STL-10 ``*_y.bin`` file: labels 1..10 stored as uint8, returned as 0..9 int64."""
    path = Path(path)
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if y.size == 0 or y.min() < 1 or y.max() > num_classes:
        found = f"values {y.min()}..{y.max()}" if y.size else "an empty file"
        raise _fail(path, f"STL-10 binary labels (uint8 values 1..{num_classes})", f"found {found}")
    return y - 1


# --------------------------------------------------------------------------------------------------- SVHN
def read_svhn_mat(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN ``*_32x32.mat`` file: images ``(N, 3, 32, 32)`` uint8 and labels 0..9 (the file's 10 is 0)."""
    path = Path(path)
    expected = "an SVHN cropped-digits .mat file (MATLAB v5, X of shape (32, 32, 3, N) uint8, y of shape (N, 1))"
    try:
        import scipy.io
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("reading SVHN .mat files needs scipy (pip install scipy)") from e
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError or its MatReadError on bad files
        raise _fail(path, expected, f"cannot read ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise _fail(path, expected, f"missing X or y; found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise _fail(path, expected, f"X is {x.dtype} of shape {x.shape}, y has {y.size} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise _fail(path, expected, f"labels {y.min()}..{y.max()}, not 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), (y % 10).astype(np.int64)


# ------------------------------------------------------------------------------------------- image folders
class ImageFolderIndex:
    """The samples of one ``split/<class>/<image>`` folder: ``samples`` as ``(path, label)``, ``classes`` sorted.

    Args:
        root: The split folder (e.g. ``imagenet/train``).
        classes: Class names to use (e.g. those of the train split, for a val split); ``None``: the
            sub-folders of ``root``. A class folder missing under ``root`` is allowed (no samples); a
            sub-folder not in ``classes`` is an error.
    """

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} not found: expected a folder of class sub-folders <class>/<image>")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataFormatError(f"{self.root}: class folder(s) {unknown[:5]} are not among the training classes")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
                self.samples.extend((p, label) for p in files)
        if not self.classes or not self.samples:
            raise FileNotFoundError(
                f"{self.root}: no images found; expected {self.root}/<class>/<image> with extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )

    def __len__(self) -> int:
        return len(self.samples)


def decode_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to ``size`` (bilinear), centre-crop: ``(3, size, size)`` uint8."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image folders needs Pillow (pip install pillow)") from e
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as e:  # PIL.UnidentifiedImageError and truncated data are OSErrors
        raise _fail(path, "an image Pillow can decode (JPEG, PNG, ...)", f"cannot decode ({e})") from None
    return arr.transpose(2, 0, 1)


def read_image_folder(
    index: ImageFolderIndex, size: int, *, max_bytes: int = 8 << 30, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``index`` into memory: ``(N, 3, size, size)`` uint8 and labels ``(N,)`` int64.

    Raises ``MemoryError`` naming the size when the decoded images would exceed ``max_bytes``.
    """
    n = len(index)
    need = n * 3 * size * size
    if need > max_bytes:
        raise MemoryError(
            f"{index.root}: {n} images at {size}x{size} need {need / 2**30:.1f} GiB in memory, more than the "
            f"{max_bytes / 2**30:.1f} GiB allowed; stream the folder instead (TrainConfig.stream=True, "
            "--stream true) or use a smaller image_size"
        )
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(lambda s: decode_image(s[0], size), index.samples)):
            out[i] = arr
    return out, np.array([label for _, label in index.samples], dtype=np.int64)


# ------------------------------------------------------------------------------------ whole data-set folders
Arrays4 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _need(folders: Sequence[Path], names: Sequence[str]) -> Path:
    found = find_file(folders, names)
    if found is None:
        raise FileNotFoundError(f"file {' or '.join(names)} not found in {', '.join(str(f) for f in folders)}")
    return found


def _pair(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) != len(y):
        raise DataFormatError(f"{what}: {len(x)} images but {len(y)} labels")


def read_idx_folder(folders: Sequence[Path]) -> Arrays4:
    """MNIST-style IDX files (``train-images-idx3-ubyte`` ... ``t10k-labels-idx1-ubyte``, optionally ``.gz``)
    from the first folder holding each: ``(x_train, y_train, x_test, y_test)``, images ``(N, 1, H, W)``."""

    def read(stem: str, ndim: int) -> np.ndarray:
        dotted = stem.replace("-idx", ".idx")  # some mirrors write "train-images.idx3-ubyte"
        path = _need(folders, (stem, stem + ".gz", dotted, dotted + ".gz"))
        arr = read_idx(path, ndim=ndim)
        if arr.dtype != np.uint8:
            raise DataFormatError(f"{path}: IDX data of type {arr.dtype}; expected unsigned bytes (type 0x08)")
        return arr

    out: list[np.ndarray] = []
    for split in ("train", "t10k"):
        x, y = read(f"{split}-images-idx3-ubyte", 3), read(f"{split}-labels-idx1-ubyte", 1).astype(np.int64)
        _pair(x, y, f"{split}-images-idx3-ubyte / {split}-labels-idx1-ubyte")
        out += [x[:, None], y]
    return out[0], out[1], out[2], out[3]


def read_cifar_folder(folders: Sequence[Path], cifar100: bool = False) -> Arrays4:
    """The CIFAR-10 batches (``data_batch_1..5``, ``test_batch``) or CIFAR-100 files (``train``, ``test``)."""
    names = ("train", "test") if cifar100 else tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
    key = "fine_labels" if cifar100 else "labels"
    parts = [read_cifar_batch(_need(folders, (name,)), key) for name in names]
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    return x_train, y_train, parts[-1][0], parts[-1][1]


def read_stl10_folder(folders: Sequence[Path]) -> Arrays4:
    """The labelled STL-10 split: ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``."""
    out: list[np.ndarray] = []
    for split in ("train", "test"):
        x = read_stl10_images(_need(folders, (f"{split}_X.bin",)))
        y = read_stl10_labels(_need(folders, (f"{split}_y.bin",)))
        _pair(x, y, f"{split}_X.bin / {split}_y.bin")
        out += [x, y]
    return out[0], out[1], out[2], out[3]


def read_svhn_folder(folders: Sequence[Path]) -> Arrays4:
    """SVHN ``train_32x32.mat`` and ``test_32x32.mat``."""
    return (*read_svhn_mat(_need(folders, ("train_32x32.mat",))), *read_svhn_mat(_need(folders, ("test_32x32.mat",))))
