"""A published checkpoint read strictly into robustcl's Encoder: the layout detected from the keys (or forced),
every tensor of robustcl's network filled exactly once with a matching shape, every tensor of the file used or
dropped by a rule of its layout (robustcl/encoders/layouts.py), anything else a one-line EncoderError before
anything is evaluated."""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from robustcl.data import DatasetInfo
from robustcl.data.files import file_digest
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.finite import check_finite_weights
from robustcl.encoders.layouts import (LAYOUTS, Drop, Layout, assign_copies, detect, resolve_copy,
                                       torchvision_prefix, with_prefix)
from robustcl.export import FORMAT
from robustcl.methods.factory import IMAGENET_MEAN, IMAGENET_STD
from robustcl.models import Encoder, build_backbone
from robustcl.models.torchvision_layout import LayoutError, detect_layout, torchvision_name

# The one class beyond tensors and containers a published layout pickles (the seed paper's `args`).
ALLOWED_CLASSES = {"argparse.Namespace": argparse.Namespace}
PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size)
PROTOCOLS_OF = ("robustcl", "benchmark")
BENCHMARK_LAYOUTS = ("acl", "dynacl", "advcl", "deacl")  # what the RobustSSL benchmark reads (its get_model)


@dataclass(frozen=True)
class Reading:
    """How to read a file: `format` forces a layout, `bn_branch` picks the BN copy (benign, adversarial or an
    index), `stem_padding` the 3x3 stem's padding, `protocol_of` "benchmark" reads it as the RobustSSL benchmark
    does (its branch, normalisation, stem and raw pooled features), `method` names the method for results."""
    format: str | None = None
    bn_branch: str | int | None = None
    stem_padding: int | None = None
    protocol_of: str | None = None
    method: str | None = None


