"""Encoders with dual batch-norm (benign / adversarial branches) and the heads used on top of them."""

from .convnet import ConvNet
from .dual_bn import (BRANCHES, Branch, DualBatchNorm2d, check_branch, frozen_bn_stats, reported_branch,
                      set_bn_momentum)
from .encoder import BACKBONES, BranchModel, Encoder, build_backbone, build_encoder
from .heads import Critic, LinearHead, ProjectionHead
from .resnet import STEMS, BasicBlock, Bottleneck, ResNet, ResNet18, ResNet50, resolve_stem

__all__ = [
    "BACKBONES", "BRANCHES", "BasicBlock", "Bottleneck", "Branch", "BranchModel", "ConvNet", "Critic",
    "DualBatchNorm2d", "Encoder", "LinearHead", "ProjectionHead", "ResNet", "ResNet18", "ResNet50", "STEMS",
    "build_backbone", "build_encoder", "check_branch", "frozen_bn_stats", "reported_branch", "resolve_stem",
    "set_bn_momentum",
]
