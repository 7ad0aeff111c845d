"""DeACL (Zhang et al., "Decoupled Adversarial Contrastive Learning for Self-supervised Adversarial Robustness",
ECCV 2022, arXiv 2207.10899; code github.com/pantheon5100/DeACL): a frozen non-robust SSL teacher T, then a
student f trained adversarially to match T's features.

Stage 1 is an ordinary run (SimCLR in the paper). Stage 2, one step on the weak (pad-crop-flip) view x:
  t  = T(x)                                          teacher features, eval mode, no gradient
  x' = PGD on x minimising cos(f(x'), t)             f in eval mode, parameters frozen
  L  = -mean cos(f(x), t) - gamma * mean cos(f(x'), f(x))
  ("distill" and "robust" terms, weights 1 and gamma; the gradient flows through both f(x') and f(x)).
Features are encoder outputs: the authors replace the projector by the identity, and so does DeACL here
(z = f(x); the student has no projection head). The student has one BN; x and x' go through it as one
batch [x; x'], as in the authors' step. Its headline branch is benign. As in their scripts (no
`--student_scratch`), the student starts from the teacher's weights and BN statistics
(`student_init: teacher`); `student_init: scratch` is their ablation.

`method.teacher` is a finished robustcl run directory (any method; its encoder is read through its
headline branch with the reader the harness lends, `SetupEnv.read_run_encoder`, i.e.
`robustcl.export.read_headline_encoder`), a preset name / YAML path, or empty (stage 1 is then this
run's own config with method.name=simclr). A config is stage 1: `setup` trains it, or resumes it, in
<run>/teacher with robustcl's own pretrain entry point (lent by the harness as `SetupEnv.pretrain`),
then loads it; a finished <run>/teacher is not trained again, so one command (or a resumed one) runs
both stages.
The stage-1 config is that preset with this run's data, model and seed and its runtime settings
(train.device, threads, loggers), then `method.teacher_overrides`; `--overwrite` of the DeACL run
keeps <run>/teacher (delete it to train stage 1 again).
The teacher is an auxiliary module: in the method's state dict (checkpointed and resumed with it),
always in eval mode, requires_grad False, never in the optimiser. Until `setup` loads it, it is a
copy of the student's (untrained) encoder, so a method built without a run (bench, tests) still steps.

Where robustcl differs from the authors' code (solo-learn based: mocov2_distillation_AT.py,
base_for_adversarial_training.py, bash_files/DeACL_cifar10_resnet18.sh):
- The teacher is robustcl's own SimCLR run (presets cifar10-simclr / cifar100-simclr: 500 epochs,
  batch 512), not the solo-learn SimCLR checkpoint they distil from (`simclr-cifar10-...-ep=999.ckpt`).
- Their CIFAR-100 script names the CIFAR-10 SimCLR teacher (`--distillation_teacher simclr_cifar10`,
  the only SimCLR entry of their teacher table); cifar100-deacl trains a CIFAR-100 teacher. A CIFAR-10
  teacher for CIFAR-100 is `method.teacher=<a cifar10-simclr run dir>`.
- PGD's random start is clipped to [0, 1] (theirs is not: `reference.unclipped_start` reproduces it).
- Their step also trains an online linear classifier on labels (eval mode, detached features: no
  effect on the encoder, a monitor only): not done; robustcl uses no labels in phase 1.
- Precision: theirs fp32 (CIFAR-10 script) / fp16 (CIFAR-100 script); the presets' `auto` (bf16 where
  native, loss terms in fp32).
- Schedule: robustcl's per-step linear warm-up from ~0 then cosine (theirs: per-epoch warm-up from
  lr 0.003 over 10 epochs, then cosine to 0), and 5,000 training images held out for phase-2
  selection (theirs trains on all 50,000).
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from robustcl.config import AttackConfig, Config, ConfigError, apply_overrides, from_mapping, load_config
from robustcl.methods.method import Method, MethodConfig, SetupEnv
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd
from robustcl.models import Encoder
from robustcl.runs import RunDir, RunError

# Settings of the DeACL run that the stage-1 (teacher) config takes over: what it trains on and with what
# architecture, so that student and teacher agree, and where and how it runs.
IMPOSED = ("seed", "data", "model")
IMPOSED_TRAIN = ("device", "threads", "loggers", "wandb_project")
T = TypeVar("T")


@dataclass
class DeaclConfig(MethodConfig):
    """DeACL stage 2: the teacher (run dir or config), gamma, the student's start, the attack."""
    name: str = "deacl"
    # a finished run directory, a preset name / YAML path trained as stage 1 in <run>/teacher, or empty:
    # stage 1 is this run's own config with method.name=simclr
    teacher: str = ""
    teacher_overrides: tuple[str, ...] = ()   # key=value applied to the stage-1 config last
    gamma: float = 2.0                        # weight of the robustness term (authors: --trades_k 2)
    student_init: Literal["teacher", "scratch"] = "teacher"  # the student starts as the teacher (authors), or fresh
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))  # 8/255, 2/255, PGD-5

    def validate(self) -> None:
        super().validate()
        if self.gamma < 0:
            raise ConfigError(f"config value method.gamma={self.gamma!r} must be >= 0")


