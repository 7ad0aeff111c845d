"""The phase-1 factory (`robustcl.methods.factory`) and the trainer's use of the method hooks: parameter groups,
lr schedule, per-epoch and per-step hooks, auxiliary networks, checkpoints and exact resume."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from robustcl.config import load_config
from robustcl.data import dataset_info
from robustcl.methods import METHODS, SetupEnv, StepContext, method_class
from robustcl.methods.step import optimizer_params
from robustcl.methods.factory import build_training
from robustcl.methods.simclr import Simclr, SimclrConfig
from robustcl.runs import RunDir
from robustcl.train.pretrain import Pretrainer, pretrain

CPU = torch.device("cpu")
# 64 training images in batches of 32: two steps an epoch, three epochs in six steps
SHORT = ["data.train_limit=64", "train.max_steps=6", "train.threads=1", "train.log_every=1", "diagnostics.every=0"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # noqa: ANN202 - the Pretrainer sets torch's global thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def smoke(name: str, *overrides: str):
    """The smoke preset switched to method `name`, one attack step where it attacks."""
    cls = method_class(name)
    extra = [] if cls.attack_free(cls.config_class()) else ["method.attack.steps=1"]
    return load_config("smoke", [f"method.name={name}", *extra, "train.threads=1", *overrides])


def smoke_info() -> Any:
    return dataset_info("synthetic", channels=1, size=16, num_classes=4)


# ------------------------------------------------------------------------------------ the factory
@pytest.mark.parametrize("name", sorted(METHODS))
def test_build_training_makes_one_sgd_per_param_group_key_and_sam_over_the_encoder_optimiser(name):
    cfg = smoke(name)
    training = build_training(cfg, smoke_info(), CPU)
    method, ctx = training.method, training.ctx
    assert set(training.optimizers) == set(method.param_groups(cfg.train)) == set(ctx.optimizers)
    assert ctx.optimizer is training.optimizers["encoder"]
    assert ctx.critic_optimizer is training.optimizers.get("critic")
    assert (training.sam is not None) == (method.sam_config().mode != "off") and ctx.sam is training.sam
    if training.sam is not None:
        assert training.sam.params == optimizer_params(ctx.optimizer)
    assert torch.equal(training.generator.get_state(), torch.Generator().manual_seed(cfg.seed).get_state())


def test_schedule_scales_every_encoder_group_and_the_critic_only_under_its_reference_switch():
    def lr_at(step: int, base: float) -> float:
        return base * (step + 1) / 10

    for switch, expected_critic in (("false", 0.2), ("true", 0.2 * 4 / 10)):
        cfg = smoke("gbrcl", f"reference.critic_schedule={switch}")
        training = build_training(cfg, smoke_info(), CPU, lr_at=lr_at)
        encoder = training.optimizers["encoder"]
        encoder.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr_scale": 0.5})
        assert training.schedule(3) == pytest.approx(cfg.train.lr * 4 / 10)
        assert [g["lr"] for g in encoder.param_groups] == pytest.approx([cfg.train.lr * 0.4, cfg.train.lr * 0.2])
        assert training.optimizers["critic"].param_groups[0]["lr"] == pytest.approx(expected_critic)


def test_optimizer_step_steps_the_optimiser_under_a_key_on_its_own_loss():
    training = build_training(smoke("gbrcl"), smoke_info(), CPU)
    critic = training.method.critic
    before = [p.detach().clone() for p in critic.parameters()]
    loss = critic(torch.randn(4, 16)).square().mean()
    training.ctx.optimizer_step("critic", loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.parameters()))


def test_an_auxiliary_module_in_the_param_groups_is_refused(registry):
    class Leaky(Simclr):
        name = "leaky-test"

        def auxiliary_modules(self) -> dict[str, nn.Module]:
            return {"projector": self.projector}  # also in the default "encoder" group

    with pytest.raises(TypeError, match="hold parameters of an auxiliary module"):
        build_training(load_config("smoke", ["method.name=leaky-test"]), smoke_info(), CPU)


# ------------------------------------------------------------------------------------ trainer hooks
def _kill_at_call(monkeypatch: pytest.MonkeyPatch, cls: type, call: int) -> None:
    """Make cls.training_step raise KeyboardInterrupt at its `call`-th call (a killed run)."""
    original = cls.training_step
    calls = {"n": 0}

    def dying(self, images, ctx):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(cls, "training_step", dying)


def _straight_and_resumed(cfg, tmp_path: Path, cls: type, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """Final checkpoints of an uninterrupted run and of one killed after its step-3 checkpoint (mid-epoch 1),
    then resumed."""
    straight, killed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed")
    pretrain(cfg, straight, progress=False)
    with monkeypatch.context() as patch:
        _kill_at_call(patch, cls, 4)  # steps 0-2 ran; checkpoints at 2 (epoch end) and 3 (checkpoint_every)
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, killed, progress=False)
    assert torch.load(killed.checkpoint, weights_only=True)["step"] == 3
    pretrain(cfg, killed, resume=True, progress=False)
    return (torch.load(straight.checkpoint, weights_only=True), torch.load(killed.checkpoint, weights_only=True))


def _assert_same_models(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_method_defined_in_a_test_trains_and_on_epoch_start_runs_at_each_epoch_and_on_resume(
        registry, tmp_path, monkeypatch):
    """An epoch-dependent augmentation strength (as DynACL anneals its own) set in on_epoch_start: called at
    every epoch boundary and at the first step of a resumed fit, so the resumed run equals the straight one."""
    @dataclass
    class AnnealedConfig(SimclrConfig):
        name: str = "annealed-test"

    class Annealed(Simclr):
        name = "annealed-test"
        config_class = AnnealedConfig
        epochs: ClassVar[list[tuple[int, float]]] = []

        def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
            type(self).epochs.append((epoch, total_epochs))
            ctx.strong = dataclasses.replace(ctx.strong, crop_scale=(0.2 + 0.3 * epoch, 1.0))

    assert registry["annealed-test"] is Annealed
    cfg = load_config("smoke", ["method.name=annealed-test", *SHORT, "train.checkpoint_every=3"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "probe"))
    assert type(trainer.method) is Annealed and trainer.steps_per_epoch == 2
    a, b = _straight_and_resumed(cfg, tmp_path, Annealed, monkeypatch)
    _assert_same_models(a, b)
    # straight: epochs 0, 1, 2; killed: 0, 1 (dies at step 3, inside epoch 1); resumed at step 3: 1, 2
    assert [e for e, _ in Annealed.epochs] == [0, 1, 2, 0, 1, 1, 2]
    assert all(total == 3.0 for _, total in Annealed.epochs)


def test_on_epoch_start_is_called_again_when_a_fit_resumes_inside_an_epoch(registry, tmp_path):
    """A checkpoint taken mid-epoch: the resumed fit calls on_epoch_start for that epoch before its first step."""
    seen: list[tuple[int, int]] = []

    class Recording(Simclr):
        name = "recording-test"

        def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
            seen.append((epoch, self.trainer_step()))

        def trainer_step(self) -> int:
            return trainer.step

    cfg = load_config("smoke", ["method.name=recording-test", *SHORT])
    run = RunDir(tmp_path / "run")
    trainer = Pretrainer(cfg, run)
    run.prepare("x\n", False, False)
    trainer.step = 3  # as after loading a step-3 checkpoint
    trainer.fit(progress=False)
    assert seen == [(1, 3), (2, 4)]


class _Teacher(nn.Module):
    """A BN-and-linear network whose forward records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
        self.modes: list[bool] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.net(z)


