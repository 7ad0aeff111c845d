"""STL-10 in its official binary format, optionally resized and relabelled for CIFAR-10 -> STL-10 transfer.

Files (`stl10_binary.tar.gz`, extracting to `stl10_binary/`): `train_X.bin` / `test_X.bin` hold 5000 /
8000 images of 3 x 96 x 96 bytes. Each image is three channel planes (R, G, B) and each plane is stored
COLUMN-MAJOR (the MATLAB original's order), so a (N, 3, 96, 96) view of the bytes must swap its last two
axes to become (channel, row, column). `train_y.bin` / `test_y.bin` hold one byte per image, labels
1..10 in the order of `class_names.txt`; they become 0..9. `unlabeled_X.bin` (100000 images) and
`fold_indices.txt` are not used by the train/test splits.

Options: `size` resizes every image to size x size (antialiased bilinear on float, rounded back to
uint8), e.g. `size=32` to evaluate a CIFAR-10 encoder at its training resolution. `classes` is "all"
(the 10 STL-10 classes) or "cifar10-shared": the standard CIFAR-10 -> STL-10 transfer protocol keeps
the 9 classes both sets share (STL-10 "car" is CIFAR-10 "automobile"; STL-10's "monkey" has no CIFAR-10
counterpart and CIFAR-10's "frog" none in STL-10) and relabels them to CIFAR-10 indices, so a CIFAR-10
linear head applies unchanged (num_classes stays 10; label 6, frog, never occurs).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import ArrayDataset, DataError, DatasetInfo
from .files import FileReader, cache_dir, download_file, file_digest, read_tar_members, safe_extract, url_for

NAME = "stl10"
URL_ENV = "ROBUSTCL_STL10_URL"
DEFAULT_URL = "http://ai.stanford.edu/~acoates/stl10/"
FOLDER = "stl10_binary"
TARBALL = "stl10_binary.tar.gz"
TARBALL_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
COUNTS: dict[str, int] = {"train": 5000, "test": 8000}  # official images per split (exact file sizes)
SPLIT_FILES: dict[str, tuple[str, str]] = {"train": ("train_X.bin", "train_y.bin"),
                                           "test": ("test_X.bin", "test_y.bin")}
MEAN = (0.4467, 0.4398, 0.4066)
STD = (0.2603, 0.2566, 0.2713)
RESIZE_CHUNK = 500  # images resized per step, bounding the float32 working memory

# Label order of STL-10's class_names.txt and of CIFAR-10's batches.meta label_names.
STL10_CLASSES: tuple[str, ...] = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                                  "truck")
CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                    "ship", "truck")
STL10_TO_CIFAR10_NAME: dict[str, str] = {"car": "automobile"}  # the one shared class named differently
CLASS_SETS: tuple[str, ...] = ("all", "cifar10-shared")


def cifar10_label_map() -> tuple[int, ...]:
    """For each STL-10 label 0..9, the CIFAR-10 label of the same class, or -1 (monkey) if CIFAR-10 lacks it."""
    names = [STL10_TO_CIFAR10_NAME.get(name, name) for name in STL10_CLASSES]
    return tuple(CIFAR10_CLASSES.index(name) if name in CIFAR10_CLASSES else -1 for name in names)


def _manual_fix() -> str:
    """How to replace damaged files."""
    return f"delete it and re-extract {TARBALL} or re-download it (download=True / data.download=true)"


def parse_split(x_blob: bytes, y_blob: bytes, x_where: str, y_where: str,
                count: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (count, 3, 96, 96) uint8 in (channel, row, column) order and labels 0..9 from one split's files."""
    expected = count * IMAGE_BYTES
    if len(x_blob) != expected:
        raise DataError(f"truncated or corrupt STL-10 file {x_where}: {len(x_blob)} bytes, expected {expected} "
                        f"({count} images of 3x{SIDE}x{SIDE}); {_manual_fix()}")
    if len(y_blob) != count:
        raise DataError(f"truncated or corrupt STL-10 file {y_where}: {len(y_blob)} bytes, expected {count} "
                        f"(one label per image); {_manual_fix()}")
    planes = np.frombuffer(x_blob, np.uint8).reshape(count, 3, SIDE, SIDE)
    images = np.ascontiguousarray(planes.transpose(0, 1, 3, 2))  # column-major planes -> (row, column)
    labels = np.frombuffer(y_blob, np.uint8).astype(np.int64)
    bad = labels[(labels < 1) | (labels > len(STL10_CLASSES))]
    if bad.size:
        raise DataError(f"corrupt STL-10 file {y_where}: label {int(bad[0])} outside 1..{len(STL10_CLASSES)}; "
                        f"{_manual_fix()}")
    return images, labels - 1


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images resized to (N, C, size, size): antialiased bilinear on float, rounded."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        part = images[start:start + RESIZE_CHUNK].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _validate_options(size: Any, classes: Any) -> None:
    """DataError unless size is an integer >= 1 and classes one of CLASS_SETS."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"stl10 option size={size!r} must be an integer >= 1 (96 keeps the original images)")
    if classes not in CLASS_SETS:
        raise DataError(f"stl10 option classes={classes!r} must be one of {', '.join(CLASS_SETS)}")


class STL10Reader(FileReader):
    """STL-10: 5000 train / 8000 test colour 96x96 images, 10 classes, from the official binary files."""

    def __init__(self) -> None:
        """Name, nominal (96x96, all classes) info and options."""
        self.name = NAME
        self.dataset_info = DatasetInfo(NAME, 10, 3, SIDE, SIDE, MEAN, STD)
        self.defaults = {"verify": False, "size": SIDE, "classes": "all"}
        self.system_dirs = ()
        self.apt_package = None

    def hint(self) -> str:
        """Both ways to obtain the files."""
        return (f"put {TARBALL} (or its extracted {FOLDER}/) in {cache_dir(self.name)} "
                "or pass download=True / data.download=true (a 2.6 GB download)")

    def info(self, **options: Any) -> DatasetInfo:
        """Dataset facts for these options: the image side follows `size`; num_classes is always 10."""
        size, classes = options.get("size", SIDE), options.get("classes", "all")
        _validate_options(size, classes)
        return DatasetInfo(NAME, 10, 3, int(size), int(size), MEAN, STD)

    def _folder(self, directory: Path, split: str | None) -> Path | None:
        """The extracted `stl10_binary` folder (`directory` itself or its child) holding `split`, or None."""
        names = [n for s, pair in SPLIT_FILES.items() if split in (None, s) for n in pair]
        candidates = ([directory] if directory.name == FOLDER else []) + [directory / FOLDER]
        return next((c for c in candidates if all((c / n).is_file() for n in names)), None)

    def files(self, directory: Path, split: str | None) -> list[Path] | None:
        """The split's image and label files (extracted preferred), else the tarball, else None."""
        folder = self._folder(directory, split)
        if folder is not None:
            return [folder / n for s, pair in SPLIT_FILES.items() if split in (None, s) for n in pair]
        tarball = directory / TARBALL
        return [tarball] if tarball.is_file() else None

    def fetch(self, directory: Path) -> None:
        """Download the tarball (md5-verified) and extract it safely into `directory`."""
        tarball = directory / TARBALL
        if not tarball.is_file():
            manual = f"download it manually from {DEFAULT_URL}{TARBALL} and place it in {cache_dir(self.name)}"
            download_file(url_for(URL_ENV, DEFAULT_URL, TARBALL), tarball, TARBALL_MD5, manual)
        safe_extract(tarball, directory)

    def read(self, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Parse the split from the extracted folder, or straight from the tarball without extracting."""
        x_name, y_name = SPLIT_FILES[split]
        folder = self._folder(directory, split)
        if folder is not None:
            x_path, y_path = folder / x_name, folder / y_name
            return parse_split(x_path.read_bytes(), y_path.read_bytes(), str(x_path), str(y_path), COUNTS[split])
        tarball = directory / TARBALL
        x_blob, y_blob = read_tar_members(tarball, [f"{FOLDER}/{x_name}", f"{FOLDER}/{y_name}"])
        return parse_split(x_blob, y_blob, f"{tarball}:{FOLDER}/{x_name}", f"{tarball}:{FOLDER}/{y_name}",
                           COUNTS[split])

    def verify(self, directory: Path) -> list[Path]:
        """md5-check the tarball; extracted files (no published md5s) get an exact size check."""
        folder = self._folder(directory, None)
        if folder is not None:
            checked = []
            for split, (x_name, y_name) in SPLIT_FILES.items():
                for name, expected in ((x_name, COUNTS[split] * IMAGE_BYTES), (y_name, COUNTS[split])):
                    path = folder / name
                    if path.stat().st_size != expected:
                        raise DataError(f"truncated or corrupt STL-10 file {path}: {path.stat().st_size} bytes, "
                                        f"expected {expected}; {_manual_fix()}")
                    checked.append(path)
            return checked
        tarball = directory / TARBALL
        if not tarball.is_file():
            raise DataError(f"{self.name} not found in {directory}; {self.hint()}")
        got = file_digest(tarball, "md5")
        if got != TARBALL_MD5:
            raise DataError(f"checksum mismatch for {tarball}: expected {TARBALL_MD5}, got {got}; "
                            "the file is corrupt, delete it and re-download")
        return [tarball]

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool, verify: bool = False,
             size: int = SIDE, classes: str = "all") -> ArrayDataset:
        """One split (memoised raw parse), restricted to `classes` and resized to `size`."""
        info = self.info(size=size, classes=classes)
        data = super().load(split, root, download, verify)
        images, labels = data.images, data.labels
        if classes == "cifar10-shared":
            mapped = torch.tensor(cifar10_label_map(), dtype=torch.int64)[labels]
            keep = mapped >= 0
            images, labels = images[keep], mapped[keep]
        return ArrayDataset(resize_images(images, int(size)), labels, info)


STL10 = STL10Reader()
