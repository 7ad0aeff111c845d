"""The optimised gbrcl step equals a plain transcription of the paper's algorithm (fp32).

The library's step computes the attack target's features once per step (the plain version
recomputes them at every PGD iteration), attacks with parameter gradients switched off, computes
the benign-branch forward once for the benign and divergence terms, and runs ASAM through
`StepContext`. The plain version below does none of that; loss values and the updated parameters
(encoder, projector and critic) must agree. BN running statistics are not compared for the full
step: the plain version runs the benign forward once per term, so it updates them more than once by
design. The adversarial-only rung (lambda_b 0, no SAM, no critic) is compared with its own plain
transcription, BN running statistics included: both forward [p; q] once through the benign branch,
as the authors' adv-only step does, whatever lambda_b is.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.config import load_config
from robustcl.objectives import info_nce
from robustcl.runs import RunDir
from robustcl.train.pretrain import Pretrainer
from robustcl.views import strong_view, weak_view

LOG2 = math.log(2.0)


def _critic_bce(logits_benign: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 [BCE(D(z_b), 1) + BCE(D(z_a), 0)] with D = sigmoid(logits)."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_benign, torch.ones_like(logits_benign))
                  + F.binary_cross_entropy_with_logits(logits_adv, torch.zeros_like(logits_adv)))


def _plain_attack(m, p: torch.Tensor, q: torch.Tensor, generator: torch.Generator, cfg) -> torch.Tensor:
    """1. attack: PGD on q in eval mode; the target z_b(p) recomputed at every iteration."""
    a, tau, lam_d = cfg.method.attack, cfg.method.temperature, cfg.method.critic.weight
    m.eval()
    x = (q + (2 * torch.rand(q.shape, generator=generator) - 1) * a.eps).clamp(0, 1)
    for _ in range(a.steps):
        x.requires_grad_(True)
        target = m.embed(p, "benign")
        z = m.embed(x, "adversarial")
        objective = info_nce(target, z, tau) + lam_d * (LOG2 + torch.log(1 - torch.sigmoid(m.critic(z))).mean())
        (grad,) = torch.autograd.grad(objective, x)
        x = torch.min(torch.max(x.detach() + a.alpha * grad.sign(), q - a.eps), q + a.eps).clamp(0, 1)
    return x.detach()


def _plain_critic_step(m, q: torch.Tensor, q_adv: torch.Tensor, c) -> torch.Tensor:
    """2. critic: one SGD step on L_D over eval-mode features; its loss."""
    with torch.no_grad():
        z_b, z_a = m.embed(q, "benign"), m.embed(q_adv, "adversarial")
    critic_opt = torch.optim.SGD(m.critic.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    critic_loss = _critic_bce(m.critic(z_b), m.critic(z_a))
    critic_opt.zero_grad()
    critic_loss.backward()
    critic_opt.step()
    return critic_loss


def plain_gbrcl_step(method, images: torch.Tensor, generator: torch.Generator, cfg, lr: float) -> dict[str, float]:
    """The step of docs/algorithm.md section 2 written out directly: attack, critic step, encoder step with
    ASAM on the benign term."""
    m, c = method, cfg.method.critic
    tau, lam_b, lam_d, rho = cfg.method.temperature, cfg.method.benign_weight, c.weight, cfg.method.sam.rho
    p = strong_view(images, generator, cfg.views.strong)
    q = weak_view(images, generator, cfg.views.weak)
    q_adv = _plain_attack(m, p, q, generator, cfg)
    critic_loss = _plain_critic_step(m, q, q_adv, c)
    # 3 + 4. encoder: lambda_b NCE_b + NCE_adv - lambda_D L_D (D frozen), ASAM on the benign term
    m.train()
    params = [*m.encoder.parameters(), *m.projector.parameters()]
    for prm in m.critic.parameters():
        prm.requires_grad_(False)

    def benign() -> torch.Tensor:
        z_p, z_q = m.embed(torch.cat([p, q]), "benign").chunk(2)
        return info_nce(z_p, z_q, tau)

    def adversarial_and_divergence() -> tuple[torch.Tensor, torch.Tensor]:
        z_p, z_q = m.embed(torch.cat([p, q]), "benign").chunk(2)
        z_adv = m.embed(q_adv, "adversarial")
        return info_nce(z_p, z_adv, tau), LOG2 - _critic_bce(m.critic(z_q), m.critic(z_adv))

    def grad(loss: torch.Tensor) -> list[torch.Tensor]:  # a parameter the loss does not use: zero gradient
        out = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(prm) if g is None else g for prm, g in zip(params, out)]

    benign_term = benign()
    g_sharp = grad(lam_b * benign_term)
    adversarial_term, divergence_term = adversarial_and_divergence()
    g_rest = grad(adversarial_term + lam_d * divergence_term)
    with torch.no_grad():
        t_g = [prm.abs() * g for prm, g in zip(params, g_sharp)]
        norm = torch.sqrt(sum((v ** 2).sum() for v in t_g))
        e = [rho * prm.abs() * v / norm for prm, v in zip(params, t_g)]
        theta = [prm.clone() for prm in params]
        for prm, ei in zip(params, e):
            prm.add_(ei)
    g_at_e = grad(lam_b * benign())
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    with torch.no_grad():
        for prm, t0, g1, g2 in zip(params, theta, g_at_e, g_rest):
            prm.copy_(t0)
            prm.grad = g1 + g2
    opt.step()
    return {"benign": benign_term.item(), "adversarial": adversarial_term.item(),
            "divergence": divergence_term.item(), "critic_loss": critic_loss.item() - LOG2}


def library_and_plain_step(trainer, plain_step, cfg, lr: float = 0.05):
    """One library step of `trainer` on its first batch, and `plain_step` on a copy of the same model with the
    same views' random state: (the copy after its plain step, the library's stats, the plain step's values)."""
    images = trainer.batch(0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    reference = copy.deepcopy(trainer.method)
    generator = torch.Generator().manual_seed(0)
    generator.set_state(trainer.generator.get_state())
    stats = trainer.method.training_step(images, trainer.ctx)
    return reference, stats, plain_step(reference, images, generator, cfg, lr)


@pytest.mark.parametrize("channels_last", ["false", "true"])
def test_the_library_gbrcl_step_equals_the_plain_algorithm(tmp_path, channels_last):
    cfg = load_config("smoke", ["train.threads=1", "train.precision=fp32", f"train.channels_last={channels_last}",
                                "method.attack.steps=3"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "run"))
    reference, stats, expected = library_and_plain_step(trainer, plain_gbrcl_step, cfg)
    for name, value in expected.items():
        assert abs(stats[name].item() - value) < 1e-5, (name, stats[name].item(), value)
    for (name, mine), theirs in zip(trainer.method.named_parameters(), reference.parameters()):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name
    moved = [n for n, prm in trainer.method.named_parameters()
             if not torch.equal(prm, dict(Pretrainer(cfg, RunDir(tmp_path / "fresh")).method.named_parameters())[n])]
    assert any(n.startswith("critic") for n in moved) and any(n.startswith("encoder") for n in moved)


def plain_adv_only_step(method, images: torch.Tensor, generator: torch.Generator, cfg, lr: float) -> dict[str, float]:
    """The adversarial-only rung written out: PGD on q against z_b(p), then one SGD step on NCE(z_b(p), z_a(q')).

    The benign branch sees p and q together, one forward, exactly as in the +benign rung.
    """
    m, a, tau = method, cfg.method.attack, cfg.method.temperature
    p = strong_view(images, generator, cfg.views.strong)
    q = weak_view(images, generator, cfg.views.weak)
    m.eval()
    x = (q + (2 * torch.rand(q.shape, generator=generator) - 1) * a.eps).clamp(0, 1)
    for _ in range(a.steps):
        x.requires_grad_(True)
        objective = info_nce(m.embed(p, "benign"), m.embed(x, "adversarial"), tau)
        (grad,) = torch.autograd.grad(objective, x)
        x = torch.min(torch.max(x.detach() + a.alpha * grad.sign(), q - a.eps), q + a.eps).clamp(0, 1)
    q_adv = x.detach()
    m.train()
    params = [*m.encoder.parameters(), *m.projector.parameters()]
    z_p, _ = m.embed(torch.cat([p, q]), "benign").chunk(2)
    adversarial = info_nce(z_p, m.embed(q_adv, "adversarial"), tau)
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    opt.zero_grad()
    adversarial.backward()
    opt.step()
    return {"adversarial": adversarial.item()}


def test_the_adversarial_only_rung_step_equals_its_plain_transcription(tmp_path):
    cfg = load_config("smoke", ["train.threads=1", "train.precision=fp32", "method.attack.steps=3",
                                "method.benign_weight=0", "method.sam.mode=off", "method.critic.enabled=false"])
    trainer = Pretrainer(cfg, RunDir(tmp_path / "run"))
    assert trainer.method.critic is None and trainer.sam is None
    reference, stats, expected = library_and_plain_step(trainer, plain_adv_only_step, cfg)
    assert set(stats) == {"adversarial"}
    assert abs(stats["adversarial"].item() - expected["adversarial"]) < 1e-6
    for (name, mine), theirs in zip(trainer.method.named_parameters(), reference.parameters()):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6), name
    for (name, mine), theirs in zip(trainer.method.named_buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), rtol=1e-5, atol=1e-7), name
