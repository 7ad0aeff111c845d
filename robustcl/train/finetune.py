"""Phase 2: SLF and ALF linear heads on the frozen encoder, or AFF, epoch selected on a validation split.

SLF trains the head on clean features, ALF on PGD examples made against the current head, AFF
fine-tunes encoder and head with TRADES (or PGD-AT); all read features through one stated BN
branch, and the best epoch is chosen by validation accuracy (clean for SLF, PGD for ALF and AFF),
never on the test set. With finetune.postprocess (lp-aff: DynACL++, robustcl/train/lp_aff.py) the encoder
is first post-processed once per call; every protocol starts from the result, which SLF/ALF heads carry.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from robustcl.config import Config
from robustcl.evaluation import ce_objective, pgd_accuracy
from robustcl.export import check_run_encoder, read_encoder, resolve_branch
from robustcl.models import BranchModel, Encoder, LinearHead
from robustcl.objectives import pgd
from robustcl.objectives.trades import trades_attack, trades_loss
from robustcl.runs import RunDir, RunError, save_torch_atomic
from robustcl.runs.guard import writing
from robustcl.methods.factory import autocast_factory
from robustcl.runtime import Runtime, open_runtime, paced, started_config
from robustcl.splits import load_split, train_val_indices
from robustcl.runs.loggers import open_logger
from robustcl.runs.progress import StepBar
from robustcl.train.lp_aff import lp_aff  # DynACL++'s post-processing (lp-aff, the only one)
from robustcl.views import weak_view


@torch.no_grad()
def extract_features(encoder: Encoder, images: torch.Tensor, branch: str, batch_size: int,
                     device: torch.device, autocast) -> torch.Tensor:
    """Frozen, eval-mode features of uint8 images (fp32, on device)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().div_(255)
        with autocast():
            out.append(encoder(x, branch).float())
    return torch.cat(out)


def _cosine(step: int, total: int, base: float) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / max(1, total)))


def _make_optimizer(head: LinearHead, cfg: Config) -> torch.optim.Optimizer:
    f = cfg.finetune
    return torch.optim.SGD(head.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)


def train_slf(encoder, head, branch, train, val, cfg, device, autocast, gen, log, progress) -> dict[str, Any]:
    """Standard linear fine-tuning on precomputed clean features (the encoder is frozen)."""
    f = cfg.finetune
    feats = extract_features(encoder, train[0], branch, 512, device, autocast)
    val_feats = extract_features(encoder, val[0], branch, 512, device, autocast)
    y, val_y = train[1].to(device), val[1].to(device)
    opt = _make_optimizer(head, cfg)
    steps_per_epoch = math.ceil(len(feats) / f.batch_size)
    total, step = f.epochs * steps_per_epoch, 0
    best: dict[str, Any] = {"val_acc": -1.0}
    bar = StepBar(f.epochs, f"finetune SLF ({branch})", progress, unit="epoch")
    for epoch in range(f.epochs):
        perm = torch.randperm(len(feats), generator=gen).to(device)
        head.train()
        for i in range(steps_per_epoch):
            idx = perm[i * f.batch_size:(i + 1) * f.batch_size]
            for group in opt.param_groups:
                group["lr"] = _cosine(step, total, f.lr)
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        head.eval()
        with torch.no_grad():
            val_acc = (head(val_feats).argmax(1) == val_y).float().mean().item()
        log({"phase": "finetune", "protocol": "slf", "epoch": epoch + 1, "loss": loss.item(), "val_acc": val_acc})
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1, "state": {k: v.clone() for k, v in head.state_dict().items()}}
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_acc:.3f}")
        bar.update(1)
    bar.close()
    return best


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state (the weights of the best epoch so far)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _select_on_robust_validation(protocol, model, val, cfg, device, autocast, epoch, loss, best, log, bar,
                                 snapshot) -> dict[str, Any]:
    """End of an ALF/AFF epoch: PGD accuracy on the validation split, logged; keep the epoch if it is the best."""
    val_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    val_acc = pgd_accuracy(model, val[0], val[1], cfg.finetune.attack, 500, val_gen, autocast)
    log({"phase": "finetune", "protocol": protocol, "epoch": epoch + 1, "loss": loss.item(), "val_robust_acc": val_acc})
    bar.set_postfix(loss=f"{loss.item():.3f}", val_robust=f"{val_acc:.3f}", refresh=False)
    return {"val_acc": val_acc, "epoch": epoch + 1, **snapshot()} if val_acc > best["val_acc"] else best


