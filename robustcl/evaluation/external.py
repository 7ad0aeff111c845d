"""Bring your own encoder: robustcl's phase 2 (SLF/ALF/AFF), attacks and integrity checks on any encoder.

An encoder is an nn.Module mapping images in [0, 1], shape (N, C, H, W), to features (N, D); it
does its own input normalisation, as robustcl's encoders do. Three ways to give one:
- a robustcl encoder.safetensors (or a run directory): its normalisation and BN branches come with it;
- a torchvision-layout ResNet-18/50 state dict (.pt/.pth/.bin via torch.load(weights_only=True), or a
  .safetensors without robustcl metadata), loaded into robustcl's single-BN ResNet with `mean`/`std`
  (default: the evaluation dataset's channel statistics, what robustcl trains with) in front, and
  L2-normalised features as robustcl's encoders give;
- a module (`evaluate_encoder(module)`) or "package.module:callable" naming one or a zero-argument
  factory of one; its features are used as it returns them.
The results directory is a run directory (config.yaml, heads/, results.json, report.md, metrics.jsonl)
plus encoder.json saying what was evaluated; for the first two kinds it also holds encoder.safetensors,
so `robustcl evaluate --run DIR` can add attacks later without refitting.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustcl.config import Config, ConfigError, dump_yaml, load_config
from robustcl.data import DataError, DatasetInfo, dataset_info
from robustcl.export import FORMAT, read_encoder
from robustcl.models import Encoder
from robustcl.models.torchvision_layout import LayoutError, from_torchvision, resnet_tensors
from robustcl.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text

# The preset whose finetune and eval sections are a dataset's standard protocol (--config overrides it).
PROTOCOL_PRESETS = {"cifar10": "cifar10-gbrcl", "cifar100": "cifar100-gbrcl", "fashion-mnist": "fmnist-gbrcl",
                    "synthetic": "smoke"}
DESCRIPTION = "encoder.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class EncoderError(ConfigError):
    """An encoder robustcl cannot load or use: the message says what and how to fix it."""


class ModuleEncoder(nn.Module):
    """A user's encoder behind robustcl's interface, forward(x, branch) -> features; it has one set of BN
    statistics, so the branch is ignored."""

    dual_bn = False

    def __init__(self, module: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.module, self.feature_dim = module, feature_dim

    def forward(self, x: torch.Tensor, branch: str = "benign") -> torch.Tensor:
        return self.module(x)


def fingerprint(module: nn.Module) -> str:
    """A digest of a module's class and state (names, dtypes, shapes, bytes): what the evaluation saw."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def feature_dim(module: nn.Module, info: DatasetInfo) -> int:
    """D of a module's (N, D) output on a batch of two of the dataset's images (eval mode, no grad)."""
    x = torch.rand(2, info.channels, info.height, info.width, generator=torch.Generator().manual_seed(0))
    module.eval()
    try:
        with torch.no_grad():
            out = module(x.to(next(module.parameters(), x).device))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module, named in one line
        raise EncoderError(f"the encoder failed on a batch of shape {tuple(x.shape)} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); it must take the dataset's images") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"the encoder returned {shape} for a batch of shape {tuple(x.shape)}; it must return "
                           "(N, D) features (flatten or pool inside it)")
    return int(out.shape[1])


