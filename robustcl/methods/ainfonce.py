"""A-InfoNCE (Yu, Lou, Zhan, Li, Zuo, Liu & Liu, "Adversarial Contrastive Learning via Asymmetric InfoNCE",
ECCV 2022, arXiv 2207.08374; code yqy2001/A-InfoNCE), on robustcl's AdvCL (advcl.py): the authors' Asym-AdvCL.

Views and attack as AdvCL: x = the weak view, p, q = two strong views, h = HF(x); x' = PGD-5 from x.
The loss is the four-view contrastive loss over v_0 = z_a(x') (adversarial) and v_1..v_3 = z_b(p), z_b(q),
z_b(h), with the adversarial sample treated asymmetrically. For a row i (one of the 4N embeddings) with
positives P(i) (the other three views of its image) and negatives K(i) (the views of the other images),
    l(i, j) = -s_ij + log D_i,   s_ij = cos(v_i, v_j) / tau,
    D_i = sum_{k != i} e^{s_ik}                                   (plain InfoNCE), or, with hard negatives,
    D_i = mean_{p in P(i)} e^{s_ip}
          + max(|K| e^{-1/tau}, (sum_{k in K} w_ik e^{s_ik} - tau+ |K| mean_p e^{s_ip}) / (1 - tau+)),
    w_ik = e^{beta s_ik} / mean_{k in K(i)} e^{beta s_ik}      (Robinson et al.'s hard-negative estimator, HCL)
and the loss is L = 1/(4N) sum_i 1/3 sum_{j in P(i)} c_ij with
    c_ij = l(i, j)                                               for two clean views,
    c_ij = lambda [ (1 - alpha) l_sg(a, c) + alpha l_sg(c, a) ]   for the pair (a, c) = (adversarial, clean) of
                                                                 one image, in both its rows i = a and i = c,
where l_sg computes the similarities with the keys detached (`stop_gradient`: an anchor is pulled towards its
positive, not the positive towards it): the adversarial sample is an inferior positive, it moves towards the
clean views with share 1 - alpha and pulls them with share alpha. alpha = 1/2, lambda = 1, no stop-gradient and
no hard negatives is exactly AdvCL's multi-positive NCE (two views: InfoNCE); `a_infonce` is that loss.
alpha is adaptive (`adaptive_alpha`): over the first `adaptive_after` epochs the mean distance d between the
benign-branch features f_b(x) and f_b(x') is averaged (d_avg); afterwards each step uses alpha0 if d > d_avg,
1/2 if d < d_min, and linearly between (alpha0 at d_avg, 1/2 at d_min).
The attack maximises the same loss without stop-gradient, with alpha = 0 and (as every script of the authors,
--attack_ori) without hard negatives. Defaults: the authors' CIFAR-10 "IP+HN" script (advcl-IPHN-cifar10.sh:
--stop_grad --stpg_degree 0.2 --adv_weight 0.7 --stop_grad_adaptive 30 --HN, beta 1, tau+ 0.1, d_min 0.4).

AdvCL's "ours" options (add_on_terms.AddOnTermsConfig: benign term, SAM, critic) compose onto it as onto advcl.

Where robustcl differs from the authors' code (Asym-AdvCL/pretraining_advCL.py, losses.py):
- No ImageNet pseudo-label cross-entropy term and no 'pgd_ce' BN branch (as robustcl's advcl); the RobustSSL
  benchmark's A-InfoNCE numbers include it ("Using ImageNet-1K pre-trained models").
- Their SupConLoss multiplies the loss by tau / 0.07 (base temperature); robustcl does not (the lr absorbs it).
- Their hard-negative floor |K| e^{-1/0.5} is applied after shifting each row's logits by its maximum (the
  self-similarity 1/tau), i.e. |K| e^{1/tau - 2} unshifted: `negative_floor: shifted`; robustcl's default
  `hcl` is HCL's floor |K| e^{-1/tau} on unshifted similarities. Their importance weights are normalised by the
  mean over the whole row (zeros included), a factor N/(N - 1) on the reweighted negatives; robustcl averages
  over the negatives.
- Without stop-gradient their adversarial pair term is lambda l(a, c) in both rows (alpha = 0); robustcl
  uses `alpha` there too (alpha = 0 reproduces theirs).
- The feature distance of the adaptive alpha uses eval mode (theirs: train mode, whose forward of x' also
  moves the benign BN's running statistics); averaged over ranks, so every rank uses the same alpha.
- The attack targets z_b(p), z_b(q), z_b(h) are fixed eval-mode embeddings (as robustcl's advcl); theirs are
  recomputed in train mode at every PGD step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from robustcl.config import ConfigError
from robustcl.methods.add_on_terms import critic_attack_term, divergence_term, step_with_add_on_terms
from robustcl.methods.advcl import AdvclConfig, high_frequency
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd, fixed_embedding
from robustcl.objectives import info_nce
from robustcl.objectives.infonce import Gather, current_gather  # the trainer's cross-rank gather (default_gather)

NegativeFloor = Literal["hcl", "shifted"]

__all__ = ["Ainfonce", "AinfonceConfig", "HardNegatives", "a_infonce", "adaptive_alpha"]


# ------------------------------------------------------------------------------------------ the loss
@dataclass(frozen=True)
class HardNegatives:
    """HCL's negative estimator: class prior tau_plus, concentration beta, floor on the estimate (module docstring)."""
    tau_plus: float = 0.1
    beta: float = 1.0
    floor: NegativeFloor = "hcl"

    def floor_logit(self, temperature: float) -> float:
        """log of the per-negative floor: -1/tau (HCL) or 1/tau - 2 (the authors' clamp after the row-max shift)."""
        return -1.0 / temperature if self.floor == "hcl" else 1.0 / temperature - 2.0


