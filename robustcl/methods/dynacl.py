"""DynACL and DynACL++ (Luo, Wang & Wang, "Rethinking the Effect of Data Augmentation in Adversarial Contrastive
Learning", ICLR 2023, arXiv 2303.01289; code PKU-ML/DYNACL).

DynACL is dual-stream ACL (acl.py) under two schedules of the epoch e (0-based, T epochs, period K):
- augmentation strength s(e) = 1 - floor(e / K) * K / T (K = 50, T = 1000 in the authors' code), applied to
  the strong view (`strong_view_at`): colour-jitter strengths, jitter probability, grayscale probability
  and blur probability times s, crop scale (1 - (1 - c) s, c_max) with (c, c_max) the full-strength range
  ((0.1, 1) in the authors' code); flip and aspect ratios unchanged. Set on ctx.strong in `on_epoch_start`.
- loss L = (1 - w)/2 NCE(z_b(p), z_b(q)) + (1 + w)/2 NCE(z_a(p'), z_a(q')), w(e) = lambda (1 - s(e)),
  lambda = 2/3 (`dynamic_weights`): from ACL's equal halves towards the adversarial term.
Attack, as ACL: (p', q') = PGD-5 (eps 8/255, alpha 2/255) on both strong views jointly, maximising
NCE(z_a(p'), z_a(q')). Branches: p, q through the benign BN branch; p', q' through the adversarial one.

"DynACL + ours" (components.OursConfig, all off by default, composed as advcl composes it): "benign" =
benign_weight * NCE(z_b(p), z_b(q)) (the NCE of DynACL's own "natural" term, computed once, so SAM on
"benign" sharpens only the added part), and a critic D between z_b([p; q]) and z_a([p'; q']).

`air` (objectives/air.py, off by default) adds the term "air" = lambda1 SIR + lambda2 AIR of Xu et al. (NeurIPS
2023, arXiv 2305.00374) on z_b(p), z_b(q), z_b(x) (x the un-augmented image, its own forward), z_a(p'),
z_a(q'): DynACL-AIR (its ++ with the LP-AFF below: DynACL-AIR++), as the authors add IR to DynACL (AIR.py).

DynACL++ (`lp_aff`: robustcl's finetune runs it before its protocols when finetune.postprocess.name is
lp-aff): pseudo-labels = k-means (k = 10, `kmeans`) of the benign-branch features of the phase-2 training
images; a linear head probed on them with the encoder frozen (10 epochs, lr 0.01), then encoder and head
adversarially fine-tuned on them with TRADES (25 epochs, lr 0.1, x0.1 at epochs 10 and 20) through the
reported branch. Every protocol (SLF, ALF, AFF) then starts from that encoder.

Where robustcl differs from the authors' code:
- PKU-ML/DYNACL's train_DynACL.py sends the second view of each pair through a no-gradient momentum copy of
  the encoder (EMA 0.99, `resnet18_momentum(swap=True)`) and exports that copy; robustcl trains one dual-BN
  encoder, as the RobustSSL benchmark's DynACL re-implementations do (RCS's DynACL.py, AIR's --DynAug).
- There w uses the 1-based epoch // K, so it steps one epoch before s does at each stage boundary; robustcl
  uses w = lambda (1 - s(e)) of the same epoch, as those re-implementations do.
- LARS (lr 5.0, weight decay 1e-6) and a 3-layer BN projection head there; robustcl's SGD and 2-layer head.
- Their view has no blur (the presets set views.strong.blur_p 0); a view with blur anneals its probability
  like the other colour operations (our generalisation).
- A `period` below one epoch (CPU-sized presets) is followed step by step through `on_step_end`: exact,
  except on the first step of a fit resumed inside an epoch, which runs at the strength of the epoch's start
  (no hook runs before a step; one is requested from the method API).
- LP-AFF: k-means on robustcl's unit-norm features with k-means++ seeding (kmeans_pytorch: random seeding,
  raw features); a head of k outputs (the authors': the dataset's class count); TRADES from x + 0.001 N(0, 1)
  (robustcl's trades_attack; the authors' starts at x); the phase-2 training split only (not its
  validation images).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from robustcl.config import AttackConfig, Config, ConfigError
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.components import (OursConfig, critic_attack_term, divergence_term, draw_view, eval_pgd,
                                         ours_step)
from robustcl.models import BranchModel, Encoder, LinearHead
from robustcl.objectives import info_nce, pgd
from robustcl.objectives.air import AirConfig, invariant_regularization
from robustcl.objectives.trades import trades_attack, trades_loss
from robustcl.views import StrongViewConfig, to_unit, weak_view

__all__ = ["Dynacl", "DynaclConfig", "augmentation_strength", "dynamic_weights", "kmeans", "lp_aff",
           "strong_view_at"]

_FLOOR_TOLERANCE = 1e-9  # floor(e / K) of float epochs: 0.15 / 0.05 is 2.9999999999999996 in binary


# ------------------------------------------------------------------------------ the two schedules
def augmentation_strength(epoch: float, total_epochs: float, period: float) -> float:
    """s = 1 - floor(epoch / period) * period / total_epochs, at least 0: strong (1) to weak in steps."""
    if total_epochs <= 0 or period <= 0 or epoch < 0:
        raise ValueError(f"need epoch >= 0, total_epochs > 0, period > 0; got {epoch}, {total_epochs}, {period}")
    stage = math.floor(epoch / period + _FLOOR_TOLERANCE)
    return max(0.0, 1.0 - stage * period / total_epochs)


def dynamic_weights(epoch: float, total_epochs: float, period: float, lam: float) -> dict[str, float]:
    """The loss weights at `epoch`: natural (1 - w)/2 and adversarial (1 + w)/2, w = lam (1 - s(epoch))."""
    w = lam * (1.0 - augmentation_strength(epoch, total_epochs, period))
    return {"natural": (1.0 - w) / 2, "adversarial": (1.0 + w) / 2}


def strong_view_at(strength: float, full: StrongViewConfig) -> StrongViewConfig:
    """The strong view at `strength` s: jitter, its probability, grayscale and blur probabilities x s; crop scale
    from c + (1 - c)(1 - s) = 1 - (1 - c) s (c: the full-strength minimum), so s = 1 is `full` exactly."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    lo, hi = full.crop_scale
    return dataclasses.replace(
        full, crop_scale=(min(hi, lo + (1.0 - lo) * (1.0 - strength)), hi),
        jitter=tuple(j * strength for j in full.jitter),  # type: ignore[arg-type]
        jitter_p=full.jitter_p * strength, gray_p=full.gray_p * strength, blur_p=full.blur_p * strength)


