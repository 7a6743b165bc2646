"""Tests of widesparse.data.datasets: every data set by name (embedded digits; the others from small files written
here in their real formats and layouts), the defaults table, clear errors, and the batch iterator."""

import numpy as np
import pytest
import torch

from widesparse.data.datasets import (
    DATASETS,
    DatasetInfo,
    Split,
    download_dataset,
    get_dataset_info,
    iterate_batches,
    list_datasets,
    load_dataset,
    load_pixels,
)
from widesparse.data.readers import DataFormatError

from fake_datasets import make_dataset, write_idx


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_list_datasets_matches_table():
    assert list_datasets() == sorted(DATASETS)
    assert "digits" in list_datasets()
    for name, info in DATASETS.items():
        assert isinstance(info, DatasetInfo)
        assert info.name == name


def test_digits_info():
    info = get_dataset_info("digits")
    assert (info.image_size, info.in_chans, info.num_classes, info.default_patch_size) == (8, 1, 10, 2)
    assert len(info.mean) == len(info.std) == info.in_chans
    assert info.to_dict()["name"] == "digits"


def test_shapes_and_dtypes(digits):
    train, test, info = digits
    assert isinstance(train, Split) and isinstance(test, Split)
    assert train.num_examples + test.num_examples == 1797
    assert test.num_examples == 360  # ceil(0.2 * 1797)
    for split in (train, test):
        x, y = split  # unpacks as a pair
        assert x.shape == (len(y), info.in_chans, info.image_size, info.image_size)
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert set(y.tolist()) == set(range(info.num_classes))


def test_dtype_argument():
    train, _, _ = load_dataset("digits", dtype=torch.float64)
    assert train.x.dtype == torch.float64
    with pytest.raises(ValueError, match="floating"):
        load_dataset("digits", dtype=torch.int64)


def test_normalisation_stats(digits):
    train, test, info = digits
    assert abs(train.x.mean().item()) < 0.05
    assert abs(train.x.std().item() - 1.0) < 0.05
    # The table constants are the stats of the whole set: undoing them gives pixels in [0, 1] on 1/16 steps.
    both = torch.cat([train.x, test.x]).double()
    pixels = both * info.std[0] + info.mean[0]
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(pixels * 16, (pixels * 16).round(), atol=1e-4)
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=1e-6)
    assert pixels.std(unbiased=False).item() == pytest.approx(info.std[0], abs=1e-6)


def test_split_reproducible_and_seeded(digits):
    train, test, _ = digits
    train2, test2, _ = load_dataset("digits", seed=0)
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y)
    assert torch.equal(test.x, test2.x) and torch.equal(test.y, test2.y)
    train3, test3, _ = load_dataset("digits", seed=1)
    assert not torch.equal(test.x, test3.x)
    assert not torch.equal(train.y, train3.y)


def test_split_is_stratified(digits):
    train, test, info = digits
    counts_train = np.bincount(train.y.numpy(), minlength=info.num_classes)
    counts_test = np.bincount(test.y.numpy(), minlength=info.num_classes)
    total = counts_train + counts_test
    # Each class keeps its share in the test split up to one example of rounding.
    assert np.all(np.abs(counts_test - 0.2 * total) <= 1.0)


def test_train_and_test_disjoint(digits):
    train, test, _ = digits
    keys_train = {tuple(row) for row in train.x.flatten(1).numpy().round(5).tolist()}
    keys_test = [tuple(row) for row in test.x.flatten(1).numpy().round(5).tolist()]
    # load_digits holds a few exact duplicate images; nearly all test images must be unseen.
    assert sum(k in keys_train for k in keys_test) <= 5


def test_test_fraction():
    train, test, _ = load_dataset("digits", test_fraction=0.5)
    assert abs(train.num_examples - test.num_examples) <= 1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            load_dataset("digits", test_fraction=bad)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown data set 'nope'") as err:
        load_dataset("nope")
    for name in list_datasets():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="digits"):
        get_dataset_info("nope")


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 10, 64])
def test_iterate_batches_covers_every_example_once(shuffle, batch_size):
    n = 37
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1).expand(n, 3).contiguous()
    y = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(x, y, batch_size, shuffle=shuffle, generator=gen))
    assert len(batches) == -(-n // batch_size)
    assert all(len(yb) == batch_size for _, yb in batches[:-1])
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(n))
    for xb, yb in batches:
        assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
    if not shuffle:
        assert torch.equal(seen, y)


def test_iterate_batches_shuffle_seeded_and_drop_last():
    x, y = torch.randn(20, 2), torch.arange(20)

    def order(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([yb for _, yb in iterate_batches(x, y, 6, shuffle=True, generator=gen)])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    batches = list(iterate_batches(x, y, 6, drop_last=True))
    assert [len(yb) for _, yb in batches] == [6, 6, 6]


def test_iterate_batches_validates():
    with pytest.raises(ValueError, match="differ in length"):
        list(iterate_batches(torch.zeros(3, 1), torch.zeros(4), 2))
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(torch.zeros(3, 1), torch.zeros(3), 0))


# ------------------------------------------------------------------------------------------- from disk
DISK_SETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "stl10", "svhn", "imagefolder"]