def _row_log_prob(logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  hard: HardNegatives | None, temperature: float) -> torch.Tensor:
    """s_ik - log D_i for every (row i, key k): D_i the plain or the hard-negative denominator (module docstring)."""
    if hard is None:
        return logits - torch.logsumexp(logits.masked_fill(~(positive | negative), float("-inf")), 1, keepdim=True)
    shift = logits.masked_fill(~(positive | negative), float("-inf")).amax(1, keepdim=True).detach()
    e = (logits - shift).exp()
    n_pos, n_neg = positive.sum(1, keepdim=True), negative.sum(1, keepdim=True)
    pos = e.masked_fill(~positive, 0.0).sum(1, keepdim=True) / n_pos
    weights = F.softmax((hard.beta * logits).masked_fill(~negative, float("-inf")), dim=1) * n_neg  # mean 1 over K
    reweighted = (weights * e.masked_fill(~negative, 0.0)).sum(1, keepdim=True)
    estimate = (reweighted - hard.tau_plus * n_neg * pos) / (1.0 - hard.tau_plus)
    floor = n_neg * torch.exp(hard.floor_logit(temperature) - shift)
    return logits - (shift + torch.log(pos + torch.maximum(estimate, floor)))


def a_infonce(views: Sequence[torch.Tensor], temperature: float = 0.5, *, alpha: float = 0.5, weight: float = 1.0,
              stop_gradient: bool = False, hard_negatives: HardNegatives | None = None,
              gather: Gather | None = None) -> torch.Tensor:
    """The asymmetric InfoNCE over V >= 2 views (views[0] adversarial, the others clean) of N images.

    `alpha`: the clean view's share of each adversarial pair's term (the adversarial view gets 1 - alpha);
    `weight`: lambda on the adversarial pairs; `stop_gradient`: their terms computed with detached keys;
    `hard_negatives`: HCL's denominator for every row. alpha 1/2, weight 1, no stop-gradient, no hard negatives
    is `multi_positive_nce`. `gather` (default: the trainer's, `default_gather`) as in `info_nce`: keys are the
    global batch, queries this rank's rows, so the mean over ranks is the single-process loss.
    """
    views = list(views)
    if len(views) < 2 or any(v.dim() != 2 or v.shape != views[0].shape for v in views):
        raise ValueError(f"a_infonce needs >= 2 (N, d) tensors of equal shape, got {[tuple(v.shape) for v in views]}")
    zs = [F.normalize(v.float(), dim=1) for v in views]
    n_views, n_local = len(zs), zs[0].shape[0]
    gather = gather if gather is not None else current_gather()
    offset = dist.get_rank() * n_local if gather is not None and dist.is_available() and dist.is_initialized() else 0
    key_views = [gather(z) for z in zs] if gather is not None else zs
    n = key_views[0].shape[0]
    keys, queries = torch.cat(key_views), torch.cat(zs)
    local = torch.arange(n_local, device=queries.device) + offset
    rows = torch.cat([local + a * n for a in range(n_views)])             # each query's own index in keys
    key_image = torch.arange(n, device=queries.device).repeat(n_views)
    same = local.repeat(n_views)[:, None] == key_image[None, :]
    positive = same & ~F.one_hot(rows, n_views * n).bool()
    negative = ~same

    log_prob = _row_log_prob(queries @ keys.T / temperature, positive, negative, hard_negatives, temperature)
    clean_keys = torch.arange(n_views * n, device=queries.device) >= n
    clean = log_prob[n_local:].masked_fill(~(positive[n_local:] & clean_keys), 0.0).sum()
    sg = (_row_log_prob(queries @ keys.detach().T / temperature, positive, negative, hard_negatives, temperature)
          if stop_gradient else log_prob)
    adversarial_rows = torch.arange(n_local, device=queries.device)
    pairs = sum(((1.0 - alpha) * -sg[adversarial_rows, local + v * n]      # l_sg(a, c): the adversarial row
                 + alpha * -sg[v * n_local + adversarial_rows, local]).sum()  # l_sg(c, a): the clean row of view v
                for v in range(1, n_views))
    return (-clean + 2.0 * weight * pairs) / ((n_views - 1) * n_views * n_local)


