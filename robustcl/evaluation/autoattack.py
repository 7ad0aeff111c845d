"""Standard AutoAttack (Croce & Hein 2020) through its official implementation (PyPI `pyautoattack`).

The attack library calls `model(x)` on pixel-space inputs in [0, 1]; robustcl's `BranchModel`
already fixes the BN branch and keeps normalisation inside, so it is passed as is.

The standard version's four attacks (with the library's standard settings) run one after the
other on the points still robust, exactly as `run_standard_evaluation` orders them; after each
attack the robust flags are saved, so an interrupted evaluation resumes at the next attack. (The
library's own state file cannot resume in pyautoattack 0.2.0: `from_disk` returns the attack sets
as text and `run_standard_evaluation` then refers to an undefined `y_adv`.) The library's warnings
(randomised or dynamic defence, too few classes) are returned with the result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustcl.runs import atomic_write_text
from robustcl.runs.loaders import RunFileError
from robustcl.runs.progress import SILENT, Progress, Tick

STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")


class AutoAttackUnavailable(RuntimeError):
    """pyautoattack is not installed; the message says how to install it."""


@dataclass
class AutoAttackResult:
    """Accuracy under standard AutoAttack, the accuracy after each attack in order, and its warnings."""

    accuracy: float
    clean: float
    after: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    n: int = 0
    eps: float = 0.0
    norm: str = "Linf"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "clean": self.clean, "after": self.after, "warnings": self.warnings,
                "seconds": self.seconds, "n": self.n, "eps": self.eps, "norm": self.norm,
                "version": "standard", "attacks": list(STANDARD_ATTACKS), "implementation": _implementation()}


def _implementation() -> str:
    try:
        import pyautoattack
        return f"pyautoattack {pyautoattack.__version__}"
    except ImportError:
        return "pyautoattack (not installed)"


def _autoattack_class() -> Any:
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise AutoAttackUnavailable("AutoAttack needs the official implementation: pip install 'pyautoattack>=0.2,<0.3' "
                                    "(or drop autoattack from eval.attacks)") from None
    return AutoAttack


class _Capture(logging.Handler):
    """Collects the library's warnings (randomised/dynamic defence, class count, Square success)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.warnings:
            self.warnings.append(message)


class _Batches(logging.Handler):
    """Turns the library's per-batch debug line ("apgd-ce - 1/4 - 3 out of 500 successfully perturbed") into a
    progress tick of that batch's images (pyautoattack 0.2 logs it after each batch)."""

    LINE = re.compile(r" - \d+/\d+ - \d+ out of (\d+) successfully perturbed$")

    def __init__(self, tick: Tick) -> None:
        super().__init__(logging.DEBUG)
        self.tick = tick

    def emit(self, record: logging.LogRecord) -> None:
        found = self.LINE.search(record.getMessage())
        if found:
            self.tick(int(found.group(1)))


def state_key(*parts: Any, files: tuple[Path, ...] = ()) -> str:
    """A short digest of the evaluation's identity (model files, budget, images) naming its state file."""
    digest = hashlib.sha1(json.dumps([str(p) for p in parts]).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size] for i in range(0, len(y), batch_size)])


def read_state(state_path: Path | None, identity: dict[str, Any]) -> dict[str, Any]:
    """The saved state of an interrupted or finished AutoAttack evaluation ({} when there is none); a file of
    another evaluation, or an unreadable one, is a one-line error."""
    if state_path is None or not state_path.is_file():
        return {}
    try:
        saved = json.loads(state_path.read_text())
    except (ValueError, OSError) as exc:
        raise RunFileError(f"{state_path} is not readable AutoAttack state ({exc}); delete it to start over") from None
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        found = saved.get("identity") if isinstance(saved, dict) else saved
        raise RunFileError(f"{state_path} belongs to another AutoAttack evaluation ({found}); delete it to start over")
    return saved


