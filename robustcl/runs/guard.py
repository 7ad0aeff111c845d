"""What keeps a run directory safe to write: writability probed first, an ownership marker, a writer lock,
no symbolic links or devices among its files, run names kept inside the runs directory.

- `probe_writable` fails in one line before any work when a directory cannot be written (read-only
  mount, a regular file in the path, a full file system).
- `MARKER` (robustcl-run.json) is written into every run robustcl makes; `--overwrite` replaces only
  a directory that carries it (or an older run holding nothing but robustcl's own files: the entries
  `robustcl.runs.layout.RunLayout` declares).
- `RunLock` (robustcl-run.lock: pid, host, process start time) is held while a process writes into a
  run, so a second writer (say `--resume` while the run is still training) is refused; the lock of
  a process that died is detected (same host, pid gone or reused) and taken over.
- `claimed` holds a run for a whole sweep task (pretrain to report) without a file: a second sweep sees
  the run as running elsewhere instead of failing on its lock between two phases.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from robustcl.runs.atomic import RunError, atomic_write_text, file_kind
from robustcl.runs.layout import LOCK, MARKER, SWEEP_MARKER, TRANSFER_PREFIX, RunLayout

MARKER_FORMAT = "robustcl.run/1"
MIN_FREE_BYTES = 64 * 1024  # below this the file system is full: not even a config and a log line fit


def probe_writable(path: Path | str, why: str) -> None:
    """RunError unless files can be created in `path` (or, if it does not exist yet, in its nearest existing
    ancestor, where it would be made); leaves nothing behind. `why` says what would be written."""
    path = Path(path)
    target = path
    while not target.exists() and not target.is_symlink() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise RunError(f"cannot write {path}: {target} is a regular file, not a directory; choose another directory "
                       f"(needed for {why})")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".robustcl-probe-", dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise RunError(f"cannot write into {target} ({exc.strerror or exc}), needed for {why}; choose a writable "
                       "directory (or copy the run to one)") from None
    free = shutil.disk_usage(target).free
    if free < MIN_FREE_BYTES:
        raise RunError(f"cannot write into {target}: its file system is full ({free} bytes free), needed for {why}; "
                       "free some space first")


def is_owned(root: Path) -> bool:
    """True when robustcl made this directory: it carries the marker, or (older runs) a config.yaml and
    nothing but robustcl's own entries (`RunLayout`'s, and transfer runs made inside it)."""
    if (root / MARKER).is_file():
        return True
    names = {p.name for p in root.iterdir() if LOCK not in p.name}
    return "config.yaml" in names and all(n in RunLayout.top_names() or n.startswith(TRANSFER_PREFIX) for n in names)


def foreign_entries(root: Path, limit: int = 6) -> str:
    """'a, b, c (and N more)': what a directory holds, for a refusal message."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if LOCK not in p.name)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def refuse_foreign(root: Path) -> None:
    """RunError when `root` holds files but robustcl did not make it a run: it never writes into or --overwrites
    such a directory (naming what it found; a sweep directory is said to be one)."""
    if not root.is_dir() or not any(LOCK not in p.name for p in root.iterdir()) or is_owned(root):
        return
    if (root / SWEEP_MARKER).is_file():
        raise RunError(f"{root} is a sweep directory ({SWEEP_MARKER}), not a run; robustcl will not write a run into "
                       "it or --overwrite it: choose another --out (a sweep's runs are its sub-directories)")
    raise RunError(f"{root} was not made by robustcl (no {MARKER}; it holds {foreign_entries(root)}); robustcl "
                   "will not write into it or --overwrite it: choose another --out")


def write_marker(root: Path) -> None:
    """Mark `root` as a run robustcl made (what --overwrite later checks)."""
    if not (root / MARKER).is_file():
        marker = {"format": MARKER_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}
        atomic_write_text(root / MARKER, json.dumps(marker) + "\n")


def _unsafe(path: Path, folder: bool | None) -> str | None:
    """Why robustcl may not write at `path` inside a run (`folder`: whether a folder belongs there; None: either),
    or None."""
    kind = file_kind(path)
    if kind is None or (kind == "a directory" and folder is not False):
        return None
    if kind == "a directory":
        return f"{path} is a folder where robustcl writes a file; move it away (or remove it)"
    if path.is_symlink():
        return (f"{path} is {kind}; robustcl writes only regular files inside a run: replace it by a regular file or "
                "folder (or remove it)")
    return f"{path} is {kind}, not a regular file; robustcl writes only regular files inside a run: remove it (or move it away)"


