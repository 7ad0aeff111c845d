"""Free adversarial training (Shafahi et al. 2019) as method.attack.mode=free: replayed batches and views,
a carried perturbation stepped from the training backward, no attack pass, exact resume, validation."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from robustcl.cli import main
from robustcl.config import AttackConfig, ConfigError, load_config
from robustcl.methods import gbrcl, step_inputs
from robustcl.methods.free_replay import FreeReplay
from robustcl.methods.step import StepContext
from robustcl.methods.step_inputs import eval_pgd
from robustcl.methods.gbrcl import Gbrcl
from robustcl.objectives import SAM
from robustcl.runs import RunDir
from robustcl.train.pretrain import Pretrainer, pretrain

EPS = 0.1
FREE = ["method.attack.mode=free", "method.attack.replays=2", "train.threads=1"]  # 1 thread: fast on a busy CPU
RUN = [*FREE, "train.max_steps=4", "train.checkpoint_every=1"]  # 2 replays x 2 batches, a checkpoint due every step


@pytest.fixture(scope="module", autouse=True)
def _keep_torch_threads():  # noqa: ANN202 - the Pretrainer sets torch's global thread count
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- a toy method: one backward, both gradients
class Toy(nn.Module):
    """Loss sum_i (w . (x_i + delta_i))^2 on a free-mode perturbed x; its attack objective must never run."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(attack=AttackConfig(eps=EPS, mode="free", replays=2))
        self.w = nn.Parameter(torch.tensor([1.0, -0.5, 2.0, 0.7, -0.3, 1.5]))
        self.critic = None

    def attack_config(self) -> AttackConfig:  # the Method hook StepContext reads to set up free mode
        return self.cfg.attack

    def training_step(self, x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        def objective(_: torch.Tensor) -> torch.Tensor:
            raise AssertionError("free mode evaluated an attack objective")

        x_adv = eval_pgd(self, objective, x, self.cfg.attack, ctx)  # type: ignore[arg-type]
        assert eval_pgd(self, objective, x, self.cfg.attack, ctx) is x_adv  # same input twice: same tensor
        return ctx.encoder_step(lambda only: {"adversarial": ((x_adv.flatten(1) @ self.w) ** 2).sum()},
                                {"adversarial": 1.0})


def _toy_ctx(toy: Toy, lr: float, sam: SAM | None = None) -> StepContext:
    opt = torch.optim.SGD([toy.w], lr=lr)
    return StepContext(toy, opt, None, sam, ("adversarial",), torch.Generator(),  # type: ignore[arg-type]
                       contextlib.nullcontext)


def _toy_input() -> torch.Tensor:
    """Pixels in [0.3, 0.7]: with |delta| <= eps the image box never clips x + delta."""
    return 0.3 + 0.4 * torch.rand(3, 1, 2, 3, generator=torch.Generator().manual_seed(0))


def test_a_replay_steps_delta_by_eps_sign_of_the_loss_gradient_and_clips_to_the_eps_ball():
    toy, x, lr = Toy(), _toy_input(), 0.01
    ctx = _toy_ctx(toy, lr)
    flat, w0 = x.flatten(1), toy.w.detach().clone()
    # replay 1 by hand: delta = 0; dL/dw = 2 sum_i s_i x_i, dL/d delta_i = 2 s_i w, s_i = w . x_i
    s = flat @ w0
    w1 = w0 - lr * 2 * (s[:, None] * flat).sum(0)
    delta1 = (EPS * torch.sign(2 * s[:, None] * w0)).clamp(-EPS, EPS)
    toy.training_step(x, ctx)
    assert ctx.free is not None and len(ctx.free.deltas) == 1
    assert torch.allclose(toy.w.detach(), w1, atol=1e-6)  # the same backward stepped the parameters
    assert torch.equal(ctx.free.deltas[0].flatten(1), delta1)
    # replay 2: the delta carries over; the second signed step leaves the eps-ball and is clipped back
    s2 = (flat + delta1) @ w1
    unclipped = delta1 + EPS * torch.sign(2 * s2[:, None] * w1)
    assert unclipped.abs().max() > EPS * 1.5  # the clip is exercised
    toy.training_step(x, ctx)
    delta2 = ctx.free.deltas[0].flatten(1)
    assert torch.equal(delta2, unclipped.clamp(-EPS, EPS))
    assert delta2.abs().max() <= EPS and not delta2.requires_grad


def test_under_sam_the_delta_gradient_is_the_one_at_theta(monkeypatch):
    toy, x = Toy(), _toy_input()
    ctx = _toy_ctx(toy, 0.01, SAM([toy.w], rho=5.0))  # a large rho: the pass at theta + e has another gradient
    seen: list[torch.Tensor] = []
    original = FreeReplay.end_step

    def spying(self: FreeReplay) -> None:
        seen.extend(x_adv.grad.clone() for x_adv in self.perturbed())
        original(self)

    monkeypatch.setattr(FreeReplay, "end_step", spying)
    flat, w0 = x.flatten(1), toy.w.detach().clone()
    toy.training_step(x, ctx)
    expected = 2 * (flat @ w0)[:, None] * w0  # dL/d delta at theta (delta = 0)
    assert len(seen) == 1 and torch.allclose(seen[0].flatten(1), expected, atol=1e-5)


def test_delta_steps_by_the_sign_of_autograds_gradient_through_the_image_box_clamp():
    """Where x + delta leaves [0, 1] the clamp passes no gradient (as in the reference implementation):
    that delta does not move; elsewhere it steps by eps * sign(g)."""
    free = FreeReplay(replays=2, eps=EPS)
    x = torch.tensor([[0.0, 0.5, 1.0, 0.02, 0.97]])
    delta0 = torch.tensor([[-0.05, 0.03, 0.05, -0.01, 0.02]])
    free.deltas = [delta0.clone()]
    g = torch.tensor([[1.0, -2.0, 3.0, -1.0, 0.5]])  # d loss / d x'
    x_adv = free.perturb(x)
    x_adv.grad = g.clone()
    free.end_step()
    d = delta0.clone().requires_grad_(True)
    ((x + d).clamp(0, 1) * g).sum().backward()  # the same gradient by autograd, through the clamp
    assert torch.equal(free.deltas[0], (delta0 + EPS * d.grad.sign()).clamp(-EPS, EPS))
    assert free.deltas[0][0, 0] == delta0[0, 0] and free.deltas[0][0, 2] == delta0[0, 2]  # clipped pixels: still


def test_a_batch_of_another_shape_starts_from_a_zero_delta():
    free = FreeReplay(replays=2, eps=EPS)
    free.deltas = [torch.full((4, 1, 2, 2), EPS)]
    x = torch.full((3, 1, 2, 2), 0.5)
    out = free.perturb(x)
    assert torch.equal(out, x) and free.deltas[0].shape == x.shape


# ---------------------------------------------------------------------- smoke gbrcl through the CLI, recorded
@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> dict[str, Any]:
    """gbrcl free on smoke, 2 replays x 2 batches, with every batch, view and attacked input recorded,
    encoder forwards counted, and the PGD/FGSM-RS attacks made to fail if ever called."""
    out = tmp_path_factory.mktemp("free") / "straight"
    rec: dict[str, Any] = {"images": [], "views": [], "attacked": [], "forwards": [], "out": out}
    step_views: list[torch.Tensor] = []
    real_step, real_view, real_eval = Gbrcl.training_step, step_inputs.draw_view, step_inputs.eval_pgd

    def step(self: Gbrcl, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        rec["images"].append(images.clone())
        calls = {"n": 0}
        handle = self.encoder.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        try:
            stats = real_step(self, images, ctx)
        finally:
            handle.remove()
        rec["forwards"].append(calls["n"])
        rec["views"].append(list(step_views))
        step_views.clear()
        return stats

    def view(kind, images, ctx):  # noqa: ANN001, ANN202
        v = real_view(kind, images, ctx)
        step_views.append(v.clone())
        return v

    def attacked(method, objective, x, attack, ctx):  # noqa: ANN001, ANN202
        x_adv = real_eval(method, objective, x, attack, ctx)
        rec["attacked"].append((x.clone(), x_adv.detach().clone()))
        return x_adv

    def no_attack(*_: Any, **__: Any) -> torch.Tensor:
        raise AssertionError("free mode ran an attack pass")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Gbrcl, "training_step", step)
        mp.setattr(gbrcl, "draw_view", view)
        mp.setattr(gbrcl, "eval_pgd", attacked)
        mp.setattr(step_inputs, "pgd", no_attack)
        mp.setattr(step_inputs, "fgsm_rs", no_attack)
        assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", *RUN]) == 0
    return rec


def test_replays_of_a_batch_see_the_same_images_and_views_and_the_next_batch_new_ones(recorded_run):
    images, views = recorded_run["images"], recorded_run["views"]
    assert len(images) == len(views) == 4
    for b in range(2):
        first, second = 2 * b, 2 * b + 1
        assert torch.equal(images[first], images[second])
        assert len(views[first]) == len(views[second]) == 2  # p (strong) and q (weak)
        for v1, v2 in zip(views[first], views[second]):
            assert torch.equal(v1, v2)
    assert not torch.equal(images[0], images[2])
    assert not any(torch.equal(v0, v2) for v0, v2 in zip(views[0], views[2]))


def test_the_attacked_input_stays_in_the_image_box_and_the_eps_ball_and_moves(recorded_run):
    attacked = recorded_run["attacked"]
    assert len(attacked) == 4  # one eval_pgd call a step (3-step order)
    for x, x_adv in attacked:
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert torch.equal(attacked[0][0], attacked[0][1])  # the delta starts at zero
    moved = [(x_adv - x).abs().max().item() for x, x_adv in attacked[1:]]
    assert all(m == pytest.approx(EPS, abs=1e-6) for m in moved)  # one step of eps, carried on


def test_no_forward_is_spent_on_an_attack(recorded_run):
    """gbrcl, 3-step order, ASAM on the benign term: critic (z_b(q), z_a(q')), encoder ([p; q], q'), SAM ([p; q]).

    PGD-k would add k attack forwards and the target z_b(p); pgd and fgsm_rs raise if called at all."""
    assert recorded_run["forwards"] == [5] * 4


def test_the_checkpoint_holds_the_carried_delta(recorded_run):
    state = torch.load(RunDir(recorded_run["out"]).checkpoint, weights_only=True)
    assert state["step"] == 4
    (delta,) = state["free_ranks"][0]
    assert delta.shape == (32, 1, 16, 16) and delta.abs().max() <= EPS


def test_a_killed_free_run_resumes_exactly(recorded_run, tmp_path, monkeypatch):
    """checkpoint_every=1 with 2 replays: checkpoints wait for a batch's last replay, so the run killed in
    step 4 (batch 2's second replay) resumes from step 2, not 3, and ends bit-identical to the straight run."""
    cfg = load_config("smoke", RUN)
    killed = RunDir(tmp_path / "killed")
    original, calls = Gbrcl.training_step, {"n": 0}

    def dying(self: Gbrcl, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 4:  # steps 1..3 ran: step 4 is the second replay of batch 2
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, progress=False)
    assert torch.load(killed.checkpoint, weights_only=True)["step"] == 2
    monkeypatch.setattr(Gbrcl, "training_step", original)
    pretrain(cfg, killed, resume=True, progress=False)
    a = torch.load(RunDir(recorded_run["out"]).checkpoint, weights_only=True)
    b = torch.load(killed.checkpoint, weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["free_ranks"][0][0], b["free_ranks"][0][0])
    assert torch.equal(a["rng"]["views"], b["rng"]["views"])
    steps = [r["step"] for r in killed.iter_metrics("pretrain")]
    assert steps == sorted(set(steps))  # no duplicate records after the resume


def test_acl_trains_in_free_mode_with_one_delta_for_the_stacked_pair(tmp_path, monkeypatch):
    out = tmp_path / "acl"
    monkeypatch.setattr(step_inputs, "pgd", lambda *a, **k: pytest.fail("free mode ran PGD"))
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "method.name=acl",
                 f"method.attack.eps={EPS}", *FREE, "train.max_steps=4"]) == 0
    assert (out / "encoder.safetensors").is_file()
    (delta,) = torch.load(RunDir(out).checkpoint, weights_only=True)["free_ranks"][0]
    assert delta.shape == (64, 1, 16, 16) and delta.abs().max() == pytest.approx(EPS)


