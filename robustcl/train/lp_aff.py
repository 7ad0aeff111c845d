"""DynACL++'s post-processing LP-AFF (Luo, Wang & Wang, ICLR 2023, arXiv 2303.01289; code PKU-ML/DYNACL), run by
phase 2 (`robustcl.train.finetune`) before its protocols when finetune.postprocess.name is lp-aff.

Pseudo-labels = k-means (k = finetune.postprocess.clusters, `kmeans`) of the benign-branch features of the
phase-2 training images; a linear head probed on them with the encoder frozen (`linear_probe`), then
encoder and head adversarially fine-tuned on them with TRADES or PGD-AT through the reported branch, lr
x 0.1 at each milestone epoch (`adversarial_fine_tune`). Every protocol (SLF, ALF, AFF) then starts
from that encoder. The phase-1 method is robustcl/methods/dynacl.py, whose docstring lists where
LP-AFF differs from the authors' code.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from robustcl.config import AffConfig, Config, ConfigError, PostprocessConfig
from robustcl.models import BranchModel, Encoder, LinearHead
from robustcl.objectives import pgd
from robustcl.objectives.trades import trades_attack, trades_loss
from robustcl.runs.progress import StepBar
from robustcl.views import weak_view

Log = Callable[[dict[str, Any]], None]
View = Callable[[torch.Tensor], torch.Tensor]  # batch indices -> their weak views, on the device


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007) in fp64 on the CPU: (labels, centres).

    Seeding draws the first centre uniformly and each next one with probability proportional to the
    squared distance to the nearest centre so far, all from `generator` (a CPU generator), so the labels
    are a function of x and the seed. Iterates until no label changes (or `iters`); an empty cluster keeps
    its centre.
    """
    x = x.detach().to("cpu", torch.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres, d2 = [x[first]], ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = (int(torch.multinomial(d2 / total, 1, generator=generator)) if total > 0
               else int(torch.randint(n, (1,), generator=generator)))  # every point already is a centre
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)
    labels: torch.Tensor | None = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    else:
        labels = torch.cdist(x, c).argmin(1)
    assert labels is not None
    return labels, c.float()


