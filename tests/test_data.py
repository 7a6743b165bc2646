"""Tests of widesparse.data: the embedded digits set, the defaults table and the batch iterator."""

import numpy as np
import pytest
import torch

from widesparse.data import (
    DATASETS,
    DatasetInfo,
    Split,
    get_dataset_info,
    iterate_batches,
    list_datasets,
    load_dataset,
)


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