def adaptive_alpha(distance: float, average: float, d_min: float, alpha0: float) -> float:
    """alpha0 if distance > average; 1/2 below d_min (or if average <= d_min); linear in between, from alpha0 at
    the average to 1/2 at d_min (the authors' adaptive grad stopping)."""
    if distance > average:
        return alpha0
    if distance < d_min or average <= d_min:
        return 0.5
    return (average - distance) / (average - d_min) * (0.5 - alpha0) + alpha0


# ---------------------------------------------------------------------------------------- the method
@dataclass
class AinfonceConfig(AdvclConfig):
    """AdvCL's views, attack and "ours" options, plus the asymmetric loss (defaults: the authors' CIFAR-10 IP+HN)."""
    name: str = "ainfonce"
    stop_gradient: bool = True              # --stop_grad: adversarial pairs with detached keys (inferior positives)
    alpha: float = 0.2                      # --stpg_degree: the clean view's share of an adversarial pair
    adversarial_weight: float = 0.7         # --adv_weight: lambda on the adversarial pairs
    adaptive_after: float | None = 30.0     # --stop_grad_adaptive: epochs of distance averaging, then adaptive alpha
    d_min: float = 0.4                      # --d_min: below it alpha = 1/2
    hard_negatives: bool = True             # --HN
    tau_plus: float = 0.1                   # --tau_plus
    beta: float = 1.0                       # --beta
    negative_floor: NegativeFloor = "hcl"   # shifted: the authors' clamp (module docstring)
    attack_hard_negatives: bool = False     # false: PGD on the plain denominator (--attack_ori)

    def validate(self) -> None:
        super().validate()
        checks = [("alpha", 0 <= self.alpha <= 1, "must be in [0, 1]"),
                  ("adversarial_weight", self.adversarial_weight >= 0, "must be >= 0"),
                  ("adaptive_after", self.adaptive_after is None or self.adaptive_after >= 0, "must be >= 0 or null"),
                  ("d_min", self.d_min >= 0, "must be >= 0"),
                  ("tau_plus", 0 <= self.tau_plus < 1, "must be in [0, 1)"),
                  ("beta", self.beta >= 0, "must be >= 0")]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"config value method.{key}={getattr(self, key)!r} {message}")


class Ainfonce(Method):
    """AdvCL with the asymmetric InfoNCE: adversarial views as inferior positives, HCL hard negatives."""

    name = "ainfonce"
    config_class = AinfonceConfig
    cfg: AinfonceConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The adaptive alpha's state, in state_dict (so checkpointed): the warm-up distances and the next step's epoch.
        self.register_buffer("distance_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("distance_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("next_epoch", torch.zeros((), dtype=torch.float64))
        self._total_epochs: float | None = None
        self._last: dict[str, float] = {"alpha": self.cfg.alpha}  # + "feature_distance" once one is measured

    def hard(self, attack: bool = False) -> HardNegatives | None:
        """The hard-negative estimator of the loss (attack=True: of the attack's objective), None if off."""
        on = self.cfg.hard_negatives and (not attack or self.cfg.attack_hard_negatives)
        return HardNegatives(self.cfg.tau_plus, self.cfg.beta, self.cfg.negative_floor) if on else None

    # ------------------------------------------------------------- the adaptive alpha
    def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
        """Epoch boundaries and a fit's first step: the next epoch (a restored fractional one inside it is kept)."""
        self._total_epochs = total_epochs
        self.next_epoch.fill_(max(float(epoch), float(self.next_epoch)))

    def on_step_end(self, step: int, total_steps: int, ctx: StepContext) -> None:
        """The next step's fractional epoch, step / steps_per_epoch (warm-ups shorter than an epoch need it)."""
        if self._total_epochs is not None:
            self.next_epoch.fill_(step * self._total_epochs / total_steps)

    def epoch_metrics(self) -> dict[str, float]:
        """The last step's alpha and (adaptive alpha) feature distance, logged with its metrics."""
        return dict(self._last)

    @torch.no_grad()
    def feature_distance(self, x: torch.Tensor, x_adv: torch.Tensor, ctx: StepContext) -> float:
        """Mean over the batch (and ranks) of ||f_b(x) - f_b(x')||, eval mode: the adaptive alpha's distance."""
        with self.evaluating(), ctx.autocast():
            d = F.pairwise_distance(self.encoder(x, "benign").float(), self.encoder(x_adv.detach(), "benign").float())
        mean = d.mean().reshape(1)
        ctx.distributed.all_reduce_mean_([mean])
        return float(mean)

    def alpha_for(self, distance: float) -> float:
        """This step's alpha: alpha0 while averaging (epoch < adaptive_after), then `adaptive_alpha` on the average."""
        c = self.cfg
        assert c.adaptive_after is not None
        if float(self.next_epoch) < c.adaptive_after:
            self.distance_sum.add_(distance)
            self.distance_count.add_(1)
            return c.alpha
        average = float(self.distance_sum / self.distance_count) if self.distance_count > 0 else distance
        return adaptive_alpha(distance, average, c.d_min, c.alpha)

    # ---------------------------------------------------------------------- the step
    def attack(self, x: torch.Tensor, clean: torch.Tensor, ctx: StepContext,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """PGD from x maximising the loss at alpha 0 without stop-gradient (+ the critic's term), fixed z_b(clean)."""
        if targets is None:
            targets = fixed_embedding(self, clean, "benign", ctx)
        z_p, z_q, z_h = targets.chunk(3)
        c = self.cfg

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            z = self.embed(x_adv, "adversarial")
            return (a_infonce([z, z_p, z_q, z_h], c.temperature, alpha=0.0, weight=c.adversarial_weight,
                              hard_negatives=self.hard(attack=True)) + critic_attack_term(self, z))

        return eval_pgd(self, objective, x, c.attack, ctx)

    def loss_terms(self, x: torch.Tensor, clean: torch.Tensor, x_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None, alpha: float | None = None) -> Terms:
        """"contrastive" = the asymmetric loss over {z_a(x'), z_b(p), z_b(q), z_b(h)} at `alpha` (default: cfg.alpha);
        "benign" = NCE(z_b(p), z_b(q)) if weighted; "divergence" between z_b(x) and z_a(x') with a critic."""
        want = lambda name: only is None or name in only  # noqa: E731
        c, terms = self.cfg, {}
        need_benign = want("benign") and c.benign_weight > 0
        need_divergence = want("divergence") and self.critic is not None
        z_adv = self.embed(x_adv, "adversarial") if want("contrastive") or need_divergence else None
        if want("contrastive") or need_benign:
            z_p, z_q, z_h = self.embed(clean, "benign").chunk(3)
            if want("contrastive"):
                terms["contrastive"] = a_infonce(
                    [z_adv, z_p, z_q, z_h], c.temperature, alpha=c.alpha if alpha is None else alpha,
                    weight=c.adversarial_weight, stop_gradient=c.stop_gradient, hard_negatives=self.hard())
            if need_benign:
                terms["benign"] = info_nce(z_p, z_q, c.temperature)
        if need_divergence:
            terms["divergence"] = divergence_term(self, self.embed(x, "benign"), z_adv)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = draw_view("weak", images, ctx)
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        clean = ctx.prepare(torch.cat([p, q, high_frequency(x, self.cfg.hf_radius)]))
        targets = fixed_embedding(self, clean, "benign", ctx)
        seen: dict[str, Any] = {}

        def terms(x_adv: torch.Tensor, only: tuple[str, ...] | None) -> Terms:
            if seen.get("x_adv") is not x_adv:  # once per attacked x' (SAM's second pass reuses its alpha)
                alpha = self.cfg.alpha
                if self.cfg.adaptive_after is not None:
                    distance = self.feature_distance(x, x_adv, ctx)
                    alpha = self.alpha_for(distance)
                    self._last["feature_distance"] = distance
                seen.update(x_adv=x_adv, alpha=alpha)
                self._last["alpha"] = alpha
            return self.loss_terms(x, clean, x_adv, only, seen["alpha"])

        return step_with_add_on_terms(self, lambda: self.attack(x, clean, ctx, targets), x, terms, {"contrastive": 1.0},
                                      ctx)
