"""The compared methods: each loss against a row-by-row computation, HF(x), and two steps of every method/preset."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.config import list_presets, load_config, preset_chain
from robustcl.methods import METHODS, Method, StepContext, method_class
from robustcl.methods.advcl import high_frequency
from robustcl.data import DatasetInfo
from robustcl.methods.step import weighted_sum
from robustcl.methods.factory import build_training
from robustcl.objectives import DIVERGENCES, f_divergence_bound, info_nce, multi_positive_nce
from robustcl.splits import load_split

CPU = torch.device("cpu")



def attack_free(cfg) -> bool:  # noqa: ANN001
    """Whether cfg's method trains without an attack (asked of the method, never by its name)."""
    return method_class(cfg.method.name).attack_free(cfg.method)


def inherits(preset: str, base: str, writable: dict[str, set[str]]) -> bool:
    """Whether `preset` extends `base` and every file on the way writes only the sections (and, for a
    section mapped to a set of keys, only those keys) of `writable`, besides name and method."""
    chain = preset_chain(preset)
    names = [name for name, _ in chain]
    if preset == base or base not in names:
        return False
    for _, raw in chain[:names.index(base)]:
        for section, value in raw.items():
            if section in ("extends", "name", "method"):
                continue
            keys = writable.get(section)
            if keys is None or (keys and not set(value or {}) <= keys):
                return False
    return True


# the paper's CIFAR setup, docs/algorithm.md section 2: presets that keep cifar10-gbrcl's schedule and model
PAPER_SETUP = sorted(p for p in list_presets() if inherits(p, "cifar10-gbrcl", {"train": {"lr"}, "data": {"name"},
                                                                              "reference": set()}))
# Fashion-MNIST presets of other methods on fmnist-gbrcl's whole budget (they write only their method section)
FMNIST_BUDGET = sorted(p for p in list_presets() if inherits(p, "fmnist-gbrcl", {})
                       and load_config(p).method.name != "gbrcl")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- reference losses