def resolve_callable(spec: str) -> nn.Module:
    """The module named by "package.module:attr": a module itself, or what calling it without arguments returns.
    The working directory is importable, as with `python -m`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EncoderError(f"--encoder {spec!r} is neither a file nor module:callable (e.g. mypkg.models:build)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError) as exc:
        raise EncoderError(f"cannot load --encoder {spec}: {exc}") from None
    if not isinstance(found, nn.Module):
        if not callable(found):
            raise EncoderError(f"--encoder {spec} is a {type(found).__name__}, not an nn.Module or a callable returning one")
        found = found()
    if not isinstance(found, nn.Module):
        raise EncoderError(f"--encoder {spec} returned a {type(found).__name__}, not an nn.Module")
    return found


def _torchvision_encoder(path: Path, tensors: Any, info: DatasetInfo, mean: Sequence[float] | None,
                         std: Sequence[float] | None) -> tuple[Encoder, dict[str, Any]]:
    """A torchvision-layout state dict as a single-BN robustcl Encoder with `mean`/`std` in front."""
    try:
        backbone, layout = from_torchvision(resnet_tensors(tensors))
    except LayoutError as exc:
        raise EncoderError(f"{path}: {exc}") from None
    mean = tuple(mean) if mean is not None else tuple(info.mean)
    std = tuple(std) if std is not None else tuple(info.std)
    if len(mean) != layout["in_channels"] or len(std) != layout["in_channels"]:
        raise EncoderError(f"{path} takes {layout['in_channels']}-channel images: give {layout['in_channels']} "
                           f"--mean and --std values (got {len(mean)} and {len(std)})")
    encoder = Encoder(backbone, mean, std).eval()
    meta = {"format": FORMAT, "arch": layout["arch"], "in_channels": layout["in_channels"], "mean": list(mean),
            "std": list(std), "dual_bn": False, "widths": None, "stem": layout["stem"], "method": "external",
            "headline_branch": "benign",
            "source": {"kind": "torchvision-state-dict", "path": str(path), **layout,
                       "normalisation": {"mean": list(mean), "std": list(std)}}}
    return encoder, meta


def _file_encoder(path: Path, info: DatasetInfo, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> tuple[nn.Module, dict[str, Any]]:
    """A robustcl encoder file (or run directory) or a torchvision-layout state dict file."""
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        file = path / "encoder.safetensors" if path.is_dir() else path
        try:
            with safe_open(str(file), framework="pt") as fh:
                robustcl_file = "robustcl" in (fh.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise EncoderError(f"{file} is not a readable safetensors file ({exc})") from None
        if not robustcl_file:
            return _torchvision_encoder(path, load_file(str(file)), info, mean, std)
        if mean is not None or std is not None:
            raise EncoderError(f"{file} is a robustcl encoder and normalises its inputs itself; drop --mean/--std")
        try:
            encoder, meta = read_encoder(file)
        except ValueError as exc:
            raise EncoderError(str(exc)) from None
        return encoder, {**meta, "source": {"kind": "robustcl", "path": str(file), "method": meta["method"],
                                            "trained_on": meta["dataset"]}}
    if path.suffix not in TORCH_SUFFIXES:
        raise EncoderError(f"{path}: give a .safetensors file, a run directory or a torch state dict "
                           f"({', '.join(TORCH_SUFFIXES)})")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; one line names the file
        raise EncoderError(f"{path} does not load with torch.load(weights_only=True) ({type(exc).__name__}); "
                           "save the model's state_dict()") from None
    return _torchvision_encoder(path, tensors, info, mean, std)


def load_external(encoder: nn.Module | str | Path, info: DatasetInfo, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder called as encoder(x, branch), metadata) for a module, a module:callable, or a file."""
    if isinstance(encoder, (str, Path)) and Path(encoder).exists():
        module, meta = _file_encoder(Path(encoder), info, mean, std)
        if meta["in_channels"] != info.channels:
            raise EncoderError(f"{encoder} takes {meta['in_channels']}-channel images but {info.name} has "
                               f"{info.channels}; evaluate on a dataset with as many channels")
        meta["dataset"] = info.name
        meta["fingerprint"] = fingerprint(module)
        return module, meta
    if mean is not None or std is not None:
        raise EncoderError("--mean/--std apply to torchvision-layout state dicts; a module normalises its inputs itself")
    if isinstance(encoder, str):
        spec, user = encoder, resolve_callable(encoder)
    elif isinstance(encoder, nn.Module):
        spec, user = f"{type(encoder).__module__}.{type(encoder).__qualname__}", encoder
    else:
        raise EncoderError(f"{encoder} does not exist (give a file, a run directory or module:callable)")
    user = copy.deepcopy(user)  # eval mode, device and frozen parameters must not change the caller's module
    dim = feature_dim(user, info)
    module = ModuleEncoder(user, dim)
    meta = {"dual_bn": False, "headline_branch": "benign", "method": "external", "dataset": info.name,
            "source": {"kind": "module", "spec": spec, "feature_dim": dim}, "fingerprint": fingerprint(user)}
    return module, meta


