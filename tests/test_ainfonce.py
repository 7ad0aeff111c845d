"""A-InfoNCE: the asymmetric loss against a row-by-row float64 computation, its special cases, the adaptive
alpha, the method's loss, two steps by name, and the adaptive state through a killed and resumed run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.config import ConfigError, load_config
from robustcl.data import DatasetInfo
from robustcl.methods.ainfonce import Ainfonce, HardNegatives, a_infonce, adaptive_alpha
from robustcl.methods.factory import build_training
from robustcl.objectives import info_nce, multi_positive_nce
from robustcl.splits import load_split

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the loss, row by row
def loop_loss(views: list[torch.Tensor], tau: float, alpha: float, weight: float, stop_gradient: bool,
              hard: HardNegatives | None) -> torch.Tensor:
    """The module docstring's formula with Python loops over rows (view, image) in float64; differentiable."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    n_views, n = len(z), z[0].shape[0]
    rows = [(v, k) for v in range(n_views) for k in range(n)]

    def ell(i, j, detach_keys: bool) -> torch.Tensor:
        s = {r: z[i[0]][i[1]] @ (z[r[0]][r[1]].detach() if detach_keys else z[r[0]][r[1]]) / tau
             for r in rows if r != i}
        if hard is None:
            log_d = torch.logsumexp(torch.stack(list(s.values())), 0)
        else:
            pos = [s[r].exp() for r in s if r[1] == i[1]]
            neg = [r for r in s if r[1] != i[1]]
            mean_pos = sum(pos) / len(pos)
            mean_b = sum((hard.beta * s[r]).exp() for r in neg) / len(neg)
            reweighted = sum((hard.beta * s[r]).exp() / mean_b * s[r].exp() for r in neg)
            estimate = (reweighted - hard.tau_plus * len(neg) * mean_pos) / (1 - hard.tau_plus)
            floor = len(neg) * math.exp(-1 / tau if hard.floor == "hcl" else 1 / tau - 2)
            log_d = torch.log(mean_pos + torch.clamp(estimate, min=floor))
        return -(s[j] - log_d)

    total = torch.zeros((), dtype=torch.float64)
    for i in rows:
        for j in (r for r in rows if r[1] == i[1] and r != i):
            if i[0] == 0 or j[0] == 0:
                a, c = (i, j) if i[0] == 0 else (j, i)
                total = total + weight * ((1 - alpha) * ell(a, c, stop_gradient) + alpha * ell(c, a, stop_gradient))
            else:
                total = total + ell(i, j, False)
    return total / (n_views - 1) / len(rows)


HARD = [None, HardNegatives(0.1, 1.0, "hcl"), HardNegatives(0.3, 0.5, "shifted")]


@pytest.mark.parametrize("hard", HARD, ids=["plain", "hcl", "shifted"])
@pytest.mark.parametrize("stop_gradient", [False, True])
@pytest.mark.parametrize("n_views", [2, 4])
def test_loss_and_gradient_match_the_row_loop(n_views, stop_gradient, hard):
    views = [randn(5, 6, seed=k).requires_grad_() for k in range(n_views)]
    ref_views = [v.detach().double().requires_grad_() for v in views]
    for tau, alpha, weight in ((0.5, 0.2, 0.7), (0.2, 0.8, 1.5)):
        loss = a_infonce(views, tau, alpha=alpha, weight=weight, stop_gradient=stop_gradient, hard_negatives=hard)
        ref = loop_loss(ref_views, tau, alpha, weight, stop_gradient, hard)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        grads = torch.autograd.grad(loss, views)
        ref_grads = torch.autograd.grad(ref, ref_views)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-6)


def test_the_shifted_floor_binds_in_the_row_loop_case_it_is_checked_on():
    """The floor actually acts on these inputs, so the parametrised comparison covers it (HCL's does not here)."""
    z = F.normalize(torch.cat([randn(5, 6, seed=k) for k in range(4)]).double(), dim=1)
    sims = (z @ z.T / 0.2).exp()
    negatives = [sims[i, [k for k in range(20) if k % 5 != i % 5]] for i in range(20)]
    assert any(neg.mean() < math.exp(1 / 0.2 - 2) for neg in negatives)


