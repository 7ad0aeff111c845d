"""Evaluate a run's heads on the test set: clean and PGD accuracy through one stated branch."""
from __future__ import annotations

import time
from typing import Any

import torch

from robustcl.config import Config
from robustcl.evaluation.integrity import run_integrity_checks
from robustcl.evaluation.robust import (accuracy, accuracy_under, ce_objective, cw_margin_objective,
                                       pgd_accuracy, robustness_curve)
from robustcl.objectives import pgd, pgd_l2
from robustcl.export import read_encoder
from robustcl.models import BranchModel, LinearHead
from robustcl.runs import RunDir, RunError
from robustcl.train.common import autocast_factory, load_split, resolve_device


def attack_name(steps: int, eps: float, kind: str = "pgd", norm: str = "linf") -> str:
    """A stable key for results.json's `robust` map, e.g. pgd20-linf-0.1, cw20-linf-0.1, pgd20-l2-0.5."""
    return f"{kind}{steps}-{norm}-{eps:.4g}"


def extra_attack(kind: str, model, images, labels, cfg: Config, gen, autocast) -> tuple[str, float]:
    """Accuracy under the CW-margin L-inf attack or PGD-L2, keyed like attack_name."""
    a, e = (cfg.eval.l2 if kind == "pgd-l2" else cfg.eval.attack), cfg.eval
    if kind == "cw":
        def perturb(x, y):
            return pgd(cw_margin_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                       modules=[model])
        return attack_name(a.steps, a.eps, "cw"), accuracy_under(model, images, labels, perturb, e.batch_size, autocast)

    def perturb_l2(x, y):
        return pgd_l2(ce_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                      modules=[model])
    return attack_name(a.steps, a.eps, "pgd", "l2"), accuracy_under(model, images, labels, perturb_l2, e.batch_size,
                                                                    autocast)


def test_subset(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The test images to evaluate: all, or a seeded random subset of eval.limit (stated in results)."""
    test = load_split(cfg, "test")
    if cfg.eval.limit is None or cfg.eval.limit >= len(test):
        return test.images, test.labels, f"full test set ({len(test)} images)"
    gen = torch.Generator().manual_seed(cfg.eval.subset_seed + 104_729)
    idx = torch.randperm(len(test), generator=gen)[: cfg.eval.limit]
    return (test.images[idx], test.labels[idx],
            f"random subset of {cfg.eval.limit} of {len(test)} test images (subset seed {cfg.eval.subset_seed})")


def evaluate_run(cfg: Config, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Evaluate every fitted head of `run`; writes and returns results.json's content."""
    device = resolve_device(cfg.train.device)
    if not run.encoder.is_file():
        raise RunError(f"{run.root} has no encoder.safetensors; run `robustcl pretrain` first")
    protocols = [p for p in cfg.finetune.protocols if run.head(p).is_file()]
    if not protocols:
        raise RunError(f"{run.root} has no fitted heads; run `robustcl finetune --run {run.root}` first")
    encoder, meta = read_encoder(run.encoder)
    encoder.to(device).eval().requires_grad_(False)
    if cfg.train.channels_last:
        encoder.to(memory_format=torch.channels_last)
    images, labels, subset = test_subset(cfg)
    autocast = autocast_factory(device, cfg.eval.precision)
    a, e = cfg.eval.attack, cfg.eval
    eps_values = sorted(set([0.0, a.eps, *e.eps_curve]))
    per_protocol: dict[str, Any] = {}
    for protocol in protocols:
        t0 = time.perf_counter()
        saved = torch.load(run.head(protocol), map_location=device, weights_only=True)
        head = LinearHead(encoder.feature_dim, int(saved["head"]["weight"].shape[0])).to(device)
        head.load_state_dict(saved["head"])
        model = BranchModel(encoder, head, saved["branch"]).eval()
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        clean = accuracy(model, images, labels, e.batch_size, autocast)
        robust = {attack_name(a.steps, a.eps): pgd_accuracy(model, images, labels, a, e.batch_size, gen, autocast)}
        for kind in e.attacks:
            if kind != "pgd":
                key, acc = extra_attack(kind, model, images, labels, cfg, gen, autocast)
                robust[key] = acc
        known = {0.0: clean, a.eps: robust[attack_name(a.steps, a.eps)]}
        curve = robustness_curve(model, images, labels, a, eps_values, e.batch_size, cfg.seed, autocast, known)
        integrity = run_integrity_checks(model, images, labels, a, clean, robust[attack_name(a.steps, a.eps)], curve,
                                         head.out_features, e.batch_size, cfg.seed, autocast)
        per_protocol[protocol] = {
            "protocol": protocol, "branch": saved["branch"], "clean_acc": clean, "robust": robust,
            "eps_curve": curve, "best_epoch": saved["best_epoch"], "val_acc": saved["val_acc"],
            "selected_on": saved["selected_on"], "integrity": integrity, "seconds": time.perf_counter() - t0,
        }
    headline = per_protocol[protocols[0]]
    results = {
        "method": meta["method"], "dataset": meta["dataset"],
        "protocol": headline["protocol"], "branch": headline["branch"],
        "clean_acc": headline["clean_acc"], "robust": headline["robust"],
        "n_eval": int(len(images)), "eval_subset": subset,
        "attack": {"type": "PGD", "norm": "Linf", "eps": a.eps, "alpha": a.alpha, "steps": a.steps,
                   "random_start": a.random_start, "loss": "cross-entropy", "precision": e.precision},
        "branch_note": "clean and robust accuracy are read through the same BN branch",
        "suspect": {p: r["integrity"]["failed"] for p, r in per_protocol.items() if not r["integrity"]["passed"]},
        "protocols": per_protocol,
    }
    run.write_json(run.results, results)
    return results