def encoder_config(data: str, config: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """The phase-2 and evaluation settings: `config` (default: the dataset's reference preset) on `data`."""
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with

    base = config or PROTOCOL_PRESETS.get(data)
    if base is None:
        raise ConfigError(f"no preset holds the phase-2 and evaluation protocol for {data!r}; pass --config NAME|PATH "
                          f"(its finetune and eval sections are used, e.g. cifar10-gbrcl)")
    return load_config(base, [f"data.name={data}", *overrides])


def data_info(cfg: Config) -> DatasetInfo:
    """Shape, channels and statistics of cfg's dataset (imagefolder reads its files for them)."""
    from robustcl.splits import load_split

    options = {**(vars(cfg.data.synthetic) if cfg.data.name == "synthetic" else {}), **(cfg.data.options or {})}
    try:
        return dataset_info(cfg.data.name, **options)
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


def _prepare(run: RunDir, cfg: Config, overwrite: bool) -> None:
    """Create the results directory; an existing one is replaced only if it is an encoder evaluation and
    `overwrite` is given (a training run is never touched)."""
    if run.root.exists() and any(run.root.iterdir()):
        if not (run.root / DESCRIPTION).is_file():
            raise RunError(f"{run.root} holds something other than an encoder evaluation; choose another --out")
        if not overwrite:
            raise RunError(f"{run.root} already holds an encoder evaluation; pass --overwrite to redo it "
                           "or choose another --out")
    run.prepare(dump_yaml(cfg), resume=False, overwrite=overwrite)


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
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs.loggers import check_loggers
    from robustcl.runs.report import write_report
    from robustcl.train.finetune import finetune

    cfg = encoder_config(data, config, overrides)
    unknown = [p for p in protocols or () if p not in ("slf", "alf", "aff")]
    if unknown:
        raise ConfigError(f"unknown protocol {unknown[0]!r}; valid: slf, alf, aff")
    check_loggers(cfg.train.loggers)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    loaded = load_external(encoder, data_info(cfg), mean, std)  # bad input fails before anything is written
    run = RunDir(out if out is not None else default_out(encoder, data))
    _prepare(run, cfg, overwrite)
    module, meta = loaded
    atomic_write_text(run.root / DESCRIPTION, json.dumps({**meta["source"], "fingerprint": meta["fingerprint"],
                                                          "data": data}, indent=2) + "\n")
    if meta["source"]["kind"] == "robustcl":  # an encoder file here lets `robustcl evaluate --run` reuse the directory
        atomic_write_bytes(run.encoder, Path(meta["source"]["path"]).read_bytes())
    elif isinstance(module, Encoder):
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        stored = {k: v for k, v in meta.items() if k not in ("source", "fingerprint")}
        atomic_write_bytes(run.encoder, save(tensors, metadata={"robustcl": json.dumps(stored)}))
    chosen = tuple(protocols) if protocols else None
    finetune(cfg, run, chosen, progress=progress, overwrite=True, loaded=loaded)
    results = evaluate_run(cfg, run, progress=progress, protocols=chosen, loaded=loaded)
    write_report(run, title=f"{meta['source'].get('path') or meta['source'].get('spec')} on {data}")
    return results


def cmd_evaluate_encoder(args: argparse.Namespace, overrides: list[str]) -> int:
    """`robustcl evaluate --encoder SPEC --data NAME`: print the results table and where they are."""
    from robustcl.runs.report import results_table

    if args.data is None:
        raise ConfigError("--encoder needs --data NAME (the dataset to fit heads on and evaluate, e.g. cifar10)")
    out = Path(args.out) if args.out else default_out(args.encoder, args.data)
    results = evaluate_encoder(args.encoder, args.data, out, config=args.config, overrides=overrides,
                               protocols=args.protocol, mean=args.mean, std=args.std, overwrite=args.overwrite,
                               progress=not args.quiet)
    print(results_table([(out.name, results)]))
    print(f"results: {out / 'results.json'}\nreport: {out / 'report.md'}")
    return 0


__all__ = ["EncoderError", "ModuleEncoder", "PROTOCOL_PRESETS", "encoder_config", "evaluate_encoder", "fingerprint",
           "load_external"]
