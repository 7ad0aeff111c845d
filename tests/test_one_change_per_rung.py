"""One change per ablation rung: a term's weight being zero does not change how the other terms are computed.

The adversarial term of gbrcl reads z_b(p) from the benign BN branch. If p went through that
branch alone when the benign term is off, and together with q when it is on, the first rung of the
ladder (adversarial InfoNCE only -> + benign) would change the BN batch statistics behind z_b(p) as
well as the loss. These tests fix the inputs and weights and compare, for benign_weight 0 and 2,
the adversarial term, its gradient and the BN running statistics after the forward.
"""
from __future__ import annotations

import copy

import pytest
import torch

from robustcl.config import load_config
from robustcl.methods.factory import build_method


def _method(*overrides: str):
    cfg = load_config("smoke", ["method.critic.enabled=false", "method.sam.mode=off", *overrides])
    torch.manual_seed(0)
    return build_method(cfg, 1, (0.5,), (0.25,)).train()


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers() if "running" in k}


@pytest.mark.parametrize("critic", ["false", "true"])
def test_adversarial_term_gradient_and_bn_stats_do_not_depend_on_the_benign_weight(critic):
    without = _method("method.benign_weight=0", f"method.critic.enabled={critic}")
    with_benign = copy.deepcopy(without)
    with_benign.cfg = copy.deepcopy(without.cfg)
    with_benign.cfg.benign_weight = 2.0
    gen = torch.Generator().manual_seed(1)
    p, q = torch.rand(12, 1, 16, 16, generator=gen), torch.rand(12, 1, 16, 16, generator=gen)
    q_adv = (q + 0.05 * torch.randn(q.shape, generator=gen)).clamp(0, 1)
    results = []
    for method in (without, with_benign):
        terms = method.loss_terms(p, q, q_adv)
        assert ("benign" in terms) == (method.cfg.benign_weight > 0)
        grads = torch.autograd.grad(terms["adversarial"], method.encoder_parameters(), allow_unused=True)
        results.append((terms["adversarial"].detach(), grads, _buffers(method)))
    (adv0, grads0, bn0), (adv2, grads2, bn2) = results
    assert torch.equal(adv0, adv2)
    for g0, g2 in zip(grads0, grads2):
        assert (g0 is None) == (g2 is None)
        if g0 is not None:
            assert torch.equal(g0, g2)
    assert bn0.keys() == bn2.keys()
    for key in bn0:
        assert torch.equal(bn0[key], bn2[key]), key


def test_the_sam_pass_for_the_benign_term_forwards_both_views_through_the_benign_branch():
    """SAM's pass at theta + e recomputes the benign term alone (only=("benign",)) over [p; q], as the full pass does."""
    method = _method("method.benign_weight=2")
    seen: list[tuple[int, str]] = []
    original = method.embed
    method.embed = lambda x, branch: seen.append((len(x), branch)) or original(x, branch)  # type: ignore[method-assign]
    p, q = torch.rand(6, 1, 16, 16), torch.rand(6, 1, 16, 16)
    terms = method.loss_terms(p, q, q, only=("benign",))
    assert set(terms) == {"benign"} and seen == [(12, "benign")]
