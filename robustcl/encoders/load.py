"""Reading any encoder into robustcl's interface, encoder(x, branch) -> features: a robustcl file, a published
checkpoint of any layout (encoders/published.py), a module, or "package.module:callable" (see
robustcl/encoders/__init__.py)."""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustcl.data import DatasetInfo
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.finite import check_finite_features, check_finite_weights
from robustcl.encoders.published import Reading, is_robustcl_file, read_published
from robustcl.export import fingerprint, read_encoder


class ModuleEncoder(nn.Module):
    """A user's encoder behind robustcl's interface, forward(x, branch) -> features; it has one set of BN
    statistics, so the branch is ignored."""

    dual_bn = False

    def __init__(self, module: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.module, self.feature_dim = module, feature_dim

    def forward(self, x: torch.Tensor, branch: str = "benign") -> torch.Tensor:
        return self.module(x)


def _probe(info: DatasetInfo) -> torch.Tensor:
    """The batch an encoder is first tried on: two random images of the dataset's shape, in [0, 1]."""
    return torch.rand(2, info.channels, info.height, info.width, generator=torch.Generator().manual_seed(0))


def first_line(exc: BaseException) -> str:
    """'ExceptionType: the first line of its message' (the type alone for an empty message)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def feature_dim(module: nn.Module, info: DatasetInfo, where: str = "the encoder") -> int:
    """D of a module's (N, D) output on a batch of two of the dataset's images (eval mode, no grad), which must
    be finite."""
    x = _probe(info)
    module.eval()
    try:
        with torch.no_grad():
            out = module(x.to(next(module.parameters(), x).device))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure of the user's module, named in one line
        raise EncoderError(f"{where} failed on a batch of shape {tuple(x.shape)} ({first_line(exc)}); it must "
                           "take the dataset's images") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EncoderError(f"{where} returned {shape} for a batch of shape {tuple(x.shape)}; it must return "
                           "(N, D) features (flatten or pool inside it)")
    check_finite_features(out, where)
    return int(out.shape[1])


# ------------------------------------------------------------------------------------- your code
# What "package.module:attr" may name, and when robustcl calls it (docs/evaluating-your-encoder.md):
# - an nn.Module instance: used as it is;
# - an nn.Module subclass, or a Python function (a `def`, a bound method, a functools.partial of one): called
#   with no arguments, only after inspect.signature shows no required parameter, and (a function) only when
#   its return annotation, if it has one, is an nn.Module class; what it returns must be an nn.Module.
# Anything else (a builtin such as os.system or sys.exit, a class that is not a module, another callable object)
# is refused without being called. Whatever the user's code raises on import, on attribute access or in the
# call (SystemExit included) is a one-line EncoderError naming the code and the exception.
def _user_error(spec: str, doing: str, exc: BaseException) -> EncoderError:
    return EncoderError(f"your encoder {spec} raised {doing}: {first_line(exc)}")


def _import_attr(spec: str, module_name: str, attr: str) -> Any:
    """The object named by "module_name:attr", the user's code run by importing it."""
    try:
        found: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(f"{exc.name}.")):
            raise EncoderError(f"your encoder {spec}: no module named {exc.name} (the working directory and the "
                               "Python path are searched)") from None
        raise _user_error(spec, f"while importing {module_name}", exc) from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - whatever the user's module does on import
        raise _user_error(spec, f"while importing {module_name}", exc) from None
    path = module_name
    for part in attr.split("."):
        owner = f"module {path}" if path == module_name else path
        try:
            found = getattr(found, part)
        except AttributeError:
            raise EncoderError(f"your encoder {spec}: {owner} has no attribute {part}") from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a property or module __getattr__ of the user's
            raise _user_error(spec, f"while reading {part} of {owner}", exc) from None
        path = f"{path}.{part}"
    return found


def _declared_return(found: Any) -> Any:
    """A function's return annotation, evaluated (Signature.empty when absent or when it does not evaluate)."""
    try:
        return inspect.signature(found, eval_str=True).return_annotation
    except (Exception, SystemExit):  # noqa: BLE001 - an annotation naming something undefined: unknown
        return inspect.Signature.empty


def check_callable(spec: str, found: Any, where: str) -> None:
    """EncoderError unless `found` may be called to build the encoder (the rule above); calls nothing."""
    refuse = "robustcl does not call it: give an nn.Module, an nn.Module subclass or a Python function that returns one"
    if not callable(found):
        raise EncoderError(f"your encoder {spec} is a {type(found).__name__}, not an nn.Module or a function that builds one")
    if isinstance(found, type) and not issubclass(found, nn.Module):
        raise EncoderError(f"your encoder {spec} is a class that is not an nn.Module ({where}); {refuse}")
    try:
        parameters = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):
        raise EncoderError(f"your encoder {spec} ({where}) does not show its parameters; {refuse}") from None
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise EncoderError(f"your encoder {spec} needs {'an argument' if len(required) == 1 else 'arguments'} "
                           f"({', '.join(required)}); robustcl calls it with none: "
                           "give a function without required parameters (def build(): return ...)")
    if isinstance(found, type):
        return
    function = found.func if isinstance(found, functools.partial) else getattr(found, "__func__", found)
    if not inspect.isfunction(function):
        kind = "a builtin function" if inspect.isbuiltin(found) else f"a {type(found).__name__}"
        raise EncoderError(f"your encoder {spec} is {kind} ({where}), not an nn.Module, an nn.Module subclass or a "
                           "Python function that builds one; robustcl does not call it")
    returns = _declared_return(found)
    if returns is not inspect.Signature.empty and (returns is None or (isinstance(returns, type)
                                                                      and not issubclass(returns, nn.Module))):
        raise EncoderError(f"your encoder {spec} is annotated to return {getattr(returns, '__name__', returns)}, not an "
                           "nn.Module; robustcl does not call it")