@torch.no_grad()
def _features(encoder: Encoder, images: torch.Tensor, branch: str, device: torch.device, autocast) -> torch.Tensor:
    """Eval-mode features of uint8 images through `branch`, no augmentation (the pseudo-labels' input)."""
    out = []
    for i in range(0, len(images), 512):
        with autocast():
            out.append(encoder(images[i:i + 512].to(device).float().div_(255), branch).float().cpu())
    return torch.cat(out)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's shuffled full batches (the authors' drop_last: BN in train mode needs them)."""
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def pseudo_labels(encoder: Encoder, images: torch.Tensor, pp: PostprocessConfig, seed: int, device: torch.device,
                  autocast) -> tuple[torch.Tensor, list[int]]:
    """1. k-means (seeded by `seed`) of the eval-mode benign-branch features: (labels on device, cluster sizes)."""
    labels, _ = kmeans(_features(encoder, images, "benign", device, autocast), pp.clusters,
                       torch.Generator().manual_seed(seed + 41), pp.kmeans_iters)
    sizes = torch.bincount(labels, minlength=pp.clusters).tolist()
    return labels.to(device), sizes


def linear_probe(encoder: Encoder, head: LinearHead, branch: str, labels: torch.Tensor, view: View, n: int,
                 pp: PostprocessConfig, gen: torch.Generator, autocast, log: Log, progress: bool = False) -> torch.Tensor:
    """2. `pp.lp_epochs` of the k-way head on frozen eval-mode features through `branch`; the last loss."""
    aff = pp.aff
    opt = torch.optim.SGD(head.parameters(), lr=pp.lp_lr, momentum=aff.momentum, weight_decay=aff.weight_decay)
    lp_loss = torch.zeros(())
    bar = StepBar(pp.lp_epochs, f"finetune LP-AFF linear probe ({branch})", progress, unit="epoch")
    for epoch in range(pp.lp_epochs):
        for idx in _batches(n, aff.batch_size, gen):
            with torch.no_grad(), autocast():
                feats = encoder(view(idx), branch).float()
            lp_loss = F.cross_entropy(head(feats), labels[idx])
            opt.zero_grad(set_to_none=True)
            lp_loss.backward()
            opt.step()
        log({"phase": "postprocess", "stage": "lp", "epoch": epoch + 1, "loss": lp_loss.item()})
        bar.set_postfix(loss=f"{lp_loss.item():.3f}")
        bar.update(1)
    bar.close()
    return lp_loss


def _adversarial_example(model: BranchModel, x: torch.Tensor, y: torch.Tensor, aff: AffConfig,
                         gen: torch.Generator, autocast) -> torch.Tensor:
    """TRADES's KL maximiser, or PGD on the cross-entropy (PGD-AT), in eval mode with parameters frozen."""
    model.eval()
    if aff.loss == "trades":
        def logits(z: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(z).float()
        return trades_attack(logits, x, aff.attack.eps, aff.attack.alpha, aff.attack.steps, gen, modules=[model])

    def ce(z: torch.Tensor) -> torch.Tensor:
        with autocast():
            return F.cross_entropy(model(z).float(), y, reduction="sum")
    return pgd(ce, x, aff.attack.eps, aff.attack.alpha, aff.attack.steps, aff.attack.random_start, gen,
               modules=[model])


def _fine_tune_step(model: BranchModel, x: torch.Tensor, y: torch.Tensor, aff: AffConfig, opt: torch.optim.Optimizer,
                    attack_gen: torch.Generator, autocast) -> torch.Tensor:
    """One TRADES (or PGD-AT) step of encoder and head on a batch; its loss."""
    x_adv = _adversarial_example(model, x, y, aff, attack_gen, autocast)
    model.train()
    with autocast():  # clean and adversarial in separate forwards (own BN batch statistics), as the authors
        logits_adv = model(x_adv).float()
        logits_clean = model(x).float() if aff.loss == "trades" else None
    loss = (trades_loss(logits_clean, logits_adv, y, aff.beta) if logits_clean is not None
            else F.cross_entropy(logits_adv, y))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def adversarial_fine_tune(model: BranchModel, labels: torch.Tensor, view: View, n: int, pp: PostprocessConfig,
                          gen: torch.Generator, attack_gen: torch.Generator, autocast, log: Log,
                          progress: bool = False) -> torch.Tensor:
    """3. `pp.aff.epochs` of adversarial full fine-tuning of encoder and head on the pseudo-labels (lr x 0.1 at
    each of `pp.milestones`); the last loss."""
    aff = pp.aff
    model.encoder.requires_grad_(True)
    opt = torch.optim.SGD([*model.encoder.parameters(), *model.head.parameters()], lr=aff.lr, momentum=aff.momentum,
                          weight_decay=aff.weight_decay)
    aff_loss = torch.zeros(())
    bar = StepBar(aff.epochs * (n // aff.batch_size), f"finetune LP-AFF {aff.loss} ({model.branch})", progress)
    for epoch in range(aff.epochs):
        for group in opt.param_groups:
            group["lr"] = aff.lr * 0.1 ** sum(epoch >= m for m in pp.milestones)
        for idx in _batches(n, aff.batch_size, gen):
            aff_loss = _fine_tune_step(model, view(idx), labels[idx], aff, opt, attack_gen, autocast)
            bar.update(1)
        log({"phase": "postprocess", "stage": "aff", "epoch": epoch + 1, "loss": aff_loss.item()})
        bar.set_postfix(loss=f"{aff_loss.item():.3f}")
    bar.close()
    return aff_loss


def lp_aff(encoder: Encoder, images: torch.Tensor, branch: str, cfg: Config, device: torch.device, autocast,
           log: Log, progress: bool = False) -> tuple[Encoder, dict[str, Any]]:
    """DynACL++'s post-processing of `encoder` on uint8 `images`: a new encoder (the input is left alone) + a record.

    1. pseudo-labels: k-means of the benign-branch features; 2. linear probing of a k-way head through
    `branch` (encoder frozen, eval mode); 3. TRADES (or PGD-AT) full fine-tuning of encoder and head
    through `branch` on the pseudo-labels, lr x 0.1 at each milestone epoch; the last epoch is kept.
    """
    pp = cfg.finetune.postprocess
    assert pp is not None and pp.name == "lp-aff"
    aff, t0 = pp.aff, time.perf_counter()
    if aff.train_limit is not None:
        images = images[: aff.train_limit]
    if len(images) < max(aff.batch_size, pp.clusters):
        raise ConfigError(f"finetune.postprocess needs at least {max(aff.batch_size, pp.clusters)} training images "
                          f"(batch_size, clusters); it has {len(images)}")
    encoder = copy.deepcopy(encoder).to(device).eval().requires_grad_(False)
    labels, sizes = pseudo_labels(encoder, images, pp, cfg.seed, device, autocast)
    gen, view_gen = torch.Generator().manual_seed(cfg.seed + 43), torch.Generator(device=device).manual_seed(cfg.seed + 47)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 53)
    weak = cfg.views.weak

    def view(idx: torch.Tensor) -> torch.Tensor:
        x = weak_view(images[idx].to(device), view_gen, weak)
        return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x

    torch.manual_seed(cfg.seed)
    head = LinearHead(encoder.feature_dim, pp.clusters).to(device)
    model = BranchModel(encoder, head, branch)
    lp_loss = linear_probe(encoder, head, branch, labels, view, len(images), pp, gen, autocast, log, progress)
    aff_loss = adversarial_fine_tune(model, labels, view, len(images), pp, gen, attack_gen, autocast, log, progress)
    encoder.eval().requires_grad_(False)
    record = {"name": pp.name, "clusters": pp.clusters, "cluster_sizes": sizes, "cluster_branch": "benign",
              "branch": branch, "n_train": len(images), "lp_loss": lp_loss.item(), "aff_loss": aff_loss.item(),
              "seconds": time.perf_counter() - t0}
    return encoder, record


__all__ = ["adversarial_fine_tune", "kmeans", "linear_probe", "lp_aff", "pseudo_labels"]
