"""Phase 1: the pre-training loop (SGD with warm-up + cosine, exact resume, metrics, checkpoints).

Data-parallel over several processes when launched by torchrun (`robustcl.distributed`): each rank
trains on its shard of the global batch with identical parameters; rank 0 alone shows progress,
writes metrics, checkpoints and the encoder. A single process is the same code with world size 1.

Free adversarial training (method.attack.mode=free, m = method.attack.replays): every batch is given
for m consecutive optimiser steps. A step is one optimiser step, so `train.max_steps` counts
replays, an epoch (one pass over the data) is m x the batches, and `train.epochs` /
`train.warmup_epochs` count passes over the data (m x the optimiser steps of the same setting
without replay; Shafahi et al. divide the epochs by m to keep the number of steps). Checkpoints are
taken at replay boundaries only (a due one waits for the batch's last replay) and hold each rank's
carried perturbations, so a resumed run draws the next batch's views from the restored generator
exactly as an uninterrupted one does.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from robustcl.config import CHANGEABLE_ON_RESUME, Config, dump_yaml, reference_switches
from robustcl.distributed import Distributed, job_from_env
from robustcl.export import export_encoder, read_headline_encoder
from robustcl.methods import Method, SetupEnv
from robustcl.methods.factory import build_training, encoder_export_fields
from robustcl.objectives.infonce import default_gather
from robustcl.runs import RunDir, RunError, atomic_write_text, open_run, save_torch_atomic
from robustcl.runs.guard import RunLock, probe_writable, refuse_foreign, refuse_unsafe_files
from robustcl.runs.loaders import RunFileError, checkpoint_fix, load_checkpoint, load_state_into
from robustcl.runtime import config_change, governed, open_runtime, pace_threads, started_config
from robustcl.splits import load_split, train_val_indices
from robustcl.runs.loggers import MetricLogger, open_logger
from robustcl.runs.progress import StepBar
from robustcl.train.diagnostics import Diagnostics, drop_after
from robustcl.train.schedule import reference_learning_rate


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


class CatastrophicOverfitting(RuntimeError):
    """The held-out robust k-NN accuracy collapsed (diagnostics.on_collapse=stop); the last checkpoint is kept."""


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
    """Builds everything phase 1 needs from a Config and runs it inside a run directory.

    `distributed` (default: the initialised process group, else a single process) is this
    process's rank in a data-parallel job: it trains on its shard of every global batch, with
    cross-rank batch norm, InfoNCE keys gathered from all ranks and gradients averaged over ranks.
    """

    def __init__(self, cfg: Config, run: RunDir, distributed: Distributed | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.dist = distributed if distributed is not None else Distributed.current()
        t = cfg.train
        runtime = open_runtime(cfg)  # threads set; a missing TensorBoard / W&B library fails here, before any write
        self.device = self.dist.device(runtime.device)
        self.dist.shard(t.batch_size)  # a batch the ranks cannot split evenly fails here, before any write
        data = load_split(cfg, "train")
        train_idx, val_idx = train_val_indices(len(data), cfg.data.val_size, cfg.seed)
        if cfg.data.train_limit is not None:
            train_idx = train_idx[: cfg.data.train_limit]
        self.images = data.images[train_idx].to(self.device)
        self.info = data.info
        if len(self.images) < t.batch_size:
            raise RunError(f"train.batch_size={t.batch_size} exceeds the {len(self.images)} training images; lower it")
        self.training = build_training(cfg, data.info, self.device, self.dist, lr_at=self.lr_at)
        self.method: Method = self.training.method
        self.optimizers = self.training.optimizers  # one per `Method.param_groups` key, all checkpointed
        self.optimizer = self.optimizers["encoder"]
        self.critic_optimizer = self.optimizers.get("critic")
        self.sam = self.training.sam
        self.ctx = self.training.ctx
        self.generator = self.ctx.generator
        self.replays = self.ctx.free.replays if self.ctx.free is not None else 1  # optimiser steps per batch
        self.steps_per_epoch = len(self.images) // t.batch_size * self.replays  # optimiser steps per pass
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.diagnostics = (Diagnostics(cfg, self.method, data.images[val_idx], data.labels[val_idx],
                                        data.info.num_classes, self.device, self.ctx.autocast, self.ctx.prepare)
                            if cfg.diagnostics.every > 0 and self.dist.is_main else None)
        # (held-out labels: measured, never trained on; rank 0 alone measures and logs)
        self.step = 0
        self.epoch_started: int | None = None  # the epoch whose `Method.on_epoch_start` ran last in this process
        self.saved_step: int | None = None  # step of the checkpoint on disk, None until one is written
        self.logger: MetricLogger | None = None  # rank 0, while fit() runs
        self.sync_from_main()

    def setup_method(self) -> None:
        """`Method.setup` on every rank, once the run directory is prepared (a method may write under it, e.g.
        DeACL's stage 1 in <run>/teacher) and before a resume loads the checkpoint over what it set up. The
        method may train another run with this module's own `pretrain` and read a finished run's encoder."""
        self.method.setup(SetupEnv(self.cfg, self.run.root, self.device, self.dist, quiet=not self.dist.is_main,
                                   pretrain=pretrain, read_run_encoder=read_headline_encoder))

    def sync_from_main(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (a no-op for a single process)."""
        self.dist.broadcast_(self.method.state_dict().values())

    def lr_at(self, step: int, base: float) -> float:
        """Optimiser step `step`'s learning rate for base rate `base`: linear warm-up then per-step cosine, or
        the authors' schedule (set after each step, cosine per epoch) under reference.schedule."""
        t = self.cfg.train
        if reference_switches(self.cfg).schedule:
            return reference_learning_rate(step, self.steps_per_epoch, self.total_steps / self.steps_per_epoch,
                                           t.warmup_epochs, base, t.min_lr)
        return learning_rate(step, self.total_steps, self.warmup_steps, base, t.min_lr)

    # ------------------------------------------------------------------ state
    def rng_state(self) -> dict[str, Any]:
        """This rank's random state: its view generator, torch's and Python's global RNGs, CUDA's."""
        return {"views": self.generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}

    def state_dict(self, rng_ranks: list[dict[str, Any]] | None = None,
                   free_ranks: list[list[torch.Tensor]] | None = None) -> dict[str, Any]:
        """Everything an exact resume needs; loadable with torch.load(weights_only=True).

        Model and optimiser state are the same on every rank. "rng" is this process's random state;
        a job of several ranks also stores "rng_ranks", every rank's, in rank order (gathered by
        `save_checkpoint`), and "world_size" says how many ranks wrote it. In free mode "free_ranks"
        holds every rank's carried perturbations (rank order; `FreeReplay.state`).
        """
        state = {
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer else None,
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items() if k not in ("encoder", "critic")},
            "sam": {"rho": self.sam.rho, "adaptive": self.sam.adaptive} if self.sam else None,
            "scheduler": {"step": self.step, "total": self.total_steps, "warmup": self.warmup_steps},
            "rng": self.rng_state(),
            "world_size": self.dist.world,
            "config": self.cfg.to_dict(),
        }
        if rng_ranks is not None and self.dist.world > 1:
            state["rng_ranks"] = rng_ranks
        if self.ctx.free is not None:
            state["free_ranks"] = free_ranks if free_ranks is not None else [self.ctx.free.state()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore model, optimisers, step and this rank's random state ("rng_ranks"[rank] when present)."""
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        for key, opt in self.optimizers.items():  # a method's further optimisers (none for most methods)
            if key not in ("encoder", "critic"):
                opt.load_state_dict(state["optimizers"][key])
        rng = state["rng_ranks"][self.dist.rank] if "rng_ranks" in state else state["rng"]
        self.generator.set_state(rng["views"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        if self.ctx.free is not None:  # this rank's carried perturbations (free mode)
            self.ctx.free.load(state["free_ranks"][self.dist.rank], self.step, self.device)

    def diverged(self, what: str) -> NonFiniteLoss:
        """The error for a run that went non-finite: what is kept (or that nothing is) and how to start again."""
        kept = (f"{self.run.checkpoint} keeps the last good state (step {self.saved_step}; resuming it repeats the "
                "same steps)" if self.saved_step is not None else "no checkpoint was written yet, so nothing is kept")
        return NonFiniteLoss(f"{what}; the run stopped and {kept}; lower train.lr and start again: robustcl pretrain "
                             f"--config {self.run.config} --out {self.run.root} --overwrite train.lr=<lower>")

    def save_checkpoint(self) -> None:
        """Write checkpoints/last.pt atomically (rank 0), refusing non-finite parameters or buffers (BN running
        statistics) so that the previous checkpoint stays the last good one (one host sync).

        Every rank calls it: parameters and buffers are identical across ranks, so all of them stop
        together on a non-finite one, and each contributes its random state to the checkpoint.
        """
        named = [(k, t) for k, t in itertools.chain(self.method.named_parameters(), self.method.named_buffers())
                 if t.is_floating_point()]
        if not torch.stack([torch.isfinite(t).all() for _, t in named]).all():
            bad = [k for k, t in named if not torch.isfinite(t).all()]
            raise self.diverged(f"non-finite values at step {self.step} in {', '.join(bad[:3])}"
                                + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
        rng_ranks = self.dist.all_gather_object(self.rng_state()) if self.dist.world > 1 else None
        free_ranks = self.dist.all_gather_object(self.ctx.free.state()) if self.ctx.free is not None else None
        self.dist.on_main(lambda: save_torch_atomic(self.state_dict(rng_ranks, free_ranks), self.run.checkpoint))
        self.saved_step = self.step

    def resume(self) -> None:
        """Load checkpoints/last.pt (refusing a config that changes phase 1, or another number of ranks)
        and drop later metrics."""
        state = load_checkpoint(self.run.checkpoint, self.device)
        changed = config_change(state["config"], self.cfg, CHANGEABLE_ON_RESUME)
        if changed:
            raise RunError(f"cannot resume {self.run.root} with a changed phase-1 setting ({changed}); "
                           "resume without it, or start a new run (--out) or --overwrite")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world:
            raise RunError(f"cannot resume {self.run.root}: its checkpoint was written by {saved_world} process(es) "
                           f"and this job has {self.dist.world}; resume with the same number "
                           f"(torchrun --nproc_per_node={saved_world}, or no torchrun for 1)")
        load_state_into(self.method, state["model"], self.run.checkpoint, checkpoint_fix(self.run.root))
        try:
            self.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - optimiser or RNG state of another shape: the file is unusable
            raise RunFileError(f"{self.run.checkpoint} cannot be restored ({type(exc).__name__}: {exc}); "
                               f"{checkpoint_fix(self.run.root)}") from None
        self.saved_step = self.step
        self.sync_from_main()
        self.dist.on_main(self._rewind_logs)

    def _rewind_logs(self) -> None:
        """Drop metrics logged after the checkpoint's step and restore the diagnostics' history (rank 0)."""
        self.run.truncate_metrics(self.step)
        drop_after(self.run, self.step)
        if self.diagnostics is not None:
            self.diagnostics.restore(self.run.read_metrics())

    # ------------------------------------------------------------------ loop
    def start_epoch_if_new(self) -> None:
        """`Method.on_epoch_start` when the current step opens an epoch not yet started in this fit (so at
        every epoch boundary, and at the first step of a resumed fit: the method's state is a function of
        the epoch alone, as exact resume needs)."""
        epoch = self.step // self.steps_per_epoch
        if epoch != self.epoch_started:
            self.method.on_epoch_start(epoch, self.total_steps / self.steps_per_epoch, self.ctx)
            self.epoch_started = epoch

    def batch(self, step: int) -> torch.Tensor:
        """This rank's uint8 rows of global step `step`'s batch: a seeded permutation per epoch (the same
        on every rank), so resume is exact; rank r takes the r-th contiguous 1/world of the batch.
        In free mode steps m*b .. m*b + m-1 all get batch b (its replays)."""
        epoch, i = divmod(step // self.replays, self.steps_per_epoch // self.replays)
        if getattr(self, "_perm_epoch", None) != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.images), generator=gen).to(self.device)
            self._perm_epoch = epoch
        b = self.cfg.train.batch_size
        return self.images[self._perm[i * b:(i + 1) * b][self.dist.shard(b)]]

    def mean_stats(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """The logged step statistics: per-step means over the window, averaged over ranks (one host sync).

        Every statistic is a per-rank mean (InfoNCE over the rank's queries), so the average over
        ranks is the value of the global batch.
        """
        if not sums:
            return {}
        values = torch.stack([v.float() for v in sums.values()]) / count
        self.dist.all_reduce_mean_([values])
        return dict(zip(sums, values.tolist()))

    def _diagnose(self, last: dict[str, float]) -> tuple[float, str | None]:
        """One diagnostics check (rank 0): logged; returns its seconds and the robust-collapse warning if any."""
        assert self.diagnostics is not None
        record = self.diagnostics.check(self.step, last)
        assert self.logger is not None
        self.logger.log(record)
        collapse = next((w for w in record["warnings"] if w.startswith("robust-collapse")), None)
        return record["seconds"], collapse

    def fit(self, progress: bool = True) -> PretrainResult:
        """Train to total_steps from the current step, logging through train.loggers (rank 0)."""
        def open_sinks() -> None:  # TensorBoard hides earlier processes' points after this step (a resume)
            self.logger = open_logger(self.run, self.cfg, purge_from=self.step + 1, resuming=self.step > 0)
        self.dist.on_main(open_sinks)
        try:
            return self._train(progress)
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None

    def _pace_threads(self, main: bool, start: bool = False) -> None:
        """`train.threads: auto`: the count at the start of a fit and each change of it (the machine's load
        changed) are metrics records."""
        threads = torch.get_num_threads() if start and governed() else pace_threads()
        if threads is not None and main and self.logger is not None:
            self.logger.log({"phase": "threads", "step": self.step, "threads": threads})

    def _train(self, progress: bool) -> PretrainResult:
        t = self.cfg.train
        main = self.dist.is_main
        bar = StepBar(self.total_steps, f"pretrain {self.cfg.method.name} {t.precision}", progress and main,
                      initial=self.step)
        sums: dict[str, torch.Tensor] = {}
        count, last, t0, window_start = 0, {}, time.perf_counter(), time.perf_counter()
        start_step, checkpoint_due = self.step, False
        self._pace_threads(main, start=True)
        self.epoch_started = None  # a (resumed) fit calls on_epoch_start at its first step
        while self.step < self.total_steps:
            self.start_epoch_if_new()
            lr = self.training.schedule(self.step)  # encoder groups (x lr_scale); D's under reference.critic_schedule
            with default_gather(self.dist.gather):  # InfoNCE keys from every rank (none for one process)
                stats = self.method.training_step(self.batch(self.step), self.ctx)
            for k, v in stats.items():  # accumulate on device: no host sync in the hot loop
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            count += 1
            self.step += 1
            self.method.on_step_end(self.step, self.total_steps, self.ctx)
            bar.update(1)
            self._pace_threads(main)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.step % t.log_every == 0 or self.step == self.total_steps or end_of_epoch:
                last = self.mean_stats(sums, count)
                bad = [k for k, v in last.items() if not math.isfinite(v)]
                if bad:
                    bar.close()
                    raise self.diverged(f"non-finite loss ({', '.join(bad)}) before step {self.step}")
                now = time.perf_counter()
                ips = count * t.batch_size / max(now - window_start, 1e-9)
                if main:
                    assert self.logger is not None
                    self.logger.log({"phase": "pretrain", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                     "lr": lr, "images_per_s": ips, **last, **self.method.epoch_metrics()})
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"img/s": f"{ips:.0f}"}, refresh=False)
                sums, count, window_start = {}, 0, now
            every = self.cfg.diagnostics.every
            if every > 0 and (self.step % every == 0 or self.step == self.total_steps):
                seconds, collapse = self.dist.on_main(lambda: self._diagnose(last))  # rank 0 measures
                window_start += seconds  # images_per_s keeps measuring training alone
                if collapse and self.cfg.diagnostics.on_collapse == "stop":
                    bar.close()
                    raise CatastrophicOverfitting(
                        f"stopped at step {self.step}: {collapse}; {self.run.checkpoint} keeps the last state "
                        "before it. Train with method.attack.mode=pgd (more steps), a lower train.lr, or "
                        "diagnostics.on_collapse=warn to continue anyway")
            checkpoint_due = checkpoint_due or self.step % t.checkpoint_every == 0 or end_of_epoch
            if (checkpoint_due and self.step % self.replays == 0) or self.step == self.total_steps:
                self.save_checkpoint()  # free mode: at the end of a batch's replays (or of the run)
                checkpoint_due = False
        bar.close()
        seconds = time.perf_counter() - t0
        done = self.step - start_step
        self.dist.on_main(self._finish)
        return PretrainResult(self.step, seconds, done * t.batch_size / max(seconds, 1e-9), last)

    def _finish(self) -> None:
        """Export the encoder and mark phase 1 done (rank 0)."""
        export_encoder(self.method.encoder, self.run.encoder, self.info, self.cfg,
                       **encoder_export_fields(self.cfg, self.info))
        atomic_write_text(self.run.pretrain_done, f"{self.step}\n")


def preflight(cfg: Config, run: RunDir, resume: bool) -> None:
    """Before any work: a resume changes no phase-1 setting of config.yaml (finished runs included); then, unless
    there is nothing to write, the run directory can be written, no other live process writes into it and none
    of its files is a symbolic link."""
    if resume and run.config.is_file():
        stored = run.config.read_text(encoding="utf-8")
        changed = config_change(started_config(run.config) or {}, cfg, CHANGEABLE_ON_RESUME)
        if changed:
            raise RunError(f"cannot resume {run.root} with a changed phase-1 setting ({changed}); "
                           "resume without it, or start a new run (--out) or --overwrite")
        if run.pretrain_done.is_file() and run.encoder.is_file() and stored == dump_yaml(cfg):
            return  # finished, same settings: nothing will be written
    probe_writable(run.root, f"the run directory {run.root}")
    RunLock(run.root).check()
    if not resume:  # a resume needs a checkpoint or a marked run (RunDir.prepare): older runs stay resumable
        refuse_foreign(run.root)
    if run.root.is_dir():
        refuse_unsafe_files(run.root)


def record_settings(cfg: Config, run: RunDir) -> None:
    """A finished run resumed with changed phase-2/evaluation settings: store them in config.yaml (under the lock),
    as a resume from a checkpoint does, so finetune/evaluate (and `robustcl run --resume`) use them."""
    text = dump_yaml(cfg)
    if run.config.read_text(encoding="utf-8") != text:
        with RunLock(run.root):
            atomic_write_text(run.config, text)


def pretrain(cfg: Config, run: RunDir, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> PretrainResult | None:
    """Phase 1 for `cfg` in `run`; with resume, continue from checkpoints/last.pt (from step 0 when the run
    was stopped before its first checkpoint).

    Under torchrun (or inside an initialised process group) every process calls this and they train
    data-parallel (`robustcl.distributed`); rank 0 writes the run directory and holds its lock while
    it does. Returns None when the run's phase 1 had already finished (nothing to do).
    """
    runtime = open_runtime(cfg, started_config(run.config) if resume else None)  # `auto` as the stored run resolved it
    cfg, device = runtime.cfg, runtime.device
    with job_from_env(device) as job:
        job.on_main(lambda: preflight(cfg, run, resume))  # fails before any work and any write
        if resume and run.pretrain_done.is_file() and run.encoder.is_file():
            job.on_main(lambda: record_settings(cfg, run))
            return None
        trainer = Pretrainer(cfg, run, job)  # reads the data and builds the model: bad input fails before any write
        lock = RunLock(run.root)  # probe, lock, prepare: one round trip to rank 0, which holds the lock till the end
        resuming = job.on_main(lambda: open_run(run, lock, dump_yaml(cfg), resume, overwrite, f"the run directory {run.root}"))
        try:
            trainer.setup_method()
            if resuming:
                trainer.resume()
                job.on_main(lambda: atomic_write_text(run.config, dump_yaml(cfg)))  # only CHANGEABLE_ON_RESUME keys differ
            elif resume:  # stopped before its first checkpoint: drop what it logged, train from step 0
                job.on_main(trainer._rewind_logs)
            return trainer.fit(progress)
        finally:
            if job.is_main:
                lock.release()
