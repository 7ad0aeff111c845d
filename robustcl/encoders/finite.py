"""Finite weights and features: an encoder holding NaN or inf is a one-line error, never evaluated."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from robustcl.encoders.errors import EncoderError


def check_finite_weights(tensors: Iterable[tuple[str, Any]], where: str) -> None:
    """EncoderError naming the first floating-point tensor holding NaN or inf (`where`: the file or the code)."""
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise EncoderError(f"{where}: tensor {name} holds non-finite values ({bad} of {tensor.numel()} are NaN or "
                               "inf); its weights are broken (a diverged training run, a bad conversion?) and robustcl "
                               "does not evaluate it")


def check_finite_features(out: torch.Tensor, where: str) -> None:
    """EncoderError when the features of the probe batch hold NaN or inf although the weights are finite."""
    if not bool(torch.isfinite(out).all()):
        image, feature = (int(i) for i in (~torch.isfinite(out)).nonzero()[0])
        raise EncoderError(f"{where}: its features on {out.shape[0]} random images of the dataset's shape are not "
                           f"finite (NaN or inf, first at feature {feature} of image {image}) although its weights "
                           "are; robustcl does not evaluate it")


__all__ = ["check_finite_features", "check_finite_weights"]