class IdentityHead(nn.Identity):
    """DeACL's projection head: none (the authors set it to nn.Identity), z = f(x)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim


class TeacherFeatures(nn.Module):
    """A frozen encoder read through one fixed BN branch: forward(x) -> its unit-norm features."""

    def __init__(self, encoder: nn.Module, branch: str) -> None:
        super().__init__()
        self.encoder, self.branch = encoder, branch
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.branch)


def deacl_terms(student_clean: torch.Tensor, student_adv: torch.Tensor, teacher: torch.Tensor,
                only: tuple[str, ...] | None = None) -> Terms:
    """"distill" = -mean_i cos(f(x_i), t_i), "robust" = -mean_i cos(f(x'_i), f(x_i)) (weights 1 and gamma)."""
    terms: Terms = {}
    if only is None or "distill" in only:
        terms["distill"] = -F.cosine_similarity(student_clean.float(), teacher.float(), dim=1).mean()
    if only is None or "robust" in only:
        terms["robust"] = -F.cosine_similarity(student_adv.float(), student_clean.float(), dim=1).mean()
    return terms


def teacher_config(cfg: Config, teacher: str, overrides: tuple[str, ...]) -> Config:
    """Stage 1's config: preset/YAML `teacher` with cfg's seed, data, model and runtime settings (empty
    `teacher`: cfg itself with method.name=simclr), then `overrides`."""
    mine = cfg.to_dict()
    data = load_config(teacher).to_dict() if teacher else {**mine, "method": {"name": "simclr"}}
    for key in IMPOSED:
        data[key] = mine[key]
    for key in IMPOSED_TRAIN:
        data["train"][key] = mine["train"][key]
    apply_overrides(data, list(overrides))
    return from_mapping(data)


def lent(entry: T | None, name: str, what: str) -> T:
    """`entry`, a SetupEnv field the harness lends; a RuntimeError naming it when this SetupEnv lacks it."""
    if entry is None:
        raise RuntimeError(f"deacl needs SetupEnv.{name} to {what}; robustcl's pretrain lends it (a SetupEnv built "
                           "elsewhere must pass it)")
    return entry


@contextlib.contextmanager
def kept_rng(device: torch.device) -> Iterator[None]:
    """Run a block without changing torch's (CPU and CUDA) and Python's global random state."""
    python = random.getstate()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python)


class Deacl(Method):
    """DeACL stage 2: a single-BN student matching a frozen teacher's features, robust by a feature attack."""

    name = "deacl"
    config_class = DeaclConfig
    dual_bn = False
    headline_branch = "benign"
    cfg: DeaclConfig

    def __init__(self, cfg: DeaclConfig, encoder: Encoder, projector: nn.Module, critic: nn.Module | None = None
                 ) -> None:
        super().__init__(cfg, encoder, IdentityHead(encoder.feature_dim), critic)  # type: ignore[arg-type]
        self.teacher = TeacherFeatures(copy.deepcopy(encoder), "benign")  # placeholder until `setup`

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def train(self, mode: bool = True) -> "Deacl":
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics never move
        return self

    # ------------------------------------------------------------------ stage 1
    def setup(self, env: SetupEnv) -> None:
        """Load the teacher: a run directory as it is, a config after training/resuming it in <run>/teacher."""
        source = self.cfg.teacher
        if source and Path(source).is_dir():
            self.install_teacher(Path(source), env)
            return
        if env.run_root is None:  # no run (bench, a bare step): the placeholder teacher stays
            if not env.quiet:
                print(f"deacl: no run directory, so stage 1 ({source or 'this config as simclr'}) is not trained; "
                      "stepping against an untrained teacher")
            return
        self.install_teacher(self.train_teacher(env), env)

    def train_teacher(self, env: SetupEnv) -> Path:
        """Train or resume stage 1 in <run>/teacher (a finished one is left as it is) with the harness's own
        pretrain entry point (`env.pretrain`); returns its directory."""
        pretrain = lent(env.pretrain, "pretrain", "train stage 1")
        cfg = teacher_config(env.cfg, self.cfg.teacher, self.cfg.teacher_overrides)
        run = RunDir(Path(env.run_root) / "teacher")
        try:
            with kept_rng(env.device):  # stage 2 draws the same numbers whether stage 1 ran now or before
                pretrain(cfg, run, resume=run.config.is_file(), progress=not env.quiet)
        except RunError as exc:
            raise RunError(f"DeACL stage 1 (method.teacher={self.cfg.teacher}, in {run.root}): {exc}") from None
        if env.distributed is not None:
            env.distributed.barrier()  # rank 0 writes the teacher's encoder; the others read it next
        return run.root

    def install_teacher(self, root: Path, env: SetupEnv) -> None:
        """Read a finished run's encoder (with `env.read_run_encoder`) as the frozen teacher (and, with
        student_init=teacher, the student's start)."""
        read_run_encoder = lent(env.read_run_encoder, "read_run_encoder", "read the teacher's encoder")
        run = RunDir(root)
        if not (run.pretrain_done.is_file() and run.encoder.is_file()):
            raise RunError(f"method.teacher={root} is not a finished run (no {run.pretrain_done.name}); finish it "
                           f"first: robustcl pretrain --resume --out {root}")
        encoder, branch = read_run_encoder(root)
        if encoder.feature_dim != self.encoder.feature_dim:
            raise ConfigError(f"method.teacher={root} has {encoder.feature_dim}-d features, this student "
                              f"{self.encoder.feature_dim}-d; use a teacher of the student's model (model.*)")
        if self.cfg.student_init == "teacher":
            self.start_from(encoder, root)
        self.teacher = TeacherFeatures(encoder, branch).to(env.device)
        if any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in self.encoder.parameters()):
            self.teacher.to(memory_format=torch.channels_last)  # the student's layout (train.channels_last)

    def start_from(self, teacher: Encoder, root: Path) -> None:
        """Copy the teacher's backbone (weights, BN statistics) into the student's, in place (the optimiser keeps
        its tensors); the student keeps its own input normalisation."""
        mine, theirs = self.encoder.backbone.state_dict(), teacher.backbone.state_dict()
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise ConfigError(f"method.student_init=teacher needs a teacher of the student's architecture, and "
                              f"{root} holds another (model.* or dual BN differ); set method.student_init=scratch "
                              "or use such a teacher")
        with torch.no_grad():
            for key, value in mine.items():
                value.copy_(theirs[key])

    # ------------------------------------------------------------------ stage 2
    def teacher_features(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """t = T(x): the frozen teacher's features, eval mode, no gradient."""
        self.teacher.eval()
        with torch.no_grad(), ctx.autocast():
            return self.teacher(x).float()

    def attack(self, x: torch.Tensor, target: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x' = PGD on x maximising -cos(f(x'), t) (eval mode, parameters frozen)."""
        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            return -F.cosine_similarity(self.embed(x_adv, "benign").float(), target, dim=1).mean()

        return eval_pgd(self, objective, x, self.cfg.attack, ctx)

    def loss_terms(self, x: torch.Tensor, x_adv: torch.Tensor, target: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """The two terms on f([x; x']) (one forward, one BN batch, as the authors)."""
        clean, adv = self.embed(torch.cat([x, x_adv]), "benign").chunk(2)
        return deacl_terms(clean, adv, target, only)

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = draw_view("weak", images, ctx)
        target = self.teacher_features(x, ctx)
        x_adv = self.attack(x, target, ctx)
        return ctx.encoder_step(lambda only: self.loss_terms(x, x_adv, target, only),
                                {"distill": 1.0, "robust": self.cfg.gamma})


__all__ = ["Deacl", "DeaclConfig", "deacl_terms", "teacher_config"]
