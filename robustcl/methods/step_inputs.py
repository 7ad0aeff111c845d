"""What a method's step draws and attacks: its views (`draw_view`), an attack's fixed target embedding
(`fixed_embedding`) and its adversarial examples (`eval_pgd`: PGD or FGSM-RS in eval mode, parameters
frozen; or, in free mode, the carried perturbation and the replayed views of `StepContext.free`).

Shared by every method file; the randomness comes from the run's generator (`StepContext.generator`).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from robustcl.config import AttackConfig
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, phase
from robustcl.objectives import fgsm_rs, pgd
from robustcl.views import strong_view, weak_view


def fixed_embedding(method: Method, x: torch.Tensor, branch: str, ctx: StepContext) -> torch.Tensor:
    """g(f_branch(x)) in eval mode without gradients: an attack's fixed target.

    In free mode (`ctx.free`) no attack objective is ever evaluated, so no forward is spent on it:
    the target is a data-less meta tensor of the embedding's shape (any use of its values fails loudly).
    """
    if ctx.free is not None:
        return torch.empty((x.shape[0], method.projector.out_dim), device="meta")
    with method.evaluating(), torch.no_grad(), ctx.autocast():
        return method.embed(x, branch)  # type: ignore[arg-type]


def eval_pgd(method: Method, objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             attack: AttackConfig, ctx: StepContext) -> torch.Tensor:
    """PGD (or FGSM-RS) maximising `objective` (run under autocast) from x, eval mode, parameters frozen.

    Mode free attacks nothing here: it returns (x + delta_k).clamp(0, 1), this step's k-th carried
    perturbation (`robustcl.methods.free_replay.FreeReplay`), whose gradient the encoder step's own backward
    computes; `objective` is not evaluated. The same x twice in a step gives the same tensor.
    """
    if attack.mode == "free":
        assert ctx.free is not None, "method.attack.mode=free needs a StepContext built for that method"
        return ctx.free.perturb(x)

    def wrapped(x_adv: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            return objective(x_adv)

    clip_start = not ctx.reference.unclipped_start  # reference: the authors' start, x + U(-eps, eps) unclipped
    with method.evaluating(), phase("attack"):
        if attack.mode == "fgsm-rs":
            return fgsm_rs(wrapped, x, attack.eps, None, ctx.generator, modules=[method], clip_start=clip_start)
        return pgd(wrapped, x, attack.eps, attack.alpha, attack.steps, attack.random_start, ctx.generator,
                   modules=[method], clip_start=clip_start)


def draw_view(kind: Literal["strong", "weak"], images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The strong (SimCLR) or weak (pad-crop-flip) view of a uint8 batch, from the run's generator.

    In free mode the j-th view of a step is drawn on a batch's first replay and the same tensor is
    returned on the other replays (the generator is not advanced), so the carried perturbations keep
    attacking the same images.
    """
    def draw() -> torch.Tensor:
        with phase("views"):
            if kind == "strong":
                return ctx.prepare(strong_view(images, ctx.generator, ctx.strong))
            return ctx.prepare(weak_view(images, ctx.generator, ctx.weak))

    return draw() if ctx.free is None else ctx.free.view(draw)


__all__ = ["draw_view", "eval_pgd", "fixed_embedding"]
