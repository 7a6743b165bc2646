"""Data sets: the embedded digits, readers of the standard on-disk formats, augmentation and streaming.

``datasets`` names every data set and loads it as tensors; ``readers`` parses the file formats (IDX, CIFAR
pickles, STL-10 binaries, SVHN ``.mat``, ImageFolder trees); ``augment`` crops, flips and normalises batches;
``loader`` streams image folders too large to hold. Nothing here knows a model.
"""

from widesparse.data.datasets import (
    DATASETS,
    DatasetInfo,
    Split,
    download_dataset,
    get_dataset_info,
    image_folder_splits,
    image_geometry,
    iterate_batches,
    list_datasets,
    load_dataset,
    load_pixels,
    missing_files,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Split",
    "download_dataset",
    "get_dataset_info",
    "image_folder_splits",
    "image_geometry",
    "iterate_batches",
    "list_datasets",
    "load_dataset",
    "load_pixels",
    "missing_files",
]
