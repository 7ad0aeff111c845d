"""SimCLR (Chen et al. 2020): NT-Xent between two strong views, no attack, one BN branch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.step import StepContext
from robustcl.methods.step_inputs import draw_view
from robustcl.objectives import info_nce


@dataclass
class SimclrConfig(MethodConfig):
    name: str = "simclr"


class Simclr(Method):
    """The non-robust baseline: minimise NCE(z(p1), z(p2)) over two strong views."""

    name = "simclr"
    config_class = SimclrConfig
    dual_bn = False
    headline_branch = "benign"

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p1, p2 = draw_view("strong", images, ctx), draw_view("strong", images, ctx)

        def terms(only: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
            z1, z2 = self.embed(torch.cat([p1, p2]), "benign").chunk(2)
            return {"benign": info_nce(z1, z2, self.cfg.temperature)}

        return ctx.encoder_step(terms, {"benign": 1.0})
