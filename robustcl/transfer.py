"""`robustcl transfer`: phase 2 and evaluation of a trained encoder on another dataset (e.g. CIFAR-10 -> STL-10).

The encoder is copied unchanged (its own normalisation inside) into a new run directory whose
config is the source run's with the data section replaced; SLF/ALF/AFF then run there as usual,
so the source run's heads and results are never touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # imported when the command runs: `robustcl --help` imports no yaml or torch
    from robustcl.config import Config
    from robustcl.runs import RunDir


def transfer_config(source: Path, dataset: str, size: int | None, root: str | None, val_size: int,
                    overrides: list[str]) -> Config:
    """The source run's config with data.* replaced by the target dataset (and any further overrides)."""
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with
    from robustcl.config import load_config

    if not (source / "config.yaml").is_file():
        raise FileNotFoundError(f"{source} is not a robustcl run (no config.yaml); pass the --out of a pretrain run")
    options = f"data.options={{size: {size}}}" if size is not None else "data.options=null"
    data = [f"data.name={dataset}", options, f"data.val_size={val_size}", "data.train_limit=null",
            f"data.root={root if root is not None else 'null'}"]
    return load_config(str(source / "config.yaml"), [*data, *overrides])


def transfer_run(source_dir: Path | str, dataset: str, size: int | None = None, root: str | None = None,
                 val_size: int = 500, overrides: Sequence[str] = (), out: Path | str | None = None,
                 protocols: tuple[str, ...] | None = None, overwrite: bool = False,
                 progress: bool = True) -> tuple[RunDir, dict[str, Any]]:
    """Copy the source run's encoder into a new run for `dataset`, fine-tune and evaluate there, write
    the report; returns (the new run, its results.json content). Bad target data fails before any write."""
    from robustcl.config import dump_yaml
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.export import read_encoder
    from robustcl.runs import RunDir, RunError, atomic_write_bytes, open_run
    from robustcl.runs.guard import RunLock
    from robustcl.runs.report import write_report
    from robustcl.splits import load_split
    from robustcl.train.finetune import finetune

    source = RunDir(source_dir)
    if not source.encoder.is_file():
        raise RunError(f"{source.root} has no encoder.safetensors; finish `robustcl pretrain` first")
    cfg = transfer_config(source.root, dataset, size, root, val_size, list(overrides))
    target = RunDir(out or source.root / (f"transfer-{dataset}" + (f"-{size}px" if size else "")))
    for split in ("train", "test"):  # bad or missing target data fails before anything is written
        target_info = load_split(cfg, split).info
    _, meta = read_encoder(source.encoder)
    if meta["in_channels"] != target_info.channels:
        raise RunError(f"the encoder of {source.root} takes {meta['in_channels']}-channel images but {dataset} has "
                       f"{target_info.channels}; transfer between datasets with the same number of channels")
    lock = RunLock(target.root)
    open_run(target, lock, dump_yaml(cfg), resume=False, overwrite=overwrite, why="the transfer run")
    try:
        atomic_write_bytes(target.encoder, source.encoder.read_bytes())
    finally:
        lock.release()
    finetune(cfg, target, protocols, progress=progress, overwrite=True)
    results = evaluate_run(cfg, target, progress=progress)
    write_report(target, title=f"{source.root.name} -> {dataset}")
    return target, results


__all__ = ["transfer_config", "transfer_run"]