# ---------------------------------------------------------------------- the data schedule
def test_each_batch_is_given_for_m_optimiser_steps_and_an_epoch_is_m_times_the_batches(tmp_path):
    plain = Pretrainer(load_config("smoke", ["train.max_steps=null"]), RunDir(tmp_path / "a"))
    free = Pretrainer(load_config("smoke", [*FREE, "train.max_steps=null"]), RunDir(tmp_path / "b"))
    n = plain.steps_per_epoch
    assert free.steps_per_epoch == 2 * n and free.total_steps == 2 * plain.total_steps  # epochs: passes over data
    assert free.warmup_steps == 2 * plain.warmup_steps
    for b in (0, 1, n - 1, n, n + 1):  # across the epoch boundary: the next epoch's permutation
        for r in (0, 1):
            assert torch.equal(free.batch(2 * b + r), plain.batch(b)), (b, r)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, message", [
    (["method.attack.mode=free"], "method.attack.replays=None must be >= 2 with method.attack.mode=free"),
    (["method.attack.mode=free", "method.attack.replays=1"],
     "method.attack.replays=1 must be >= 2 with method.attack.mode=free"),
    (["method.attack.replays=4"], "method.attack.replays=4 applies to method.attack.mode=free only"),
    (["eval.attack.mode=free"], "eval.attack.mode='free' must be pgd"),
])
def test_free_mode_settings_are_validated_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_cli_reports_a_bad_free_setting_in_one_line(tmp_path, capsys):
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "r"), "--quiet",
                 "method.attack.mode=free", "method.attack.replays=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustcl: error: config value method.attack.replays=1") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_fast_attack_sweep_runs_the_free_preset():
    from robustcl.sweep import configurations, load_spec

    cfg = load_config("fmnist-gbrcl-free")
    a, base = cfg.method.attack, load_config("fmnist-gbrcl")
    assert (a.mode, a.replays, a.eps, cfg.diagnostics.on_collapse) == ("free", 4, 0.1, "stop")
    assert cfg.train == base.train  # the same 300 optimiser steps as the PGD-3 preset
    runs = {r.name: r.config for r in configurations(load_spec("fmnist-fast-attacks"))}
    assert runs["free"] == "fmnist-gbrcl-free"
