"""The published CIFAR-10-C and CIFAR-100-C, read as released (Zenodo records 2535967 and 3555552).

Layout: a folder CIFAR-10-C/ (CIFAR-100-C/) of `<corruption>.npy`, each uint8 (50000, 32, 32, 3): severity 1's
10,000 test images, then severity 2's, ..., severity 5's, every block in the order of the CIFAR test batch
(make_cifar_c.py walks torchvision's CIFAR10(train=False), which is test_batch in file order, as robustcl's
reader is), and `labels.npy` (50000,) the test labels repeated five times. Where the folder is looked
for: `<data.root>/CIFAR-10-C`, `<data.root>` itself, then the cache `<cache>/cifar10/CIFAR-10-C` (a
CIFAR-10-C.tar there is extracted on first use); `fetch_official` downloads the tar into the cache.

Checksums: the tars' md5s are the ones the Zenodo records list (also used by several public loaders).
The md5s of the single .npy files are not published by the authors; the ones below are those that
public CIFAR-C loaders (e.g. torch-uncertainty's CIFAR10C/CIFAR100C) check, which agree with one another.
As for CIFAR itself, md5s are checked when data.options.verify is true; shapes, sizes and labels always.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..base import DataError
from ..files import cache_dir, download_file, file_digest, file_lock, safe_extract, url_for, user_path

URL_ENV = "ROBUSTCL_CIFAR_C_URL"
SHAPE = (32, 32, 3)
SEVERITY_COUNT = 5


@dataclass(frozen=True)
class OfficialSet:
    """One published -C release: its folder, tar, Zenodo record and checksums."""
    name: str
    folder: str
    tarball: str
    record: str
    tarball_md5: str
    file_md5: dict[str, str] = field(default_factory=dict)

    def default_url(self) -> str:
        return f"https://zenodo.org/records/{self.record}/files/"


CIFAR10_C = OfficialSet(
    "CIFAR-10-C", "CIFAR-10-C", "CIFAR-10-C.tar", "2535967", "56bf5dcef84df0e2308c6dcbcbbd8499",
    {"gaussian_noise": "ecaf8b9a2399ffeda7680934c33405fd", "shot_noise": "3a7239bb118894f013d9bf1984be7f11",
     "impulse_noise": "2090e01c83519ec51427e65116af6b1a", "defocus_blur": "7d1322666342a0702b1957e92f6254bc",
     "glass_blur": "7361fb4019269e02dbf6925f083e8629", "motion_blur": "fffa5f852ff7ad299cfe8a7643f090f4",
     "zoom_blur": "6ea8e63f1c5cdee1517533840641641b", "snow": "bb238de8555123da9c282dea23bd6e55",
     "frost": "31f6ab3bce1d9934abfb0cc13656f141", "fog": "7b397314b5670f825465fbcd1f6e9ccd",
     "brightness": "0a81ef75e0b523c3383219c330a85d48", "contrast": "3c8262171c51307f916c30a3308235a8",
     "elastic_transform": "9421657c6cd452429cf6ce96cc412b5f", "pixelate": "0f14f7e2db14288304e1de10df16832f",
     "jpeg_compression": "2b9cc4c864e0193bb64db8d7728f8187", "speckle_noise": "ef00b87611792b00df09c0b0237a1e30",
     "gaussian_blur": "c33370155bc9b055fb4a89113d3c559d", "spatter": "8a5a3903a7f8f65b59501a6093b4311e",
     "saturate": "1cfae0964219c5102abbb883e538cc56", "labels": "c439b113295ed5254878798ffe28fd54"})
CIFAR100_C = OfficialSet(
    "CIFAR-100-C", "CIFAR-100-C", "CIFAR-100-C.tar", "3555552", "11f0ed0f1191edbf9fa23466ae6021d3",
    {"gaussian_noise": "ecc4d366eac432bdf25c024086f5e97d", "shot_noise": "b0a1fa6e1e465a747c1b204b1914048a",
     "impulse_noise": "3b3c210ddfa0b5cb918ff4537a429fef", "defocus_blur": "d923e3d9c585a27f0956e2f2ad832564",
     "glass_blur": "0bf384f38e5ccbf8dd479d9059b913e1", "motion_blur": "732a7e2e54152ff97c742d4c388c5516",
     "zoom_blur": "0204613400c034a81c4830d5df81cb82", "snow": "0237be164583af146b7b144e73b43465",
     "frost": "3a39c6823bdfaa0bf8b12fe7004b8117", "fog": "4efc7ebd5e82b028bdbe13048e3ea564",
     "brightness": "f22d7195aecd6abb541e27fca230c171", "contrast": "322bb385f1d05154ee197ca16535f71e",
     "elastic_transform": "a0792bd6581f6810878be71acedfc65a", "pixelate": "96c00c60f144539e14cffb02ddbd0640",
     "jpeg_compression": "c851b7f1324e1d2ffddeb76920576d11", "speckle_noise": "e3f215b1a0f9fd9fd6f0d1cf94a7ce99",
     "gaussian_blur": "5204ba0d557839772ef5a4196a052c3e", "spatter": "12ccf41d62564d36e1f6a6ada5022728",
     "saturate": "c0697e9fdd646916a61e9c312c77bf6b", "labels": "bb4026e9ce52996b95f439544568cdb2"})
OFFICIAL: dict[str, OfficialSet] = {"cifar10": CIFAR10_C, "cifar100": CIFAR100_C}


def official_set(dataset: str) -> OfficialSet | None:
    """The published -C release of `dataset` (cifar10, cifar100), None for any other dataset."""
    return OFFICIAL.get(dataset)


def _complete(directory: Path, names: tuple[str, ...]) -> bool:
    return all((directory / f"{n}.npy").is_file() for n in (*names, "labels"))


def find_official(dataset: str, names: tuple[str, ...], root: str | os.PathLike[str] | None) -> Path | None:
    """The folder that holds `names` and labels.npy of dataset's -C set, None when there is none (then the
    corruptions are generated). A tar in the cache (or in root) without its folder is extracted beside it
    first; a -C folder that lacks a requested file is a DataError, not a silent switch to generated images."""
    spec = OFFICIAL[dataset]
    bases = [user_path(root, "data.root")] if root is not None else []
    places = [*(p for base in bases for p in (base / spec.folder, base)), cache_dir(dataset) / spec.folder]
    for place in places:
        if _complete(place, names):
            return place
        if (place / "labels.npy").is_file():  # a -C folder without some requested file: say so, do not generate
            missing = [f"{n}.npy" for n in names if not (place / f"{n}.npy").is_file()]
            raise DataError(f"{spec.name} folder {place} lacks {', '.join(missing)}; restore it (extract "
                            f"{spec.tarball} again) or ask only for the corruptions it has")
    for base in [*bases, cache_dir(dataset)]:
        if (base / spec.tarball).is_file() and not (base / spec.folder).exists():
            with file_lock(base / spec.tarball):  # several evaluations at once: one extracts, the others wait
                if not (base / spec.folder).exists():
                    safe_extract(base / spec.tarball, base)
            if _complete(base / spec.folder, names):
                return base / spec.folder
    return None


def fetch_official(dataset: str) -> Path:
    """Download the -C tar of `dataset` from Zenodo into the cache (md5-checked) and extract it there."""
    spec = OFFICIAL[dataset]
    target = cache_dir(dataset)
    tarball = target / spec.tarball
    with file_lock(tarball):  # one process downloads and extracts; the others find the folder
        if (target / spec.folder / "labels.npy").is_file():
            return target / spec.folder
        if not tarball.is_file():
            manual = f"download {spec.tarball} (Zenodo record {spec.record}) by hand and put it in {target}"
            download_file(url_for(URL_ENV, spec.default_url(), spec.tarball), tarball, spec.tarball_md5, manual)
        safe_extract(tarball, target)
    return target / spec.folder


_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files whose md5 matched in this process


def _check_md5(file: Path, expected: str, release: str) -> None:
    """DataError unless `file` has md5 `expected` (each file hashed once per process while unchanged)."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    got = file_digest(file, "md5")
    if got != expected:
        raise DataError(f"checksum mismatch for {file}: expected {expected} ({release} as published), got {got}; "
                        "delete it and download the set again")
    _VERIFIED.add(key)


