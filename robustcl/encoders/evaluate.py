"""`robustcl evaluate --encoder`: robustcl's phase 2 (SLF/ALF/AFF), attacks and integrity checks on any encoder,
in a results directory of its own (a run directory plus encoder.json saying what was evaluated)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save
from torch import nn

import robustcl.methods  # noqa: F401 - registers the methods configs are built with (pyflakes: used for its effect)
from robustcl.config import Config, ConfigError, dump_yaml, load_config
from robustcl.data import DataError, DatasetInfo, dataset_info
from robustcl.encoders.load import load_external
from robustcl.evaluation.run_eval import evaluate_run
from robustcl.models import Encoder
from robustcl.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text, open_run
from robustcl.runs.guard import RunLock
from robustcl.runtime import open_runtime
from robustcl.runs.report import write_report
from robustcl.splits import load_split
from robustcl.train.finetune import finetune

# The preset whose finetune and eval sections are a dataset's standard protocol (--config overrides it).
PROTOCOL_PRESETS = {"cifar10": "cifar10-gbrcl", "cifar100": "cifar100-gbrcl", "fashion-mnist": "fmnist-gbrcl",
                    "synthetic": "smoke"}


def encoder_config(data: str, config: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The phase-2 and evaluation settings: `config` (default: the dataset's reference preset) on `data`."""
    base = config or PROTOCOL_PRESETS.get(data)
    if base is None:
        raise ConfigError(f"no preset holds the phase-2 and evaluation protocol for {data!r}; pass --config NAME|PATH "
                          f"(its finetune and eval sections are used, e.g. cifar10-gbrcl)")
    return load_config(base, [f"data.name={data}", *overrides])


def data_info(cfg: Config) -> DatasetInfo:
    """Shape, channels and statistics of cfg's dataset (imagefolder reads its files for them)."""
    try:
        return dataset_info(cfg.data.name, **cfg.data.reader_options())
    except DataError:
        return load_split(cfg, "test").info


def default_out(encoder: nn.Module | str | Path, data: str) -> Path:
    """runs/encoders/<encoder name>-<data>."""
    if isinstance(encoder, nn.Module):
        name = type(encoder).__name__.lower()
    else:
        path = Path(encoder)
        name = (path.name if path.is_dir() else path.parent.name if path.stem == "encoder" else path.stem) \
            if path.exists() else str(encoder).replace(":", "-")
    return Path("runs") / "encoders" / f"{name}-{data}"


def refuse_other_contents(run: RunDir, overwrite: bool) -> None:
    """An existing results directory is replaced only if it is an encoder evaluation and `overwrite` is given
    (a training run is never touched)."""
    if run.root.exists() and any(run.root.iterdir()):
        if not run.encoder_description.is_file():
            raise RunError(f"{run.root} holds something other than an encoder evaluation; choose another --out")
        if not overwrite:
            raise RunError(f"{run.root} already holds an encoder evaluation; pass --overwrite to redo it "
                           "or choose another --out")


def write_encoder_files(run: RunDir, module: nn.Module, meta: dict[str, Any], data: str) -> None:
    """encoder.json (what was evaluated) and, for an encoder robustcl can read back, encoder.safetensors."""
    atomic_write_text(run.encoder_description, json.dumps({**meta["source"], "fingerprint": meta["fingerprint"],
                                                          "data": data}, indent=2) + "\n")
    if meta["source"]["kind"] == "robustcl":  # an encoder file here lets `robustcl evaluate --run` reuse the directory
        atomic_write_bytes(run.encoder, Path(meta["source"]["path"]).read_bytes())
    elif isinstance(module, Encoder):
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        stored = {k: v for k, v in meta.items() if k not in ("source", "fingerprint")}
        atomic_write_bytes(run.encoder, save(tensors, metadata={"robustcl": json.dumps(stored)}))


def evaluate_encoder(encoder: nn.Module | str | Path, data: str, out: str | Path | None = None, *,
                     config: str | None = None, overrides: Sequence[str] = (), protocols: Sequence[str] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Fit SLF/ALF/AFF heads on `encoder`, run the attacks and integrity checks on `data`'s test set;
    returns results.json's content (the structure `robustcl evaluate --run` writes, plus "encoder").

    `encoder`: an nn.Module (inputs in [0, 1], returns (N, D) features), "package.module:callable", or a
    file (robustcl encoder.safetensors, torchvision-layout ResNet-18/50 state dict; `mean`/`std` for the
    latter). `config` (a preset or YAML) supplies the finetune and eval settings, `overrides` change them.
    The caller's module is not modified.
    """
    cfg = encoder_config(data, config, overrides)
    unknown = [p for p in protocols or () if p not in ("slf", "alf", "aff")]
    if unknown:
        raise ConfigError(f"unknown protocol {unknown[0]!r}; valid: slf, alf, aff")
    open_runtime(cfg)  # device, threads, logger libraries: before anything is read or written
    loaded = load_external(encoder, data_info(cfg), mean, std)  # bad input fails before anything is written
    run = RunDir(out if out is not None else default_out(encoder, data))
    refuse_other_contents(run, overwrite)
    module, meta = loaded
    lock = RunLock(run.root)
    open_run(run, lock, dump_yaml(cfg), resume=False, overwrite=overwrite, why="the encoder evaluation")
    try:
        write_encoder_files(run, module, meta, data)
    finally:
        lock.release()
    chosen = tuple(protocols) if protocols else None
    finetune(cfg, run, chosen, progress=progress, overwrite=True, loaded=loaded)
    results = evaluate_run(cfg, run, progress=progress, protocols=chosen, loaded=loaded)
    write_report(run, title=f"{meta['source'].get('path') or meta['source'].get('spec')} on {data}")
    return results
