"""Tests of widesparse.data.readers: every format on small files written here in the real layout, and every failure."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest

from widesparse.data import readers
from widesparse.data.readers import DataFormatError

import fake_datasets
from fake_datasets import write_cifar, write_idx, write_png, write_svhn

RNG = np.random.default_rng(0)


def images(n: int, c: int, h: int, w: int | None = None) -> np.ndarray:
    return fake_datasets.images(RNG, n, c, h, w)


# -------------------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    x = images(5, 1, 7, 6)[:, 0]
    got = readers.read_idx(write_idx(tmp_path / "img", x, gz=gz), ndim=3)
    assert got.dtype == np.uint8 and np.array_equal(got, x)
    y = np.arange(5, dtype=np.uint8)
    assert np.array_equal(readers.read_idx(write_idx(tmp_path / "lab", y, gz=gz), ndim=1), y)


def test_idx_other_types_are_read_big_endian(tmp_path):
    a = np.array([[1, -2, 300], [70000, 5, -6]], dtype=np.int32)
    got = readers.read_idx(write_idx(tmp_path / "a", a, type_byte=0x0C))
    assert got.dtype == np.int32 and np.array_equal(got, a)


def test_idx_errors_name_the_file_and_format(tmp_path):
    good = write_idx(tmp_path / "good", images(4, 1, 3)[:, 0]).read_bytes()
    cases = {
        "truncated": (good[:-5], r"header says shape \(4, 3, 3\) \(36 data bytes\) but the file holds 31"),
        "toolong": (good + b"\0", "file holds 37"),
        "badmagic": (b"\x08\x03" + good[2:], "bad magic bytes 08 03"),
        "empty": (b"", r"\(empty file\)"),
        "badheader": (good[:6], "truncated header"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=msg) as err:
            readers.read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "IDX" in str(err.value)
    with pytest.raises(DataFormatError, match="with 1 dimension"):
        readers.read_idx(tmp_path / "good", ndim=1)


def test_idx_corrupt_gzip(tmp_path):
    data = gzip.compress(write_idx(tmp_path / "x", images(4, 1, 5)[:, 0]).read_bytes())
    (tmp_path / "trunc.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated gzip") as err:
        readers.read_idx(tmp_path / "trunc.gz")
    assert "trunc.gz" in str(err.value)
    (tmp_path / "garbage.gz").write_bytes(b"\x1f\x8b" + b"\xff" * 40)
    with pytest.raises(DataFormatError, match="gzip"):
        readers.read_idx(tmp_path / "garbage.gz")


def test_idx_folder_searches_names_and_checks_pairs(tmp_path):
    x_tr, x_te = images(6, 1, 4)[:, 0], images(3, 1, 4)[:, 0]
    y_tr, y_te = np.arange(6, dtype=np.uint8) % 10, np.arange(3, dtype=np.uint8)
    sub = tmp_path / "MNIST" / "raw"
    sub.mkdir(parents=True)
    write_idx(sub / "train-images-idx3-ubyte.gz", x_tr, gz=True)
    write_idx(sub / "train-labels.idx1-ubyte", y_tr)  # the dotted mirror spelling
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_te)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_te, gz=True)
    a, b, c, d = readers.read_idx_folder([sub, tmp_path])
    assert a.shape == (6, 1, 4, 4) and np.array_equal(a[:, 0], x_tr) and np.array_equal(b, y_tr)
    assert np.array_equal(c[:, 0], x_te) and np.array_equal(d, y_te) and b.dtype == np.int64
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_te[:2], gz=True)
    with pytest.raises(DataFormatError, match="3 images but 2 labels"):
        readers.read_idx_folder([sub, tmp_path])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        readers.read_idx_folder([sub, tmp_path])


# ------------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("legacy", [False, True])
def test_cifar_batch_roundtrip(tmp_path, legacy):
    x, y = images(7, 3, 32), RNG.integers(0, 10, 7)
    gx, gy = readers.read_cifar_batch(write_cifar(tmp_path / "b", x, y, legacy=legacy))
    assert gx.shape == (7, 3, 32, 32) and np.array_equal(gx, x) and np.array_equal(gy, y) and gy.dtype == np.int64
    # Channel-major rows, as distributed: the first 1024 bytes of a row are the red plane.
    assert np.array_equal(gx[2, 0].ravel(), x.reshape(7, -1)[2, :1024])


def test_cifar_refuses_code_and_reports_bad_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataFormatError, match=r"refusing to load global (__builtin__|builtins)\.print") as err:
        readers.read_cifar_batch(tmp_path / "evil")
    assert "CIFAR python batch" in str(err.value)
    raw = write_cifar(tmp_path / "b", images(4, 3, 32), np.zeros(4)).read_bytes()
    (tmp_path / "trunc").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="cannot unpickle") as err:
        readers.read_cifar_batch(tmp_path / "trunc")
    assert str(tmp_path / "trunc") in str(err.value)
    with pytest.raises(DataFormatError, match=r"missing key\(s\) \['fine_labels'\]"):
        readers.read_cifar_batch(tmp_path / "b", "fine_labels")
    write_cifar(tmp_path / "short", images(4, 3, 32), np.zeros(3))
    with pytest.raises(DataFormatError, match="4 images but 'labels' has shape"):
        readers.read_cifar_batch(tmp_path / "short")
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataFormatError, match="not a dict"):
        readers.read_cifar_batch(tmp_path / "list")


def test_cifar_folders(tmp_path):
    xs = [images(3, 3, 32) for _ in range(6)]
    for i in range(5):
        write_cifar(tmp_path / f"data_batch_{i + 1}", xs[i], np.full(3, i))
    write_cifar(tmp_path / "test_batch", xs[5], np.full(3, 9))
    x_tr, y_tr, x_te, y_te = readers.read_cifar_folder([tmp_path])
    assert np.array_equal(x_tr, np.concatenate(xs[:5])) and y_tr.tolist() == [i for i in range(5) for _ in range(3)]
    assert np.array_equal(x_te, xs[5]) and y_te.tolist() == [9, 9, 9]
    c100 = tmp_path / "c100"
    c100.mkdir()
    write_cifar(c100 / "train", xs[0], [99, 0, 5], label_key="fine_labels")
    write_cifar(c100 / "test", xs[1], [1, 2, 3], label_key="fine_labels")
    assert readers.read_cifar_folder([c100], cifar100=True)[1].tolist() == [99, 0, 5]


# ----------------------------------------------------------------------------------------------- STL-10
def test_stl10_column_major_and_labels(tmp_path):
    x = images(3, 3, 96)
    # The file stores each channel column-major (as MATLAB writes it): transpose H and W before writing.
    (tmp_path / "train_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    assert np.array_equal(readers.read_stl10_images(tmp_path / "train_X.bin"), x)
    assert readers.read_stl10_labels(tmp_path / "train_y.bin").tolist() == [0, 9, 3]
    (tmp_path / "bad_X.bin").write_bytes(b"\0" * (3 * 96 * 96 + 1))
    with pytest.raises(DataFormatError, match="multiple of 3\\*96\\*96 = 27648 bytes.*") as err:
        readers.read_stl10_images(tmp_path / "bad_X.bin")
    assert "bad_X.bin" in str(err.value) and "27649" in str(err.value)
    (tmp_path / "bad_y.bin").write_bytes(bytes([0, 3]))
    with pytest.raises(DataFormatError, match="values 0..3"):
        readers.read_stl10_labels(tmp_path / "bad_y.bin")
    (tmp_path / "test_X.bin").write_bytes(np.ascontiguousarray(x[:2].transpose(0, 1, 3, 2)).tobytes())
    (tmp_path / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataFormatError, match="2 images but 3 labels"):
        readers.read_stl10_folder([tmp_path])


# ------------------------------------------------------------------------------------------------- SVHN
def test_svhn_layout_and_label_ten(tmp_path):
    x = images(4, 3, 32)
    gx, gy = readers.read_svhn_mat(write_svhn(tmp_path / "train_32x32.mat", x, np.array([10, 1, 9, 10])))
    assert np.array_equal(gx, x) and gy.tolist() == [0, 1, 9, 0]


def test_svhn_errors(tmp_path):
    raw = write_svhn(tmp_path / "a.mat", images(4, 3, 32), np.ones(4)).read_bytes()
    (tmp_path / "trunc.mat").write_bytes(raw[:100])
    with pytest.raises(DataFormatError, match="cannot read") as err:
        readers.read_svhn_mat(tmp_path / "trunc.mat")
    assert "trunc.mat" in str(err.value) and "SVHN" in str(err.value)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataFormatError, match="junk.mat"):
        readers.read_svhn_mat(tmp_path / "junk.mat")
    write_svhn(tmp_path / "lab.mat", images(2, 3, 32), np.array([0, 3]))
    with pytest.raises(DataFormatError, match="labels 0..3, not 1..10"):
        readers.read_svhn_mat(tmp_path / "lab.mat")
    import scipy.io

    scipy.io.savemat(tmp_path / "nox.mat", {"Z": np.zeros(3)})
    with pytest.raises(DataFormatError, match=r"missing X or y; found \['Z'\]"):
        readers.read_svhn_mat(tmp_path / "nox.mat")


# ---------------------------------------------------------------------------------------------- folders
def test_image_folder_index_and_decode(tmp_path):
    a = RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    write_png(tmp_path / "train" / "cat" / "1.png", a)
    write_png(tmp_path / "train" / "cat" / "2.PNG", a)
    write_png(tmp_path / "train" / "dog" / "sub" / "3.png", a[:, :, 0])  # grayscale, nested: converted to RGB
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    idx = readers.ImageFolderIndex(tmp_path / "train")
    assert idx.classes == ["cat", "dog"] and len(idx) == 3
    assert [label for _, label in idx.samples] == [0, 0, 1]
    x, y = readers.read_image_folder(idx, 6)
    assert x.shape == (3, 3, 6, 6) and y.tolist() == [0, 0, 1]
    assert np.array_equal(x[0], a.transpose(2, 0, 1))  # same size: no resampling
    assert np.array_equal(x[2][0], a[:, :, 0]) and np.array_equal(x[2][1], a[:, :, 0])


def test_decode_resizes_shorter_side_and_centre_crops(tmp_path):
    wide = np.zeros((4, 8, 3), dtype=np.uint8)
    wide[:, 2:6] = 255  # a white centre band, 4 px wide
    write_png(tmp_path / "w.png", wide)
    out = readers.decode_image(tmp_path / "w.png", 4)
    assert out.shape == (3, 4, 4)
    assert (out == 255).all()  # shorter side already 4: the centre 4x4 crop is all white
    out2 = readers.decode_image(tmp_path / "w.png", 2)
    assert out2.shape == (3, 2, 2) and out2.min() > 100  # halved, centre crop


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a folder of class sub-folders"):
        readers.ImageFolderIndex(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        readers.ImageFolderIndex(tmp_path / "empty")
    write_png(tmp_path / "val" / "zebra" / "1.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"\['zebra'\] are not among the training classes"):
        readers.ImageFolderIndex(tmp_path / "val", classes=["cat"])
    bad = tmp_path / "bad" / "c" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataFormatError, match="cannot decode") as err:
        readers.read_image_folder(readers.ImageFolderIndex(tmp_path / "bad"), 4)
    assert "broken.jpg" in str(err.value)
    with pytest.raises(MemoryError, match="need .* GiB in memory"):
        readers.read_image_folder(readers.ImageFolderIndex(tmp_path / "val"), 4, max_bytes=10)
