"""Atomic file writes and the run-directory error: a kill or a full disk never leaves a half-written file.

Every file robustcl writes goes through `atomic_write_bytes`: a temporary file beside the target, made as
`open()` would make it (its mode follows the umask; a replaced file keeps its mode), fsynced, then renamed
over the target. The target must be a regular file or nothing: a symbolic link, a device, a FIFO, a socket
or a directory there is refused in one line (a rename would replace it, and a link would not be followed).
"""
from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any

import torch


class RunError(RuntimeError):
    """A run-directory problem: the message says what and how to fix it."""


WRITE_HINTS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
               errno.EROFS: "the file system is read-only: use a writable directory",
               errno.EACCES: "fix the directory's permissions or use another one"}


def write_failure(path: Path, exc: OSError) -> RunError:
    """A failed write (full disk, read-only mount, permissions) as one line naming the file."""
    hint = WRITE_HINTS.get(exc.errno or 0, "fix the cause")
    return RunError(f"cannot write {path}: {exc.strerror or exc}; the previous {path.name} (if any) is unchanged; "
                    f"{hint}, then run the command again")


KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def file_kind(path: Path | str) -> str | None:
    """What `path` is when it is something other than a regular file ("a character device", "a symbolic link
    (to /dev/stdout)", ...); None for a regular file or nothing at all."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # absent (or an unusable parent: the write itself says why)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    return next((kind for test, kind in KINDS if test(mode)), "not a regular file")


def refuse_irregular(path: Path | str, fix: str = "choose another path (or remove it)") -> None:
    """RunError when `path` exists and is not a regular file: robustcl never writes through or replaces one."""
    kind = file_kind(path)
    if kind is not None:
        raise RunError(f"{path} is {kind}, not a regular file; robustcl writes only regular files and never replaces "
                       f"anything else: {fix}")


def open_append(path: Path, buffering: int = -1) -> IO[str]:
    """`path` opened for appending text, created as open() creates a file: the one way robustcl appends (a log),
    never through a symbolic link and never to a device or FIFO (opened without blocking, then refused)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fix = "replace it by a regular file (or remove it)"
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if file_kind(path) is not None:
            refuse_irregular(path, fix)
        raise write_failure(Path(path), exc) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device opened without blocking: never written to
        os.close(fd)
        refuse_irregular(path, fix)
    return os.fdopen(fd, "a", buffering=buffering, encoding="utf-8")


def _temporary(path: Path) -> tuple[int, Path]:
    """A new temp file beside `path`, created as open() creates a file: mode 0666 less the umask, or the mode of
    the regular file it will replace."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # a replaced file keeps its mode, as with open()
        except FileNotFoundError:
            pass
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path` (a failure is a RunError
    and leaves the previous file as it was); `path` must be a regular file or absent (`refuse_irregular`)."""
    path = Path(path)
    tmp = None
    try:
        refuse_irregular(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failure(path, exc) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_torch_atomic(obj: Any, path: Path) -> None:
    """torch.save to bytes, then an atomic write: a kill never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