def resolve_callable(spec: str) -> nn.Module:
    """The module named by "package.module:attr": a module itself, or what calling it without arguments returns,
    under the rule above. The working directory is importable, as with `python -m`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise EncoderError(f"--encoder {spec!r} is neither a file nor module:callable (e.g. mypkg.models:build)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    found = _import_attr(spec, module_name, attr)
    if isinstance(found, nn.Module):
        return found
    where = f"{module_name}.{attr}"
    check_callable(spec, found, where)
    try:
        built = found()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - whatever the user's factory does
        raise _user_error(spec, f"when robustcl called {where}()", exc) from None
    if not isinstance(built, nn.Module):
        raise EncoderError(f"your encoder {spec} returned a {type(built).__name__}, not an nn.Module")
    return built


def _file_encoder(path: Path, info: DatasetInfo, mean: Sequence[float] | None,
                  std: Sequence[float] | None, reading: Reading | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A robustcl encoder file (or run directory), or a published checkpoint of any layout (encoders/published.py)."""
    file = path / "encoder.safetensors" if path.is_dir() else path
    if not is_robustcl_file(file):
        return read_published(file, info, mean, std, reading)  # any name: the layout is read from the keys
    if mean is not None or std is not None:
        raise EncoderError(f"{file} is a robustcl encoder and normalises its inputs itself; drop --mean/--std")
    try:
        encoder, meta = read_encoder(file)
    except ValueError as exc:
        raise EncoderError(str(exc)) from None
    return encoder, {**meta, "source": {"kind": "robustcl", "path": str(file), "method": meta["method"],
                                        "trained_on": meta["dataset"]}}


def _checked_file_encoder(path: Path, info: DatasetInfo, mean: Sequence[float] | None, std: Sequence[float] | None,
                          reading: Reading | None) -> tuple[nn.Module, dict[str, Any]]:
    """A file encoder that takes the dataset's images, with finite weights and finite features on a first batch."""
    module, meta = _file_encoder(path, info, mean, std, reading)
    if meta["in_channels"] != info.channels:
        raise EncoderError(f"{path} takes {meta['in_channels']}-channel images but {info.name} has "
                           f"{info.channels}; evaluate on a dataset with as many channels")
    check_finite_weights(module.state_dict().items(), str(path))
    module.eval()
    with torch.no_grad():
        for branch in ("benign", "adversarial") if meta.get("dual_bn") else ("benign",):
            check_finite_features(module(_probe(info), branch), str(path))
    return module, meta


def _user_module(encoder: nn.Module | str) -> tuple[str, nn.Module]:
    """(spec, a copy of the user's module) for a module or "package.module:callable"."""
    if isinstance(encoder, str):
        spec, user = encoder, resolve_callable(encoder)
    elif isinstance(encoder, nn.Module):
        spec, user = f"{type(encoder).__module__}.{type(encoder).__qualname__}", encoder
    else:
        raise EncoderError(f"{encoder} does not exist (give a file, a run directory or module:callable)")
    try:
        user = copy.deepcopy(user)  # eval mode, device and frozen parameters must not change the caller's module
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a module that cannot be copied (its own __deepcopy__)
        raise _user_error(spec, "when robustcl copied it (copy.deepcopy)", exc) from None
    return spec, user


def load_external(encoder: nn.Module | str | Path, info: DatasetInfo, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, reading: Reading | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder called as encoder(x, branch), metadata) for a module, a module:callable, or a file (`reading`:
    how to read a published checkpoint).

    Non-finite weights, or non-finite features on a first batch, are an EncoderError naming the file or code
    and the first non-finite tensor, for every kind of encoder."""
    if isinstance(encoder, (str, Path)) and Path(encoder).exists():
        module, meta = _checked_file_encoder(Path(encoder), info, mean, std, reading)
        meta["dataset"] = info.name
        meta["fingerprint"] = fingerprint(module)
        return module, meta
    if mean is not None or std is not None:
        raise EncoderError("--mean/--std apply to torchvision-layout state dicts; a module normalises its inputs itself")
    spec, user = _user_module(encoder)
    where = f"your encoder {spec}"
    check_finite_weights(user.state_dict().items(), where)
    dim = feature_dim(user, info, where)
    module = ModuleEncoder(user, dim)
    meta = {"dual_bn": False, "headline_branch": "benign", "method": "external", "dataset": info.name,
            "source": {"kind": "module", "spec": spec, "feature_dim": dim}, "fingerprint": fingerprint(user)}
    return module, meta