def _method_with_teacher() -> type[Simclr]:
    """A SimCLR with an EMA teacher (a submodule, not trained by any optimiser, moved in on_step_end), a predictor
    group with lr_scale in the encoder optimiser and a further optimiser of its own; registered when called."""
    class WithTeacher(Simclr):
        name = "teacher-test"

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.teacher = _Teacher().requires_grad_(False)
            self.predictor = nn.Linear(16, 16)
            self.offset = nn.Parameter(torch.zeros(16))
            self.set_up: list[SetupEnv] = []

        def auxiliary_modules(self) -> dict[str, nn.Module]:
            return {"teacher": self.teacher}

        def param_groups(self, train):  # noqa: ANN001, ANN202
            groups = super().param_groups(train)
            groups["encoder"].append({"params": list(self.predictor.parameters()), "lr": train.lr, "lr_scale": 0.5,
                                      "momentum": 0.9, "weight_decay": 0.0, "name": "predictor"})
            groups["offset"] = [{"params": [self.offset], "lr": 0.01, "momentum": 0.9, "name": "offset"}]
            return groups

        def setup(self, env: SetupEnv) -> None:
            self.set_up.append(env)

        def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
            stats = super().training_step(images, ctx)
            with torch.no_grad():
                z = self.embed(images.float().div(255), "benign")
                self.teacher(z)
            ctx.optimizer_step("offset", (self.predictor(z) + self.offset - self.teacher(z)).square().mean())
            return stats

        def on_step_end(self, step: int, total_steps: int, ctx: StepContext) -> None:
            with torch.no_grad():  # EMA of the predictor into the teacher's linear layer
                self.teacher.net[0].weight.lerp_(self.predictor.weight, 0.5)

    return WithTeacher