def fit_targets(attack: Any, num_classes: int) -> list[str]:
    """Standard AutoAttack on fewer than 10 classes: APGD-T and FAB-T target every other class (their standard 9
    targets need 10 classes; the library fails with an IndexError otherwise), and APGD-T, whose targeted DLR loss
    reads the 3rd and 4th largest logits, is left out below 4 classes. Returns what was changed, for results."""
    if num_classes >= 10:
        return []
    targets = max(1, num_classes - 1)
    attack.apgd_targeted.n_target_classes = min(attack.apgd_targeted.n_target_classes, targets)
    attack.fab.n_target_classes = min(attack.fab.n_target_classes, targets)
    changes = [f"{num_classes} classes: APGD-T and FAB-T target the {targets} other class(es), not the standard 9"]
    if num_classes < 4 and "apgd-t" in attack.attacks_to_run:
        attack.attacks_to_run = [a for a in attack.attacks_to_run if a != "apgd-t"]
        changes.append(f"{num_classes} classes: APGD-T not run (its targeted DLR loss needs at least 4 classes)")
    return changes


def autoattack_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
                        norm: str = "Linf", batch_size: int = 500, seed: int = 0,
                        state_path: Path | None = None, parts: Progress = SILENT,
                        num_classes: int | None = None) -> AutoAttackResult:
    """Robust accuracy under standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), model in eval mode.

    With `state_path`, the robust flags after each finished attack are kept there (JSON, written
    atomically): a finished evaluation is read back, an interrupted one continues at the next attack.
    Each attack run is a part of `parts` ("autoattack <name>", its images). `num_classes`: the model's output
    width for `fit_targets` (one forward pass finds it when not given)."""
    if model.training:
        raise RuntimeError("AutoAttack needs the model in eval mode (call model.eval())")
    device = next(model.parameters()).device
    x = images.to(device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    y = labels.to(device)
    t0 = time.perf_counter()
    attack = _autoattack_class()(model, device=device, eps=eps, norm=norm, seed=seed, version="standard")
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
    adapted = fit_targets(attack, num_classes)
    order = list(attack.attacks_to_run)
    identity = {"n": int(len(y)), "eps": eps, "norm": norm, "seed": seed, "attacks": order}
    saved = read_state(state_path, identity)
    if saved:
        flags = torch.tensor(saved["flags"], dtype=torch.bool, device=device)
        clean, after, warnings = saved["clean"], dict(saved["after"]), list(saved["warnings"])
    else:
        flags = _correct(model, x, y, batch_size)
        clean, after, warnings = flags.float().mean().item(), {}, list(adapted)
    capture = _Capture()
    logger = logging.getLogger("auto-attack")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)  # its per-batch lines tick the progress; only _Capture keeps warnings
    logger.propagate = False  # the library logs progress at debug level: keep it off the user's handlers
    logger.addHandler(capture)
    try:
        for name in order:
            if name in after:
                continue
            idx = flags.nonzero().squeeze(1)
            with parts.part(f"autoattack {name}", int(idx.numel())) as part:
                if idx.numel() > 0:
                    attack.attacks_to_run = [name]  # the standard settings stay; one attack on the robust points
                    x_adv = _run_one(attack, x[idx], y[idx], batch_size, logger, part.update)
                    flags[idx] = _correct(model, x_adv.to(device), y[idx], batch_size)
            after[name] = flags.float().mean().item()
            if state_path is not None:
                state_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(state_path, json.dumps({
                    "identity": identity, "flags": flags.tolist(), "clean": clean, "after": after,
                    "warnings": list(dict.fromkeys(warnings + capture.warnings))}))
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return AutoAttackResult(accuracy=flags.float().mean().item(), clean=clean, after=after,
                            warnings=list(dict.fromkeys(warnings + capture.warnings)),
                            seconds=time.perf_counter() - t0, n=int(len(y)), eps=eps, norm=norm)


def _run_one(attack: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int, logger: logging.Logger,
             tick: Tick) -> torch.Tensor:
    """The library's evaluation of its one configured attack on (x, y), each finished batch a progress tick."""
    batches = _Batches(tick)
    logger.addHandler(batches)
    try:
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        logger.removeHandler(batches)
    return x_adv


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int,
                  seed: int = 0) -> torch.Tensor:
    """The official Square attack (L-inf, margin loss) alone: a black-box cross-check of white-box results."""
    _autoattack_class()  # clear error when the library is missing
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(model, norm="Linf", n_queries=queries, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                          verbose=False, device=x.device, resc_schedule=False)
    with torch.no_grad():
        return attack.perturb(x, y)
