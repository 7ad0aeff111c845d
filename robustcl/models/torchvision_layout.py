"""torchvision's ResNet state-dict layout <-> robustcl's ResNet: load a plain ResNet-18/50, export one BN branch.

torchvision names: conv1.weight, bn1.{weight, bias, running_mean, running_var, num_batches_tracked},
layer{1..4}.{j}.conv{1,2[,3]}.weight and .bn{1,2[,3]}.*, the shortcut as layer{i}.{j}.downsample.0.weight
(1x1 conv) and downsample.1.* (its BN), and fc.{weight, bias} (the classifier: dropped on load, robustcl
fits its own heads; absent on export). robustcl names the same tensors with one BN per branch
(bn1.<branch>.*) and shortcut_conv / shortcut_bn. conv1's kernel gives the stem: 7x7 is torchvision's
ImageNet stem (stride 2, then a 3x3 stride-2 max-pool), 3x3 robustcl's CIFAR stem (stride 1, no max-pool).
A state dict carries no input normalisation: whoever loads it puts the mean/std in front.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .dual_bn import BRANCHES, Branch, check_branch
from .encoder import build_backbone

CLASSIFIER_PREFIX = "fc."
STEM_BY_KERNEL = {7: "imagenet", 3: "cifar"}
ARCH_BY_LAYOUT = {("basic", (2, 2, 2, 2)): "resnet18", ("bottleneck", (3, 4, 6, 3)): "resnet50"}
OPTIONAL = "num_batches_tracked"  # absent from checkpoints saved before torch 0.4.1; not used in eval mode


class LayoutError(ValueError):
    """A state dict that is not a torchvision-layout ResNet-18/50: the message names the key and the fix."""


def torchvision_name(key: str, branch: Branch) -> str | None:
    """The torchvision name of robustcl backbone key `key` read through `branch` (None: the other branch's BN)."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-2] in BRANCHES:
        if parts[-2] != branch:
            return None
        parts = parts[:-2] + parts[-1:]
    return ".".join(parts).replace("shortcut_conv.", "downsample.0.").replace("shortcut_bn.", "downsample.1.")


def to_torchvision(backbone: nn.Module, branch: Branch | str) -> dict[str, torch.Tensor]:
    """One BN branch of a robustcl ResNet backbone as a torchvision-layout state dict (CPU copies, no fc)."""
    branch = check_branch(branch) if getattr(backbone, "dual_bn", False) else "benign"  # single BN: its only one
    out = {}
    for key, value in backbone.state_dict().items():
        name = torchvision_name(key, branch)
        if name is not None:
            out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """arch (resnet18 | resnet50), stem (from conv1's kernel) and input channels of a torchvision-layout dict."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4 or conv1.shape[0] != 64:
        raise LayoutError(f"no conv1.weight of shape (64, C, k, k) (got {None if conv1 is None else tuple(conv1.shape)}); "
                          "expected a torchvision-layout ResNet-18/50 state dict")
    stem = STEM_BY_KERNEL.get(int(conv1.shape[-1]))
    if stem is None:
        raise LayoutError(f"conv1.weight has a {conv1.shape[-1]}x{conv1.shape[-1]} kernel; robustcl's ResNet stems are "
                          "7x7 (ImageNet) or 3x3 (CIFAR)")
    blocks = []
    for layer in range(1, 5):
        indices = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        if not indices:
            raise LayoutError(f"no layer{layer}.* keys; expected a torchvision-layout ResNet-18/50 state dict")
        blocks.append(max(indices) + 1)
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    arch = ARCH_BY_LAYOUT.get((kind, tuple(blocks)))
    if arch is None:
        raise LayoutError(f"a ResNet of {kind} blocks {tuple(blocks)} is neither ResNet-18 (basic 2,2,2,2) nor "
                          "ResNet-50 (bottleneck 3,4,6,3)")
    return {"arch": arch, "stem": stem, "in_channels": int(conv1.shape[1])}


def from_torchvision(state: Mapping[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """A single-BN robustcl ResNet backbone (eval mode) holding a torchvision-layout state dict, and its layout."""
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    layout = detect_layout(state)
    backbone = build_backbone(layout["arch"], layout["in_channels"], dual_bn=False, stem=layout["stem"])
    target = backbone.state_dict()
    names = {torchvision_name(k, "benign"): k for k in target}
    unexpected = [k for k in state if k not in names]
    missing = [n for n in names if n not in state and not n.endswith(OPTIONAL)]
    if unexpected or missing:
        what = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        raise LayoutError(f"not a torchvision-layout {layout['arch']} state dict: {what} "
                          f"({len(unexpected)} unexpected, {len(missing)} missing)")
    mapped = {}
    for name, key in names.items():
        if name not in state:  # an absent num_batches_tracked keeps its initial 0
            mapped[key] = target[key]
            continue
        if tuple(state[name].shape) != tuple(target[key].shape):
            raise LayoutError(f"{name} has shape {tuple(state[name].shape)}, a {layout['arch']} needs "
                              f"{tuple(target[key].shape)}")
        mapped[key] = state[name].to(target[key].dtype)
    backbone.load_state_dict(mapped)
    return backbone.eval(), layout


def resnet_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The ResNet tensors of a loaded checkpoint: a plain state dict or one under "state_dict" / "model",
    whose names may carry one prefix before conv1.weight (e.g. "module.", "backbone."); keys outside it are left out."""
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping):
        raise LayoutError(f"the file holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stem_key = "conv1.weight"
    prefixes = {k[: -len(stem_key)] for k in tensors
                if k.endswith(stem_key) and f"{k[: -len(stem_key)]}layer1.0.conv1.weight" in tensors}
    if len(prefixes) != 1:
        found = "no" if not prefixes else f"{len(prefixes)} ({', '.join(sorted(repr(p) for p in prefixes))})"
        raise LayoutError(f"found {found} ResNet with conv1.weight and layer1.0.conv1.weight in the file; "
                          "expected one torchvision-layout ResNet-18/50 state dict")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


__all__ = ["LayoutError", "detect_layout", "from_torchvision", "resnet_tensors", "to_torchvision", "torchvision_name"]
