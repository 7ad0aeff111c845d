"""DeACL: its loss against a direct computation, its attack, its frozen teacher (bitwise, from a run directory),
and the two-stage chain (stage 1 trained in <run>/teacher, stage 2 resumed without retraining stage 1)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from robustcl.api import pretrain
from robustcl.config import ConfigError, load_config
from robustcl.distributed import Distributed
from robustcl.export import load_encoder, read_encoder, read_headline_encoder
from robustcl.methods import SetupEnv, StepContext, deacl
from robustcl.methods.factory import build_training
from robustcl.methods.deacl import Deacl, deacl_terms, teacher_config
from robustcl.methods.simclr import Simclr
from robustcl.runs import RunDir, RunError
from robustcl.splits import load_split
from robustcl.train.pretrain import pretrain as pretrain_run

SMALL = ["method.name=deacl", "method.attack.steps=2", "train.threads=1"]
TEACHER = ["method.teacher=smoke", "method.teacher_overrides=[method.name=simclr, train.threads=1]"]


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads():  # noqa: ANN202 - the Pretrainer sets torch's global thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def build(*overrides: str) -> tuple[Deacl, StepContext, torch.Tensor]:
    """A DeACL method on the smoke config from the trainer's factory, and a batch of its images."""
    cfg = load_config("smoke", [*SMALL, *overrides])
    data = load_split(cfg, "train")
    training = build_training(cfg, data.info, torch.device("cpu"))
    assert isinstance(training.method, Deacl)
    return training.method, training.ctx, data.images[:16]


