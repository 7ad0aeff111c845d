"""The output-file policy every robustcl writer follows (docs/reliability.md, "Output files").

A command replaces only its own files, in a directory it owns: a run (robustcl-run.json; opened through
`runs.open_run`, or `runs.guard.writing` for a command that writes into an existing run) or a sweep
directory of the same spec (robustcl-sweep.json, `claim_sweep_dir`). It refuses, in one line naming the path:

- anything but a regular file where it writes: a device, a FIFO, a socket, a symbolic link, a folder
  (`atomic.refuse_irregular`, checked by every write), even with --overwrite;
- another run's or another command's files: a standalone output (`export --out FILE`, `bench --json PATH`,
  `claim_output_file`) never takes a path a run or a sweep directory declares (`layout`), even with
  --overwrite, nor the file the command reads;
- an existing file it was not asked to replace: a standalone output needs --overwrite; a sweep directory of
  another spec needs --overwrite; a file in a directory robustcl did not make (no marker) is never replaced.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from robustcl.runs.atomic import RunError, atomic_write_text, refuse_irregular
from robustcl.runs.guard import is_owned
from robustcl.runs.layout import MARKER, SWEEP_MARKER, Layout, RunFile, RunLayout, SweepLayout

SWEEP_FORMAT = "robustcl.sweep/1"
OWNER_DEPTH = 3  # a declared path is at most this deep below its directory (checkpoints/last.pt, submitit/x/y)


# ------------------------------------------------------------------------------------ standalone files
def _layout_of(root: Path) -> tuple[type[Layout], str] | None:
    """The layout of a directory robustcl owns (a run, an older run, a sweep directory), with its kind."""
    if (root / MARKER).is_file() or ((root / "config.yaml").is_file() and is_owned(root)):
        return RunLayout, "run"
    if (root / SWEEP_MARKER).is_file():
        return SweepLayout, "sweep directory"
    return None


def owner_of(path: Path | str) -> tuple[Path, str, RunFile] | None:
    """(directory, its kind, the entry) when `path` is a file a run or a sweep directory declares as its own
    (`RunLayout`, `SweepLayout`); None for any other path. Folders on the way are resolved (links, ..)."""
    path = Path(path)
    target = path.parent.resolve() / path.name
    for root in list(target.parents)[:OWNER_DEPTH]:
        found = _layout_of(root) if root.is_dir() else None
        if found is not None:
            layout, kind = found
            entry = layout.entry_for(target.relative_to(root))
            return None if entry is None else (root, kind, entry)
    return None


def claim_output_file(path: Path | str, overwrite: bool, option: str = "--out", inputs: Iterable[Path | str] = ()) -> Path:
    """Check, before any work, that a standalone output file may be written at `path`: not a device, FIFO, socket,
    link or folder; not a file of a run or a sweep directory nor one of `inputs` (both even with --overwrite);
    not an existing file unless `overwrite`. Returns the path; a refusal is a one-line RunError naming it."""
    path = Path(path)
    refuse_irregular(path, f"choose another {option}" + (" (- writes to stdout)" if option == "--json" else ""))
    target = path.parent.resolve() / path.name
    owner = owner_of(path)
    if owner is not None:
        root, kind, entry = owner
        raise RunError(f"{path} is a file of the {kind} {root} ({entry.name}); robustcl never writes another "
                       f"command's output over it, --overwrite or not: choose another {option}")
    if any(Path(source).resolve() == target for source in inputs):
        raise RunError(f"{path} is the file this command reads; robustcl never writes over its input: choose another "
                       f"{option}")
    if path.exists() and not overwrite:
        raise RunError(f"{path} already exists; pass --overwrite to replace it, or choose another {option}")
    return path


# ------------------------------------------------------------------------------------ sweep directories
def _read_sweep_marker(root: Path) -> dict[str, Any] | None:
    """The sweep directory's marker; for a sweep made before the marker, what its sweep.yaml names (legacy);
    None when `root` is no sweep robustcl made."""
    marker = root / SWEEP_MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{marker} is not readable ({exc}); remove it if {root} is a sweep of this spec, "
                           "or choose another --out") from None
        if isinstance(data, dict) and data.get("format") == SWEEP_FORMAT:
            return data
        raise RunError(f"{marker} is not a robustcl sweep marker; remove it if {root} is a sweep of this spec, or "
                       "choose another --out")
    try:
        plan = yaml.safe_load(SweepLayout(root).plan.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if isinstance(plan, dict) and isinstance(plan.get("name"), str) and isinstance(plan.get("runs"), list):
        return {"name": plan["name"], "spec": plan.get("spec"), "legacy": True}
    return None


def same_sweep(found: dict[str, Any], identity: dict[str, Any]) -> bool:
    """One sweep: the same name, and the same spec file (edited or not) or the same content (a copy elsewhere);
    a sweep made before the marker is known by its name only."""
    return found.get("name") == identity["name"] and bool(
        found.get("legacy") or found.get("spec") == identity["spec"] or found.get("fingerprint") == identity["fingerprint"])


def _refusal(root: Path, found: dict[str, Any] | None, identity: dict[str, Any], overwrite: bool) -> str | None:
    """Why `root` may not become (or stay) this spec's sweep directory, or None."""
    if found is None:
        theirs = [root / f.name for f in SweepLayout.FILES if not f.folder and os.path.lexists(root / f.name)]
        if theirs:
            return (f"{theirs[0]} was not written by robustcl ({root} has no {SWEEP_MARKER}: not a sweep robustcl made); "
                    "robustcl never replaces it, --overwrite or not: move it away or choose another --out")
        return None
    if not same_sweep(found, identity) and not overwrite:
        return (f"{root} holds sweep {found.get('name')!r} (spec {found.get('spec')}), not {identity['name']!r} (spec "
                f"{identity['spec']}); choose another --out, or pass --overwrite to make it {identity['name']!r}'s (its "
                "summary files are replaced, and every run is redone)")
    return None


def claim_sweep_dir(root: Path | str, identity: dict[str, Any], overwrite: bool) -> None:
    """Make `root` this spec's sweep directory before anything is written in it (`identity`: name, spec,
    fingerprint; robustcl/sweep/plan.py `sweep_identity`): its marker written or kept, or a one-line RunError."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunError(f"{root} is {'a regular file' if root.is_file() else 'not a folder'}, not a sweep directory; "
                       "choose another --out")
    if root.is_dir() and _layout_of(root) == (RunLayout, "run"):
        raise RunError(f"{root} is a robustcl run, not a sweep directory; choose another --out")
    for _ in range(3):
        found = _read_sweep_marker(root) if root.is_dir() else None
        refusal = _refusal(root, found, identity, overwrite)
        if refusal:
            raise RunError(refusal)
        if found is not None and not found.get("legacy") and all(found.get(k) == v for k, v in identity.items()):
            return  # already this spec's, as it is now
        marker = {"format": SWEEP_FORMAT, **identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "host": socket.gethostname()}
        text = json.dumps(marker, indent=2) + "\n"
        if found is not None:  # this spec's (edited, copied elsewhere, made before the marker) or --overwrite
            atomic_write_text(SweepLayout(root).marker, text)
            return
        if _create(SweepLayout(root).marker, text):  # a new sweep directory, unless another sweep claimed it meanwhile
            return
    raise RunError(f"{root}'s {SWEEP_MARKER} keeps changing (another sweep claiming it?); run the command again")


def _create(path: Path, text: str) -> bool:
    """Write `path` only if it does not exist (atomically: a complete file is hard-linked into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_text(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["SWEEP_FORMAT", "claim_output_file", "claim_sweep_dir", "owner_of", "same_sweep"]
