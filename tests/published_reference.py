"""Reference networks carrying each published layout's names and structure, written from the facts in
/work/shared/zoo-formats.md (the public training code's modules), independent of robustcl.models, and saved as
each training script saves them. tests/test_published_layouts.py loads the files through robustcl and compares
features with these networks' own forward."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


class Normalize(nn.Module):
    """NormalizeByChannelMeanStd: (C,) buffers `mean`, `std`."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


class BNList(nn.Module):
    """ACL's batch_norm_multiple: `bn_list.{i}`, the copy picked by index."""

    def __init__(self, c: int, copies: int, dims: int = 2) -> None:
        super().__init__()
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.bn_list = nn.ModuleList([bn(c) for _ in range(copies)])

    def forward(self, x, i):
        return self.bn_list[i](x)


class IndexedBN(nn.ModuleList):
    """The seed paper's `nn.ModuleList([BatchNorm2d, BatchNorm2d])`: `bnX.{0,1}`."""

    def __init__(self, c: int) -> None:
        super().__init__([nn.BatchNorm2d(c), nn.BatchNorm2d(c)])

    def forward(self, x, i):
        return self[i](x)


class PlainBN(nn.BatchNorm2d):
    def forward(self, x, i=0):
        return super().forward(x)


def norm(style: str, c: int, copies: int) -> nn.Module:
    return {"bn_list": lambda: BNList(c, copies), "indexed": lambda: IndexedBN(c), "plain": lambda: PlainBN(c)}[style]()


class ConvBN(nn.Module):
    """ACL's Downsample_multiple: `.conv` then `.bn`."""

    def __init__(self, cin, cout, stride, style, copies) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = norm(style, cout, copies)

    def forward(self, x, i):
        return self.bn(self.conv(x), i)


class SeqShortcut(nn.Sequential):
    """torchvision's / RoCL's `nn.Sequential(conv1x1, BatchNorm2d)`: `.0`, `.1`."""

    def __init__(self, cin, cout, stride) -> None:
        super().__init__(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x, i=0):
        return self[1](self[0](x))


class Block(nn.Module):
    """A CIFAR BasicBlock. `shortcut` names the projection: downsample (ACL: .conv/.bn; torchvision: .0/.1),
    shortcut (RoCL: .0/.1) or conv3/bn3 (the seed paper's, whose other blocks add no identity)."""

    def __init__(self, cin, cout, stride, style, copies, shortcut: str, identity: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(style, cout, copies)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(style, cout, copies)
        self.identity = identity
        self.kind = None
        if stride != 1 or cin != cout:
            self.kind = shortcut
            if shortcut == "conv3":
                self.conv3 = nn.Conv2d(cin, cout, 1, stride, bias=False)
                self.bn3 = norm(style, cout, copies)
            elif style == "bn_list":
                setattr(self, shortcut, ConvBN(cin, cout, stride, style, copies))
            else:
                setattr(self, shortcut, SeqShortcut(cin, cout, stride))

    def forward(self, x, i):
        out = F.relu(self.bn1(self.conv1(x), i))
        out = self.bn2(self.conv2(out), i)
        if self.kind == "conv3":
            return F.relu(out + self.bn3(self.conv3(x), i))
        if self.kind is not None:
            return F.relu(out + getattr(self, self.kind)(x, i))
        return F.relu(out + x) if self.identity else F.relu(out)


class CifarResNet18(nn.Module):
    """The CIFAR ResNet-18 all six layouts use: 3x3 stride-1 stem (padding `padding`), no max-pool, 4 stages."""

    def __init__(self, style: str, copies: int, shortcut: str, padding: int = 1, normalize=None,
                 identity: bool = True) -> None:
        super().__init__()
        if normalize is not None:
            self.normalize = Normalize(*normalize)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, padding, bias=False)
        self.bn1 = norm(style, 64, copies)
        cin = 64
        for n, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{n}", nn.ModuleList([Block(cin, cout, stride, style, copies, shortcut, identity),
                                                       Block(cout, cout, 1, style, copies, shortcut, identity)]))
            cin = cout

    def feature_map(self, x, i=0):
        if hasattr(self, "normalize"):
            x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x), i))
        for n in range(1, 5):
            for block in getattr(self, f"layer{n}"):
                x = block(x, i)
        return x

    def forward(self, x, i=0):
        return self.feature_map(x, i).mean(dim=(2, 3))


def scramble(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics far from their initial values (so a copy or buffer mix-up shows)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.weight.data = 1 + 0.3 * torch.randn(c, generator=gen)
            m.bias.data = 0.3 * torch.randn(c, generator=gen)
            m.running_mean.data = 0.3 * torch.randn(c, generator=gen)
            m.running_var.data = 0.5 + torch.rand(c, generator=gen)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
            if m.bias is not None:
                m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
    return module.eval()


def optimiser_state(module: nn.Module) -> dict:
    """An SGD state dict with momentum buffers, as the training scripts save beside the weights."""
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in module.parameters():
        p.grad = None
    return opt.state_dict()


class ACLModel(CifarResNet18):
    """ACL's resnet_multi_bn: normalize (ImageNet), bn_list.{0,1}, downsample.conv/bn, projection head fc.*."""

    def __init__(self) -> None:
        super().__init__("bn_list", 2, "downsample", normalize=IMAGENET)
        self.fc = nn.Module()
        self.fc.fc1, self.fc.fc2, self.fc.fc3 = nn.Linear(512, 512), nn.Linear(512, 512, bias=False), nn.Linear(
            512, 512, bias=False)
        for k in (1, 2, 3):
            setattr(self.fc, f"bn{k}", BNList(512, 2, dims=1))


class DynACLModel(nn.Module):
    """DynACL's training model: encoder_q and encoder_k, each an ACL network; forward is encoder_k's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_q, self.encoder_k = ACLModel(), ACLModel()

    def forward(self, x, i=1):
        return self.encoder_k(x, i)


class AdvCLModel(CifarResNet18):
    """AdvCL's ResNet: bn_list.{0,1,2}, downsample.conv/bn, no normalisation, pseudo-label and projection heads."""

    def __init__(self) -> None:
        super().__init__("bn_list", 3, "downsample")
        for k in ("002", "010", "050", "100", "500"):
            setattr(self, f"fc_{k}", nn.Linear(512, int(k)))
        for name, out in (("head_ce", 1000), ("head_proj", 128), ("head_pred", 128)):
            setattr(self, name, nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, out)))


