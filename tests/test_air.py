"""AIR / SIR (objectives/air.py): each against a loop over the batch in float64, their zero and reduction cases,
where the gradient goes, the "air" term in ACL and DynACL, and that a zero weight changes nothing else."""
from __future__ import annotations

import math

import pytest
import torch

from robustcl.config import ConfigError, load_config
from robustcl.data import DatasetInfo
from robustcl.methods.step import weighted_sum
from robustcl.methods.factory import build_training
from robustcl.objectives import info_nce
from robustcl.objectives.air import AirConfig, air, invariant_regularization, sir
from robustcl.splits import load_split

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- the term, by loops
def loop_distribution(u: torch.Tensor, v: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """p(k) = exp(cos(u_k, v_k)/tau) / sum_m exp(cos(u_m, v_m)/tau), one image k at a time, float64."""
    sims = [(u[k].double() @ v[k].double()) / (u[k].double().norm() * v[k].double().norm()) / tau
            for k in range(len(u))]
    total = sum(s.exp() for s in sims)
    return [s.exp() / total for s in sims]


def loop_divergence(p: list[torch.Tensor], q: list[torch.Tensor], form: str) -> torch.Tensor:
    if form == "kl":
        return sum(pk * (pk.log() - qk.log()) for pk, qk in zip(p, q))
    return sum(qk * (qk.log() - pk) for pk, qk in zip(p, q))  # the authors' kl_div(P, log Q, log_target=True)


def loop_sir(zi, zj, zo, tau, form):
    return loop_divergence(loop_distribution(zi, zo, tau), loop_distribution(zj, zo, tau), form)


def loop_air(zi, zj, zo, zia, zja, tau, form):
    p = [a * b for a, b in zip(loop_distribution(zia, zi, tau), loop_distribution(zia, zo, tau))]
    q = [a * b for a, b in zip(loop_distribution(zja, zj, tau), loop_distribution(zja, zo, tau))]
    return loop_divergence(p, q, form)


def five(seed: int = 0, n: int = 6, d: int = 4) -> list[torch.Tensor]:
    """z_i, z_j, z_orig, z_i', z_j' (requires grad)."""
    return [randn(n, d, seed=seed + k).requires_grad_() for k in range(5)]


@pytest.mark.parametrize("form", ["kl", "authors"])
@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_sir_and_air_and_their_gradients_match_the_loops(form, tau):
    zs = five()
    ref = [z.detach().double().requires_grad_() for z in zs]
    for fn, loop, k in ((sir, loop_sir, 3), (air, loop_air, 5)):
        value, expected = fn(*zs[:k], tau, form), loop(*ref[:k], tau, form)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
        for g, r in zip(torch.autograd.grad(value, zs[:k]), torch.autograd.grad(expected, ref[:k])):
            assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-6)


def test_both_vanish_when_the_two_views_coincide_and_air_is_sir_over_n_without_attack():
    zi, _, zo, zia, _ = five(seed=3)
    assert sir(zi, zi, zo).item() == pytest.approx(0.0, abs=1e-7)
    assert air(zi, zi, zo, zia, zia).item() == pytest.approx(0.0, abs=1e-7)
    zi, zj, zo = five(seed=7)[:3]
    # z' = z: p_{z|z} is uniform (1/N), so AIR = sum (p/N) log(p/q) = SIR / N
    assert air(zi, zj, zo, zi, zj).item() == pytest.approx(sir(zi, zj, zo).item() / len(zi), rel=1e-5)
    # The authors' form is not a divergence: at P = Q it is sum Q (log Q - Q), below 0
    q = loop_distribution(zi.detach(), zo.detach(), 0.5)
    assert sir(zi, zi, zo, form="authors").item() == pytest.approx(sum(x * (x.log() - x) for x in q).item(), rel=1e-5)


def test_hand_computed_sir_on_two_images():
    # z_o = e1, e2; view i on the originals (cos 1, 1): p = (1/2, 1/2); view j: cos (1, 0) -> q = (e^2, 1)/(e^2 + 1)
    zo = torch.eye(2)
    zj = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    q1 = math.exp(2) / (math.exp(2) + 1)
    expected = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    assert sir(zo, zj, zo).item() == pytest.approx(expected, rel=1e-6)


def test_nothing_is_detached_sir_reaches_only_its_inputs_air_all_five():
    zs = five(seed=11)
    grads = torch.autograd.grad(air(*zs), zs)
    assert all(g.abs().sum() > 0 for g in grads)
    grads = torch.autograd.grad(sir(*zs[:3]), zs, allow_unused=True)
    assert all(g.abs().sum() > 0 for g in grads[:3]) and grads[3] is None and grads[4] is None


def test_invariant_regularization_is_the_weighted_sum_and_skips_zero_weights():
    zs = five(seed=5)
    cfg = AirConfig(enabled=True, lambda1=0.3, lambda2=0.7)
    value = invariant_regularization(*zs, 0.5, cfg)
    assert value.item() == pytest.approx((0.3 * sir(*zs[:3]) + 0.7 * air(*zs)).item(), rel=1e-6)
    only_air = invariant_regularization(*zs, 0.5, AirConfig(enabled=True, lambda1=0.0, lambda2=1.0))
    grads = torch.autograd.grad(only_air, zs)
    assert only_air.item() == pytest.approx(air(*zs).item(), rel=1e-6) and all(g.abs().sum() > 0 for g in grads)


