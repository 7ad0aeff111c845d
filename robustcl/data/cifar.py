"""CIFAR-10 / CIFAR-100 in both official formats (python pickles, binary records), tarball or extracted.

Each image is 3072 bytes: 1024 red, then 1024 green, then 1024 blue, each a row-major 32x32 plane,
so a batch reshapes directly to (N, 3, 32, 32). Pickles are parsed by a restricted unpickler that
resolves only numpy's array-reconstruction globals, so a crafted file cannot run code.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import DataError, DatasetInfo
from .files import FileReader, cache_dir, download_file, file_digest, read_tar_members, safe_extract, url_for

URL_ENV = "ROBUSTCL_CIFAR_URL"
DEFAULT_URL = "https://www.cs.toronto.edu/~kriz/"
PIXELS = 3 * 32 * 32


def _reconstruct_function() -> Any:
    """numpy's ndarray pickle helper, from whichever module path this numpy version has."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals CIFAR batches contain; anything else is refused."""

    def __init__(self, data: bytes, where: str) -> None:
        """Read `data` as Python-2-era pickles are read (`encoding="bytes"`); `where` names the file."""
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        """Allowed numpy reconstruction globals only; DataError for everything else (e.g. os.system)."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(f"refusing to unpickle {self.where}: it references {module}.{name}, which CIFAR "
                            "batches never contain; the file is corrupt or malicious, delete it and "
                            "re-download")
        return allowed


def _corrupt(where: str, problem: str) -> DataError:
    """The standard error for a damaged CIFAR batch."""
    return DataError(f"corrupt CIFAR file {where}: {problem}; delete it and re-download")


def _field(batch: dict[Any, Any], key: str) -> Any:
    """A batch dict entry under its Python 2 (bytes) or Python 3 (str) key, else None."""
    return batch.get(key.encode(), batch.get(key))


def parse_pickle_batch(data: bytes, where: str, label_key: str,
                       num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels int64 from one python-version batch."""
    try:
        batch = RestrictedUnpickler(data, where).load()
    except DataError:
        raise
    except Exception as exc:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise _corrupt(where, f"unreadable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise _corrupt(where, f"pickle holds {type(batch).__name__}, expected a dict")
    images, labels = _field(batch, "data"), _field(batch, label_key)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != PIXELS:
        raise _corrupt(where, f"'data' is not a uint8 (N, {PIXELS}) array")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise _corrupt(where, f"'{label_key}' is not a list of integers") from exc
    return images.reshape(-1, 3, 32, 32), _check_labels(labels, images.shape[0], where, num_classes)


def parse_binary_batch(data: bytes, where: str, label_bytes: int,
                       num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from binary records: `label_bytes` label bytes (last = used) + 3072 pixels."""
    record = label_bytes + PIXELS
    if not data or len(data) % record:
        raise _corrupt(where, f"{len(data)} bytes is not a whole number of {record}-byte records")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), _check_labels(labels, rows.shape[0], where, num_classes)


def _check_labels(labels: np.ndarray, count: int, where: str, num_classes: int) -> np.ndarray:
    """Labels as a 1-D array of `count` ints in range, else a DataError."""
    if labels.ndim != 1 or labels.shape[0] != count:
        raise _corrupt(where, f"{labels.size} labels for {count} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(where, f"labels outside 0..{num_classes - 1}")
    return labels


@dataclass(frozen=True)
class Format:
    """One official distribution format: directory, tarball, per-split members and label layout."""

    kind: str  # "python" or "binary"
    folder: str
    tarball: str
    tarball_md5: str
    splits: dict[str, tuple[str, ...]]
    member_md5: dict[str, str]  # extracted python batches; binary batches have no published md5


@dataclass(frozen=True)
class Layout:
    """Where a format was found: an extracted folder under `base`, or a tarball."""

    fmt: Format
    base: Path  # directory containing `fmt.folder`, or the tarball itself
    is_tarball: bool

    def paths(self, split: str | None) -> list[Path]:
        """Files that hold `split` (all splits when None)."""
        if self.is_tarball:
            return [self.base]
        return [self.base / self.fmt.folder / m for m in _members(self.fmt, split)]


def _members(fmt: Format, split: str | None) -> list[str]:
    """Member names (relative to the format folder) for `split`, or all splits when None."""
    return [m for s, names in fmt.splits.items() if split in (None, s) for m in names]


class CifarReader(FileReader):
    """CIFAR-10 or CIFAR-100 (fine labels), 50000 train / 10000 test colour 32x32 images."""

    def __init__(self, info: DatasetInfo, label_key: str, label_bytes: int, formats: tuple[Format, ...]) -> None:
        """`formats` in order of preference; the python tarball (formats[0]) is what `fetch` downloads."""
        self.name = info.name
        self.dataset_info = info
        self.label_key = label_key
        self.label_bytes = label_bytes
        self.formats = formats
        self.system_dirs = ()
        self.apt_package = None

    def hint(self) -> str:
        """Both ways to obtain the files."""
        fmt = self.formats[0]
        return (f"put {fmt.tarball} (or its extracted {fmt.folder}/) in {cache_dir(self.name)} "
                "or pass download=True / data.download=true")

    def layout(self, directory: Path, split: str | None) -> Layout | None:
        """First usable layout: extracted folder in `directory`, `directory` itself, then tarball."""
        for fmt in self.formats:
            bases = [directory, directory.parent] if directory.name == fmt.folder else [directory]
            for base in bases:
                if all((base / fmt.folder / m).is_file() for m in _members(fmt, split)):
                    return Layout(fmt, base, is_tarball=False)
            if (directory / fmt.tarball).is_file():
                return Layout(fmt, directory / fmt.tarball, is_tarball=True)
        return None

    def files(self, directory: Path, split: str | None) -> list[Path] | None:
        """The batch files (or tarball) for `split` in `directory`, or None."""
        found = self.layout(directory, split)
        return None if found is None else found.paths(split)

    def fetch(self, directory: Path) -> None:
        """Download the python-version tarball (md5-verified) and extract it safely into `directory`."""
        fmt = self.formats[0]
        tarball = directory / fmt.tarball
        if not tarball.is_file():
            manual = f"download it manually and place {fmt.tarball} in {cache_dir(self.name)}"
            download_file(url_for(URL_ENV, DEFAULT_URL, fmt.tarball), tarball, fmt.tarball_md5, manual)
        safe_extract(tarball, directory)

    def read(self, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Parse and concatenate the split's batches."""
        found = self.layout(directory, split)
        assert found is not None
        names = _members(found.fmt, split)
        if found.is_tarball:
            blobs = read_tar_members(found.base, [f"{found.fmt.folder}/{m}" for m in names])
            wheres = [f"{found.base}:{found.fmt.folder}/{m}" for m in names]
        else:
            wheres = [str(p) for p in found.paths(split)]
            blobs = [Path(w).read_bytes() for w in wheres]
        parts = [self._parse(found.fmt, blob, where) for blob, where in zip(blobs, wheres)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _parse(self, fmt: Format, blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Dispatch one batch to the pickle or binary parser."""
        if fmt.kind == "python":
            return parse_pickle_batch(blob, where, self.label_key, self.dataset_info.num_classes)
        return parse_binary_batch(blob, where, self.label_bytes, self.dataset_info.num_classes)

    def verify(self, directory: Path) -> list[Path]:
        """md5-check the tarball, or the extracted python batches; binary batches get a size check."""
        found = self.layout(directory, None)
        if found is None:
            raise DataError(f"{self.name} not found in {directory}; {self.hint()}")
        if found.is_tarball:
            return [_check_md5(found.base, found.fmt.tarball_md5)]
        for member, path in zip(_members(found.fmt, None), found.paths(None)):
            if found.fmt.kind == "python":
                _check_md5(path, found.fmt.member_md5[member])
            else:
                self._check_binary_size(path, member)
        return found.paths(None)

    def _check_binary_size(self, path: Path, member: str) -> None:
        """Official binary batches have no published md5; check the exact record count instead."""
        count = 10000 if member.startswith(("test", "data_batch")) else 50000
        expected = count * (self.label_bytes + PIXELS)
        if path.stat().st_size != expected:
            raise _corrupt(str(path), f"{path.stat().st_size} bytes, expected {expected}")


def _check_md5(path: Path, expected: str) -> Path:
    """DataError unless `path` has md5 `expected`."""
    got = file_digest(path, "md5")
    if got != expected:
        raise DataError(f"checksum mismatch for {path}: expected {expected}, got {got}; "
                        "the file is corrupt, delete it and re-download")
    return path


CIFAR10 = CifarReader(
    DatasetInfo("cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    label_key="labels", label_bytes=1,
    formats=(
        Format("python", "cifar-10-batches-py", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
               {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
               {"data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                "test_batch": "40351d587109b95175f43aff81a1287e"}),
        Format("binary", "cifar-10-batches-bin", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
               {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
               {}),
    ),
)

CIFAR100 = CifarReader(
    DatasetInfo("cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    label_key="fine_labels", label_bytes=2,
    formats=(
        Format("python", "cifar-100-python", "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
               {"train": ("train",), "test": ("test",)},
               {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
        Format("binary", "cifar-100-binary", "cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
               {"train": ("train.bin",), "test": ("test.bin",)},
               {}),
    ),
)