def env(cfg, run_root: Path | None) -> SetupEnv:
    return SetupEnv(cfg=cfg, run_root=run_root, device=torch.device("cpu"), distributed=Distributed(), quiet=True,
                    pretrain=pretrain_run, read_run_encoder=read_headline_encoder)


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step SimCLR run of the smoke model: a teacher run directory."""
    out = tmp_path_factory.mktemp("simclr") / "run"
    pretrain("smoke", out, ["method.name=simclr", "train.max_steps=3", "train.threads=1"])
    return out


# ------------------------------------------------------------------------------------------------ the loss
def test_the_terms_are_negative_mean_cosines_by_hand():
    clean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    terms = deacl_terms(clean, adv, teacher)
    assert terms["distill"].item() == pytest.approx(-(1.0 + 1 / math.sqrt(2)) / 2)
    assert terms["robust"].item() == pytest.approx(-(0.0 + 1.0) / 2)
    assert set(deacl_terms(clean, adv, teacher, ("robust",))) == {"robust"}


def test_the_terms_match_a_row_loop_in_float64():
    g = torch.Generator().manual_seed(1)
    clean, adv, teacher = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    terms = deacl_terms(clean, adv, teacher)

    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v)))

    assert terms["distill"].item() == pytest.approx(-sum(cos(clean[i], teacher[i]) for i in range(6)) / 6, rel=1e-6)
    assert terms["robust"].item() == pytest.approx(-sum(cos(adv[i], clean[i]) for i in range(6)) / 6, rel=1e-6)


def test_the_step_minimises_distill_plus_gamma_robust_on_f_of_the_weak_view_and_its_attack(monkeypatch):
    method, ctx, images = build("method.gamma=3.0")
    seen = {}

    def record(terms_fn, weights):  # noqa: ANN001, ANN202 - StepContext.encoder_step's signature
        seen["terms"], seen["weights"] = terms_fn(None), dict(weights)
        return {}

    monkeypatch.setattr(ctx, "encoder_step", record)
    views, attacks = [], []
    draw, attack = deacl.draw_view, Deacl.attack
    monkeypatch.setattr(deacl, "draw_view",
                        lambda kind, imgs, c: views.append((kind, draw(kind, imgs, c))) or views[-1][1])
    monkeypatch.setattr(Deacl, "attack",
                        lambda self, x, t, c: attacks.append(attack(self, x, t, c)) or attacks[-1])
    method.training_step(images, ctx)
    (kind, x), (x_adv,) = views[0], attacks
    assert len(views) == 1 and kind == "weak"
    assert seen["weights"] == {"distill": 1.0, "robust": 3.0}
    with torch.no_grad():
        method.train()
        both = method.encoder(torch.cat([x, x_adv]), "benign").double()  # one BN batch [x; x'], no projector
        f_x, f_adv = both[:16], both[16:]
        t = method.teacher.encoder(x, "benign").double()
    cos = torch.nn.functional.cosine_similarity
    assert seen["terms"]["distill"].item() == pytest.approx(-cos(f_x, t).mean().item(), rel=1e-5)
    assert seen["terms"]["robust"].item() == pytest.approx(-cos(f_adv, f_x).mean().item(), rel=1e-5)


def test_the_attack_stays_in_the_ball_and_moves_the_student_away_from_the_teacher(simclr_run):
    method, ctx, images = build("method.attack.steps=5", "method.attack.eps=0.1", "method.attack.alpha=0.03",
                                "method.student_init=scratch", f"method.teacher={simclr_run}")
    method.setup(env(load_config("smoke", SMALL), None))
    x = images.float() / 255
    target = method.teacher_features(x, ctx)
    x_adv = method.attack(x, target, ctx)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad(), method.evaluating():
        cos = torch.nn.functional.cosine_similarity
        assert cos(method.encoder(x_adv), target).mean() < cos(method.encoder(x), target).mean() - 1e-3


# ------------------------------------------------------------------------------------------------ the teacher
def test_a_step_leaves_the_teacher_bitwise_unchanged_and_out_of_the_optimiser():
    method, ctx, images = build("method.student_init=scratch")
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    student = [p.detach().clone() for p in method.encoder.parameters()]
    method.train()
    assert not method.teacher.training and all(not p.requires_grad for p in method.teacher.parameters())
    grouped = {id(p) for group in ctx.optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in method.encoder.parameters()}  # f only: no teacher, no projector
    for _ in range(2):
        stats = method.training_step(images, ctx)
    assert set(stats) == {"distill", "robust"} and all(torch.isfinite(v) for v in stats.values())
    after = method.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert any(not torch.equal(a, b) for a, b in zip(student, method.encoder.parameters()))
    assert all(k.startswith("teacher.") for k in method.state_dict() if k not in
               {f"encoder.{n}" for n in method.encoder.state_dict()})  # checkpointed with the method


def test_a_teacher_run_directory_is_loaded_as_that_runs_encoder(simclr_run):
    method, ctx, images = build(f"method.teacher={simclr_run}")
    method.setup(env(load_config("smoke", SMALL), None))  # a run directory needs no run of its own
    stored, _ = read_encoder(simclr_run)
    got = method.teacher.encoder.state_dict()
    assert got.keys() == stored.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in stored.state_dict().items())
    x = images.float() / 255
    with torch.no_grad():
        assert torch.equal(method.teacher(x), load_encoder(simclr_run)(x))
    mine = method.encoder.backbone.state_dict()  # student_init=teacher: the student starts as the teacher
    assert all(torch.equal(mine[k], v) for k, v in stored.backbone.state_dict().items())
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.training_step(images, ctx)
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())


def test_deacl_reads_and_trains_runs_only_through_what_the_harness_lends(simclr_run, tmp_path):
    """No method imports the harness or the exporter: a SetupEnv without the lent entry points is a clear error."""
    method, _, _ = build(f"method.teacher={simclr_run}")
    bare = SetupEnv(cfg=load_config("smoke", SMALL), run_root=None, device=torch.device("cpu"),
                    distributed=Distributed(), quiet=True)
    with pytest.raises(RuntimeError, match=r"SetupEnv\.read_run_encoder"):
        method.setup(bare)
    method, _, _ = build(*TEACHER)
    with pytest.raises(RuntimeError, match=r"SetupEnv\.pretrain"):
        method.setup(SetupEnv(cfg=load_config("smoke", [*SMALL, *TEACHER]), run_root=tmp_path / "run",
                              device=torch.device("cpu"), distributed=Distributed(), quiet=True))


def test_a_scratch_student_keeps_its_own_start(simclr_run):
    method, _, _ = build(f"method.teacher={simclr_run}", "method.student_init=scratch")
    start = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    method.setup(env(load_config("smoke", SMALL), None))
    assert all(torch.equal(start[k], v) for k, v in method.encoder.state_dict().items())


def test_an_unfinished_teacher_run_is_refused_with_the_fix(simclr_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((simclr_run / "config.yaml").read_text())
    method, _, _ = build(f"method.teacher={unfinished}")
    fix = rf"robustcl pretrain --resume --out {re.escape(str(unfinished))}$"
    with pytest.raises(RunError, match=rf"not a finished run .*{fix}"):
        method.setup(env(load_config("smoke", SMALL), None))


def test_a_teacher_of_another_architecture_is_refused_for_a_student_started_from_it(simclr_run):
    method, _, _ = build(f"method.teacher={simclr_run}", "model.widths=[8,16,16,16]")
    with pytest.raises(ConfigError, match="has 32-d features, this student 16-d"):
        method.setup(env(load_config("smoke", SMALL), None))


def test_the_stage_1_config_takes_the_runs_data_model_seed_and_device():
    cfg = load_config("fmnist-deacl", ["seed=3", "data.train_limit=500", "model.widths=[8,16,16,32]",
                                       "train.device=cpu", "train.threads=1"])
    stage1 = teacher_config(cfg, cfg.method.teacher, ("train.max_steps=7",))
    preset = load_config("fmnist-simclr")
    assert stage1.method.name == "simclr" and stage1.seed == 3
    assert stage1.data == cfg.data and stage1.model == cfg.model
    assert (stage1.train.device, stage1.train.threads, stage1.train.max_steps) == ("cpu", 1, 7)
    assert (stage1.train.lr, stage1.train.batch_size, stage1.views) == (preset.train.lr, preset.train.batch_size,
                                                                        preset.views)
    own = teacher_config(cfg, "", ())  # empty: this run's own config as SimCLR
    assert own.method.name == "simclr" and own.train == cfg.train and own.views == cfg.views


@pytest.mark.parametrize("teacher", [TEACHER, []], ids=["named", "empty"])
def test_outside_a_run_a_config_teacher_is_not_trained(teacher):
    method, _, _ = build(*teacher)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.setup(env(load_config("smoke", [*SMALL, *teacher]), None))
    assert all(torch.equal(before[k], v) for k, v in method.teacher.state_dict().items())


# ------------------------------------------------------------------------------------------------ the chain
CHAIN = [*SMALL, *TEACHER, "train.max_steps=4", "train.checkpoint_every=2"]


def test_one_command_trains_stage_1_then_stage_2_and_a_killed_stage_2_resumes_without_stage_1(tmp_path,
                                                                                                 monkeypatch):
    straight = pretrain("smoke", tmp_path / "straight", CHAIN)
    teacher = RunDir(tmp_path / "straight" / "teacher")
    assert straight.trained and straight.steps == 4 and teacher.pretrain_done.is_file()
    assert load_config(str(teacher.config)).method.name == "simclr"
    stage1, _ = read_encoder(teacher.root)
    state = torch.load(RunDir(straight.run_dir).checkpoint, weights_only=True)
    assert all(torch.equal(state["model"][f"teacher.encoder.{k}"], v) for k, v in stage1.state_dict().items())

    original, calls = Deacl.training_step, {"n": 0}

    def dying(self: Deacl, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 4:  # stage 2 ran steps 1..3 (a checkpoint at 2): killed in step 4
            raise KeyboardInterrupt
        return original(self, images, ctx)

    killed = tmp_path / "killed"
    monkeypatch.setattr(Deacl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain("smoke", killed, CHAIN)
    assert RunDir(killed / "teacher").pretrain_done.is_file()
    assert torch.load(RunDir(killed).checkpoint, weights_only=True)["step"] == 2
    monkeypatch.setattr(Deacl, "training_step", original)
    monkeypatch.setattr(Simclr, "training_step", lambda *a: pytest.fail("stage 1 trained again"))
    resumed = pretrain(None, killed, resume=True)
    assert resumed.trained and resumed.steps == 4
    a, b = state, torch.load(RunDir(killed).checkpoint, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # stage 2 resumed exactly, teacher included
        assert torch.equal(a["model"][key], b["model"][key]), key


# ------------------------------------------------------------------------------------------------ the presets
def test_the_presets_carry_the_authors_values_and_fmnist_mirrors_fmnist_gbrcl():
    c10 = load_config("cifar10-deacl")
    m, t = c10.method, c10.train
    assert (m.teacher, m.gamma, m.student_init) == ("cifar10-simclr", 2.0, "teacher")
    assert (m.attack.eps, m.attack.alpha, m.attack.steps) == (8 / 255, 2 / 255, 5)
    assert (t.batch_size, t.epochs, t.lr, t.momentum, t.weight_decay, t.warmup_epochs) == (256, 100, 0.5, 0.9, 5e-4, 10)
    assert c10.model.arch == "resnet18" and c10.data.name == "cifar10"
    c100 = load_config("cifar100-deacl")
    assert (c100.data.name, c100.method.teacher) == ("cifar100", "cifar100-simclr")
    assert c100.train == c10.train and c100.method.attack == m.attack
    fm, gb = load_config("fmnist-deacl"), load_config("fmnist-gbrcl")
    assert fm.method.teacher == "fmnist-simclr" and fm.method.attack == gb.method.attack
    assert {k: v for k, v in fm.to_dict().items() if k not in ("name", "method")} == \
        {k: v for k, v in gb.to_dict().items() if k not in ("name", "method")}