class DeACLModule(nn.Module):
    """DeACL's Lightning module: student backbone and teacher momentum_backbone (torchvision names, padding-2
    stem, CIFAR-10 normalize buffers), online classifiers."""

    def __init__(self, padding: int = 2) -> None:
        super().__init__()
        self.backbone = CifarResNet18("plain", 1, "downsample", padding=padding, normalize=CIFAR10)
        self.momentum_backbone = CifarResNet18("plain", 1, "downsample", padding=padding, normalize=CIFAR10)
        self.classifier, self.classifier_adv = nn.Linear(512, 10), nn.Linear(512, 10)


class RoCLModel(CifarResNet18):
    """RoCL's ResNet18: single BN, shortcut.{0,1}, no normalisation; features avg_pool2d(layer4, 4)."""

    def __init__(self) -> None:
        super().__init__("plain", 1, "shortcut")

    def forward(self, x, i=0):
        return F.avg_pool2d(self.feature_map(x), 4).flatten(1)


class SeedSSL(nn.Module):
    """The seed paper's ResNetSSL: encoder (normalize, bnX.{0,1}, conv3/bn3 shortcut, no identity), head, fc;
    the linear head reads L2-normalised encoder features."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = CifarResNet18("indexed", 2, "conv3", normalize=IMAGENET, identity=False)
        self.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        self.fc = nn.Linear(512, 10)

    def forward(self, x, i=0):
        return F.normalize(self.encoder(x, i), dim=1)


class TorchvisionStyle(CifarResNet18):
    """A torchvision-named CIFAR ResNet-18 (downsample.0/1); `normalize` adds LP-AFT's buffers, plus its fc."""

    def __init__(self, normalize=None) -> None:
        super().__init__("plain", 1, "downsample", normalize=normalize)
        self.fc = nn.Linear(512, 10)


def save_layout(name: str, folder: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    """(the file the layout's training script writes, the network whose features it should give)."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "acl":
        model = scramble(ACLModel(), seed)
        path = folder / "model.pt"
        torch.save({"epoch": 100, "state_dict": model.state_dict(), "optim": optimiser_state(model)}, path)
        return path, model
    if name == "dynacl":
        model = scramble(DynACLModel(), seed)
        path = folder / "model.pt"
        torch.save({"epoch": 100, "state_dict": model.state_dict(), "optim": optimiser_state(model)}, path)
        return path, model.encoder_k
    if name == "advcl":
        model = scramble(AdvCLModel(), seed)
        path = folder / "epoch_1000.ckpt"
        torch.save({"model": nn.DataParallel(model).state_dict(), "epoch": 1000, "rng_state": torch.get_rng_state()},
                   path)
        return path, model
    if name == "deacl":
        module = scramble(DeACLModule(), seed)
        path = folder / "deacl-epoch=99.ckpt"
        torch.save({"epoch": 99, "global_step": 9800, "pytorch-lightning_version": "1.5.10",
                    "state_dict": module.state_dict(), "callbacks": {}, "optimizer_states": [optimiser_state(module)],
                    "lr_schedulers": [{"last_epoch": 99}]}, path)
        return path, module.backbone
    if name == "rocl":
        model = scramble(RoCLModel(), seed)
        path = folder / "ckpt.t7ResNet18_rocl_0"
        torch.save({"epoch": 500, "acc": 0.0, "model": nn.DataParallel(model).state_dict(),
                    "optimizer_state": optimiser_state(model), "rng_state": torch.get_rng_state()}, path)
        return path, model
    if name == "gbrcl":
        model = scramble(SeedSSL(), seed)
        critic = nn.Module()
        critic.d = nn.Sequential(nn.Linear(128, 1), nn.Sigmoid())
        path = folder / "last.pth"
        torch.save({"args": argparse.Namespace(dataset="cifar10", epochs=500, lr=0.5), "epoch": 500,
                    "model": model.state_dict(), "discriminator": critic.state_dict(),
                    "optimizer": optimiser_state(model), "d_optimizer": optimiser_state(critic)}, path)
        return path, model
    if name == "lpaft":
        model = scramble(TorchvisionStyle(IMAGENET), seed)
        path = folder / "LPAFT_model.pt"
        torch.save({"epoch": 25, "state_dict": model.state_dict()}, path)
        return path, model
    if name == "torchvision":
        model = scramble(TorchvisionStyle(), seed)
        path = folder / "resnet18.pth"
        torch.save(model.state_dict(), path)
        return path, model
    raise ValueError(name)


BN_COPIES = {"acl": 2, "dynacl": 2, "advcl": 3, "deacl": 1, "rocl": 1, "gbrcl": 2, "lpaft": 1, "torchvision": 1}
