"""Datasets as in-memory uint8 tensors: Fashion-MNIST, CIFAR-10/100 and a synthetic set.

`load_dataset(name, split)` finds files via an explicit root, the user cache (`$ROBUSTCL_DATA`,
default `~/.cache/robustcl`), system locations, then (with `download=True`) an md5-checked download.
"""
from .base import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    DataError,
    DatasetInfo,
    dataset_info,
    dataset_options,
    load_dataset,
)
from .files import locate_dataset, verify_files

__all__ = [
    "DATASETS",
    "SPLITS",
    "ArrayDataset",
    "DataError",
    "DatasetInfo",
    "dataset_info",
    "dataset_options",
    "load_dataset",
    "locate_dataset",
    "verify_files",
]
