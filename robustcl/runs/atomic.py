"""Atomic file writes and the run-directory error: a kill or a full disk never leaves a half-written file."""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path` (a failure is a RunError
    and leaves the previous file as it was)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
