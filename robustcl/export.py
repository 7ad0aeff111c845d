"""Trained encoders as safetensors files, and `load_encoder` for downstream use."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from robustcl.models import BRANCHES, Branch, Encoder, build_encoder, reported_branch
from robustcl.runs import atomic_write_bytes, save_torch_atomic

FORMAT = "robustcl.encoder/1"


class FixedBranchEncoder(nn.Module):
    """An encoder whose BN branch is fixed at construction: forward(x) -> L2-normalised features."""

    def __init__(self, encoder: Encoder, branch: Branch) -> None:
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        self.encoder, self.branch = encoder, branch
        self.feature_dim = encoder.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.branch)


Normalisation = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std)


def encoder_metadata(encoder: Encoder, info: Any, cfg: Any, headline_branch: Branch,
                     normalisation: Normalisation) -> dict[str, Any]:
    """What is needed to rebuild the encoder without the config: arch, channels, the (mean, std) `normalisation`
    it was built with, the resolved ResNet stem (None for convnet) and whether its blocks have identity shortcuts;
    and what reading it needs: the method's `headline_branch`.

    The caller knows the last two (`robustcl.methods.factory.encoder_export_fields`: the dataset's statistics
    or ImageNet's under reference.imagenet_normalisation, and the method class's headline branch).
    """
    model = cfg.model
    mean, std = normalisation
    return {"format": FORMAT, "arch": model.arch, "in_channels": info.channels, "mean": list(mean),
            "std": list(std), "dual_bn": encoder.dual_bn,
            "widths": list(model.widths) if model.arch == "convnet" else None,
            "stem": getattr(encoder.backbone, "stem", None),
            "identity_shortcut": getattr(encoder.backbone, "identity_shortcut", None),
            "method": cfg.method.name, "headline_branch": headline_branch,
            "dataset": info.name}


def resolve_branch(requested: str, meta: dict[str, Any]) -> Branch:
    """The branch an exported encoder is read through for `requested` (headline | benign | adversarial):
    headline -> the method's reporting branch recorded in `meta`; a single-BN encoder only has benign."""
    return reported_branch(requested, meta["headline_branch"], meta["dual_bn"])


