"""Phase 1: the pre-training loop (SGD with warm-up + cosine, exact resume, metrics, checkpoints)."""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from robustcl.config import PHASE1_FREE, Config, dump_yaml, first_difference
from robustcl.export import export_encoder
from robustcl.methods import Method, StepContext
from robustcl.objectives import SAM
from robustcl.runs import RunDir, RunError, atomic_write_text, save_torch_atomic
from robustcl.train.common import autocast_factory, build_method, load_split, resolve_device, train_val_indices
from robustcl.train.diagnostics import Diagnostics, drop_after


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


def learning_rate(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    images_per_second: float
    last: dict[str, float]


class Pretrainer:
    """Builds everything phase 1 needs from a Config and runs it inside a run directory."""

    def __init__(self, cfg: Config, run: RunDir) -> None:
        self.cfg, self.run = cfg, run
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        data = load_split(cfg, "train")
        train_idx, val_idx = train_val_indices(len(data), cfg.data.val_size, cfg.seed)
        if cfg.data.train_limit is not None:
            train_idx = train_idx[: cfg.data.train_limit]
        self.images = data.images[train_idx].to(self.device)
        self.info = data.info
        if len(self.images) < t.batch_size:
            raise RunError(f"train.batch_size={t.batch_size} exceeds the {len(self.images)} training images; lower it")
        torch.manual_seed(cfg.seed)
        self.method: Method = build_method(cfg, data.info.channels, data.info.mean, data.info.std).to(self.device)
        if t.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.method.encoder_parameters(), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay, foreach=True)
        self.critic_optimizer = None
        if self.method.critic is not None:
            c = cfg.method.critic
            self.critic_optimizer = torch.optim.SGD(self.method.critic.parameters(), lr=c.lr, momentum=c.momentum,
                                                    weight_decay=c.weight_decay, foreach=True)
        sam_cfg = self.method.sam_config()
        self.sam = (SAM(self.method.encoder_parameters(), sam_cfg.rho, adaptive=sam_cfg.mode == "asam")
                    if sam_cfg.mode != "off" else None)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.steps_per_epoch = len(self.images) // t.batch_size
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.ctx = StepContext(self.method, self.optimizer, self.critic_optimizer, self.sam, sam_cfg.terms,
                               self.generator, autocast_factory(self.device, t.precision),
                               strong=cfg.views.strong.build(), weak=cfg.views.weak.build(),
                               channels_last=t.channels_last)
        self.diagnostics = (Diagnostics(cfg, self.method, data.images[val_idx], data.labels[val_idx],
                                        data.info.num_classes, self.device, self.ctx.autocast, self.ctx.prepare)
                            if cfg.diagnostics.every > 0 else None)  # held-out labels: measured, never trained on
        self.step = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs; loadable with torch.load(weights_only=True)."""
        return {
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer else None,
            "sam": {"rho": self.sam.rho, "adaptive": self.sam.adaptive} if self.sam else None,
            "scheduler": {"step": self.step, "total": self.total_steps, "warmup": self.warmup_steps},
            "rng": {"views": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["rng"]["views"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> None:
        """Write checkpoints/last.pt atomically, refusing non-finite parameters (one host sync)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.method.parameters()]).all()
        if not finite:
            raise NonFiniteLoss(f"non-finite parameters at step {self.step}; kept the last good checkpoint "
                                f"{self.run.checkpoint}; lower train.lr or use train.precision=fp32")
        save_torch_atomic(self.state_dict(), self.run.checkpoint)

    def resume(self) -> None:
        """Load checkpoints/last.pt (refusing a config that changes phase 1) and drop later metrics."""
        state = torch.load(self.run.checkpoint, map_location=self.device, weights_only=True)
        changed = first_difference(state["config"], self.cfg.to_dict(), ignore=PHASE1_FREE)
        if changed:
            raise RunError(f"cannot resume {self.run.root} with a changed phase-1 setting ({changed}); "
                           "resume without it, or start a new run (--out) or --overwrite")
        self.load_state_dict(state)
        self.run.truncate_metrics(self.step)
        drop_after(self.run, self.step)
        if self.diagnostics is not None:
            self.diagnostics.restore(self.run.read_metrics())

    # ------------------------------------------------------------------ loop
    def batch(self, step: int) -> torch.Tensor:
        """The uint8 batch of global step `step`: a seeded permutation per epoch, so resume is exact."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.images), generator=gen).to(self.device)
            self._perm_epoch = epoch
        b = self.cfg.train.batch_size
        return self.images[self._perm[i * b:(i + 1) * b]]

    def fit(self, progress: bool = True) -> PretrainResult:
        t = self.cfg.train
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"pretrain {self.cfg.method.name}",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        sums: dict[str, torch.Tensor] = {}
        count, last, t0, window_start = 0, {}, time.perf_counter(), time.perf_counter()
        start_step = self.step
        while self.step < self.total_steps:
            lr = learning_rate(self.step, self.total_steps, self.warmup_steps, t.lr, t.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            stats = self.method.training_step(self.batch(self.step), self.ctx)
            for k, v in stats.items():  # accumulate on device: no host sync in the hot loop
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            count += 1
            self.step += 1
            bar.update(1)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.step % t.log_every == 0 or self.step == self.total_steps or end_of_epoch:
                last = {k: (v / count).item() for k, v in sums.items()}
                bad = [k for k, v in last.items() if not math.isfinite(v)]
                if bad:
                    bar.close()
                    raise NonFiniteLoss(f"non-finite loss ({', '.join(bad)}) before step {self.step}; the run stopped "
                                        f"and {self.run.checkpoint} keeps the last good state; lower train.lr")
                now = time.perf_counter()
                ips = count * t.batch_size / max(now - window_start, 1e-9)
                self.run.log({"phase": "pretrain", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                              "lr": lr, "images_per_s": ips, **last})
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"img/s": f"{ips:.0f}"}, refresh=False)
                sums, count, window_start = {}, 0, now
            if self.diagnostics is not None and self.diagnostics.due(self.step, self.total_steps):
                record = self.diagnostics.check(self.step, last)
                self.run.log(record)
                window_start += record["seconds"]  # images_per_s keeps measuring training alone
            if self.step % t.checkpoint_every == 0 or end_of_epoch or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - t0
        done = self.step - start_step
        export_encoder(self.method.encoder, self.run.encoder, self.info, self.cfg)
        atomic_write_text(self.run.pretrain_done, f"{self.step}\n")
        return PretrainResult(self.step, seconds, done * t.batch_size / max(seconds, 1e-9), last)


def pretrain(cfg: Config, run: RunDir, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> PretrainResult | None:
    """Phase 1 for `cfg` in `run`; with resume, continue from checkpoints/last.pt.

    Returns None when the run's phase 1 had already finished (nothing to do).
    """
    if resume and run.pretrain_done.is_file() and run.encoder.is_file():
        return None
    trainer = Pretrainer(cfg, run)  # reads the data and builds the model: bad input fails before any write
    resuming = run.prepare(dump_yaml(cfg), resume, overwrite)
    if resuming:
        trainer.resume()
        atomic_write_text(run.config, dump_yaml(cfg))  # only PHASE1_FREE settings can differ here
    return trainer.fit(progress)
