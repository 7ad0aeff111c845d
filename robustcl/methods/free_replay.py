"""Free adversarial training's state (Shafahi et al. 2019, method.attack.mode=free): the carried perturbations
and the replayed views, held by a `robustcl.methods.step.StepContext`."""
from __future__ import annotations

from typing import Callable

import torch

from robustcl.config import AttackConfig


class FreeReplay:
    """Free adversarial training's state (Shafahi et al. 2019, method.attack.mode=free), held by a StepContext.

    Replay r (0 <= r < replays) of a batch is one optimiser step. Within a step, the k-th distinct
    input x handed to `perturb` gets perturbation buffer delta_k: x's shape, zero when first made (or
    when the input's shape changes), carried across steps and batches, never reset. `perturb` returns
    x' = (x + delta_k).clamp(0, 1) as a leaf that requires grad, so the encoder step's one backward
    also fills x'.grad; `end_step` (after the optimiser step) then does
    delta_k <- clip_[-eps, eps](delta_k + eps * sign(g)), g = x'.grad where 0 <= x + delta_k <= 1, else 0
    (the gradient through the clamp, as autograd would give it). x' is a leaf, not a function of
    delta_k, so a second backward through it (SAM's pass at theta + e) needs no retained graph.
    The same input tensor handed twice in a step (gbrcl's 4-step order attacks q again after the
    critic step) gets the same x': no delta moves between the two calls. `view` replays the views:
    the j-th view of a step is drawn on replay 0 and returned unchanged on replays 1..m-1, so the
    deltas keep attacking the same images. Each rank of a data-parallel job keeps its own deltas for
    its own shard (never all-reduced).
    """

    def __init__(self, replays: int, eps: float) -> None:
        self.replays, self.eps = replays, eps
        self.replay = 0
        self.deltas: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = []
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (x, x') pairs, k-th: delta_k
        self._view_calls = 0

    def view(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """This step's next view: drawn by `draw` on the batch's first replay, the cached one after."""
        j, self._view_calls = self._view_calls, self._view_calls + 1
        if j == len(self.views):
            self.views.append(draw())
        return self.views[j]

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x' = (x + delta_k).clamp(0, 1), a leaf requiring grad, for this step's k-th distinct input x."""
        for seen, out in self._inputs:
            if seen is x:
                return out
        k = len(self._inputs)
        if k == len(self.deltas):
            self.deltas.append(torch.zeros_like(x))  # first use: zero
        elif (self.deltas[k].shape, self.deltas[k].device, self.deltas[k].dtype) != (x.shape, x.device, x.dtype):
            self.deltas[k] = torch.zeros_like(x)  # a batch of another shape starts from zero
        out = (x.detach() + self.deltas[k]).clamp_(0.0, 1.0).requires_grad_(True)
        self._inputs.append((x, out))
        return out

    def perturbed(self) -> list[torch.Tensor]:
        """This step's perturbed inputs x' (in call order): the leaves whose .grad the encoder step fills."""
        return [out for _, out in self._inputs]

    @torch.no_grad()
    def end_step(self) -> None:
        """After the optimiser step: one signed step of eps on every delta used, clipped; next replay."""
        for (x, out), delta in zip(self._inputs, self.deltas):
            if out.grad is not None:
                moved = x.detach() + delta
                inside = (moved >= 0) & (moved <= 1)  # where the clamp passes the gradient
                delta.add_(out.grad.sign() * inside, alpha=self.eps).clamp_(-self.eps, self.eps)
        self._inputs, self._view_calls = [], 0
        self.replay = (self.replay + 1) % self.replays
        if self.replay == 0:
            self.views = []  # the next batch draws new views

    def state(self) -> list[torch.Tensor]:
        """The perturbation buffers (detached CPU copies) that an exact resume needs at a replay boundary."""
        return [d.detach().cpu().clone() for d in self.deltas]

    def load(self, deltas: list[torch.Tensor], step: int, device: torch.device) -> None:
        """Restore the buffers saved by `state` at optimiser step `step` (views are drawn afresh)."""
        self.deltas = [d.to(device) for d in deltas]
        self.replay = step % self.replays
        self.views, self._inputs, self._view_calls = [], [], 0


def free_replay_for(attack: AttackConfig | None) -> FreeReplay | None:
    """The FreeReplay state for a method's attack (`Method.attack_config`) of mode free, else None."""
    if attack is not None and attack.mode == "free":
        assert attack.replays is not None  # validated: >= 2
        return FreeReplay(attack.replays, attack.eps)
    return None


__all__ = ["FreeReplay", "free_replay_for"]
