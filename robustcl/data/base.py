"""Core data types, the dataset registry, and the `load_dataset` / `dataset_info` entry points.

A reader is any object with `name`, `defaults` (accepted options and their default values),
`info(**options)` and `load(split, root, download, **options)`. File-backed readers additionally
subclass `robustcl.data.files.FileReader`, which adds `locate` and `verify` (robustcl/data/files.py).
Adding a dataset (e.g. STL-10) is one new module exposing a reader plus one `_REGISTRY` line.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

SPLITS: tuple[str, ...] = ("train", "test")


class DataError(Exception):
    """A dataset could not be found, read or trusted; the message names the problem and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; mean/std are per channel for pixel values scaled to [0, 1]."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self) -> None:
        """Check dtypes and shapes once so downstream code can rely on them."""
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.info.name}: images must be uint8 (N, C, H, W), got "
                            f"{self.images.dtype} {tuple(self.images.shape)}; this is a reader bug")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"{self.info.name}: labels must be int64 (N,), got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}; this is a reader bug")
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"{self.info.name}: {self.images.shape[0]} images but {self.labels.shape[0]} "
                            "labels; this is a reader bug")
        expected = (self.info.channels, self.info.height, self.info.width)
        if tuple(self.images.shape[1:]) != expected:
            raise DataError(f"{self.info.name}: image shape {tuple(self.images.shape[1:])} does not match "
                            f"info {expected}; this is a reader bug")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        """Examples selected by an integer index tensor or a boolean mask (copied, contiguous)."""
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex:
            raise DataError(f"subset index must be a 1-D integer or boolean tensor, got "
                            f"{index.dtype} {tuple(index.shape)}")
        return ArrayDataset(self.images[index].contiguous(), self.labels[index].clone(), self.info)


class Reader(Protocol):
    """What the registry needs from a dataset reader."""

    name: str
    defaults: Mapping[str, Any]

    def info(self, **options: Any) -> DatasetInfo:
        """Dataset facts for these options, without reading files."""
        ...

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool,
             **options: Any) -> ArrayDataset:
        """One split of the dataset."""
        ...


# name -> "module:attribute" of the reader; imported lazily so `import robustcl.data` stays cheap.
_REGISTRY: dict[str, str] = {
    "fashion-mnist": "robustcl.data.idx:FASHION_MNIST",
    "cifar10": "robustcl.data.cifar:CIFAR10",
    "cifar100": "robustcl.data.cifar:CIFAR100",
    "synthetic": "robustcl.data.synthetic:SYNTHETIC",
    "stl10": "robustcl.data.stl10:STL10",
    "imagefolder": "robustcl.data.imagefolder:IMAGEFOLDER",
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def get_reader(name: str) -> Reader:
    """The registered reader for `name`, or DataError listing the valid names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    module, attribute = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def reader_options(reader: Reader, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options merged over the reader's defaults; unknown keys are a DataError listing valid ones."""
    unknown = sorted(set(options) - set(reader.defaults))
    if unknown:
        valid = ", ".join(reader.defaults) or "none"
        raise DataError(f"unknown option(s) {', '.join(unknown)} for dataset {reader.name}; "
                        f"valid options: {valid}")
    return {**reader.defaults, **options}


def _check_split(split: str) -> None:
    """DataError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None,
                 download: bool = False, **options: Any) -> ArrayDataset:
    """Load one split of a registered dataset as uint8 (N, C, H, W) images and int64 labels."""
    reader = get_reader(name)
    _check_split(split)
    return reader.load(split, root, download, **reader_options(reader, options))


def dataset_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset's options as a run uses them: `options` over its reader's defaults (unknown keys: DataError)."""
    return reader_options(get_reader(name), options)


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Shape, class count and normalisation of a dataset, without reading any file."""
    reader = get_reader(name)
    return reader.info(**reader_options(reader, options))
