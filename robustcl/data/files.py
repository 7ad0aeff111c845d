"""Finding dataset files (explicit root, user cache, system locations), downloading with md5, safe untar.

Resolution order: an explicit `root` (no fall-through when it lacks the files), then the user cache
`$ROBUSTCL_DATA/<name>` (default `~/.cache/robustcl/<name>`; without a home directory
`<temp dir>/robustcl-cache-<uid>/<name>`), then the reader's system directories, then a download into
the cache when `download=True`. A leading ~ is expanded in one place, `user_path`.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import zlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import torch

from .base import DATASETS, ArrayDataset, DataError, DatasetInfo, get_reader

CACHE_ENV = "ROBUSTCL_DATA"
DOWNLOAD_TIMEOUT_S = 60.0
_MEMO_SIZE = 4
_MEMO: "OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()


def home_dir() -> Path | None:
    """The user's home directory, or None where there is none: HOME unset and no passwd entry for the user (as under
    `docker --user 12345`), where Path.home() raises RuntimeError."""
    try:
        return Path.home()
    except (RuntimeError, KeyError, OSError):
        return None


def user_path(path: str | os.PathLike[str], what: str) -> Path:
    """`path` with a leading ~ expanded: the one place robustcl expands ~ (data.root, $ROBUSTCL_DATA, the image
    folder's root); a one-line DataError naming `what` where there is no home to expand it to."""
    path = Path(path)
    try:
        return path.expanduser()
    except RuntimeError:
        raise DataError(f"{what} {path} starts with ~ but this process has no home directory (HOME is unset and "
                        "the user has no passwd entry, as under docker --user); give an absolute path") from None


def cache_root() -> Path:
    """The user data cache: `$ROBUSTCL_DATA` if set and non-empty, else `~/.cache/robustcl`, else (no home
    directory) `<temp dir>/robustcl-cache-<uid>`, this user's own (fallback_cache)."""
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return user_path(env, CACHE_ENV)
    home = home_dir()
    return home / ".cache" / "robustcl" if home is not None else fallback_cache()


def fallback_cache() -> Path:
    """The data cache of a process without a home: made mode 0700 under the temp dir, and refused when it is a link,
    another user's, or writable by others (a shared /tmp: someone else could plant dataset files there)."""
    root = Path(tempfile.gettempdir()) / f"robustcl-cache-{os.getuid()}"
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DataError(f"no home directory, and no data cache could be made at {root} ({exc.strerror or exc}); "
                        f"set {CACHE_ENV} to a directory of yours") from None
    st = os.lstat(root)
    problem = ("is not a directory" if not stat.S_ISDIR(st.st_mode)
               else "belongs to another user" if st.st_uid != os.getuid()
               else "is writable by other users" if st.st_mode & 0o022 else None)
    if problem:
        raise DataError(f"the data cache {root} (used because this process has no home directory) {problem}; "
                        f"remove it, or set {CACHE_ENV} to a directory of yours")
    return root


def cache_dir(name: str) -> Path:
    """Where dataset `name` lives in (and is downloaded into) the user cache."""
    return cache_root() / name


def file_digest(path: Path, algorithm: str, chunk: int = 1 << 20) -> str:
    """Hex digest of a file ("md5" for the datasets' published sums, "sha256" for checkpoints), read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def url_for(env_var: str, default_base: str, filename: str) -> str:
    """`filename` under the base URL from `env_var` (for mirrors and tests) or `default_base`."""
    base = os.environ.get(env_var, "") or default_base
    return base.rstrip("/") + "/" + filename


def download_file(url: str, dest: Path, md5: str, manual: str) -> Path:
    """`url` into `dest` (`fetch_file`), md5-checked; the errors are one line ending with `manual`."""
    def verify(part: Path) -> None:
        got = file_digest(part, "md5")
        if got != md5:
            raise DataError(f"checksum mismatch for {dest.name}: expected {md5}, got {got}; "
                            "the download is corrupt, retry")

    return fetch_file(url, dest, verify, lambda reason: DataError(f"could not download {url}: {reason}; {manual}"))


def fetch_file(url: str, dest: Path, verify: Callable[[Path], None], failed: Callable[[str], Exception],
               timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """`url` into `dest` through `<dest>.part`, resumed after an interruption (a 2.9 GB CIFAR-10-C tar need not
    start over); `verify(part)` raises for a bad file, which is then deleted; renamed into place when whole and
    checked. One process at a time (`file_lock`): one that waited finds `dest` there. `failed(reason)` is the
    error raised when the download itself fails (the part is kept for the next try)."""
    part = part_path(dest)
    with file_lock(dest):
        if dest.is_file():  # another process finished it while this one waited
            return dest
        try:
            download_resumable(url, part, timeout)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            size = part.stat().st_size if part.is_file() else 0
            kept = f" (the {size} bytes received are kept in {part} and resumed next time)" if size else ""
            raise failed(f"{exc}{kept}") from None
        try:
            verify(part)
        except Exception:
            discard_part(part)
            raise
        os.replace(part, dest)
        discard_part(part)  # its validator
    return dest


def part_path(dest: Path) -> Path:
    """Where `dest` is downloaded before it is whole and checked."""
    return dest.with_name(dest.name + ".part")


def discard_part(part: Path) -> None:
    """A part and the validator of the answer it came from, gone."""
    part.unlink(missing_ok=True)
    part.with_name(part.name + ".validator").unlink(missing_ok=True)


_HELD = threading.local()  # the paths this thread holds a file_lock on (the lock is re-entrant per thread)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """One process at a time downloads or extracts `path` (a sweep's workers may all need the same dataset at
    once); the others wait, then find the work done. A flock on `.<name>.lock` beside `path`, released if the
    process dies, removed when the holder is done (a waiter that wakes on a removed lock takes the new one)."""
    import fcntl

    key = os.path.abspath(path)
    held: set[str] = _HELD.__dict__.setdefault("paths", set())
    if key in held:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # a read descriptor is enough for flock
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break  # the lock file still in place: ours
            except FileNotFoundError:
                pass  # removed by the holder we waited for: take the new one
            os.close(fd)
    except OSError as exc:
        raise DataError(f"cannot lock {lock} to fetch {path.name}: {exc.strerror or exc}; make {path.parent} "
                        "writable, or set ROBUSTCL_DATA to a cache of your own") from None
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        lock.unlink(missing_ok=True)
        os.close(fd)


def download_resumable(url: str, part: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """`url` into `part`, resuming from its current size with an HTTP Range request made conditional (If-Range)
    on the validator (ETag or Last-Modified) of the answer the part came from: a file changed on the server, or
    a server that ignores ranges, sends the whole file, which replaces the part. An answer cut short is an
    OSError and the part stays for the next try."""
    validator = part.with_name(part.name + ".validator")
    start = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    if start and validator.is_file():
        headers["If-Range"] = validator.read_text(encoding="utf-8").strip()
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing past what we hold: the part is whole
            return
        raise
    with response:
        resumed = start > 0 and response.status == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
            discard_part(part)
            raise OSError(f"the server answered another range than bytes {start}- (the part was discarded)")
        if not resumed:
            tag = response.headers.get("ETag")
            mark = tag if tag and not tag.startswith("W/") else response.headers.get("Last-Modified")
            if mark:
                validator.write_text(mark, encoding="utf-8")
            else:
                validator.unlink(missing_ok=True)
        expected = response.headers.get("Content-Length")
        written = 0
        with open(part, "ab" if resumed else "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
                written += len(block)
            out.flush()
            os.fsync(out.fileno())
    if expected is not None and written != int(expected):
        raise OSError(f"the answer was cut short ({written} of {expected} bytes)")


def _check_member(member: tarfile.TarInfo, tar_path: Path) -> None:
    """DataError for tar members that could write outside the target or are not plain files/dirs."""
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or ".." in path.parts or ":" in member.name:
        raise DataError(f"unsafe member {member.name!r} in tarball {tar_path} (absolute path or '..'); "
                        "refusing to extract, delete it and re-download")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"unsafe member {member.name!r} in tarball {tar_path} (link or special file); "
                        "refusing to extract, delete it and re-download")


def safe_extract(tar_path: Path, dest: Path) -> list[Path]:
    """Extract a tarball into `dest` after rejecting unsafe members; top-level entries appear atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, tar_path)
            kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **kwargs)
        tops = sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})
        placed = []
        for top in tops:
            target = dest / top
            if target.parent.resolve() != dest.resolve() or top in ("", ".", "..", "/"):
                # Defence in depth: never replace anything but a direct child of dest (a top of '/'
                # would otherwise make the replacement below delete the filesystem root).
                raise DataError(f"unsafe member {top!r} in tarball {tar_path}; refusing to extract")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(staging / top, target)
            placed.append(target)
        return placed
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"corrupt tarball {tar_path}: {exc}; delete it and re-download") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_tar_members(tar_path: Path, names: list[str]) -> list[bytes]:
    """Bytes of the named regular-file members of a tarball, in order, read without extracting."""
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            found: dict[str, bytes] = {}
            for member in tar:
                name = str(PurePosixPath(member.name))
                if name in names and member.isfile() and name not in found:
                    handle = tar.extractfile(member)
                    found[name] = handle.read() if handle is not None else b""
                    if len(found) == len(set(names)):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"corrupt tarball {tar_path}: {exc}; delete it and re-download") from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"corrupt tarball {tar_path}: missing member(s) {', '.join(missing)}; "
                        "delete it and re-download")
    return [found[n] for n in names]