def classes_in(obj: Any, found: set[str] | None = None) -> set[str]:
    """Qualified names of the classes in a loaded checkpoint beyond tensors and plain containers."""
    found = set() if found is None else found
    if isinstance(obj, Mapping):
        for value in obj.values():
            classes_in(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            classes_in(value, found)
    elif not isinstance(obj, PLAIN):
        found.add(f"{type(obj).__module__}.{type(obj).__qualname__}")
        classes_in(getattr(obj, "__dict__", {}), found)
    return found


def load_checkpoint(path: Path) -> tuple[Any, set[str]]:
    """torch.load(weights_only=True) allowing argparse.Namespace and nothing broader; (object, classes in it)."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_CLASSES.values())):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if named:
            raise EncoderError(f"{path}: its pickle holds the class {named.group(1)}, which no published layout needs; "
                               "robustcl reads weights only (torch.load weights_only=True): save the state_dict()") from None
        raise EncoderError(f"{path} is not a torch checkpoint robustcl can read ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types; one line names the file
        raise EncoderError(f"{path} is neither a safetensors file nor a torch checkpoint read by "
                           f"torch.load(weights_only=True) ({type(exc).__name__})") from None
    return obj, classes_in(obj)


def unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state dict, the checkpoint's other top-level entries): its "state_dict" or "model" entry, else the
    top level when it holds tensors."""
    if not isinstance(obj, Mapping):
        raise EncoderError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    key = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
    if key is not None:
        return unwrap(obj[key], path)[0], [str(k) for k in obj if k != key]
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderError(f"{path} holds no state dict (top-level entries: {', '.join(map(str, list(obj)[:6]))})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]


def choose_layout(tensors: Mapping[str, torch.Tensor], forced: str | None, path: Path) -> tuple[Layout, str]:
    """The layout (forced by --format, or detected from the keys) and how it was chosen."""
    known = ", ".join(LAYOUTS)
    if forced is not None:
        if forced not in LAYOUTS:
            raise EncoderError(f"--format {forced}: unknown layout; known: {known}")
        layout = LAYOUTS[forced]
        prefix = torchvision_prefix(tensors) if forced == "torchvision" else None
        return (with_prefix(layout, prefix) if prefix else layout), "--format"
    layout = detect(tensors)
    if layout is None:
        raise EncoderError(f"{path}: no published layout matches its keys (first: {', '.join(list(tensors)[:3])}); "
                           f"known: {known}; force one with --format NAME")
    return layout, "detected from its keys"


def check_wrapper(layout: Layout, fields: Sequence[str], classes: set[str], path: Path, how: str) -> None:
    """A top-level entry or pickled class the layout's training script does not write is an error."""
    stray = [f for f in fields if f not in layout.fields and f not in layout.weights]
    if stray:
        raise EncoderError(f"{path}: read as layout {layout.name} ({how}), its top-level entry {stray[0]!r} is not "
                           f"one that layout's checkpoints hold ({', '.join(layout.fields) or 'none'})")
    extra = sorted(c for c in classes if c not in layout.classes)
    if extra:
        raise EncoderError(f"{path}: its pickle holds the class {extra[0]}, which layout {layout.name} ({how}) "
                           "does not write; robustcl reads weights only")


def map_tensors(layout: Layout, tensors: Mapping[str, torch.Tensor], copies: dict[int, str], dropped_copies: dict[int, str],
                path: Path, how: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[str]]]:
    """(robustcl key -> tensor, robustcl key -> file key, drop rule -> file keys); every file key mapped once."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: dict[str, list[str]] = {}
    unmatched = []
    for key, value in tensors.items():
        target = layout.map(key)
        if isinstance(target, str):
            target = resolve_copy(target, copies, dropped_copies)
        if target is None:
            unmatched.append(key)
        elif isinstance(target, Drop):
            dropped.setdefault(target.rule, []).append(key)
        elif target in mapped:
            raise EncoderError(f"{path}: read as layout {layout.name} ({how}), {origin[target]} and {key} both fill "
                               f"robustcl's {target}")
        else:
            mapped[target], origin[target] = value, key
    if unmatched:
        raise EncoderError(f"{path}: read as layout {layout.name} ({how}), {len(unmatched)} of its keys match no rule "
                           f"of that layout: {', '.join(unmatched[:3])}; nothing was evaluated (a damaged file, or "
                           f"another layout: --format NAME, known: {', '.join(LAYOUTS)})")
    return mapped, origin, dropped


def stem_padding(layout: Layout, reading: Reading, stem: str, path: Path) -> tuple[int, str]:
    """(the 3x3 stem's padding, where it comes from)."""
    if stem == "imagenet":
        if reading.stem_padding not in (None, 3):
            raise EncoderError(f"{path} has a 7x7 ImageNet stem (padding 3); --stem-padding applies to 3x3 stems")
        return 1, "the 7x7 ImageNet stem (padding 3, then a max-pool)"
    if reading.protocol_of == "benchmark":
        return 1, "the RobustSSL benchmark's ResNet (padding 1, whatever the layout)"
    if reading.stem_padding is not None:
        return reading.stem_padding, "--stem-padding"
    if layout.stem_padding != 1:
        return layout.stem_padding, f"layout {layout.name} ({layout.methods[0]}'s code; the weights cannot show it)"
    return 1, f"layout {layout.name} (padding 1" + ("; the weights cannot show it: --stem-padding 2 for DeACL-style "
                                                    "stems)" if layout.name in ("torchvision", "lpaft") else ")")


def normalisation(layout: Layout, mapped: dict[str, torch.Tensor], channels: int, given: tuple[Any, Any],
                  info: DatasetInfo | None, reading: Reading, path: Path) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they come from): the file's normalize.* buffers, none, or --mean/--std (torchvision)."""
    mean, std = given
    buffers = "mean" in mapped or "std" in mapped
    if (mean is not None or std is not None) and layout.normalisation != "given":
        what = "its normalize.* buffers" if buffers else "raw [0, 1] inputs (no normalisation)"
        raise EncoderError(f"{path} (layout {layout.name}) normalises with {what}; drop --mean/--std")
    if reading.protocol_of == "benchmark" and layout.name in ("acl", "dynacl"):
        return IMAGENET_MEAN, IMAGENET_STD, "the RobustSSL benchmark's model (ImageNet statistics)"
    if buffers:
        if "mean" not in mapped or "std" not in mapped:
            raise EncoderError(f"{path}: layout {layout.name} holds normalize.mean and normalize.std; one is missing")
        values = [tuple(float(v) for v in mapped.pop(k).reshape(-1)) for k in ("mean", "std")]
        if any(len(v) != channels for v in values):
            raise EncoderError(f"{path}: normalize.mean/std hold {len(values[0])}/{len(values[1])} values for "
                               f"{channels}-channel images")
        return values[0], values[1], "the file's normalize.* buffers"
    if layout.normalisation == "buffers":
        raise EncoderError(f"{path}: layout {layout.name} keeps its normalisation in normalize.mean/std buffers; the "
                           "file has none (damaged, or another layout: --format NAME)")
    if layout.normalisation == "none":
        return (0.0,) * channels, (1.0,) * channels, f"none: layout {layout.name} takes raw [0, 1] inputs"
    if mean is not None or std is not None:
        if len(mean or ()) != channels or len(std or ()) != channels:
            raise EncoderError(f"{path} takes {channels}-channel images: give {channels} --mean and --std values "
                               f"(got {len(mean or ())} and {len(std or ())})")
        return tuple(mean), tuple(std), "--mean/--std"
    if info is None:
        raise EncoderError(f"{path} (layout {layout.name}) holds no normalisation: give mean and std (or data=NAME "
                           "for a dataset's statistics)")
    return tuple(info.mean), tuple(info.std), f"{info.name}'s channel statistics (the file holds none; --mean/--std)"


def architecture(mapped: Mapping[str, torch.Tensor], layout: Layout, path: Path, how: str) -> dict[str, Any]:
    """arch, stem and input channels, read from the mapped backbone's tensors."""
    names = {torchvision_name(k[len("backbone."):], "benign"): v for k, v in mapped.items() if k.startswith("backbone.")}
    try:
        return detect_layout({k: v for k, v in names.items() if k is not None})
    except LayoutError as exc:
        raise EncoderError(f"{path}: read as layout {layout.name} ({how}): {exc}") from None


def fill(encoder: Encoder, mapped: Mapping[str, torch.Tensor], origin: Mapping[str, str], layout: Layout, arch: str,
         path: Path, how: str) -> None:
    """Every tensor of `encoder` (but its mean/std) from `mapped`, exactly once and of its shape."""
    target = encoder.state_dict()
    where = f"{path}: read as layout {layout.name} ({how})"
    extra = [k for k in mapped if k not in target]
    if extra:
        raise EncoderError(f"{where}, {origin[extra[0]]} has no place in a {arch} ({len(extra)} such keys)")
    missing = [k for k in target if k not in mapped and k not in ("mean", "std")
               and not (layout.optional_counts and k.endswith("num_batches_tracked"))]
    if missing:
        raise EncoderError(f"{where}, robustcl's {missing[0]} has no tensor in the file ({len(missing)} missing: "
                           "a BN copy, a block or a buffer is absent)")
    state = {}
    for key, value in target.items():
        if key in ("mean", "std") or key not in mapped:
            state[key] = value
            continue
        if tuple(mapped[key].shape) != tuple(value.shape):
            raise EncoderError(f"{where}, {origin[key]} has shape {tuple(mapped[key].shape)} but robustcl's {key} "
                               f"needs {tuple(value.shape)}")
        state[key] = mapped[key].to(value.dtype)
    encoder.load_state_dict(state)


def read_state(path: Path, obj: Any, classes: set[str], info: DatasetInfo | None, given: tuple[Any, Any],
               reading: Reading) -> tuple[Encoder, dict[str, Any]]:
    """A loaded checkpoint (or safetensors tensors) as an Encoder and its metadata (see `read_published`)."""
    tensors, fields = unwrap(obj, path)
    layout, how = choose_layout(tensors, reading.format, path)
    check_wrapper(layout, fields, classes, path, how)
    benchmark = reading.protocol_of == "benchmark"
    if benchmark and layout.name not in BENCHMARK_LAYOUTS:
        raise EncoderError(f"{path} is of layout {layout.name}; the RobustSSL benchmark reads only "
                           f"{', '.join(BENCHMARK_LAYOUTS)} files (drop --protocol-of benchmark)")
    if benchmark and reading.bn_branch not in (None, "adversarial", 1, "1"):
        raise EncoderError("--protocol-of benchmark reads BN copy 1 (pgd), as the benchmark does; drop --bn-branch")
    try:
        copies, headline, dropped_copies = assign_copies(layout, reading.bn_branch)
    except ValueError as exc:
        raise EncoderError(f"{path}: {exc}") from None
    mapped, origin, dropped = map_tensors(layout, tensors, copies, dropped_copies, path, how)
    check_finite_weights(((origin[key], value) for key, value in mapped.items()), str(path))
    arch = architecture(mapped, layout, path, how)
    padding, padding_from = stem_padding(layout, reading, arch["stem"], path)
    mean, std, norm_from = normalisation(layout, mapped, arch["in_channels"], given, info, reading, path)
    backbone = build_backbone(arch["arch"], arch["in_channels"], dual_bn=len(copies) > 1, stem=arch["stem"],
                              identity_shortcut=layout.identity_shortcut, stem_padding=padding)
    encoder = Encoder(backbone, mean, std, l2_normalise=not benchmark)
    fill(encoder, mapped, origin, layout, arch["arch"], path, how)
    branches = {branch: {"copy": i, "name": (layout.bn_copies or ("the only one",))[i]} for i, branch in copies.items()}
    source = {"kind": "published", "path": str(path), "layout": layout.name, "layout_title": layout.title,
              "layout_chosen": how, "layout_source": layout.source, "branch": headline, "bn_copies": branches,
              "normalisation": {"mean": list(mean), "std": list(std), "from": norm_from},
              "stem": {"stem": arch["stem"], "padding": padding, "from": padding_from},
              "identity_shortcut": layout.identity_shortcut, "their_features": layout.features,
              "features": "raw pooled (the benchmark's)" if benchmark else "L2-normalised pooled (robustcl's)",
              "protocol_of": "benchmark" if benchmark else "robustcl",
              "dropped": {rule: len(keys) for rule, keys in dropped.items()}, "other_entries": fields}
    meta = {"format": FORMAT, "arch": arch["arch"], "in_channels": arch["in_channels"], "mean": list(mean),
            "std": list(std), "dual_bn": len(copies) > 1, "widths": None, "stem": arch["stem"], "stem_padding": padding,
            "identity_shortcut": layout.identity_shortcut, "features": "raw" if benchmark else "l2",
            "method": reading.method or layout.name, "headline_branch": headline, "source": source}
    return encoder.eval(), meta


def is_robustcl_file(path: Path) -> bool:
    """A safetensors file with robustcl's metadata (for a directory: its encoder.safetensors); a .safetensors
    that cannot be read is a one-line EncoderError."""
    from safetensors import SafetensorError, safe_open

    file = path / "encoder.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(file), framework="pt") as fh:
            return "robustcl" in (fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise EncoderError(f"{file} is not a readable safetensors file ({exc})") from None


def read_published(path: Path, info: DatasetInfo | None, mean: Sequence[float] | None, std: Sequence[float] | None,
                   reading: Reading | None = None) -> tuple[Encoder, dict[str, Any]]:
    """A published checkpoint (a torch file, or a safetensors file without robustcl metadata) as a robustcl
    Encoder (eval mode) and its metadata, whose "source" says how it was read: layout, branch, normalisation,
    stem, dropped keys."""
    reading = reading or Reading()
    if reading.protocol_of not in (None, *PROTOCOLS_OF):
        raise EncoderError(f"--protocol-of {reading.protocol_of}: valid: {', '.join(PROTOCOLS_OF)}")
    if reading.protocol_of == "robustcl":
        reading = replace(reading, protocol_of=None)
    if path.suffix == ".safetensors":  # tensors only: no pickle, no classes
        from safetensors.torch import load_file

        obj, classes = load_file(str(path)), set()
    else:
        obj, classes = load_checkpoint(path)
    encoder, meta = read_state(path, obj, classes, info, (mean, std), reading)
    meta["source"]["sha256"] = file_digest(path, "sha256")
    return encoder, meta


__all__ = ["ALLOWED_CLASSES", "BENCHMARK_LAYOUTS", "PROTOCOLS_OF", "Reading", "is_robustcl_file", "load_checkpoint",
           "read_published"]
