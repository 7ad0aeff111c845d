"""Fashion-MNIST from the official IDX files (gzip-compressed or plain), optionally resized.

Option `size` resizes every image to size x size (antialiased bilinear, as STL-10's reader does), e.g.
`data.options={size: 32}` to train a CIFAR-style ResNet-18 on 32 px inputs; 28 keeps the originals.

Checksums: `GZ_MD5` are the md5s of the official `.gz` downloads. Debian's dataset-fashion-mnist ships
the same data re-compressed (gzip header without the file name, new mtime), so its `.gz` md5s differ;
`verify` therefore also accepts a file whose decompressed content matches `RAW_MD5`.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset, DataError, DatasetInfo
from .files import FileReader, file_signature, cache_dir, download_file, file_digest, url_for
from .stl10 import resize_images

URL_ENV = "ROBUSTCL_FASHION_MNIST_URL"
DEFAULT_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10
SIZE = 28

SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
INFO = DatasetInfo("fashion-mnist", NUM_CLASSES, 1, SIZE, SIZE, (0.2860,), (0.3530,))
_RESIZED_SIZE = 2  # resized splits kept per process (train and test)
_RESIZED: "OrderedDict[tuple[Any, ...], torch.Tensor]" = OrderedDict()


def _corrupt(path: Path, problem: str) -> DataError:
    """The standard error for a damaged IDX file."""
    return DataError(f"corrupt IDX file {path}: {problem}, delete it and re-download")


def read_bytes(path: Path) -> bytes:
    """Raw IDX content of `path`, decompressing `.gz`; damaged gzip streams are a DataError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}; check its permissions") from exc
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, f"bad gzip stream ({exc})") from exc


def parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Array from IDX bytes: big-endian magic (0x0000080N, N = ndim) and dims, then uint8 data."""
    if len(data) < 4:
        raise _corrupt(path, f"only {len(data)} bytes, shorter than the IDX header")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise _corrupt(path, f"magic 0x{got:08x}, expected 0x{magic:08x}")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise _corrupt(path, f"truncated header ({len(data)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=data[3], offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise _corrupt(path, f"{what}: {len(data)} bytes, header {dims} implies {expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(directory: Path, base: str) -> Path | None:
    """The gzip or plain file for an IDX base name in `directory`, preferring `.gz`."""
    for candidate in (directory / f"{base}.gz", directory / base):
        if candidate.is_file():
            return candidate
    return None


def _check_digest(path: Path) -> None:
    """DataError unless `path` matches the official gzip md5 or its content matches the raw md5."""
    base = path.name.removesuffix(".gz")
    if path.suffix == ".gz" and file_digest(path, "md5") == GZ_MD5[path.name]:
        return
    got = hashlib.md5(read_bytes(path)).hexdigest()
    if got != RAW_MD5[base]:
        raise DataError(f"checksum mismatch for {path}: decompressed content has md5 {got}, expected "
                        f"{RAW_MD5[base]}; the file is corrupt or not Fashion-MNIST, delete it and "
                        "re-download")


class FashionMNISTReader(FileReader):
    """Fashion-MNIST: 60000 train / 10000 test grey 28x28 images, 10 classes."""

    def __init__(self) -> None:
        """Register names, system location (Debian's dataset-fashion-mnist) and apt package."""
        self.name = INFO.name
        self.dataset_info = INFO
        self.system_dirs = (Path("/usr/share/datasets/fashion-mnist"),)
        self.apt_package = "dataset-fashion-mnist"
        self.defaults = {"verify": False, "size": SIZE}

    def info(self, **options: Any) -> DatasetInfo:
        """Dataset facts for these options: the image side follows `size` (mean/std stay the 28 px values)."""
        size = options.get("size", SIZE)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise DataError(f"fashion-mnist option size={size!r} must be an integer >= 1 (28 keeps the original images)")
        return INFO if size == SIZE else DatasetInfo(INFO.name, NUM_CLASSES, 1, int(size), int(size), INFO.mean, INFO.std)

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool, verify: bool = False,
             size: int = SIZE) -> ArrayDataset:
        """One split (memoised raw parse), resized to `size` (the resized split memoised too: phases reload it)."""
        info = self.info(size=size)
        data = super().load(split, root, download, verify)
        if size == SIZE:
            return data
        directory = self.locate(root, False, split)
        key = (split, str(directory.resolve()), file_signature(self.files(directory, split) or []), int(size))
        if key not in _RESIZED:
            _RESIZED[key] = resize_images(data.images, int(size))
            while len(_RESIZED) > _RESIZED_SIZE:
                _RESIZED.popitem(last=False)
        _RESIZED.move_to_end(key)
        return ArrayDataset(_RESIZED[key].clone(), data.labels, info)

    def hint(self) -> str:
        """Both ways to obtain the files."""
        return (f"install Debian's {self.apt_package} (apt-get install -y {self.apt_package}) "
                "or pass download=True / data.download=true")

    def files(self, directory: Path, split: str | None) -> list[Path] | None:
        """Image and label files of `split` (or all splits) in `directory`, or None if any is missing."""
        splits = [split] if split is not None else list(SPLIT_FILES)
        found = [_find(directory, base) for s in splits for base in SPLIT_FILES[s]]
        return None if any(f is None for f in found) else [f for f in found if f is not None]

    def fetch(self, directory: Path) -> None:
        """Download the missing official `.gz` files into `directory`, md5-verified."""
        manual = (f"download it manually into {cache_dir(self.name)}, or apt-get install -y "
                  f"{self.apt_package}")
        for base in (b for pair in SPLIT_FILES.values() for b in pair):
            if _find(directory, base) is None:
                name = f"{base}.gz"
                download_file(url_for(URL_ENV, DEFAULT_URL, name), directory / name, GZ_MD5[name], manual)

    def read(self, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Parse and cross-check the split's image and label files."""
        image_path, label_path = (_find(directory, base) for base in SPLIT_FILES[split])
        assert image_path is not None and label_path is not None
        images = parse_idx(read_bytes(image_path), image_path, IMAGES_MAGIC)
        labels = parse_idx(read_bytes(label_path), label_path, LABELS_MAGIC)
        if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE):
            raise _corrupt(image_path, f"dims {images.shape}, expected (N, {SIZE}, {SIZE})")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise _corrupt(label_path, f"{labels.shape[0]} labels for {images.shape[0]} images in "
                                       f"{image_path.name}")
        if labels.size and int(labels.max()) >= NUM_CLASSES:
            raise _corrupt(label_path, f"label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
        return images.reshape(-1, 1, SIZE, SIZE), labels.astype(np.int64)

    def verify(self, directory: Path) -> list[Path]:
        """md5-check all four files in `directory` (gzip md5, or decompressed md5 for re-packed gzips)."""
        files = self.files(directory, None)
        if files is None:
            raise DataError(f"{self.name} not found in {directory}; {self.hint()}")
        for path in files:
            _check_digest(path)
        return files


FASHION_MNIST = FashionMNISTReader()