def refuse_unsafe_files(root: Path) -> None:
    """RunError when a file or folder robustcl writes inside the run (`RunLayout`'s entries, and the files in its
    folders) is a symbolic link (it would write through it, outside the run) or anything but a regular file or
    folder (a device, a FIFO, a socket)."""
    paths: dict[Path, bool | None] = {}
    for entry in RunLayout.FILES:
        top = root / entry.top
        paths[top] = entry.folder or entry.top != entry.name
        if (entry.top != entry.name or entry.folder and entry.library is None) and top.is_dir() and not top.is_symlink():
            paths.update((path, None) for path in sorted(top.iterdir()))  # a logger library's folder is its own
    for path, folder in paths.items():
        why = _unsafe(path, folder)
        if why:
            raise RunError(why)



def run_dir_for(name: str, runs: Path | str = "runs") -> Path:
    """runs/<name> for a config's name, refusing a name that would put the run outside `runs`."""
    base = Path(runs)
    candidate = base / name
    resolved_base = base.resolve()
    resolved = candidate.resolve()
    if (not name or Path(name).is_absolute() or ".." in Path(name).parts or resolved == resolved_base
            or resolved_base not in resolved.parents):
        raise RunError(f"config name {name!r} would put the run outside {base}/; use a plain name (letters, digits, "
                       "-, _, sub/folders) or pass --out DIR")
    return candidate


# ------------------------------------------------------------------------------------------- lock
def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder_is_gone(holder: dict[str, Any]) -> bool:
    """True when the lock's process is known to be dead: same host, and its pid is gone or now another process."""
    if holder.get("host") != socket.gethostname():
        return False  # another machine: cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    started = _start_time(pid)
    return started is not None and holder.get("start") is not None and started != holder["start"]


class RunLock:
    """The writer lock of one run directory: `acquire` (create=True makes the directory) / `release`, or `with`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK
        self.held = False

    def _payload(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content (None when absent; {} when unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _refusal(self, holder: dict[str, Any]) -> RunError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})" if holder
               else "a process whose lock file cannot be read")
        return RunError(f"{self.root} is being written by {who}; wait for it to finish or stop it, and if it is no "
                        f"longer running, remove {self.path}")

    def check(self) -> None:
        """RunError when another live process holds the lock (a dead holder's lock is not an obstacle)."""
        holder = self.holder()
        if holder is not None and not _holder_is_gone(holder) and not self.held:
            raise self._refusal(holder)

    def acquire(self, create: bool = False) -> None:
        """Take the lock (atomically: a complete lock file is hard-linked into place), taking over a dead holder's."""
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunError(f"cannot create {self.root} ({exc.strerror or exc}); choose a writable --out") from None
        symlink = self.path.is_symlink()
        if symlink:
            raise RunError(f"{self.path} is a symbolic link; remove it (robustcl writes only regular files in a run)")
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", dir=self.root)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self._payload(), fh)
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    holder = self.holder()
                    if holder is None:
                        continue  # released meanwhile
                    if not _holder_is_gone(holder):
                        raise self._refusal(holder) from None
                    self._take_over(holder)
            raise self._refusal(self.holder() or {})
        except OSError as exc:
            raise RunError(f"cannot lock {self.root} ({exc.strerror or exc}); choose a writable directory") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a dead holder's lock: moved aside first and checked, so a live lock taken meanwhile is put back."""
        aside = self.path.with_name(f".{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != stale and moved:  # someone else's fresh lock: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take(lock: RunLock, why: str, create: bool = False) -> None:
    """The steps every writer of a run takes first: its directory probed writable, `lock` acquired, no link, device
    or FIFO among its files (on an error here the lock is released again)."""
    probe_writable(lock.root, why)
    lock.acquire(create=create)
    try:
        refuse_unsafe_files(lock.root)
    except BaseException:
        lock.release()
        raise


@contextlib.contextmanager
def writing(root: Path | str, why: str, create: bool = False) -> Iterator[RunLock]:
    """While the body runs: `root` taken for writing (`take`), its lock released after."""
    lock = RunLock(Path(root))
    take(lock, why, create)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def claimed(root: Path | str) -> Iterator[bool]:
    """Hold `root` (made if absent) for the body with an exclusive advisory lock on the directory itself: yields
    True when this process holds it, False when another live process does (a sweep running the same run).

    The kernel drops the lock when its holder dies, so no stale claim is left; where the file system cannot
    lock a directory (some network mounts), or `root` cannot be made, it yields True and the run's own
    lock (`RunLock`) is the only guard, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield True
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield True  # the run's own checks say why it cannot be written
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            yield exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock
