"""Phase-1 training diagnostics: k-NN probes, a cheap feature attack, the critic's accuracy, warnings.

Every `diagnostics.every` optimiser steps (and once at the end) the Pretrainer calls
`Diagnostics.check`. It measures on the held-out validation split of the training data (its labels
are used only here, never for training), in eval mode, under no_grad except for the attack's input
gradient, with parameters frozen and its own generator seeded from the run seed and the step: the
training generator and the global RNGs are never touched, so a run trains bit-identically with or
without diagnostics. The warning rules are pure functions of the records so far (one record per
check, as logged to metrics.jsonl with "phase": "diagnostics"), so a resumed run warns as an
uninterrupted one would.

Warning rules (thresholds in `DiagnosticsConfig`, defaults in brackets); each message is one line that
starts with the rule's id (`critic-overfitting: ...`), so repeats group and grep well:
  * critic overfitting: critic accuracy >= critic_high [0.95] for critic_high_checks [2] checks in a row;
  * critic not learning: accuracy within critic_chance [0.45-0.55] for the first critic_chance_checks
    [3] checks and still there;
  * loss diverging: once more than loss_warmup_checks [3] checks exist, a minimised loss term's latest
    value > loss_rise [1.5] x its minimum so far, or non-decreasing (and up) over the last
    loss_rising_checks [6] checks; game terms (loss_ignore) are skipped;
  * robust collapse (catastrophic overfitting): robust k-NN accuracy below (1 - robust_drop [0.5]) x its
    best, or below robust_floor [1.5] x chance while clean k-NN is above clean_floor [3] x chance; only
    after the robust accuracy once exceeded robust_floor x chance (a never-robust encoder cannot collapse).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from robustcl.config import Config, DiagnosticsConfig
from robustcl.methods import Method
from robustcl.objectives import pgd
from robustcl.objectives.critic import critic_accuracy
from robustcl.runs import RunDir, RunError
from robustcl.runs import atomic_write_text

PHASE = "diagnostics"
BOOKKEEPING = frozenset({"phase", "step", "epoch", "lr", "images_per_s"})
Features = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ measurements
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Cosine k-NN accuracy, votes weighted by exp(cos / T) (Wu et al. 2018): label-free feature quality."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    top, idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    weights = ((top - top[:, :1]) / temperature).exp()  # shifted by the row max: no overflow, same argmax
    votes = torch.zeros(len(queries), num_classes, device=queries.device).scatter_add_(1, bank_labels[idx], weights)
    return (votes.argmax(1) == query_labels).float().mean().item()


def feature_attack(features: Features, x: torch.Tensor, eps: float, steps: int,
                   generator: torch.Generator | None, modules: Sequence[torch.nn.Module] = ()) -> torch.Tensor:
    """L-inf PGD (step 2.5 eps / steps, random start) maximising 1 - cos(f(x'), f(x)): needs no labels."""
    with torch.no_grad():
        target = F.normalize(features(x).float(), dim=1)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return -(F.normalize(features(x_adv).float(), dim=1) * target).sum()

    return pgd(objective, x, eps, 2.5 * eps / steps, steps, True, generator, modules)


@torch.no_grad()
def batched_features(features: Features, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """fp32 features of uint8 images, `chunk` at a time (bounded memory for any bank size)."""
    return torch.cat([features(images[i:i + chunk].float().div(255)).float() for i in range(0, len(images), chunk)])


def critic_threshold(method: Method) -> float:
    """The logit above which D says "benign": 0 for the BCE critic, an f-divergence critic's own f'(1)."""
    name = method.divergence()
    if name is None:
        return 0.0
    from robustcl.objectives.divergences import divergence  # only methods with an f-divergence critic need it
    return float(divergence(name).threshold)


def split_sizes(n: int, bank: int, queries: int) -> tuple[int, int]:
    """(bank, queries) taken from `n` validation images, shrunk in proportion when n is too small."""
    if n < 2:
        raise RunError(f"diagnostics need at least 2 held-out validation images, got data.val_size={n}; "
                       "raise data.val_size or set diagnostics.every=0")
    if bank + queries <= n:
        return bank, queries
    q = min(n - 1, max(1, round(n * queries / (bank + queries))))
    return n - q, q


# ------------------------------------------------------------------------------ warning rules
def critic_overfitting(acc: Sequence[float], high: float = 0.95, checks: int = 2) -> str | None:
    """D pinned near 1.0: it separates the features perfectly, and the encoder pays for it in clean accuracy."""
    if len(acc) < checks or any(a < high for a in acc[-checks:]):
        return None
    values = ", ".join(f"{a:.2f}" for a in acc[-checks:])
    return (f"critic-overfitting: critic accuracy >= {high:g} for the last {checks} checks ({values}): critic "
            "overfitting, clean accuracy will suffer; lower lambda_D (method.critic.weight) or method.critic.lr")


def critic_not_learning(acc: Sequence[float], band: tuple[float, float] = (0.45, 0.55), checks: int = 3) -> str | None:
    """D at chance from the start and still there: the divergence term carries no signal."""
    lo, hi = band
    if len(acc) < checks or not all(lo <= a <= hi for a in [*acc[:checks], acc[-1]]):
        return None
    values = ", ".join(f"{a:.2f}" for a in acc[:checks])
    return (f"critic-not-learning: critic accuracy within {lo:g}-{hi:g} since the first check ({values}; now "
            f"{acc[-1]:.2f}): critic not learning; raise method.critic.lr or give it a hidden layer "
            "(model.critic_hidden)")


def loss_diverging(series: Mapping[str, Sequence[float]], rise: float = 1.5, warmup: int = 3,
                   rising: int = 6) -> list[str]:
    """Minimised loss terms far above their minimum, or climbing steadily, once the first checks are past."""
    out = []
    for name, values in series.items():
        if len(values) <= warmup:
            continue
        latest, lowest, tail = values[-1], min(values), list(values[-rising:])
        if lowest > 0 and latest > rise * lowest:
            out.append(f"loss-diverging ({name}): {name} = {latest:.4g} is {latest / lowest:.2f}x its minimum "
                       f"{lowest:.4g} (> {rise:g}x): training is diverging; lower train.lr")
        elif len(tail) == rising and tail[-1] > tail[0] and all(b >= a for a, b in zip(tail, tail[1:])):
            out.append(f"loss-diverging ({name}): {name} has not decreased over the last {rising} checks "
                       f"({tail[0]:.4g} -> {tail[-1]:.4g}): training is diverging; lower train.lr")
    return out


def robust_collapse(robust: Sequence[float], clean: Sequence[float], chance: float, drop: float = 0.5,
                    robust_floor: float = 1.5, clean_floor: float = 3.0) -> str | None:
    """Robust k-NN accuracy fell far below its best, or to near chance while clean stays high."""
    if not robust or not clean or max(robust) <= robust_floor * chance:
        return None  # never robust beyond the floor: nothing has collapsed
    best, latest = max(robust), robust[-1]
    if latest < (1 - drop) * best:
        why = f"robust k-NN accuracy {latest:.3f} is more than {drop:.0%} below its best {best:.3f}"
    elif latest < robust_floor * chance and clean[-1] > clean_floor * chance:
        why = (f"robust k-NN accuracy {latest:.3f} is below {robust_floor:g}x chance while clean k-NN "
               f"{clean[-1]:.3f} is above {clean_floor:g}x chance")
    else:
        return None
    return (f"robust-collapse: {why}: catastrophic overfitting; use more method.attack.steps or a lower "
            "train.lr")


def loss_series(records: Sequence[Mapping[str, Any]], ignore: Sequence[str]) -> dict[str, list[float]]:
    """Each minimised loss term's latest logged value at every check (the records' `losses`)."""
    series: dict[str, list[float]] = {}
    for r in records:
        for name, value in (r.get("losses") or {}).items():
            if name not in ignore and "acc" not in name and math.isfinite(value):
                series.setdefault(name, []).append(value)
    return series


def warnings_for(records: Sequence[Mapping[str, Any]], cfg: DiagnosticsConfig, chance: float) -> list[str]:
    """Every rule applied to the diagnostics records so far (the latest one included)."""
    acc = [r["critic_acc"] for r in records if r.get("critic_acc") is not None]
    found = [critic_overfitting(acc, cfg.critic_high, cfg.critic_high_checks),
             critic_not_learning(acc, cfg.critic_chance, cfg.critic_chance_checks),
             *loss_diverging(loss_series(records, cfg.loss_ignore), cfg.loss_rise, cfg.loss_warmup_checks,
                             cfg.loss_rising_checks),
             robust_collapse([r["knn_robust"] for r in records], [r["knn_clean"] for r in records], chance,
                             cfg.robust_drop, cfg.robust_floor, cfg.clean_floor)]
    return [w for w in found if w]


# ------------------------------------------------------------------------------ run hook
def drop_after(run: RunDir, step: int) -> None:
    """On resume, drop diagnostics records logged after the checkpoint's step (they will be redone)."""
    records = run.read_metrics()
    kept = [r for r in records if not (r.get("phase") == PHASE and r.get("step", 0) > step)]
    if len(kept) != len(records):
        atomic_write_text(run.metrics, "".join(json.dumps(r) + "\n" for r in kept))


class Diagnostics:
    """Periodic checks of one phase-1 run; `check(step, losses)` returns the record to log."""

    def __init__(self, cfg: Config, method: Method, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                 prepare: Callable[[torch.Tensor], torch.Tensor]) -> None:
        d = self.cfg = cfg.diagnostics
        n_bank, n_queries = split_sizes(len(images), d.bank, d.queries)
        images, labels = images[:n_bank + n_queries].to(device), labels[:n_bank + n_queries].to(device)
        self.bank, self.bank_labels = images[:n_bank], labels[:n_bank]
        self.queries, self.query_labels = images[n_bank:], labels[n_bank:]
        self.n_attack = min(d.attack_batch, n_queries)
        self.method, self.device, self.autocast, self.prepare = method, device, autocast, prepare
        self.num_classes, self.chance = num_classes, 1.0 / num_classes
        self.seed, self.chunk = cfg.seed, max(cfg.train.batch_size, 256)
        self.branch = method.report_branch(cfg.finetune.branch)  # the branch phase 2 will read
        attack = method.attack_config()
        self.eps = float(attack.eps) if attack is not None else d.eps
        self.history: list[dict[str, Any]] = []
        self.losses: dict[str, float] = {}

    def restore(self, records: Sequence[Mapping[str, Any]]) -> None:
        """After a resume: the surviving diagnostics records and the latest logged loss terms."""
        self.history = [dict(r) for r in records if r.get("phase") == PHASE]
        pretrain = [r for r in records if r.get("phase") == "pretrain"]
        self.losses = _loss_values(pretrain[-1]) if pretrain else {}

    def due(self, step: int, total: int) -> bool:
        """Every `every` steps and at the last step (never when every is 0)."""
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == total)

    def features(self, branch: str) -> Features:
        """x in [0,1] -> encoder features through `branch`, in the run's precision and memory format."""
        def run(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return self.method.encoder(self.prepare(x), branch)
        return run

    def embed(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """Projected features z (what the critic sees), fp32, no grad."""
        with torch.no_grad(), self.autocast():
            return self.method.embed(self.prepare(x), branch).float()

    def critic_acc(self, x: torch.Tensor, x_adv: torch.Tensor) -> float:
        """D's accuracy on benign z_b(x) vs adversarial z_a(x') (call in eval mode)."""
        assert self.method.critic is not None
        adv_branch = self.method.report_branch("adversarial")
        with torch.no_grad():
            logits_b = self.method.critic(self.embed(x, "benign"))
            logits_a = self.method.critic(self.embed(x_adv, adv_branch))
        thr = critic_threshold(self.method)
        return critic_accuracy(logits_b - thr, logits_a - thr).item()

    def knn(self, bank: torch.Tensor, queries: torch.Tensor) -> float:
        """k-NN accuracy of the first len(queries) query images against the bank."""
        return knn_accuracy(bank, self.bank_labels, queries, self.query_labels[:len(queries)], self.num_classes,
                            self.cfg.k, self.cfg.knn_temperature)

    def measure(self, step: int) -> dict[str, float]:
        """k-NN clean / robust accuracy and critic accuracy, in eval mode with the training RNG untouched."""
        generator = torch.Generator(device=self.device).manual_seed(abs(self.seed) * 1_000_003 + step)
        feats = self.features(self.branch)
        with self.method.evaluating():
            bank = batched_features(feats, self.bank, self.chunk)
            out = {"knn_clean": self.knn(bank, batched_features(feats, self.queries, self.chunk))}
            x = self.queries[:self.n_attack].float().div(255)
            x_adv = feature_attack(feats, x, self.eps, self.cfg.attack_steps, generator, [self.method])
            with torch.no_grad():
                out["knn_robust"] = self.knn(bank, feats(x_adv).float())
            if self.method.critic is not None:
                out["critic_acc"] = self.critic_acc(x, x_adv)
        return out

    def check(self, step: int, losses: Mapping[str, float]) -> dict[str, Any]:
        """Measure, apply the warning rules, print each warning on one line; returns the metrics record."""
        start = time.perf_counter()
        if losses:
            self.losses = _loss_values(losses)
        record: dict[str, Any] = {"phase": PHASE, "step": step, **self.measure(step), "chance": self.chance,
                                  "eps": self.eps, "branch": self.branch, "k": min(self.cfg.k, len(self.bank)),
                                  "n_bank": len(self.bank), "n_queries": len(self.queries),
                                  "n_attack": self.n_attack, "losses": dict(self.losses)}
        record["warnings"] = warnings_for([*self.history, record], self.cfg, self.chance)
        for message in record["warnings"]:
            tqdm.write(f"robustcl diagnostics, step {step}: {message}", file=sys.stderr)
        record["seconds"] = time.perf_counter() - start
        self.history.append(record)
        return record


def _loss_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric logged terms of a pretrain record (bookkeeping keys dropped)."""
    return {k: float(v) for k, v in record.items()
            if k not in BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool)}
