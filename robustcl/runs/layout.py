"""What robustcl writes inside the directories it owns, declared once: a run's files and a sweep directory's.

Each file or folder is a `RunFile` on the directory's class (`RunLayout`, which `RunDir` extends, and
`SweepLayout`): `run.results` is the path, and the class's `FILES` lists every declared entry. Ownership
(an older run holding only robustcl's files), the symbolic-link and device checks, what `--overwrite` clears
and which paths a standalone output (`export --out`, `bench --json`) may never take are all read from
`FILES`; nothing else keeps a list of them.
"""
from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

MARKER = "robustcl-run.json"
LOCK = "robustcl-run.lock"
SWEEP_MARKER = "robustcl-sweep.json"
TRANSFER_PREFIX = "transfer-"  # <run>/transfer-<data>: a run of its own (its marker), inside the source run


class RunFile:
    """A file (or a folder whose every file is robustcl's) at `name` inside an owned directory.

    `cleared`: removed by `--overwrite` (a new run starts without it); config.yaml, the marker and the lock
    are rewritten instead, W&B's offline folder is kept. `library`: a folder a logger library fills (its
    contents are that library's, links included). On the class it is the declaration; on an instance
    (`run.results`) it is the path."""

    def __init__(self, name: str, *, folder: bool = False, cleared: bool = True, library: str | None = None) -> None:
        self.name, self.folder, self.cleared, self.library = name, folder, cleared, library

    def __set_name__(self, owner: type, attr: str) -> None:
        owner.FILES = (*getattr(owner, "FILES", ()), self)  # type: ignore[attr-defined]

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.root / self.name

    @property
    def top(self) -> str:
        """The entry's name at the top of the directory (checkpoints for checkpoints/last.pt)."""
        return PurePath(self.name).parts[0]

    def covers(self, relative: PurePath) -> bool:
        """True when the path `relative` (inside the directory) is this entry or a file inside its folder."""
        parts, own = relative.parts, PurePath(self.name).parts
        return parts == own or (self.folder and parts[:len(own)] == own)

    def __repr__(self) -> str:
        return f"RunFile({self.name!r}{', folder' if self.folder else ''})"


class Layout:
    """A directory robustcl owns: its root and the entries its class declares."""
    FILES: tuple[RunFile, ...] = ()

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def top_names(cls) -> frozenset[str]:
        """Every name robustcl may put at the top of such a directory."""
        return frozenset(f.top for f in cls.FILES)

    @classmethod
    def entry_for(cls, relative: PurePath) -> RunFile | None:
        """The declared entry that `relative` (a path inside the directory) is or lies in, if any."""
        return next((f for f in cls.FILES if f.covers(relative)), None)


class RunLayout(Layout):
    """The files of one run directory (RunDir adds the reading and writing)."""
    FILES: tuple[RunFile, ...] = ()
    config = RunFile("config.yaml", cleared=False)
    metrics = RunFile("metrics.jsonl")
    checkpoint = RunFile("checkpoints/last.pt")
    encoder = RunFile("encoder.safetensors")
    encoder_description = RunFile("encoder.json")  # `evaluate-encoder`: what was evaluated
    heads = RunFile("heads", folder=True)
    results = RunFile("results.json")
    per_image = RunFile("per_image.npz")
    eps_curve = RunFile("eps_curve.csv")
    steps_curve = RunFile("steps_curve.csv")
    eval_state = RunFile("eval_state", folder=True)
    report = RunFile("report.md")
    plots = RunFile("plots", folder=True)
    pretrain_done = RunFile("pretrain.done")
    bound = RunFile("bound.json")
    bound_section = RunFile("bound.md")
    wandb_state = RunFile("wandb-run.json")  # a new W&B run after --overwrite
    wandb = RunFile("wandb", folder=True, cleared=False, library="wandb")  # W&B's offline files stay
    tensorboard = RunFile("tensorboard", folder=True, library="tensorboard")
    marker = RunFile(MARKER, cleared=False)
    lock = RunFile(LOCK, cleared=False)

    def head(self, protocol: str) -> Path:
        return self.heads / f"{protocol}.pt"


class SweepLayout(Layout):
    """The files `robustcl sweep` writes at the top of a sweep directory (each run is a run directory in it)."""
    FILES: tuple[RunFile, ...] = ()
    marker = RunFile(SWEEP_MARKER)
    plan = RunFile("sweep.yaml")
    summary = RunFile("summary.md")
    summary_csv = RunFile("summary.csv")
    stats_csv = RunFile("summary_stats.csv")
    differences_csv = RunFile("summary_differences.csv")
    plot = RunFile("clean_vs_robust.png")
    logs = RunFile("logs", folder=True)
    submitit = RunFile("submitit", folder=True)


__all__ = ["LOCK", "MARKER", "SWEEP_MARKER", "TRANSFER_PREFIX", "Layout", "RunFile", "RunLayout", "SweepLayout"]