# ------------------------------------------------------------------------------------- the method
@dataclass
class DynaclConfig(OursConfig):
    """DynACL: ACL's attack and branches, the strength schedule (period K epochs) and lambda; the "ours" fields off."""
    name: str = "dynacl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    period: float = 50.0          # K: the strength drops every K epochs (the authors' reload frequency)
    weight_lambda: float = 2 / 3  # lambda of w = lambda (1 - s)
    anneal: bool = True           # false: s = 1 and w = 0 throughout, i.e. ACL (the authors' run without --DynAug)
    air: AirConfig = field(default_factory=AirConfig)  # the IR term "air" (DynACL-AIR), off by default

    def validate(self) -> None:
        super().validate()
        if self.period <= 0:
            raise ConfigError(f"config value method.period={self.period!r} must be > 0 (epochs)")
        if not 0 <= self.weight_lambda <= 1:
            raise ConfigError(f"config value method.weight_lambda={self.weight_lambda!r} must be in [0, 1] "
                              "(above 1 the natural term's weight (1 - w)/2 turns negative)")


class Dynacl(Method):
    """Dual-stream ACL with the annealed strong view and the dynamic benign/adversarial weighting."""

    name = "dynacl"
    config_class = DynaclConfig
    cfg: DynaclConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strength, self.weights = 1.0, dynamic_weights(0, 1, 1, 0.0)  # the next step's schedule
        self._last = (self.strength, self.weights["adversarial"])          # the last step's (logged)
        self._total_epochs: float | None = None
        self._full: StrongViewConfig | None = None    # the run's full-strength strong view
        self._applied: StrongViewConfig | None = None  # the view this method last put on ctx.strong

    # -------------------------------------------------------------- the schedule hooks
    def schedule_at(self, epoch: float, total_epochs: float, ctx: StepContext) -> None:
        """Set the strength, the loss weights and ctx.strong for (fractional) `epoch` of `total_epochs`."""
        if ctx.strong is not self._applied or self._full is None:  # a fresh context holds the full-strength view
            self._full = ctx.strong
        c = self.cfg
        self.strength = augmentation_strength(epoch, total_epochs, c.period) if c.anneal else 1.0
        self.weights = dynamic_weights(epoch, total_epochs, c.period, c.weight_lambda if c.anneal else 0.0)
        self._applied = ctx.strong = strong_view_at(self.strength, self._full)

    def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
        """Every epoch boundary and the first step of every fit: the schedule of `epoch`."""
        self._total_epochs = total_epochs
        self.schedule_at(epoch, total_epochs, ctx)

    def on_step_end(self, step: int, total_steps: int, ctx: StepContext) -> None:
        """A period under one epoch: the next step's schedule at its fractional epoch step / steps_per_epoch."""
        if self._total_epochs is not None and self.cfg.period < 1:
            self.schedule_at(step * self._total_epochs / total_steps, self._total_epochs, ctx)

    def epoch_metrics(self) -> dict[str, float]:
        """The strength and adversarial weight the last step trained with (logged with its metrics)."""
        return {"strength": self._last[0], "adversarial_weight": self._last[1]}

    # ---------------------------------------------------------------------- the step
    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[p'; q'] = PGD on [p; q] maximising NCE(z_a(p'), z_a(q')) (+ the critic's term), eval mode, frozen."""
        def objective(x: torch.Tensor) -> torch.Tensor:
            z = self.embed(x, "adversarial")
            return info_nce(*z.chunk(2), self.cfg.temperature) + critic_attack_term(self, z)

        return eval_pgd(self, objective, torch.cat([p, q]), self.cfg.attack, ctx)

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, p_adv: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None, x_orig: torch.Tensor | None = None) -> Terms:
        """"natural" = NCE(z_b(p), z_b(q)), "adversarial" = NCE(z_a(p'), z_a(q')); "benign" (the same NCE)
        if benign_weight > 0; "divergence" between z_b([p; q]) and z_a([p'; q']) with a critic; "air" (with
        `x_orig`, the un-augmented images, when `air` is active) = IR, z_b(x_orig) from a forward of its own."""
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        need_benign = want("benign") and self.cfg.benign_weight > 0
        need_divergence = want("divergence") and self.critic is not None
        need_air = want("air") and self.cfg.air.active() and x_orig is not None
        if want("natural") or need_benign or need_divergence or need_air:
            z_b = self.embed(torch.cat([p, q]), "benign")
            nce_b = info_nce(*z_b.chunk(2), tau)
            if want("natural"):
                terms["natural"] = nce_b
            if need_benign:
                terms["benign"] = nce_b
        if want("adversarial") or need_divergence or need_air:
            z_a = self.embed(torch.cat([p_adv, q_adv]), "adversarial")
            if want("adversarial"):
                terms["adversarial"] = info_nce(*z_a.chunk(2), tau)
            if need_divergence:
                terms["divergence"] = divergence_term(self, z_b, z_a)
        if need_air:
            terms["air"] = invariant_regularization(*z_b.chunk(2), self.embed(x_orig, "benign"), *z_a.chunk(2), tau,
                                                    self.cfg.air)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._last = (self.strength, self.weights["adversarial"])
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        x_orig = ctx.prepare(to_unit(images)) if self.cfg.air.active() else None
        return ours_step(self, lambda: self.attack(p, q, ctx), torch.cat([p, q]),
                         lambda x_adv, only: self.loss_terms(p, q, *x_adv.chunk(2), only=only, x_orig=x_orig),
                         {**self.weights, "air": 1.0}, ctx)