@pytest.mark.parametrize("name", DISK_SETS)
def test_disk_sets_load_exactly_what_was_written(tmp_path, name):
    written = make_dataset(name, tmp_path, n_train=12, n_test=6)
    train, test, info = load_pixels(name, data_dir=tmp_path, image_size=8 if name == "imagefolder" else None)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.x.shape == (12, info.in_chans, info.image_size, info.image_size)
    assert np.array_equal(train.x.numpy(), written["x_train"]) and np.array_equal(train.y.numpy(), written["y_train"])
    assert np.array_equal(test.x.numpy(), written["x_test"]) and np.array_equal(test.y.numpy(), written["y_test"])
    # load_dataset is load_pixels normalised with the table's statistics.
    ftrain, _, _ = load_dataset(name, data_dir=tmp_path, image_size=8 if name == "imagefolder" else None,
                                dtype=torch.float64)
    mean = torch.tensor(info.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float64).view(1, -1, 1, 1)
    assert torch.allclose(ftrain.x, (train.x.double() / info.pixel_max - mean) / std, atol=1e-12)


def test_imagefolder_info_comes_from_the_folders(tmp_path):
    make_dataset("imagefolder", tmp_path, n_train=6, n_test=3)
    _, _, info = load_pixels("imagefolder", data_dir=tmp_path, image_size=8)
    assert (info.num_classes, info.image_size, info.default_patch_size) == (3, 8, 8)
    _, _, info = load_pixels("imagefolder", data_dir=tmp_path, image_size=12)
    assert (info.image_size, info.default_patch_size) == (12, 12)
    assert get_dataset_info("imagefolder").num_classes == 1000  # the shared table is untouched
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        load_pixels("imagefolder", data_dir=tmp_path, image_size=0)


def test_table_defaults():
    for info in DATASETS.values():
        assert info.image_size % info.default_patch_size == 0
        assert len(info.mean) == len(info.std) == info.in_chans and all(s > 0 for s in info.std)
        assert info.to_dict()["files"] == list(info.files)
        assert bool(info.files) == (info.name != "digits") and (info.source != "") == bool(info.files)
    sizes = {n: (DATASETS[n].image_size, DATASETS[n].default_patch_size) for n in ("mnist", "cifar10", "stl10")}
    assert sizes == {"mnist": (28, 4), "cifar10": (32, 4), "stl10": (96, 12)}
    assert (DATASETS["imagefolder"].image_size, DATASETS["imagefolder"].default_patch_size) == (224, 16)
    # Augmentation defaults: none on digit images, crop + flip on natural images, no flip on house numbers.
    assert [(DATASETS[n].crop_padding, DATASETS[n].hflip) for n in ("digits", "mnist", "cifar10", "stl10", "svhn")] == [
        (0, False), (0, False), (4, True), (12, True), (4, False)]
    assert DATASETS["digits"].pixel_max == 16 and DATASETS["cifar100"].num_classes == 100


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "stl10", "svhn"])
def test_missing_files_say_what_is_expected_and_where_to_get_it(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        load_pixels(name, data_dir=tmp_path)
    msg = str(err.value)
    info = get_dataset_info(name)
    assert "not found" in msg and str(tmp_path) in msg
    assert all(f in msg for f in info.files) and info.source in msg and "download" in msg


def test_missing_data_dir_and_imagefolder_layout(tmp_path):
    with pytest.raises(ValueError, match=r"read from disk: pass data_dir \(--data-dir DIR\).*train-images-idx3"):
        load_pixels("mnist")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pixels("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train not found: expected a folder of class sub-folders"):
        load_pixels("imagefolder", data_dir=tmp_path)


def test_one_corrupt_file_is_named(tmp_path):
    make_dataset("cifar10", tmp_path, n_train=10, n_test=4)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(DataFormatError, match="data_batch_3: cannot unpickle"):
        load_pixels("cifar10", data_dir=tmp_path)
    make_dataset("mnist", tmp_path, n_train=10, n_test=4)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3, 11], dtype=np.uint8), gz=True)
    with pytest.raises(DataFormatError, match=r"mnist test labels: values 1..11 outside 0..9"):
        load_pixels("mnist", data_dir=tmp_path)


def test_image_size_only_for_imagefolder(tmp_path):
    with pytest.raises(ValueError, match=r"digits images are 8x8; image_size=16 is not supported"):
        load_pixels("digits", image_size=16)
    assert load_pixels("digits", image_size=8)[2].image_size == 8


def test_download_needs_torchvision_or_says_how(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, as in this environment
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError, match=r"download needs an importable torchvision.*cs.toronto.edu"):
        load_pixels("cifar10", data_dir=tmp_path, download=True)
    with pytest.raises(ValueError, match="imagefolder cannot be downloaded; data sets with a downloader: cifar10"):
        download_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        download_dataset("mnist", None)


def test_download_calls_torchvision_per_split(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class Fake:
        def __init__(self, root, download, **kw):
            calls.append((type(self).__name__, root, kw, download))

    fake = types.ModuleType("torchvision.datasets")
    fake.MNIST = type("MNIST", (Fake,), {})
    fake.STL10 = type("STL10", (Fake,), {})
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
    download_dataset("mnist", tmp_path / "d")
    download_dataset("stl10", tmp_path / "d")
    d = str(tmp_path / "d")
    assert calls == [
        ("MNIST", d, {"train": True}, True), ("MNIST", d, {"train": False}, True),
        ("STL10", d, {"split": "train"}, True), ("STL10", d, {"split": "test"}, True),
    ]


def test_missing_files_looks_where_the_readers_look(tmp_path):
    from widesparse.data.datasets import missing_files

    all_idx = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert missing_files("mnist", tmp_path) == all_idx
    make_dataset("mnist", tmp_path)
    assert missing_files("mnist", tmp_path) == []
    (tmp_path / "elsewhere").mkdir()  # a folder the reader does not search does not count
    (tmp_path / "elsewhere" / "test_batch").write_bytes(b"")
    assert "cifar-10-batches-py/test_batch" in missing_files("cifar10", tmp_path)
    assert missing_files("imagefolder", tmp_path) == ["train/", "val/"]
    assert missing_files("digits", tmp_path) == []
