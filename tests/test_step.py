"""The training step's mechanics: SAM on a subset of terms, D frozen in the encoder step, gbrcl's order."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from robustcl.config import ConfigError, ReferenceConfig, load_config
from robustcl.data import DatasetInfo
from robustcl.methods.step import (StepContext, sam_term_names, set_grads, sharp_gradients, take_grads,
                                   unreached_parameters, weighted_backward)
from robustcl.methods.factory import build_training
from robustcl.objectives import SAM


class Toy(nn.Module):
    """A 'method' with one parameter vector and quadratic + linear loss terms."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.critic = None
        self.A = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
        self.b = torch.tensor([1.0, 0.5])
        self.c = torch.tensor([0.3, -0.1, 0.2])

    def attack_config(self):  # the Method hook StepContext reads: no attack, so no free mode
        return None

    def terms(self, only):
        out = {}
        if only is None or "benign" in only:
            out["benign"] = ((self.A @ self.theta - self.b) ** 2).sum()
        if only is None or "adversarial" in only:
            out["adversarial"] = self.c @ self.theta
        return out


def _ctx(toy: Toy, sam: SAM | None, terms=("benign",)) -> StepContext:
    opt = torch.optim.SGD([toy.theta], lr=1.0)
    return StepContext(toy, opt, None, sam, terms, torch.Generator(), contextlib.nullcontext)  # type: ignore[arg-type]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_uses_benign_gradient_at_perturbed_point_plus_rest_at_theta(adaptive):
    toy = Toy()
    theta = toy.theta.detach().clone()
    w_b, rho = 2.0, 0.3
    grad_b = lambda t: w_b * 2 * toy.A.T @ (toy.A @ t - toy.b)  # noqa: E731
    g = grad_b(theta)
    T = theta.abs() if adaptive else torch.ones(3)
    e = rho * T ** 2 * g / (T * g).norm()
    expected = theta - (grad_b(theta + e) + toy.c)  # SGD lr 1
    ctx = _ctx(toy, SAM([toy.theta], rho, adaptive))
    ctx.encoder_step(toy.terms, {"benign": w_b, "adversarial": 1.0})
    assert torch.allclose(toy.theta.detach(), expected, atol=1e-6)


def test_without_sam_the_step_is_plain_gradient_descent():
    toy = Toy()
    theta = toy.theta.detach().clone()
    expected = theta - (2.0 * 2 * toy.A.T @ (toy.A @ theta - toy.b) + toy.c)
    _ctx(toy, None).encoder_step(toy.terms, {"benign": 2.0, "adversarial": 1.0})
    assert torch.allclose(toy.theta.detach(), expected, atol=1e-6)


def test_sam_on_all_terms():
    toy = Toy()
    theta = toy.theta.detach().clone()
    full = lambda t: 2 * toy.A.T @ (toy.A @ t - toy.b) + toy.c  # noqa: E731
    g = full(theta)
    e = 0.2 * g / g.norm()
    _ctx(toy, SAM([toy.theta], 0.2), ("benign", "adversarial")).encoder_step(toy.terms, {})
    assert torch.allclose(toy.theta.detach(), theta - full(theta + e), atol=1e-6)


def smoke_cfg(*overrides: str):
    return load_config("smoke", list(overrides))


def _gbrcl(*overrides: str):
    """gbrcl on the smoke preset, built by the trainer's factory."""
    training = build_training(smoke_cfg(*overrides), DatasetInfo("synthetic", 4, 1, 16, 16, (0.5,), (0.25,)),
                              torch.device("cpu"))
    return training.method, training.ctx


def test_encoder_step_does_not_touch_the_critic():
    method, ctx = _gbrcl()
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    x = images.float() / 255
    before = [p.detach().clone() for p in method.critic.parameters()]
    terms = ctx.encoder_step(lambda only: method.loss_terms(x, x, x.flip(-1), only),
                             {"benign": 2.0, "adversarial": 1.0, "divergence": 0.1})
    assert set(terms) == {"benign", "adversarial", "divergence"}
    assert all(p.grad is None for p in method.critic.parameters())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, method.critic.parameters()))