def export_encoder(encoder: Encoder, path: Path, info: Any, cfg: Any, *, headline_branch: Branch,
                   normalisation: Normalisation) -> None:
    """Write the encoder's weights and rebuild metadata (`encoder_metadata`) to a safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"robustcl": json.dumps(encoder_metadata(encoder, info, cfg, headline_branch, normalisation))}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


ENCODER_KEYS = ("format", "arch", "in_channels", "mean", "std", "dual_bn", "method", "headline_branch")


def encoder_fix(path: Path) -> str:
    return (f"delete it and run `robustcl pretrain --resume --out {path.parent}` to export it again from "
            "checkpoints/last.pt")


def read_encoder(path: Path | str) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an Encoder from a safetensors file (or a run directory holding encoder.safetensors).

    Any damaged, foreign or mismatched file is a one-line RunFileError (also a ValueError) naming it.
    """
    from robustcl.runs.loaders import RunFileError, first_line, load_state_into

    path = Path(path)
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no encoder at {path}; pass a run directory or an encoder.safetensors file")
    if path.stat().st_size == 0:
        raise RunFileError(f"{path} is empty (0 bytes: cut short by a kill or a full disk?); {encoder_fix(path)}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("robustcl", "{}"))
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, bad JSON, I/O: any foreign or damaged file
        raise RunFileError(f"{path} is not a readable robustcl encoder file (not safetensors, or damaged: "
                           f"{first_line(exc)}); {encoder_fix(path)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in ENCODER_KEYS):
        raise RunFileError(f"{path} lacks robustcl encoder metadata; was it written by robustcl? {encoder_fix(path)}")
    # files written before the stem option have no "stem": their ResNet-18 had the CIFAR stem
    try:
        kwargs: dict[str, Any] = ({"widths": tuple(meta["widths"])} if meta["arch"] == "convnet"
                                  else {"stem": meta.get("stem") or "cifar"})
        if meta.get("identity_shortcut") is False:  # the authors' blocks (reference.projection_only_shortcut)
            kwargs["identity_shortcut"] = False
        if meta.get("stem_padding", 1) != 1:  # a published layout's stem (DeACL: 2), kept by its evaluation directory
            kwargs["stem_padding"] = int(meta["stem_padding"])
        encoder = build_encoder(meta["arch"], meta["in_channels"], tuple(meta["mean"]), tuple(meta["std"]),
                                dual_bn=meta["dual_bn"], l2_normalise=meta.get("features", "l2") != "raw", **kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise RunFileError(f"{path} has encoder metadata robustcl cannot build ({exc}); {encoder_fix(path)}") from None
    load_state_into(encoder, tensors, path, encoder_fix(path))
    return encoder.eval(), meta


def fingerprint(module: nn.Module) -> str:
    """A digest of a module's class and state (names, dtypes, shapes, bytes): what the evaluation saw."""
    digest = hashlib.sha1(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_encoder_fits(meta: dict[str, Any], cfg: Any, path: Path | str) -> None:
    """RunFileError when an encoder file is not of the run's config (another architecture, widths, stem or
    method): heads fitted on it would silently describe another model."""
    from robustcl.runs.loaders import RunFileError

    model = cfg.model
    wanted = [("model.arch", meta["arch"], model.arch), ("method.name", meta["method"], cfg.method.name)]
    if model.arch == "convnet":
        wanted.append(("model.widths", list(meta.get("widths") or []), list(model.widths)))
    elif model.stem in ("cifar", "imagenet"):
        wanted.append(("model.stem", meta.get("stem") or "cifar", model.stem))
    for key, found, configured in wanted:
        if found != configured:
            raise RunFileError(f"{path} is not this run's encoder: it has {key}={found} but the run's config.yaml says "
                               f"{key}={configured}; copy the run's own encoder back, or {encoder_fix(Path(path))}")


def check_run_encoder(encoder: nn.Module, meta: dict[str, Any], cfg: Any, run: Any) -> None:
    """A run's encoder.safetensors is the run's: in an `evaluate --encoder` directory (it has encoder.json) the
    encoder that directory evaluated (the same fingerprint), in a training run one of its config."""
    from robustcl.runs.loaders import RunFileError

    if not run.encoder_description.is_file():
        check_encoder_fits(meta, cfg, run.encoder)
        return
    try:
        described = json.loads(run.encoder_description.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        described = None
    found = fingerprint(encoder)
    if described != found:
        raise RunFileError(f"{run.encoder} is not the encoder {run.encoder_description.name} says this directory "
                           f"evaluated (fingerprint {found}, recorded {described}); run robustcl "
                           "evaluate --encoder FILE --out DIR --overwrite again")


def read_headline_encoder(path: Path | str) -> tuple[Encoder, Branch]:
    """`read_encoder`'s encoder with the branch its headline reading uses (what DeACL reads its teacher through)."""
    encoder, meta = read_encoder(path)
    return encoder, resolve_branch("headline", meta)


def load_encoder(path: Path | str, branch: Branch | str = "headline") -> FixedBranchEncoder:
    """A trained encoder as a plain nn.Module (eval mode) reading through `branch`.

    `branch="headline"` uses the branch the method is reported through (adversarial for robust
    methods, benign for SimCLR); a single-BN encoder reads through its one set of statistics (benign).
    """
    encoder, meta = read_encoder(path)
    return FixedBranchEncoder(encoder, resolve_branch(branch, meta)).eval()


def export_torchvision(source: Path | str, branch: str = "headline", path: Path | str | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
    """Write one BN branch of a robustcl ResNet encoder as a torchvision-layout state dict (torch.save, atomic).

    `source` is a run directory or encoder.safetensors; `branch` may be "headline"; `path` defaults to
    resnet-<branch>.pth beside the encoder. The output follows robustcl.runs.policy.claim_output_file: an
    existing file is replaced only with `overwrite`, and never a file of a run or sweep directory, the encoder
    read, or anything but a regular file. Returns what was written: path, arch, stem, branch and the input
    normalisation the weights expect (a state dict cannot hold it).
    """
    from robustcl.models.torchvision_layout import to_torchvision
    from robustcl.runs.policy import claim_output_file

    encoder, meta = read_encoder(source)
    if meta["arch"] not in ("resnet18", "resnet50"):
        raise ValueError(f"{source} holds a {meta['arch']} encoder; only ResNet-18/50 encoders have a torchvision layout")
    chosen = resolve_branch(branch, meta)  # a single-BN encoder has one set of statistics
    source = Path(source)
    read = source / "encoder.safetensors" if source.is_dir() else source
    out = Path(path) if path is not None else read.parent / f"resnet-{chosen}.pth"
    claim_output_file(out, overwrite, "--out", inputs=[read])
    save_torch_atomic(to_torchvision(encoder.backbone, chosen), out)
    return {"path": str(out), "arch": meta["arch"], "stem": meta.get("stem") or "cifar", "branch": chosen,
            "mean": meta["mean"], "std": meta["std"]}
