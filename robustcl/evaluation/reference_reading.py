"""The authors' linear evaluation (reference.evaluation): reported only labelled, next to the honest numbers.

What their linear evaluation script does, in our words:
- a linear head on the frozen encoder (L2-normalised features), SGD with finetune.lr, momentum,
  weight decay and batch size (their 0.1, 0.9, 1e-4, 512) for finetune.epochs (their 100); the
  rate is set at the start of epoch e = 1..E to floor + (lr - floor)(1 + cos(pi e / E)) / 2, floor
  1e-8, so the first epoch already runs below lr and the last one at the floor;
- every epoch's images are pad-crop-flip views (their phase-2 transform);
- SLF trains on clean images through the benign BN branch; ALF on PGD examples (finetune.attack,
  their eps 0.0314, alpha 0.007, 10 steps) made against the adversarial-branch model and read through
  the adversarial branch;
- after every epoch, on the TEST images: clean accuracy through the benign branch, accuracy under
  PGD (reference.test_attack, their eps 0.0314, alpha 0.00314, 20 steps) against and through the
  adversarial branch; the epoch with the highest test robust accuracy is the one reported.
All their PGD starts are x + U(-eps, eps), not clipped to [0, 1]. The test set picks the epoch and
the two numbers come from two BN branches, i.e. two different models: this reading exists to compare
with the paper's table, never as a headline (evaluation/run_eval.py keeps it apart, labelled).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from robustcl.config import AttackConfig, Config, reference_switches
from robustcl.evaluation.robust import accuracy, accuracy_under, ce_objective
from robustcl.models import BranchModel, Encoder, LinearHead
from robustcl.objectives import pgd
from robustcl.runs.progress import SILENT, Progress, Tick
from robustcl.views import weak_view

REFERENCE_LABEL = ("REFERENCE READING (the authors' linear evaluation): epoch picked on TEST robust accuracy; clean "
                   "accuracy through the benign BN branch, robust accuracy through the adversarial branch. Not a "
                   "headline number: the test set chose the epoch and the two numbers come from two different models")
LINEAR_FLOOR = 1e-8  # the authors' eta_min


def epoch_learning_rate(epoch: int, epochs: int, base: float, floor: float = LINEAR_FLOOR) -> float:
    """Their linear head's rate for 1-based `epoch`: cosine evaluated at the epoch number itself."""
    return floor + (base - floor) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def _unclipped_pgd_accuracy(model: BranchModel, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                            batch_size: int, generator: torch.Generator, autocast, tick: Tick | None = None) -> float:
    """Accuracy under L-inf PGD on the cross-entropy from an unclipped random start (their pgd_attack)."""
    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(ce_objective(model, y, autocast), x, attack.eps, attack.alpha, attack.steps, attack.random_start,
                   generator, modules=[model], clip_start=False)
    return accuracy_under(model, images, labels, perturb, batch_size, autocast, tick=tick)


def fit_and_select(protocol: str, encoder: Encoder, train: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], num_classes: int, cfg: Config, device: torch.device,
                   autocast, parts: Progress = SILENT) -> dict[str, Any]:
    """One protocol (slf | alf) of their linear evaluation, a part of `parts` ("<protocol>/reference reading":
    each epoch's training images and its two test readings); returns the test-selected epoch's two readings."""
    f, ref, e = cfg.finetune, reference_switches(cfg), cfg.eval
    torch.manual_seed(cfg.seed)
    head = LinearHead(encoder.feature_dim, num_classes).to(device)
    benign = BranchModel(encoder, head, "benign").eval()
    adversarial = BranchModel(encoder, head, "adversarial").eval()
    train_branch = "benign" if protocol == "slf" else "adversarial"
    images, labels = train
    if protocol == "alf" and f.alf_train_limit is not None:
        images, labels = images[: f.alf_train_limit], labels[: f.alf_train_limit]
    opt = torch.optim.SGD(head.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    weak = cfg.views.weak
    steps = math.ceil(len(images) / f.batch_size)  # their loader keeps the last, partial batch
    best: dict[str, Any] = {"robust_acc_adversarial_branch": -1.0}
    history = []
    with parts.scoped(protocol=protocol).part("reference reading", f.epochs * (len(images) + 2 * len(test[0]))) as part:
        for epoch in range(1, f.epochs + 1):
            for group in opt.param_groups:
                group["lr"] = epoch_learning_rate(epoch, f.epochs, f.lr)
            perm = torch.randperm(len(images), generator=order_gen)
            for i in range(steps):
                idx = perm[i * f.batch_size:(i + 1) * f.batch_size]
                x = weak_view(images[idx].to(device), gen, weak)
                y = labels[idx].to(device)
                if protocol == "alf":
                    head.eval()
                    a = f.attack
                    x = pgd(ce_objective(adversarial, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                            modules=[adversarial], clip_start=False)
                with torch.no_grad(), autocast():
                    feats = encoder(x, train_branch).float()
                head.train()
                loss = F.cross_entropy(head(feats), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                part.update(len(idx))
            head.eval()
            clean = accuracy(benign, test[0], test[1], e.batch_size, autocast, part.update)
            test_gen = torch.Generator(device=device).manual_seed(cfg.seed)
            robust = _unclipped_pgd_accuracy(adversarial, test[0], test[1], ref.test_attack, e.batch_size, test_gen,
                                             autocast, part.update)
            history.append({"epoch": epoch, "clean_acc_benign_branch": clean, "robust_acc_adversarial_branch": robust})
            if robust > best["robust_acc_adversarial_branch"]:
                best = dict(history[-1])
    return {**best, "epochs": f.epochs, "head_trained_on": train_branch, "history": history}


def reference_reading(cfg: Config, encoder: Encoder, train: tuple[torch.Tensor, torch.Tensor],
                      test: tuple[torch.Tensor, torch.Tensor], num_classes: int, device: torch.device, autocast,
                      parts: Progress = SILENT) -> dict[str, Any]:
    """Their linear evaluation for the run's SLF/ALF protocols, as results.json's labelled `reference_reading`
    (each protocol a part of `parts`)."""
    t0 = time.perf_counter()
    protocols = [p for p in ("slf", "alf") if p in cfg.finetune.protocols]
    a, f = reference_switches(cfg).test_attack, cfg.finetune
    out = {p: fit_and_select(p, encoder, train, test, num_classes, cfg, device, autocast, parts) for p in protocols}
    return {"label": REFERENCE_LABEL, "selected_on": "TEST robust accuracy (adversarial branch)", "protocols": out,
            "test_attack": {"type": "PGD", "norm": "Linf", "eps": a.eps, "alpha": a.alpha, "steps": a.steps,
                            "random_start": "unclipped"},
            "alf_attack": {"eps": f.attack.eps, "alpha": f.attack.alpha, "steps": f.attack.steps,
                           "random_start": "unclipped"},
            "schedule": {"epochs": f.epochs, "lr": f.lr, "momentum": f.momentum, "weight_decay": f.weight_decay,
                         "batch_size": f.batch_size, "per_epoch_cosine_floor": LINEAR_FLOOR},
            "n_train": int(len(train[0])), "seconds": time.perf_counter() - t0}


__all__ = ["REFERENCE_LABEL", "epoch_learning_rate", "fit_and_select", "reference_reading"]