def test_gbrcl_step_attack_stays_in_ball_and_updates_both_optimisers():
    method, ctx = _gbrcl()
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    enc_before = [p.detach().clone() for p in method.encoder_parameters()]
    critic_before = [p.detach().clone() for p in method.critic.parameters()]
    stats = method.training_step(images, ctx)
    assert {"benign", "adversarial", "divergence", "critic_loss", "critic_acc"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(enc_before, method.encoder_parameters()))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(critic_before, method.critic.parameters()))
    # the attack itself: eval mode, inside the eps ball of the weak view
    q = torch.rand(8, 1, 16, 16)
    p = torch.rand(8, 1, 16, 16)
    q_adv = method.attack(p, q, ctx)
    assert (q_adv - q).abs().max() <= method.cfg.attack.eps + 1e-6
    assert method.training  # evaluating() restored train mode


def test_attack_runs_in_eval_mode_without_parameter_gradients():
    method, ctx = _gbrcl()
    modes, flags = [], []
    original = method.embed

    def spy(x, branch):
        modes.append(method.training)
        flags.append(torch.is_grad_enabled() and any(p.requires_grad for p in method.parameters()))
        return original(x, branch)

    method.embed = spy  # type: ignore[method-assign]
    method.attack(torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), ctx)
    assert modes and not any(modes) and not any(flags)


def test_benign_weight_zero_drops_the_benign_term_and_no_critic_without_weight():
    method, ctx = _gbrcl("method.benign_weight=0", "method.critic.enabled=false", "method.sam.mode=off")
    assert method.critic is None
    x = torch.rand(6, 1, 16, 16)
    terms = method.loss_terms(x, x, x, None)
    assert set(terms) == {"adversarial"}


def test_four_step_order_regenerates_the_adversarial_view():
    method, ctx = _gbrcl("method.critic.order=4")
    calls = []
    original = method.attack
    method.attack = lambda p, q, c, target=None: calls.append(1) or original(p, q, c, target)  # type: ignore[method-assign]
    method.training_step(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), ctx)
    assert len(calls) == 2


def test_sam_on_terms_the_method_does_not_produce_is_a_clear_error():
    from robustcl.config import ConfigError

    method, ctx = _gbrcl("method.sam.terms=[nope]", "method.critic.enabled=false")
    with pytest.raises(ConfigError, match=r"method.sam.terms=\['nope'\] names none of this method's loss terms"):
        method.training_step(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), ctx)


