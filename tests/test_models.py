"""Tests for robustcl.models: shapes, dual-BN branch separation, in-model normalisation, BN freezing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcl.models import (
    BRANCHES, BranchModel, ConvNet, Critic, DualBatchNorm2d, Encoder, LinearHead, ProjectionHead, ResNet18,
    build_backbone, build_encoder, frozen_bn_stats, set_bn_momentum,
)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_convnet(dual_bn: bool = True, in_channels: int = 3) -> ConvNet:
    return ConvNet(in_channels=in_channels, dual_bn=dual_bn, widths=(8, 16, 16, 32))


def bn_layers(model: nn.Module, branch: str) -> list[nn.BatchNorm2d]:
    return [getattr(m, branch) for m in model.modules() if isinstance(m, DualBatchNorm2d)]


def running_stats(model: nn.Module, branch: str) -> list[torch.Tensor]:
    return [t.clone() for bn in bn_layers(model, branch) for t in (bn.running_mean, bn.running_var)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_output_shapes() -> None:
    assert ResNet18(3).eval()(torch.rand(2, 3, 32, 32), "benign").shape == (2, 512)
    assert ConvNet(1)(torch.rand(3, 1, 28, 28), "benign").shape == (3, 256)
    assert ConvNet(3)(torch.rand(3, 3, 32, 32), "adversarial").shape == (3, 256)
    assert ConvNet(3).feature_dim == 256 and ResNet18().feature_dim == 512


def test_encoder_and_heads_unit_norm() -> None:
    enc = build_encoder("convnet", 1, (0.5,), (0.25,))
    z = enc(torch.rand(5, 1, 28, 28))
    assert z.shape == (5, 256) and enc.feature_dim == 256 and enc.dual_bn
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    p = ProjectionHead(256)(z)
    assert p.shape == (5, 128)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(5))
    assert Critic(128)(p).shape == (5,) and Critic(128, hidden_dim=16)(p).shape == (5,)
    assert LinearHead(256, 10)(z).shape == (5, 10)


@pytest.mark.parametrize("used, untouched", [("benign", "adversarial"), ("adversarial", "benign")])
def test_train_forward_updates_only_its_branch(used: str, untouched: str) -> None:
    model = small_convnet().train()
    before_used, before_other = running_stats(model, used), running_stats(model, untouched)
    model(torch.rand(8, 3, 32, 32) * 3 + 1, used)
    for a, b in zip(before_other, running_stats(model, untouched)):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(before_used, running_stats(model, used)))


def test_branches_differ_in_eval_once_stats_differ() -> None:
    model = small_convnet().train()
    model(torch.rand(8, 3, 32, 32) * 3 + 1, "benign")
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    assert not torch.allclose(model(x, "benign"), model(x, "adversarial"))
    # Affine parameters are separate as well: changing the adversarial gamma leaves the benign output alone.
    ref = model(x, "benign")
    with torch.no_grad():
        for bn in bn_layers(model, "adversarial"):
            bn.weight.mul_(2.0)
    torch.testing.assert_close(model(x, "benign"), ref, rtol=0, atol=0)


def test_single_bn_ignores_branch_name() -> None:
    model = small_convnet(dual_bn=False)
    model(torch.rand(8, 3, 32, 32) * 3 + 1, "adversarial")  # moves the only BN's stats away from init
    model.eval()
    assert all(bn is None for bn in bn_layers(model, "adversarial"))
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model(x, "benign"), model(x, "adversarial"), rtol=0, atol=0)


@pytest.mark.parametrize("make", [small_convnet, lambda: ResNet18(dual_bn=False)])
def test_invalid_branch_raises(make) -> None:
    with pytest.raises(ValueError, match="benign"):
        make()(torch.rand(2, 3, 32, 32), "clean")


def test_branch_model_rejects_invalid_branch() -> None:
    with pytest.raises(ValueError, match="benign"):
        BranchModel(Encoder(small_convnet(), CIFAR_MEAN, CIFAR_STD), nn.Identity(), "adv")  # type: ignore[arg-type]


def test_unknown_arch_raises() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vgg16", 3, True)


def test_normalisation_happens_inside() -> None:
    backbone = small_convnet().eval()
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    out = Encoder(backbone, CIFAR_MEAN, CIFAR_STD)(x, "adversarial")
    ref = Encoder(backbone, (0.0,) * 3, (1.0,) * 3)(((x - mean) / std), "adversarial")
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, Encoder(backbone, (0.0,) * 3, (1.0,) * 3)(x, "adversarial"))
    with pytest.raises(ValueError):
        Encoder(backbone, (0.5,), (0.25,))


@pytest.mark.parametrize("branch", BRANCHES)
def test_eval_output_independent_of_batch(branch: str) -> None:
    model = small_convnet()
    model(torch.rand(8, 3, 32, 32), branch)  # non-trivial running stats
    model.eval()
    x = torch.rand(6, 3, 32, 32)
    torch.testing.assert_close(model(x[:1], branch), model(x, branch)[:1])


def test_frozen_bn_stats() -> None:
    model = small_convnet().train()
    for bn in bn_layers(model, "benign")[:1]:
        bn.momentum = 0.3  # a non-default value must survive the context too
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    counts = [bn.num_batches_tracked.clone() for bn in bn_layers(model, "benign")]
    x = torch.rand(8, 3, 32, 32) * 3 + 1
    reference = copy.deepcopy(model)(x, "benign")  # ordinary train-mode forward (batch statistics)
    stats = running_stats(model, "benign")
    with frozen_bn_stats(model):
        inside = model(x, "benign")
    for a, b in zip(stats, running_stats(model, "benign")):
        assert torch.equal(a, b)
    assert all(torch.equal(a, bn.num_batches_tracked) for a, bn in zip(counts, bn_layers(model, "benign")))
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    torch.testing.assert_close(inside, reference)
    assert not torch.allclose(inside, model.eval()(x, "benign"))  # i.e. not running statistics


def test_set_bn_momentum_returns_old_values() -> None:
    model = small_convnet()
    old = set_bn_momentum(model, 0.0)
    assert len(old) == 8 and all(m == 0.1 for m in old)
    assert all(bn.momentum == 0.0 for bn in bn_layers(model, "adversarial"))
    assert set_bn_momentum(model, old) == [0.0] * 8
    assert all(bn.momentum == 0.1 for bn in bn_layers(model, "benign"))


def test_resnet18_parameter_count() -> None:
    single, dual = n_params(ResNet18(dual_bn=False)), n_params(ResNet18(dual_bn=True))
    assert 11_100_000 < single < 11_250_000  # CIFAR ResNet-18 without fc: 11,168,832
    # BN channels: stem 64 + layer1 4*64 + layers 2-4 5*C each (two BNs per block + shortcut BN).
    bn_channels = 64 + 4 * 64 + 5 * (128 + 256 + 512)
    assert dual - single == 2 * bn_channels  # one extra gamma and beta per channel
    assert n_params(ResNet18(in_channels=1, dual_bn=False)) == single - 2 * 64 * 9


def test_branch_model_uses_its_branch() -> None:
    enc = Encoder(small_convnet(), CIFAR_MEAN, CIFAR_STD)
    enc(torch.rand(8, 3, 32, 32) * 3 + 1, "adversarial")
    enc.eval()
    head = LinearHead(enc.feature_dim, 10)
    x = torch.rand(4, 3, 32, 32)
    for branch in BRANCHES:
        model = BranchModel(enc, head, branch)
        assert model.branch == branch
        torch.testing.assert_close(model(x), head(enc(x, branch)), rtol=0, atol=0)
    assert not torch.allclose(BranchModel(enc, head, "benign")(x), BranchModel(enc, head, "adversarial")(x))


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_channels_last_matches_contiguous(arch: str) -> None:
    kwargs = {"widths": (8, 16, 16, 32)} if arch == "convnet" else {}
    enc = build_encoder(arch, 3, CIFAR_MEAN, CIFAR_STD, **kwargs)
    x = torch.rand(4, 3, 32, 32)
    for train in (True, False):
        enc.train(train)
        ref = enc(x, "adversarial")
        out = copy.deepcopy(enc).to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), "adversarial")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_backward() -> None:
    enc = build_encoder("convnet", 1, (0.5,), (0.25,), widths=(8, 16, 16, 32))
    head = ProjectionHead(enc.feature_dim, out_dim=16)
    x = torch.rand(4, 1, 28, 28).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head(enc(x, "adversarial"))
    assert z.shape == (4, 16) and torch.isfinite(z).all()
    z.float().sum().backward()
    grads = [m.weight.grad for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() for g in grads)
    adv_bn = bn_layers(enc, "adversarial")[0]
    assert adv_bn.weight.grad is not None and bn_layers(enc, "benign")[0].weight.grad is None