def test_symmetric_plain_form_is_multi_positive_nce_and_with_two_views_infonce():
    for n_views in (2, 3, 4):
        views = [randn(6, 5, seed=10 + k).requires_grad_() for k in range(n_views)]
        loss = a_infonce(views, 0.5)  # alpha 1/2, weight 1, no stop-gradient, no hard negatives
        expected = multi_positive_nce(views, 0.5)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        for g, e in zip(torch.autograd.grad(loss, views), torch.autograd.grad(expected, views)):
            assert torch.allclose(g, e, atol=1e-6)
        if n_views == 2:
            assert loss.item() == pytest.approx(info_nce(*views, 0.5).item(), rel=1e-6)


def test_hard_negatives_without_prior_or_concentration_are_infonce():
    u, v = randn(6, 5, seed=1).requires_grad_(), randn(6, 5, seed=2).requires_grad_()
    loss = a_infonce([u, v], 0.5, hard_negatives=HardNegatives(tau_plus=0.0, beta=0.0))
    expected = info_nce(u, v, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, e in zip(torch.autograd.grad(loss, [u, v]), torch.autograd.grad(expected, [u, v])):
        assert torch.allclose(g, e, atol=1e-6)


def test_stop_gradient_sends_the_pair_pull_only_to_the_anchor_side_alpha_chooses():
    """Two views, so every pair is adversarial: alpha 0 moves only the adversarial view, alpha 1 only the clean one."""
    adv, clean = randn(6, 5, seed=3).requires_grad_(), randn(6, 5, seed=4).requires_grad_()
    g_adv, g_clean = torch.autograd.grad(a_infonce([adv, clean], alpha=0.0, stop_gradient=True), [adv, clean])
    assert g_adv.abs().sum() > 0 and torch.equal(g_clean, torch.zeros_like(g_clean))
    g_adv, g_clean = torch.autograd.grad(a_infonce([adv, clean], alpha=1.0, stop_gradient=True), [adv, clean])
    assert torch.equal(g_adv, torch.zeros_like(g_adv)) and g_clean.abs().sum() > 0
    g_adv, g_clean = torch.autograd.grad(a_infonce([adv, clean], alpha=0.0, stop_gradient=False), [adv, clean])
    assert g_clean.abs().sum() > 0  # without stop-gradient the keys carry gradient too
    # At alpha 1/2 the value is InfoNCE's whatever the gradient path
    assert a_infonce([adv, clean], stop_gradient=True).item() == pytest.approx(info_nce(adv, clean).item(), rel=1e-6)


def test_hand_computed_hard_negative_denominator_and_both_floors():
    # Two images, two identical orthonormal views each (tau 0.5): each row has 1 positive at cos 1 (e^2) and
    # 2 negatives at cos 0 (e^0 = 1, equal weights): estimate = (2 - 0.1 * 2 * e^2) / 0.9 = 0.580;
    # HCL floor 2 e^-2 = 0.271 (inactive), the authors' shifted floor 2 e^(2 - 2) = 2 (active).
    e = torch.eye(2)
    estimate = (2 - 0.1 * 2 * math.exp(2)) / 0.9
    hcl = a_infonce([e, e], 0.5, alpha=0.3, weight=1.0, hard_negatives=HardNegatives(0.1, 1.0, "hcl"))
    shifted = a_infonce([e, e], 0.5, alpha=0.3, weight=1.0, hard_negatives=HardNegatives(0.1, 1.0, "shifted"))
    assert hcl.item() == pytest.approx(math.log(math.exp(2) + estimate) - 2, rel=1e-5)
    assert shifted.item() == pytest.approx(math.log(math.exp(2) + 2) - 2, rel=1e-5)
    # The weight lambda scales the adversarial pairs (here: all pairs)
    assert a_infonce([e, e], 0.5, weight=0.7).item() == pytest.approx(0.7 * (math.log(math.exp(2) + 2) - 2), rel=1e-5)


def test_rejects_mismatched_views():
    with pytest.raises(ValueError, match="equal shape"):
        a_infonce([torch.randn(4, 3), torch.randn(5, 3)])


# ------------------------------------------------------------------------------- adaptive alpha
def test_adaptive_alpha_is_alpha0_above_the_average_half_below_d_min_linear_between():
    assert adaptive_alpha(2.0, 1.5, 0.4, 0.2) == 0.2
    assert adaptive_alpha(1.5, 1.5, 0.4, 0.2) == pytest.approx(0.2)
    assert adaptive_alpha(0.3, 1.5, 0.4, 0.2) == 0.5
    assert adaptive_alpha(0.4, 1.5, 0.4, 0.2) == pytest.approx(0.5)
    assert adaptive_alpha(0.95, 1.5, 0.4, 0.2) == pytest.approx(0.35)
    assert adaptive_alpha(0.3, 0.3, 0.4, 0.2) == 0.5  # an average under d_min: symmetric


def smoke(*overrides: str):
    return load_config("smoke", ["method.name=ainfonce", "method.attack.steps=1", "train.threads=1", *overrides])


PLAIN = ("method.benign_weight=0", "method.sam.mode=off", "method.critic.enabled=false")
OURS = ("method.benign_weight=0.5", "method.sam.mode=asam", "method.sam.rho=0.5", "method.critic.enabled=true",
        "method.critic.weight=0.3")


def build(cfg):
    training = build_training(cfg, DatasetInfo("synthetic", 2, 1, 16, 16, (0.5,), (0.25,)), CPU)
    return training.method, training.ctx


def test_alpha_state_averages_during_the_warm_up_then_adapts_and_survives_a_state_dict():
    method, ctx = build(smoke(*PLAIN, "method.adaptive_after=0.5", "method.alpha=0.2", "method.d_min=0.5"))
    method.on_epoch_start(0, 2.0, ctx)
    assert [method.alpha_for(d) for d in (1.0, 2.0)] == [0.2, 0.2]  # epochs 0 and 0.25: averaging
    method.on_step_end(1, 8, ctx)
    assert float(method.next_epoch) == 0.25 and method.alpha_for(3.0) == 0.2
    method.on_step_end(2, 8, ctx)  # epoch 0.5: the average 2.0 is fixed from now on
    assert method.alpha_for(2.5) == 0.2 and method.alpha_for(1.25) == pytest.approx(0.35)
    assert method.alpha_for(0.1) == 0.5 and float(method.distance_count) == 3
    fresh, fresh_ctx = build(smoke(*PLAIN, "method.adaptive_after=0.5", "method.alpha=0.2", "method.d_min=0.5"))
    fresh.load_state_dict(method.state_dict())
    fresh.on_epoch_start(0, 2.0, fresh_ctx)  # a resumed fit's first step keeps the restored epoch 0.5
    assert float(fresh.next_epoch) == 0.5 and fresh.alpha_for(1.25) == pytest.approx(0.35)


def test_config_rejects_out_of_range_values():
    for override in ("method.alpha=1.5", "method.tau_plus=1.0", "method.adversarial_weight=-1", "method.beta=-0.1"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            smoke(override)


# --------------------------------------------------------------------------------- the method
def E(x: torch.Tensor, branch: str) -> torch.Tensor:
    maps = {"benign": randn(16, 5, seed=10), "adversarial": randn(16, 5, seed=11)}
    return x.flatten(1) @ maps[branch]


def test_method_loss_is_the_asymmetric_four_view_loss_with_its_config():
    method, ctx = build(smoke(*PLAIN, "method.alpha=0.3", "method.adversarial_weight=0.6", "method.tau_plus=0.2"))
    method.embed = lambda x, branch: E(x, branch)  # type: ignore[method-assign]
    x, p, q, h, xa = [randn(4, 1, 4, 4, seed=k) for k in range(5)]
    views = [E(xa, "adversarial"), E(p, "benign"), E(q, "benign"), E(h, "benign")]
    with torch.no_grad():
        terms = method.loss_terms(x, torch.cat([p, q, h]), xa, alpha=0.3)
    assert set(terms) == {"contrastive"}
    expected = loop_loss(views, 0.5, 0.3, 0.6, True, HardNegatives(0.2, 1.0, "hcl"))
    assert terms["contrastive"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_two_steps_by_name_on_synthetic_data_with_and_without_the_ours_options():
    for overrides in (PLAIN, OURS):  # the benign term, ASAM and the critic compose onto it
        cfg = smoke(*overrides, "method.adaptive_after=0")  # adaptive from the first step
        data = load_split(cfg, "train")
        method, ctx = build(cfg)
        before = [p.detach().clone() for p in method.encoder_parameters()]
        for _ in range(2):
            stats = method.training_step(data.images[:16], ctx)
            assert "contrastive" in stats and all(torch.isfinite(v).all() for v in stats.values())
        assert any(not torch.equal(a, b) for a, b in zip(before, method.encoder_parameters()))
        metrics = method.epoch_metrics()
        assert 0 <= metrics["alpha"] <= 1 and metrics["feature_distance"] > 0
        assert (method.critic is not None and ctx.sam is not None) == (overrides == OURS)
        assert ("critic_loss" in stats and "benign" in stats) == (overrides == OURS)


def test_attack_stays_in_the_ball_and_raises_the_attack_objective():
    method, ctx = build(smoke(*PLAIN, "method.attack.steps=3"))
    x = torch.rand(6, 1, 16, 16)
    clean = torch.rand(18, 1, 16, 16)
    x_adv = method.attack(x, clean, ctx)
    assert 0 < (x_adv - x).abs().max() <= method.cfg.attack.eps + 1e-6
    with torch.no_grad(), method.evaluating():
        z_p, z_q, z_h = method.embed(clean, "benign").chunk(3)
        objective = lambda z: a_infonce([method.embed(z, "adversarial"), z_p, z_q, z_h], alpha=0.0,  # noqa: E731
                                        weight=method.cfg.adversarial_weight)
        assert objective(x_adv) > objective(x)


# ------------------------------------------------------------------------------ through the trainer
def trained(tmp_path, name: str, monkeypatch, die_at: int | None = None):
    """Pretrain smoke (8 steps an epoch, 16 steps) with a half-epoch warm-up, recording each step's alpha; with
    `die_at`, the run is killed in that call and resumed."""
    from conftest import pretrain_recording
    from robustcl.runs import RunDir

    # A distance falling with the epoch the method holds (4 at epoch 0, 0 at epoch 2), so alpha adapts
    monkeypatch.setattr(Ainfonce, "feature_distance", lambda self, x, x_adv, ctx: 4.0 - 2.0 * float(self.next_epoch))
    cfg = smoke(*PLAIN, "method.adaptive_after=0.5", "method.d_min=1", "train.max_steps=16", "train.epochs=2",
                "train.checkpoint_every=4", "train.log_every=1", "diagnostics.every=0")
    seen = pretrain_recording(Ainfonce, lambda method, ctx: method.epoch_metrics()["alpha"], cfg, tmp_path / name,
                              monkeypatch, die_at)
    return RunDir(tmp_path / name), seen


def test_the_warm_up_is_the_first_half_epoch_and_a_killed_run_resumes_exactly(tmp_path, monkeypatch):
    run, seen = trained(tmp_path, "straight", monkeypatch)
    # Steps at epochs 0, 1/8, 2/8, 3/8 average d = 4, 3.75, 3.5, 3.25 (mean 3.625); then d = 4 - 2 e
    assert len(seen) == 16 and seen[:4] == [0.2] * 4
    expected = [adaptive_alpha(4 - 2 * k / 8, 3.625, 1.0, 0.2) for k in range(4, 16)]
    assert seen[4:] == pytest.approx(expected) and seen[-1] == 0.5 and 0.2 < seen[4] < 0.5
    state = torch.load(run.checkpoint, weights_only=True)["model"]
    assert float(state["distance_count"]) == 4 and float(state["next_epoch"]) == 2.0
    logged = [r["alpha"] for r in run.iter_metrics("pretrain")]
    assert logged == pytest.approx(seen)
    killed, again = trained(tmp_path, "killed", monkeypatch, die_at=15)  # resumed at step 12
    assert again[:14] == seen[:14] and again[14:] == seen[12:]
    other = torch.load(killed.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(state[k], other[k]) for k in state)