def test_config_is_off_by_default_and_validated():
    assert not AirConfig().active() and not AirConfig(enabled=True, lambda1=0, lambda2=0).active()
    assert AirConfig(enabled=True).active()
    for method in ("acl", "dynacl"):
        assert not load_config("smoke", [f"method.name={method}"]).method.air.enabled
        with pytest.raises(ConfigError, match="method.air.lambda1"):
            load_config("smoke", [f"method.name={method}", "method.air.lambda1=-1"])


# ---------------------------------------------------------------------------- in ACL and DynACL
def smoke(name: str, *overrides: str):
    return load_config("smoke", [f"method.name={name}", "method.attack.steps=1", "train.threads=1", *overrides])


def build(cfg):
    training = build_training(cfg, DatasetInfo("synthetic", 2, 1, 16, 16, (0.5,), (0.25,)), CPU)
    ctx, encoder_step = training.ctx, training.ctx.encoder_step

    def recording(terms_fn, weights):  # noqa: ANN001, ANN202
        ctx.weights = dict(weights)  # type: ignore[attr-defined]
        return encoder_step(terms_fn, weights)

    ctx.encoder_step = recording  # type: ignore[method-assign]
    return training.method, ctx


def E(x: torch.Tensor, branch: str) -> torch.Tensor:
    maps = {"benign": randn(16, 5, seed=10), "adversarial": randn(16, 5, seed=11)}
    return x.flatten(1) @ maps[branch]


HAND = [randn(4, 1, 4, 4, seed=k) for k in range(5)]  # p, q, p', q', x: four images of 16 pixels
AIR_ON = ("method.air.enabled=true", "method.air.lambda1=0.3", "method.air.lambda2=0.6")


@pytest.mark.parametrize("name", ["acl", "dynacl"])
def test_the_air_term_is_ir_on_the_methods_embeddings_weighted_one(name):
    method, ctx = build(smoke(name, *AIR_ON, "method.period=1" if name == "dynacl" else "method.temperature=0.5"))
    method.training_step(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), ctx)
    assert ctx.weights["air"] == 1.0
    method.embed = lambda x, branch: E(x, branch)  # type: ignore[method-assign]
    p, q, pa, qa, x = HAND
    with torch.no_grad():
        terms = method.loss_terms(p, q, pa, qa, x_orig=x)
    zi, zj, zo, zia, zja = E(p, "benign"), E(q, "benign"), E(x, "benign"), E(pa, "adversarial"), E(qa, "adversarial")
    expected = 0.3 * loop_sir(zi, zj, zo, 0.5, "kl") + 0.6 * loop_air(zi, zj, zo, zia, zja, 0.5, "kl")
    assert terms["air"].item() == pytest.approx(expected.item(), rel=1e-5)
    natural = "benign" if name == "acl" else "natural"
    assert terms[natural].item() == pytest.approx(info_nce(zi, zj).item(), rel=1e-6)
    assert weighted_sum(terms, ctx.weights).item() == pytest.approx(
        (ctx.weights[natural] * terms[natural] + ctx.weights["adversarial"] * terms["adversarial"] + expected).item(),
        rel=1e-5)
    without = method.loss_terms(p, q, pa, qa)  # no un-augmented images: no term
    assert "air" not in without


def steps(cfg, n: int = 2) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """n training steps from the config's seed: each step's returned terms, and the parameters after."""
    torch.manual_seed(0)
    data = load_split(cfg, "train")
    method, ctx = build(cfg)
    out = [method.training_step(data.images[:16], ctx) for _ in range(n)]
    return out, [p.detach().clone() for p in method.parameters()]


@pytest.mark.parametrize("name", ["acl", "dynacl"])
def test_air_weight_zero_leaves_the_other_terms_and_the_update_bitwise_unchanged(name):
    base, params = steps(smoke(name))
    zero, zero_params = steps(smoke(name, "method.air.enabled=true", "method.air.lambda1=0", "method.air.lambda2=0"))
    assert all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(base, zero))
    assert all(torch.equal(a, b) for a, b in zip(params, zero_params))  # hence the gradients were equal too
    on, on_params = steps(smoke(name, *AIR_ON), n=1)
    assert set(on[0]) == set(base[0]) | {"air"} and torch.isfinite(on[0]["air"])
    assert all(torch.equal(on[0][k], base[0][k]) for k in base[0])  # first step: the other terms are the same
    assert any(not torch.equal(a, b) for a, b in zip(steps(smoke(name), n=1)[1], on_params))  # but the update is not


def test_sam_on_the_air_term_alone_passes_only_air_to_the_second_pass():
    method, ctx = build(smoke("acl", *AIR_ON))
    passes: list[tuple[str, ...] | None] = []
    real = method.loss_terms

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        terms = real(*args, **kwargs)
        passes.append(tuple(sorted(terms)))
        return terms

    method.loss_terms = spy  # type: ignore[method-assign]
    from robustcl.objectives import SAM
    ctx.sam, ctx.sam_terms = SAM(method.encoder_parameters(), rho=0.5), ("air",)
    stats = method.training_step(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), ctx)
    assert passes == [("adversarial", "air", "benign"), ("air",)] and torch.isfinite(stats["air"])
