"""Encoders with dual batch-norm (benign / adversarial branches) and the heads used on top of them."""

from .convnet import ConvNet
from .dual_bn import BRANCHES, Branch, DualBatchNorm2d, check_branch, frozen_bn_stats, set_bn_momentum
from .encoder import BACKBONES, BranchModel, Encoder, build_backbone, build_encoder
from .heads import Critic, LinearHead, ProjectionHead
from .resnet import BasicBlock, ResNet18

__all__ = [
    "BACKBONES", "BRANCHES", "BasicBlock", "Branch", "BranchModel", "ConvNet", "Critic", "DualBatchNorm2d",
    "Encoder", "LinearHead", "ProjectionHead", "ResNet18", "build_backbone", "build_encoder",
    "check_branch", "frozen_bn_stats", "set_bn_momentum",
]