# --------------------------------------------------------------------------- DynACL++: LP-AFF
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


def lp_aff(encoder: Encoder, images: torch.Tensor, branch: str, cfg: Config, device: torch.device, autocast,
           log: Callable[[dict[str, Any]], None]) -> tuple[Encoder, dict[str, Any]]:
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
    labels, _ = kmeans(_features(encoder, images, "benign", device, autocast), pp.clusters,
                       torch.Generator().manual_seed(cfg.seed + 41), pp.kmeans_iters)
    sizes = torch.bincount(labels, minlength=pp.clusters).tolist()
    labels = labels.to(device)
    gen, view_gen = torch.Generator().manual_seed(cfg.seed + 43), torch.Generator(device=device).manual_seed(cfg.seed + 47)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 53)
    weak = cfg.views.weak.build()

    def view(idx: torch.Tensor) -> torch.Tensor:
        x = weak_view(images[idx].to(device), view_gen, weak)
        return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x

    torch.manual_seed(cfg.seed)
    head = LinearHead(encoder.feature_dim, pp.clusters).to(device)
    model = BranchModel(encoder, head, branch)
    opt = torch.optim.SGD(head.parameters(), lr=pp.lp_lr, momentum=aff.momentum, weight_decay=aff.weight_decay)
    lp_loss = torch.zeros(())
    for epoch in range(pp.lp_epochs):                                     # 2. linear probing
        for idx in _batches(len(images), aff.batch_size, gen):
            with torch.no_grad(), autocast():
                feats = encoder(view(idx), branch).float()
            lp_loss = F.cross_entropy(head(feats), labels[idx])
            opt.zero_grad(set_to_none=True)
            lp_loss.backward()
            opt.step()
        log({"phase": "postprocess", "stage": "lp", "epoch": epoch + 1, "loss": lp_loss.item()})

    encoder.requires_grad_(True)                                          # 3. adversarial full fine-tuning
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=aff.lr, momentum=aff.momentum,
                          weight_decay=aff.weight_decay)
    aff_loss = torch.zeros(())
    for epoch in range(aff.epochs):
        for group in opt.param_groups:
            group["lr"] = aff.lr * 0.1 ** sum(epoch >= m for m in pp.milestones)
        for idx in _batches(len(images), aff.batch_size, gen):
            x, y = view(idx), labels[idx]
            model.eval()
            if aff.loss == "trades":
                def logits(z: torch.Tensor) -> torch.Tensor:
                    with autocast():
                        return model(z).float()
                x_adv = trades_attack(logits, x, aff.attack.eps, aff.attack.alpha, aff.attack.steps, attack_gen,
                                      modules=[model])
            else:
                def ce(z: torch.Tensor) -> torch.Tensor:
                    with autocast():
                        return F.cross_entropy(model(z).float(), y, reduction="sum")
                x_adv = pgd(ce, x, aff.attack.eps, aff.attack.alpha, aff.attack.steps, aff.attack.random_start,
                            attack_gen, modules=[model])
            model.train()
            with autocast():  # clean and adversarial in separate forwards (own BN batch statistics), as the authors
                logits_adv = model(x_adv).float()
                logits_clean = model(x).float() if aff.loss == "trades" else None
            aff_loss = (trades_loss(logits_clean, logits_adv, y, aff.beta) if logits_clean is not None
                        else F.cross_entropy(logits_adv, y))
            opt.zero_grad(set_to_none=True)
            aff_loss.backward()
            opt.step()
        log({"phase": "postprocess", "stage": "aff", "epoch": epoch + 1, "loss": aff_loss.item()})
    encoder.eval().requires_grad_(False)
    record = {"name": pp.name, "clusters": pp.clusters, "cluster_sizes": sizes, "cluster_branch": "benign",
              "branch": branch, "n_train": len(images), "lp_loss": lp_loss.item(), "aff_loss": aff_loss.item(),
              "seconds": time.perf_counter() - t0}
    return encoder, record
