"""One loader per torch file a run holds (checkpoints/last.pt, heads/<protocol>.pt): any failure is a
`RunFileError`, one line naming the file, what is wrong with it and what to do.

The encoder's loader is `robustcl.export.read_encoder` and the config's `robustcl.config.load_config`;
both fail the same way. Files are read with `torch.load(weights_only=True)`: a pickle that would run
code is refused by torch's restricted unpickler and never executed.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from robustcl.runs.atomic import RunError


class RunFileError(RunError, ValueError):
    """A file of a run that cannot be used (missing, damaged, hostile, of another model); one-line message."""


def first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to many lines of advice)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text.split(". ")[0].rstrip(".")[:200]


def _mismatch(exc: BaseException) -> str:
    """torch's load_state_dict error reduced to its first concrete mismatch."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else first_line(exc))[:240]


def read_torch(path: Path | str, kind: str, fix: str, device: torch.device | str = "cpu",
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A robustcl torch file as a dict holding `required` keys; RunFileError (naming `path`, ending with `fix`)."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise RunFileError(f"{path} is empty (0 bytes: cut short by a kill or a full disk?); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns on unusual pickle protocols: the error below says it all
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise RunFileError(f"{path} was refused by the safe loader: it is not a plain-tensor {kind} (a pickle that "
                           f"could run code, or another kind of file; nothing in it was run); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign formats: every failure is this one line
        raise RunFileError(f"{path} is not a readable {kind} (damaged or truncated: {first_line(exc)}); "
                           f"{fix}") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise RunFileError(f"{path} is not a robustcl {kind} (it lacks {', '.join(missing)}); {fix}")
    return state


def load_state_into(module: torch.nn.Module, state: Any, path: Path | str, fix: str) -> None:
    """module.load_state_dict(state), a mismatch (another architecture or config) as one RunFileError line."""
    try:
        module.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - size mismatches, missing keys, a non-mapping
        raise RunFileError(f"{path} does not fit this run's model: it was written for another architecture or "
                           f"config ({_mismatch(exc)}); {fix}") from None


def checkpoint_fix(root: Path) -> str:
    return (f"restore it from a copy, or start the run again with `robustcl pretrain --config {root / 'config.yaml'} "
            f"--out {root} --overwrite`")


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """checkpoints/last.pt: step, model, optimisers, RNG states and the config it was trained with."""
    path = Path(path)
    return read_torch(path, "checkpoint", checkpoint_fix(path.parent.parent), device, ("step", "model", "config"))


def head_fix(path: Path) -> str:
    return f"refit it: robustcl finetune --run {path.parent.parent} --protocol {path.stem} --overwrite"


def load_head(path: Path | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """heads/<protocol>.pt: the head's weights, the branch it reads, its selection record (AFF: the encoder too)."""
    path = Path(path)
    saved = read_torch(path, "fitted head", head_fix(path), device, ("head", "branch", "best_epoch", "val_acc"))
    head = saved["head"]
    if not isinstance(head, dict) or not isinstance(head.get("weight"), torch.Tensor) or head["weight"].dim() != 2:
        raise RunFileError(f"{path} is not a robustcl fitted head (no 2-d head weight); {head_fix(path)}")
    return saved


__all__ = ["RunFileError", "first_line", "head_fix", "load_checkpoint", "load_head", "load_state_into", "read_torch"]