def nt_xent_loop(views: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Row by row: mean over the other views p of -log exp(s_ip/tau) / sum_{k != i} exp(s_ik/tau)."""
    z = F.normalize(torch.cat(views).double(), dim=1)
    n, total = views[0].shape[0], 0.0
    for i in range(len(z)):
        denom = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in range(len(z)) if k != i]), 0)
        positives = [k for k in range(len(z)) if k % n == i % n and k != i]
        total += sum(-(z[i] @ z[k] / tau - denom) for k in positives) / len(positives)
    return total / len(z)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_views", [2, 3, 4])
def test_multi_positive_nce_matches_the_row_loop(n_views):
    views = [randn(5, 6, seed=k) for k in range(n_views)]
    for tau in (0.5, 0.2):
        assert multi_positive_nce(views, tau).item() == pytest.approx(nt_xent_loop(views, tau).item(), rel=1e-5)
    if n_views == 2:
        assert multi_positive_nce(views, 0.5).item() == pytest.approx(info_nce(*views, 0.5).item(), rel=1e-6)


def test_multi_positive_nce_hand_computed():
    # Two images, three identical orthonormal views each (tau 0.5): every row has 2 positives at
    # sim 1 and 3 negatives at sim 0 -> loss = -(2 - log(2 e^2 + 3)).
    e = torch.eye(2)
    expected = -(2.0 - math.log(2 * math.exp(2.0) + 3.0))
    assert multi_positive_nce([e, e, e], 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_multi_positive_nce_rejects_mismatched_views():
    with pytest.raises(ValueError, match="equal shape"):
        multi_positive_nce([torch.randn(4, 3), torch.randn(5, 3)])


# ------------------------------------------------------------------------- method construction
def smoke(*overrides: str):
    return load_config("smoke", list(overrides))


def build(cfg, channels: int = 1, mean=(0.5,), std=(0.25,)) -> tuple[Method, StepContext]:
    """Method + context from the trainer's factory (`build_training`); the context remembers, as `weights`,
    the weights its last encoder step used."""
    training = build_training(cfg, DatasetInfo("synthetic", 2, channels, 16, 16, tuple(mean), tuple(std)), CPU)
    ctx = training.ctx
    encoder_step = ctx.encoder_step

    def recording(terms_fn, weights):  # noqa: ANN001, ANN202
        ctx.weights = dict(weights)  # type: ignore[attr-defined]
        return encoder_step(terms_fn, weights)

    ctx.encoder_step = recording  # type: ignore[method-assign]
    return training.method, ctx


def linear_map(out: int = 5) -> dict[str, torch.Tensor]:
    """A fixed per-branch linear map of the 16 pixels of a hand-made view."""
    return {"benign": randn(16, out, seed=10), "adversarial": randn(16, out, seed=11)}


def E(x: torch.Tensor, branch: str, out: int = 5) -> torch.Tensor:
    return x.flatten(1) @ linear_map(out)[branch]


def images(n: int = 8, channels: int = 1, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def total_loss(method: Method, ctx: StepContext, *views: torch.Tensor, out: int = 5) -> torch.Tensor:
    """One real step (records the weights it uses; trains the critic), then the weighted loss on hand-made
    views with z = g(f_branch(x)) replaced by `E`, so that each loss has a direct formula."""
    method.training_step(images(), ctx)
    method.embed = lambda x, branch: E(x, branch, out)  # type: ignore[method-assign]
    with torch.no_grad():
        return weighted_sum(method.loss_terms(*views), ctx.weights)


HAND = [randn(4, 1, 4, 4, seed=k) for k in range(5)]  # four images, 16 pixels: tiny hand-made views


# --------------------------------------------------------------------------- each method's loss
def test_acl_loss_is_half_benign_plus_half_adversarial():
    method, ctx = build(smoke("method.name=acl", "method.attack.steps=1"))
    p, q, pa, qa = HAND[:4]
    expected = 0.5 * (nt_xent_loop([E(p, "benign"), E(q, "benign")], 0.5)
                      + nt_xent_loop([E(pa, "adversarial"), E(qa, "adversarial")], 0.5))
    assert total_loss(method, ctx, p, q, pa, qa).item() == pytest.approx(expected.item(), rel=1e-5)


def test_rocl_loss_is_three_positive_nce_plus_regulariser():
    method, ctx = build(smoke("method.name=rocl", "method.attack.steps=1"))
    p, q, qa = HAND[:3]
    zp, zq, za = E(p, "benign"), E(q, "benign"), E(qa, "adversarial")
    expected = nt_xent_loop([zp, zq, za], 0.5) + nt_xent_loop([zp, za], 0.5) / 256
    assert total_loss(method, ctx, p, q, qa).item() == pytest.approx(expected.item(), rel=1e-5)


def test_clae_loss_is_benign_pair_plus_q_with_its_adversary():
    method, ctx = build(smoke("method.name=clae", "method.attack.steps=1"))
    p, q, qa = HAND[:3]
    zq = E(q, "benign")
    expected = nt_xent_loop([E(p, "benign"), zq], 0.5) + nt_xent_loop([zq, E(qa, "adversarial")], 0.5)
    assert total_loss(method, ctx, p, q, qa).item() == pytest.approx(expected.item(), rel=1e-5)


def test_advcl_loss_is_the_four_view_nce():
    method, ctx = build(smoke("method.name=advcl", "method.attack.steps=1"))
    x, p, q, h, xa = HAND
    views = [E(xa, "adversarial"), E(p, "benign"), E(q, "benign"), E(h, "benign")]
    loss = total_loss(method, ctx, x, torch.cat([p, q, h]), xa)
    assert loss.item() == pytest.approx(nt_xent_loop(views, 0.5).item(), rel=1e-5)
    assert method.critic is None and ctx.sam is None


def test_advcl_ours_adds_benign_and_divergence_terms():
    method, ctx = build(smoke("method.name=advcl", "method.attack.steps=1", "method.benign_weight=0.5",
                              "method.critic.enabled=true", "method.critic.weight=0.3", "method.divergence=kl"))
    x, p, q, h, xa = HAND
    zx, zxa = E(x, "benign", 16), E(xa, "adversarial", 16)  # the critic reads proj_dim = 16 features
    views = [zxa, E(p, "benign", 16), E(q, "benign", 16), E(h, "benign", 16)]
    loss = total_loss(method, ctx, x, torch.cat([p, q, h]), xa, out=16)  # after the step: the critic has moved
    with torch.no_grad():
        bound = f_divergence_bound("kl", method.critic(zx), method.critic(zxa))
    expected = nt_xent_loop(views, 0.5) + 0.5 * nt_xent_loop(views[1:3], 0.5) + 0.3 * bound
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gbrcl_divergence_term_is_the_critic_bound(divergence):
    method, ctx = build(smoke(f"method.divergence={divergence}", "method.sam.mode=off"))
    p, q, qa = HAND[:3]
    loss = total_loss(method, ctx, p, q, qa, out=16)
    zp, zq, za = E(p, "benign", 16), E(q, "benign", 16), E(qa, "adversarial", 16)
    with torch.no_grad():
        bound = f_divergence_bound(divergence, method.critic(zq), method.critic(za))
    expected = 2.0 * nt_xent_loop([zp, zq], 0.5) + nt_xent_loop([zp, za], 0.5) + 0.1 * bound
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_acl_attacks_both_views_inside_the_ball():
    method, ctx = build(smoke("method.name=acl"))
    p, q = torch.rand(6, 1, 16, 16), torch.rand(6, 1, 16, 16)
    pa, qa = method.attack(p, q, ctx)
    eps = method.cfg.attack.eps
    for clean, adv in ((p, pa), (q, qa)):
        assert 0 < (adv - clean).abs().max() <= eps + 1e-6
    assert method.training


# ------------------------------------------------------------------------------ high frequency
def test_high_frequency_removes_low_frequencies_and_rescales():
    i = torch.arange(32.0)
    low = 0.2 * torch.cos(2 * math.pi * i / 32)[:, None] * torch.ones(32)      # frequency (1, 0): radius 1 < 8
    checker = ((i[:, None] + i[None, :]) % 2) * 2 - 1                          # frequency (16, 16): kept
    x = (0.5 + low + 0.1 * checker).clamp(0, 1).expand(2, 3, 32, 32)
    hf = high_frequency(x, radius=8)
    assert torch.allclose(hf, ((checker + 1) / 2).expand_as(hf), atol=1e-5)
    assert torch.equal(high_frequency(torch.full((1, 1, 8, 8), 0.3), 2), torch.zeros(1, 1, 8, 8))
    r = high_frequency(torch.rand(4, 3, 16, 16), 4)
    assert r.min() >= 0 and r.max() <= 1 and torch.allclose(r.flatten(1).amax(1), torch.ones(4))


# --------------------------------------------------------------------------------- running steps
def two_steps(method: Method, ctx: StepContext, batch: torch.Tensor) -> None:
    before = [p.detach().clone() for p in method.encoder_parameters()]
    for _ in range(2):
        stats = method.training_step(batch, ctx)
        assert stats and all(torch.isfinite(v).all() for v in stats.values()), stats
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, method.encoder_parameters()))
    assert method.training


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_two_steps_on_synthetic_data(name):
    cfg = smoke(f"method.name={name}")
    if not attack_free(cfg):
        cfg = smoke(f"method.name={name}", "method.attack.steps=1")
    data = load_split(cfg, "train")
    method, ctx = build(cfg, data.info.channels, data.info.mean, data.info.std)
    two_steps(method, ctx, data.images[:16])


@pytest.mark.parametrize("preset", sorted(list_presets()))
def test_every_preset_runs_two_steps_on_synthetic_data(preset):
    """Every shipped preset (methods, ablation ladder, smoke) trains two steps on a tiny model."""
    channels = 3 if preset.startswith("cifar") else 1
    small = ["data.name=synthetic", "data.val_size=16", f"data.synthetic.channels={channels}",
             "data.synthetic.size=16", "data.synthetic.n_train=64", "data.synthetic.n_test=16",
             "model.arch=convnet", "model.widths=[8,16,16,32]", "model.proj_dim=16"]
    cfg = load_config(preset)
    if not attack_free(cfg):
        small.append("method.attack.steps=1")
    if cfg.reference is not None and cfg.reference.projection_only_shortcut:
        small.append("reference.projection_only_shortcut=false")  # a ResNet-only switch (the ConvNet has no shortcut)
    cfg = load_config(preset, small)
    data = load_split(cfg, "train")
    method, ctx = build(cfg, data.info.channels, data.info.mean, data.info.std)
    two_steps(method, ctx, data.images[:16])


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_advcl_ours_preset_builds_critic_and_asam(dataset):
    cfg = load_config(f"{dataset}-advcl-ours")
    m = cfg.method
    assert (m.name, m.benign_weight, m.sam.mode, m.sam.rho, m.sam.terms) == ("advcl", 0.5, "asam", 0.5, ("benign",))
    assert (m.critic.weight, m.critic.lr, m.critic.in_attack, m.divergence) == (0.3, 0.5, True, "js")
    method, ctx = build(load_config(f"{dataset}-advcl-ours", ["model.arch=convnet", "model.proj_dim=16"]), 3,
                        (0.5,) * 3, (0.25,) * 3)
    assert method.critic is not None and ctx.critic_optimizer.param_groups[0]["lr"] == 0.5
    assert ctx.sam is not None and ctx.sam.adaptive and ctx.sam.rho == 0.5
    plain = load_config(f"{dataset}-advcl")
    assert plain.method.sam.mode == "off" and not plain.method.critic.enabled and plain.method.attack.steps == 5


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gbrcl_with_each_divergence_runs_a_step_and_trains_the_critic(divergence):
    method, ctx = build(smoke(f"method.divergence={divergence}", "method.attack.steps=1"))
    before = [p.detach().clone() for p in method.critic.parameters()]
    stats = method.training_step(images(), ctx)
    assert {"benign", "adversarial", "divergence", "critic_loss", "critic_acc"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, method.critic.parameters()))


def test_gbrcl_attack_view_switch_and_presets_reference_values():
    method, ctx = build(smoke("method.attack_view=strong", "method.attack.steps=1"))
    assert method.cfg.attack_view == "strong"
    method.training_step(images(), ctx)
    assert load_config("smoke").method.attack_view == "weak"
    assert load_config("cifar10-acl").method.attack.steps == 5
    rocl = load_config("cifar10-rocl")
    assert rocl.train.lr == 0.1 and rocl.method.regularizer_weight == 1 / 256
    assert load_config("cifar10-gbrcl").train.lr == 0.5
    assert {"cifar10-simclr", "cifar100-gbrcl", "cifar10-acl"} <= set(PAPER_SETUP)  # the derivation finds them
    for preset in PAPER_SETUP:
        cfg = load_config(preset)
        t = cfg.train
        assert (t.batch_size, t.epochs, t.momentum, t.weight_decay, t.warmup_epochs) == (512, 500, 0.9, 1e-4, 10)
        assert cfg.model.arch == "resnet18"
        if not attack_free(cfg):
            assert (cfg.method.attack.eps, cfg.method.attack.alpha) == (8 / 255, 2 / 255), preset
    fm = load_config("fmnist-gbrcl")
    assert FMNIST_BUDGET and "fmnist-simclr" in FMNIST_BUDGET
    for preset in FMNIST_BUDGET:
        cfg = load_config(preset)
        if "attack as fmnist-gbrcl" in list_presets()[preset]:  # what the preset's own description says
            assert cfg.method.attack == fm.method.attack, preset
        assert {k: v for k, v in cfg.to_dict().items() if k not in ("name", "method")} == \
            {k: v for k, v in fm.to_dict().items() if k not in ("name", "method")}
