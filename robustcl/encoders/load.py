"""Reading any encoder into robustcl's interface, encoder(x, branch) -> features: a robustcl file, a published
checkpoint of any layout (encoders/published.py), a module, or "package.module:callable" (see
robustcl/encoders/__init__.py)."""
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

from robustcl.data import DatasetInfo
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.published import Reading, read_published
from robustcl.export import read_encoder


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


def _file_encoder(path: Path, info: DatasetInfo, mean: Sequence[float] | None,
                  std: Sequence[float] | None, reading: Reading | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A robustcl encoder file (or run directory), or a published checkpoint of any layout (encoders/published.py)."""
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
            return read_published(path, info, mean, std, reading, load_file(str(file)))
        if mean is not None or std is not None:
            raise EncoderError(f"{file} is a robustcl encoder and normalises its inputs itself; drop --mean/--std")
        try:
            encoder, meta = read_encoder(file)
        except ValueError as exc:
            raise EncoderError(str(exc)) from None
        return encoder, {**meta, "source": {"kind": "robustcl", "path": str(file), "method": meta["method"],
                                            "trained_on": meta["dataset"]}}
    return read_published(path, info, mean, std, reading)  # any name: the layout is read from the keys


def load_external(encoder: nn.Module | str | Path, info: DatasetInfo, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, reading: Reading | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder called as encoder(x, branch), metadata) for a module, a module:callable, or a file (`reading`:
    how to read a published checkpoint)."""
    if isinstance(encoder, (str, Path)) and Path(encoder).exists():
        module, meta = _file_encoder(Path(encoder), info, mean, std, reading)
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