def memoised(key: tuple[Any, ...], read: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) tensors for `key`, from `read()` -> (uint8 array, int64 array) on the first call;
    the last _MEMO_SIZE keys are kept per process (a file's signature in the key invalidates a changed file)."""
    if key not in _MEMO:
        images, labels = read()
        _MEMO[key] = (_tensor(images, np.uint8), _tensor(labels, np.int64))
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(key)
    return _MEMO[key]


def clear_memo() -> None:
    """Forget arrays memoised by `FileReader.load` in this process."""
    _MEMO.clear()


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    """A contiguous, writable torch tensor sharing `array`'s memory when it already qualifies."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def file_signature(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """Identity of a set of files (path, size, mtime) so the memo notices replaced files."""
    stats = [(str(f), f.stat()) for f in files]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


class FileReader(ABC):
    """A dataset read from files: shared resolution, download, verification and memoised loading."""

    name: str
    dataset_info: DatasetInfo
    system_dirs: tuple[Path, ...] = ()
    apt_package: str | None = None
    defaults: Mapping[str, Any] = {"verify": False}

    @abstractmethod
    def files(self, directory: Path, split: str | None) -> list[Path] | None:
        """Files in `directory` that make up `split` (None: every split), or None if incomplete."""

    @abstractmethod
    def fetch(self, directory: Path) -> None:
        """Download (with md5) into `directory` so that `files(directory, None)` succeeds."""

    @abstractmethod
    def read(self, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Parse `split` from `directory` into uint8 (N, C, H, W) images and int64 labels."""

    @abstractmethod
    def verify(self, directory: Path) -> list[Path]:
        """Check md5s of the dataset files in `directory`; DataError on mismatch; return files checked."""

    @abstractmethod
    def hint(self) -> str:
        """How a user obtains the files, appended to not-found errors."""

    def info(self, **options: Any) -> DatasetInfo:
        """Static dataset facts (options such as `verify` do not change them)."""
        return self.dataset_info

    def locate(self, root: str | os.PathLike[str] | None, download: bool,
               split: str | None = None) -> Path:
        """Directory holding the files for `split`, following the module's resolution order."""
        if root is not None:
            directory = user_path(root, "data.root")
            if self.files(directory, split) is None:
                raise DataError(f"{self.name} not found in root {directory}; put the files there or "
                                f"omit root to search {cache_dir(self.name)} and system locations "
                                "(and download there with download=True)")
            return directory
        places = [cache_dir(self.name), *self.system_dirs]
        for directory in places:
            if self.files(directory, split) is not None:
                return directory
        if download:
            with file_lock(cache_dir(self.name)):  # a sweep's workers: one fetches (downloads, extracts), all read
                if self.files(cache_dir(self.name), split) is None:
                    self.fetch(cache_dir(self.name))
            if self.files(cache_dir(self.name), split) is not None:
                return cache_dir(self.name)
            raise DataError(f"{self.name}: download into {cache_dir(self.name)} finished but the files "
                            "are still incomplete; delete that directory and retry")
        searched = ", ".join(str(p) for p in places)
        raise DataError(f"{self.name} not found in {searched}; {self.hint()}")

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool,
             verify: bool = False) -> ArrayDataset:
        """Resolve, optionally verify, parse (memoised per process) and wrap one split."""
        directory = self.locate(root, download, split)
        if verify:
            self.verify(directory)
        files = self.files(directory, split) or []
        key = (self.name, split, str(directory.resolve()), file_signature(files))
        images_t, labels_t = memoised(key, lambda: self.read(directory, split))
        return ArrayDataset(images_t.clone(), labels_t.clone(), self.dataset_info)


def file_reader(name: str) -> FileReader:
    """The reader for `name` if it is file-backed, else DataError."""
    reader = get_reader(name)
    if not isinstance(reader, FileReader):
        raise DataError(f"dataset {name} is generated in memory and has no files; use one of "
                        f"{', '.join(n for n in DATASETS if n != name)} for file operations")
    return reader


def locate_dataset(name: str, root: str | os.PathLike[str] | None = None,
                   download: bool = False) -> Path:
    """Directory that holds a complete copy of a file-backed dataset (both splits)."""
    return file_reader(name).locate(root, download)


def verify_files(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Check the md5 of every file of a dataset found via the usual resolution; return the files checked."""
    reader = file_reader(name)
    return reader.verify(reader.locate(root, False))