def test_an_auxiliary_module_is_checkpointed_stays_in_eval_mode_and_out_of_the_optimisers(
        registry, tmp_path, monkeypatch):
    """The auxiliary module, the predictor group and the further optimiser of `_method_with_teacher`: all
    checkpointed, resumed exactly."""
    WithTeacher = _method_with_teacher()  # noqa: N806 - a class
    cfg = load_config("smoke", ["method.name=teacher-test", *SHORT, "train.checkpoint_every=3"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "probe"))
    trainer.run.prepare("x\n", False, False)
    method = trainer.method
    assert method.set_up == []  # setup waits for the prepared run directory (pretrain() calls it after prepare)
    trainer.setup_method()
    assert [env.run_root for env in method.set_up] == [tmp_path / "probe"] and not method.set_up[0].quiet
    assert method.set_up[0].pretrain is not None and method.set_up[0].read_run_encoder is not None  # lent
    stepped = {id(p) for opt in trainer.optimizers.values() for p in optimizer_params(opt)}
    assert set(trainer.optimizers) == {"encoder", "offset"}
    assert not stepped & {id(p) for p in method.teacher.parameters()}
    assert {id(p) for p in method.predictor.parameters()} <= {id(p) for p in optimizer_params(trainer.optimizer)}
    method.train()
    assert method.training and method.encoder.training and not method.teacher.training
    before = copy.deepcopy(method.teacher.state_dict())
    trainer.total_steps = 1
    lr = trainer.training.schedule(0)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr, 0.5 * lr]
    trainer.fit(progress=False)
    assert method.teacher.modes and not any(method.teacher.modes)  # every teacher forward in eval mode
    assert torch.equal(method.teacher.net[1].running_mean, before["net.1.running_mean"])  # eval: stats unmoved
    assert not torch.equal(method.teacher.net[0].weight, before["net.0.weight"])  # moved by on_step_end
    state = torch.load(trainer.run.checkpoint, weights_only=True)
    assert {"teacher.net.0.weight", "teacher.net.1.running_mean"} <= set(state["model"])
    assert set(state["optimizers"]) == {"offset"} and state["optimizers"]["offset"]["state"]  # momentum kept
    a, b = _straight_and_resumed(cfg, tmp_path, WithTeacher, monkeypatch)
    _assert_same_models(a, b)
    assert torch.equal(a["optimizers"]["offset"]["state"][0]["momentum_buffer"],
                       b["optimizers"]["offset"]["state"][0]["momentum_buffer"])