def train_alf(encoder, head, branch, train, val, cfg, device, autocast, gen, log, progress) -> dict[str, Any]:
    """Adversarial linear fine-tuning: PGD examples against encoder+head, head trained on them."""
    f = cfg.finetune
    model = BranchModel(encoder, head, branch).eval()
    images, labels = train
    if f.alf_train_limit is not None:
        images, labels = images[: f.alf_train_limit], labels[: f.alf_train_limit]
    opt = _make_optimizer(head, cfg)
    steps_per_epoch = math.ceil(len(images) / f.batch_size)
    total, step = f.epochs * steps_per_epoch, 0
    best: dict[str, Any] = {"val_acc": -1.0}
    bar = StepBar(total, f"finetune ALF ({branch})", progress)
    for epoch in range(f.epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * f.batch_size:(i + 1) * f.batch_size]
            x = images[idx].to(device).float().div_(255)
            y = labels[idx].to(device)
            head.eval()
            x_adv = pgd(ce_objective(model, y, autocast), x, f.attack.eps, f.attack.alpha, f.attack.steps,
                        f.attack.random_start, gen if device.type == "cpu" else None, modules=[model])
            with torch.no_grad(), autocast():
                feats = encoder(x_adv, branch).float()
            for group in opt.param_groups:
                group["lr"] = _cosine(step, total, f.lr)
            head.train()
            loss = F.cross_entropy(head(feats), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
        model.eval()
        best = _select_on_robust_validation("alf", model, val, cfg, device, autocast, epoch, loss, best, log, bar,
                                            lambda: {"state": _copy(head)})
    bar.close()
    return best


def _aff_example(model: BranchModel, x: torch.Tensor, y: torch.Tensor, aff, autocast, gen) -> torch.Tensor:
    """The adversarial example AFF trains on: TRADES's KL maximiser or PGD on the cross-entropy (eval mode)."""
    a = aff.attack
    model.eval()
    if aff.loss == "trades":
        def logits(z: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(z).float()
        return trades_attack(logits, x, a.eps, a.alpha, a.steps, gen, modules=[model])
    return pgd(ce_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen, modules=[model])


def train_aff(encoder, head, branch, train, val, cfg, device, autocast, gen, log, progress) -> dict[str, Any]:
    """Adversarial full fine-tuning: encoder and head trained with TRADES (or PGD-AT) through one branch.

    Examples are made in eval mode with parameters frozen, the update runs in train mode (BN
    statistics of the chosen branch adapt); weak augmentation (pad-crop-flip) as in the reference.
    """
    aff = cfg.finetune.aff
    encoder = copy.deepcopy(encoder).requires_grad_(True)
    model = BranchModel(encoder, head, branch)
    images, labels = train
    if aff.train_limit is not None:
        images, labels = images[: aff.train_limit], labels[: aff.train_limit]
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=aff.lr, momentum=aff.momentum, weight_decay=aff.weight_decay, foreach=True)
    steps_per_epoch = len(images) // aff.batch_size  # full batches only: BN in train mode needs them
    if steps_per_epoch == 0:
        raise RunError(f"finetune.aff.batch_size={aff.batch_size} exceeds the {len(images)} AFF training images; lower it")
    view_gen = torch.Generator(device=device).manual_seed(cfg.seed + 31)
    weak = cfg.views.weak
    total, step = aff.epochs * steps_per_epoch, 0
    best: dict[str, Any] = {"val_acc": -1.0}
    bar = StepBar(total, f"finetune AFF-{aff.loss} ({branch})", progress)
    for epoch in range(aff.epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * aff.batch_size:(i + 1) * aff.batch_size]
            x = weak_view(images[idx].to(device), view_gen, weak)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(device)
            x_adv = _aff_example(model, x, y, aff, autocast, gen if device.type == "cpu" else None)
            for group in opt.param_groups:
                group["lr"] = _cosine(step, total, aff.lr)
            model.train()
            with autocast():
                if aff.loss == "trades":
                    logits_clean, logits_adv = model(torch.cat([x, x_adv])).float().chunk(2)
                else:
                    logits_adv = model(x_adv).float()
            loss = (trades_loss(logits_clean, logits_adv, y, aff.beta) if aff.loss == "trades"
                    else F.cross_entropy(logits_adv, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
        model.eval()
        best = _select_on_robust_validation("aff", model, val, cfg, device, autocast, epoch, loss, best, log, bar,
                                            lambda: {"state": _copy(head), "encoder": _copy(encoder)})
    bar.close()
    model.eval()
    return best


TRAINERS = {"slf": train_slf, "alf": train_alf, "aff": train_aff}


def finetune(cfg: Config, run: RunDir, protocols: tuple[str, ...] | None = None,
             progress: bool = True, overwrite: bool = False,
             loaded: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Fit each protocol's head on the run's frozen encoder; heads saved to heads/<protocol>.pt.

    An existing head is refitted only with `overwrite` (the CLI's --overwrite). `loaded` is an
    (encoder, metadata) pair already in memory to use instead of the run's encoder.safetensors
    (`robustcl.evaluation.evaluate_encoder`); the encoder is called as encoder(x, branch).
    """
    if loaded is None and not run.encoder.is_file():
        raise RunError(f"{run.root} has no encoder.safetensors; run `robustcl pretrain` first (or --resume it)")
    runtime = open_runtime(cfg, started_config(run.config))
    fitted = [p for p in (protocols or cfg.finetune.protocols) if run.head(p).is_file()]
    if fitted and not overwrite:
        raise RunError(f"{run.head(fitted[0])} already exists; pass --overwrite to refit "
                       f"{', '.join(fitted)} or choose other --protocol values")
    with writing(run.root, "heads/ and metrics.jsonl"):  # writable, one writer, no symbolic links, before any work
        return _fit_heads(runtime, run, protocols, progress, loaded)


def _fit_heads(runtime: Runtime, run: RunDir, protocols: tuple[str, ...] | None, progress: bool,
               loaded: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """`finetune`'s work, once the run is known writable and locked."""
    cfg, device = runtime.cfg, runtime.device
    if loaded is not None:
        encoder, meta = loaded
    else:
        encoder, meta = read_encoder(run.encoder)
        check_run_encoder(encoder, meta, cfg, run)
    encoder.to(device).eval().requires_grad_(False)
    if cfg.train.channels_last:
        encoder.to(memory_format=torch.channels_last)
    branch = resolve_branch(cfg.finetune.branch, meta)
    data = load_split(cfg, "train")
    train_idx, val_idx = train_val_indices(len(data), cfg.data.val_size, cfg.seed)
    if cfg.finetune.train_limit is not None:
        train_idx = train_idx[: cfg.finetune.train_limit]
    val_idx = val_idx[: cfg.finetune.val_limit]
    if len(val_idx) == 0:
        raise RunError("phase 2 needs validation images for epoch selection; set data.val_size > 0")
    train = (data.images[train_idx], data.labels[train_idx])
    val = (data.images[val_idx], data.labels[val_idx])
    autocast = autocast_factory(device, cfg.train.precision)
    out = {}
    # each fit is a new series (TensorBoard hides an earlier fit's epochs); `auto` threads re-decided between forwards
    with open_logger(run, cfg) as logger, paced(encoder):
        post = None
        if cfg.finetune.postprocess is not None and cfg.finetune.postprocess.name != "none":
            encoder, post = lp_aff(encoder, train[0], branch, cfg, device, autocast, logger.log, progress)
        for protocol in protocols or cfg.finetune.protocols:
            torch.manual_seed(cfg.seed)
            head = LinearHead(encoder.feature_dim, data.info.num_classes).to(device)
            gen = torch.Generator().manual_seed(cfg.seed)
            t0 = time.perf_counter()
            best = TRAINERS[protocol](encoder, head, branch, train, val, cfg, device, autocast, gen, logger.log,
                                      progress)
            record = {"protocol": protocol, "branch": branch, "best_epoch": best["epoch"], "val_acc": best["val_acc"],
                      "selected_on": "validation " + ("clean accuracy" if protocol == "slf" else "PGD accuracy"),
                      "n_train": len(train[0]), "n_val": len(val[0]), "seconds": time.perf_counter() - t0,
                      "finetune": cfg.to_dict()["finetune"]}  # the settings this head was fitted with
            if protocol == "aff":
                record["aff"] = {"loss": cfg.finetune.aff.loss, "beta": cfg.finetune.aff.beta}
            if post is not None:
                record["postprocess"] = post
            extra = {"encoder": best["encoder"]} if "encoder" in best else {}  # AFF: the fine-tuned encoder too
            if post is not None and not extra:  # SLF/ALF read the post-processed encoder: it travels with the head
                extra = {"encoder": _copy(encoder)}
            save_torch_atomic({"head": best["state"], **extra, **record}, run.head(protocol))
            out[protocol] = record
    return out
