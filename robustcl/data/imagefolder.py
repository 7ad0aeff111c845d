"""Your own images as a dataset: `root/<split>/<class_name>/*.png|jpg|jpeg|bmp|webp`, like torchvision's ImageFolder.

Class index = position of the class folder name in the sorted list of class folders (folders whose name
starts with '.' are skipped); both splits must have the same class folders. Images are found
recursively inside each class folder and ordered by class, then by path. Each image is decoded with
Pillow, converted to RGB (`channels=3`) or greyscale "L" (`channels=1`), centre-cropped to a square
and resized to `size` x `size` (bilinear, antialiased by Pillow when shrinking; large JPEGs are first
decoded at a reduced DCT scale that still covers `size`). mean/std are measured on the train split at
that size (a constant channel gets std 1/255 so normalising never divides by zero). Decoded splits are
memoised per process, keyed on the files' paths, sizes and mtimes, so an edited folder is re-read.
There is no download: `root` is required.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset, DataError, DatasetInfo
from .files import file_signature, memoised, user_path

NAME = "imagefolder"
EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DECODE_THREADS = min(4, os.cpu_count() or 1)  # Pillow releases the GIL while decoding
MIN_STD = 1.0 / 255
ROOT_NEEDED = "imagefolder needs data.root=DIR with train/ and test/ class folders"


def _check_options(size: Any, channels: Any) -> None:
    """DataError unless size is an integer >= 1 and channels is 1 or 3."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"imagefolder option size={size!r} must be an integer >= 1")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise DataError(f"imagefolder option channels={channels!r} must be 3 (RGB) or 1 (greyscale)")


def class_names(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in `split_dir` (hidden folders skipped); DataError if none."""
    if not split_dir.is_dir():
        raise DataError(f"imagefolder: {split_dir} not found; {ROOT_NEEDED}")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"imagefolder: no class folders in {split_dir}; {ROOT_NEEDED}")
    return names


def _check_same_classes(root: Path) -> list[str]:
    """The class names shared by root/train and root/test; DataError naming the classes either split lacks."""
    train, test = class_names(root / "train"), class_names(root / "test")
    if train != test:
        parts = [f"missing from {split}/: {', '.join(sorted(set(other) - set(mine)))}"
                 for split, mine, other in (("test", test, train), ("train", train, test)) if set(other) - set(mine)]
        raise DataError(f"imagefolder: class folders differ between {root / 'train'} and {root / 'test'} "
                        f"({'; '.join(parts)}); every class needs a folder in both splits")
    return train


def image_files(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Image paths ordered by class then path, and their class indices; DataError for an empty class."""
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).rglob("*")
                       if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file())
        if not found:
            raise DataError(f"imagefolder: no images ({', '.join(EXTENSIONS)}) in {split_dir / name}; add images "
                            "or remove that class folder from both splits")
        paths += found
        labels += [index] * len(found)
    return paths, labels


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (channels, size, size): converted, centre-cropped to a square, resized."""
    from PIL import Image

    try:
        with Image.open(path) as raw:
            raw.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG only: decode at a smaller scale
            img = raw.convert("RGB" if channels == 3 else "L")
        width, height = img.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        # crop first: resize(box=...) would let the filter read pixels outside the square
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"imagefolder: cannot read image {path} ({type(exc).__name__}: {exc}); "
                        "replace or delete the file") from exc
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_all(paths: list[Path], size: int, channels: int) -> np.ndarray:
    """All images as uint8 (N, channels, size, size), decoded by a few threads."""
    images = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        for i, array in enumerate(pool.map(lambda p: decode(p, size, channels), paths)):
            images[i] = array
    return images


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) pixels scaled to [0, 1], exact via 256-bin histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = float((hist * values).sum() / hist.sum())
        var = float((hist * (values - mean) ** 2).sum() / hist.sum())
        means.append(mean)
        stds.append(max(var ** 0.5, MIN_STD))
    return tuple(means), tuple(stds)


class ImageFolderReader:
    """Registry entry for user image folders (root required; nothing is downloaded)."""

    name = NAME
    defaults: dict[str, Any] = {"size": 64, "channels": 3}

    def info(self, **options: Any) -> DatasetInfo:
        """Always a DataError: class count and normalisation come from the files, which need a root."""
        raise DataError("imagefolder: class count and mean/std come from the files; load a split with "
                        "load_dataset('imagefolder', split, root=DIR) and use its .info")

    def _split(self, root: Path, split: str, classes: list[str], size: int,
               channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (memoised) images and labels of one split."""
        paths, labels = image_files(root / split, classes)
        key = (NAME, split, str(root.resolve()), size, channels, tuple(classes), file_signature(paths))
        return memoised(key, lambda: (decode_all(paths, size, channels), np.asarray(labels, dtype=np.int64)))

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool, size: int = 64,
             channels: int = 3) -> ArrayDataset:
        """One split, with mean/std measured on the train split at the same size and channels."""
        _check_options(size, channels)
        if root is None:
            raise DataError(ROOT_NEEDED)
        if download:
            raise DataError("imagefolder reads local folders only and has no download; set data.download=false")
        directory = user_path(root, "data.root")
        if not directory.is_dir():
            raise DataError(f"imagefolder: root {directory} is not a directory; {ROOT_NEEDED}")
        classes = _check_same_classes(directory)
        train_images, _ = self._split(directory, "train", classes, int(size), int(channels))
        mean, std = channel_stats(train_images)
        info = DatasetInfo(NAME, len(classes), int(channels), int(size), int(size), mean, std)
        images, labels = self._split(directory, split, classes, int(size), int(channels))
        return ArrayDataset(images.clone(), labels.clone(), info)


IMAGEFOLDER = ImageFolderReader()
