"""Reading any encoder into robustcl's interface, encoder(x, branch) -> features: a robustcl file, a
torchvision-layout state dict, a module, or "package.module:callable" (see robustcl/encoders/__init__.py)."""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustcl.config import ConfigError
from robustcl.data import DatasetInfo
from robustcl.export import FORMAT, read_encoder
from robustcl.models import Encoder
from robustcl.models.torchvision_layout import LayoutError, from_torchvision, resnet_tensors

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