# ------------------------------------------------------------------ the encoder step's pieces, one by one
class TwoParts(nn.Module):
    """theta feeds a BN and the "benign" term; phi only the "adversarial" term (the SAM terms never reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.3]]))
        self.phi = nn.Parameter(torch.tensor([0.4, -0.7]))
        self.bn = nn.BatchNorm1d(2)
        self.critic = None
        self.x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.2]])

    def attack_config(self):  # the Method hook StepContext reads
        return None

    def terms(self, only):
        out = {}
        if only is None or "benign" in only:
            out["benign"] = self.bn(self.x @ self.theta).square().sum() + self.theta.square().sum()
        if only is None or "adversarial" in only:
            out["adversarial"] = (self.phi * self.x.sum(0)).sum()
        return out


def _parts_ctx(model: TwoParts, sam: SAM | None, **reference: bool) -> StepContext:
    opt = torch.optim.SGD([model.theta, model.phi], lr=0.1)
    return StepContext(model, opt, None, sam, ("benign",), torch.Generator(), contextlib.nullcontext,  # type: ignore[arg-type]
                       reference=ReferenceConfig(**reference))


def test_weighted_backward_accumulates_the_weighted_sum_of_the_terms_gradients():
    model = TwoParts()
    weighted_backward(model.terms(None), {"benign": 2.0, "adversarial": 3.0})
    (g_theta,) = torch.autograd.grad(model.terms(("benign",))["benign"], model.theta)
    assert torch.allclose(model.theta.grad, 2.0 * g_theta) and torch.allclose(model.phi.grad, 3.0 * model.x.sum(0))


def test_sam_term_names_keeps_the_configured_order_and_refuses_names_the_step_lacks():
    terms = {"adversarial": torch.zeros(()), "benign": torch.zeros(())}
    assert sam_term_names(("benign", "divergence", "adversarial"), terms) == ("benign", "adversarial")
    with pytest.raises(ConfigError, match="names none of this method's loss terms"):
        sam_term_names(("divergence",), terms)


def test_sharp_gradients_splits_parameter_and_input_gradients_and_marks_the_unreached():
    model, x = TwoParts(), torch.ones(2, requires_grad=True)
    sharp = (model.theta.sum(0) * x).sum()
    grads, inputs = sharp_gradients(sharp, [model.theta, model.phi], [x], retain_graph=False)
    assert torch.equal(grads[0], torch.ones(2, 2) * x.detach()) and grads[1] is None
    assert torch.equal(inputs[0], model.theta.detach().sum(0))
    assert unreached_parameters([model.theta, model.phi], grads) == [model.phi]


@pytest.mark.parametrize("reached_only", [False, True])
def test_sam_backward_drops_the_unreached_gradients_only_under_reference_sam_reached_only(reached_only):
    model = TwoParts()
    ctx = _parts_ctx(model, SAM([model.theta, model.phi], 0.1), sam_reached_only=reached_only)
    terms = model.terms(None)
    ctx.sam_backward(model.terms, terms, {"benign": 1.0, "adversarial": 1.0}, [])
    assert model.theta.grad is not None
    assert (model.phi.grad is None) == reached_only
    if not reached_only:  # the rest term's gradient at theta
        assert torch.allclose(model.phi.grad, model.x.sum(0))


@pytest.mark.parametrize("updates_bn", [False, True])
def test_sam_second_pass_moves_bn_statistics_only_under_reference_sam_pass_updates_bn(updates_bn):
    model = TwoParts()
    sam = SAM([model.theta, model.phi], 0.5)
    ctx = _parts_ctx(model, sam, sam_pass_updates_bn=updates_bn)
    theta = model.theta.detach().clone()
    before = model.bn.running_mean.clone(), int(model.bn.num_batches_tracked)
    (g,) = torch.autograd.grad(model.terms(("benign",))["benign"], model.theta)
    after_first = model.bn.running_mean.clone()
    ctx.sam_second_pass(model.terms, ("benign",), {"benign": 1.0}, [g, None])
    assert torch.equal(model.theta.detach(), theta) and model.theta.grad is not None  # back at theta, gradient kept
    moved = not torch.equal(model.bn.running_mean, after_first)
    assert moved == updates_bn and not torch.equal(after_first, before[0])
    assert int(model.bn.num_batches_tracked) == before[1] + 1 + updates_bn


def test_take_and_set_grads_keep_an_input_gradient_out_of_a_later_backward():
    x = torch.ones(3, requires_grad=True)
    (2 * x).sum().backward()
    kept = take_grads([x])
    assert x.grad is None and torch.equal(kept[0], torch.full((3,), 2.0))
    (5 * x).sum().backward()  # another pass: would have accumulated into kept in place
    set_grads([x], kept)
    assert torch.equal(x.grad, torch.full((3,), 2.0))


class HalvingRanks:
    """A stand-in for two ranks whose other one has zero gradients: the mean all-reduce halves every gradient."""

    world = 2

    def __init__(self) -> None:
        self.calls: list[int] = []

    def all_reduce_grads(self, params) -> None:  # noqa: ANN001
        self.calls.append(len(list(params)))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(0.5)


def test_reduce_and_step_averages_the_gradients_over_ranks_before_the_optimiser_step():
    model = TwoParts()
    ranks = HalvingRanks()
    ctx = StepContext(model, torch.optim.SGD([model.theta, model.phi], lr=1.0), None, None, (),  # type: ignore[arg-type]
                      torch.Generator(), contextlib.nullcontext, distributed=ranks)  # type: ignore[arg-type]
    phi = model.phi.detach().clone()
    model.terms(None)["adversarial"].backward()
    ctx.reduce_and_step(ctx.optimizer)
    assert ranks.calls == [2] and torch.allclose(model.phi.detach(), phi - 0.5 * model.x.sum(0))