def _open(path: Path) -> np.ndarray:
    """A .npy file memory-mapped; DataError (one line, naming the file) when it is cut short or not a .npy."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"corrupt common-corruption file {path}: {reason} (truncated or not a .npy file); "
                        "delete it and download the set again") from None


def read_official(directory: Path, name: str, severity: int, index: np.ndarray, test_labels: np.ndarray,
                  n_test: int, verify: bool = False, spec: OfficialSet | None = None) -> np.ndarray:
    """Images `index` (positions in the n_test-image test split) of corruption `name` at `severity`, uint8
    (len(index), 3, 32, 32). Checks the layout (uint8 (5 n_test, 32, 32, 3); labels (5 n_test,)) and that
    labels.npy agrees with `test_labels` (the same images in the same order); md5s when `verify`."""
    path, labels_path = directory / f"{name}.npy", directory / "labels.npy"
    if verify and spec is not None:
        for key, file in ((name, path), ("labels", labels_path)):
            if key in spec.file_md5 and file.is_file():
                _check_md5(file, spec.file_md5[key], spec.name)
    images, labels = _open(path), _open(labels_path)
    expected = (SEVERITY_COUNT * n_test, *SHAPE)
    if images.dtype != np.uint8 or tuple(images.shape) != expected:
        raise DataError(f"{path} holds {images.dtype} {tuple(images.shape)}, expected uint8 {expected} (severities "
                        f"1-5 of the {n_test} test images stacked); it is not an official -C file")
    if labels.ndim != 1 or labels.shape[0] != SEVERITY_COUNT * n_test:
        raise DataError(f"{labels_path} holds {tuple(labels.shape)} labels, expected ({SEVERITY_COUNT * n_test},)")
    rows = (severity - 1) * n_test + np.asarray(index, dtype=np.int64)
    if not np.array_equal(np.asarray(labels[rows], dtype=np.int64), np.asarray(test_labels, dtype=np.int64)):
        raise DataError(f"{labels_path} does not match the test split's labels at severity {severity}: the -C "
                        "set is not of this dataset, or its images are in another order")
    return np.ascontiguousarray(np.asarray(images[rows]).transpose(0, 3, 1, 2))


__all__ = ["CIFAR100_C", "CIFAR10_C", "OFFICIAL", "OfficialSet", "fetch_official", "find_official", "official_set",
           "read_official"]
