"""Common corruptions (Hendrycks & Dietterich 2019): CIFAR-10-C's 19 corruptions for any image batch, and
the published CIFAR-10-C / CIFAR-100-C files read as they are (robustcl/data/corruptions/official.py).

`corrupt(images, name, severity, rngs)` corrupts uint8 (N, C, H, W) images with make_cifar_c.py's
constants (robustcl/data/corruptions/ops.py); `image_rngs` gives every test image its own generator,
seeded by (seed, corruption, severity, the image's position in the test split), so an image is
corrupted the same way whichever subset of the test set it is evaluated in.

One-channel images (Fashion-MNIST) are corrupted at their own size as one channel: the noises, blurs,
weather, digital and geometric corruptions act on that channel as they act on each of R, G and B; the
two whose meaning is colour (saturate, spatter) see the RGB image (g, g, g) and are read back as
luminance 0.299 R + 0.587 G + 0.114 B. Images under 32 px use CIFAR's pixel constants at their own size
(docs/corruptions.md states the rule and every departure from the script).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from ..base import DataError
from . import ops
from .filters import luminance
from .official import OFFICIAL, OfficialSet, fetch_official, find_official, official_set, read_official
from .spatter import spatter

# The benchmark's 15 (CIFAR-10-C's order) and the 4 extra ones of the same release, by their file names.
STANDARD: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression")
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL: tuple[str, ...] = STANDARD + EXTRA
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
OPS: dict[str, ops.Op] = {**{name: getattr(ops, name) for name in ALL if name != "spatter"}, "spatter": spatter}
THROUGH_RGB = frozenset({"saturate", "spatter"})  # colour corruptions: a grey image goes through (g, g, g)
MIN_SIZE = 8  # pixels a side: below this the crops, zooms and elastic square of the script are empty
# Bumped whenever any op changes the images it makes: it names the cache of generated sets.
IMPLEMENTATION_VERSION = 1


def image_rngs(seed: int, name: str, severity: int, indices: Sequence[int]) -> list[np.random.Generator]:
    """One generator per test image, from (seed, the corruption's name, severity, the image's test index)."""
    tag = zlib.crc32(name.encode())
    return [np.random.default_rng([seed % 2 ** 64, tag, severity, int(i)]) for i in indices]


def check_images(images: np.ndarray) -> None:
    """DataError unless `images` is uint8 (N, 1 or 3, H, W) with H, W >= MIN_SIZE."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"common corruptions need uint8 (N, 1 or 3, H, W) images, got {images.dtype} "
                        f"{tuple(images.shape)}")
    if min(images.shape[2:]) < MIN_SIZE:
        raise DataError(f"common corruptions need images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got "
                        f"{images.shape[2]}x{images.shape[3]}")


def corrupt(images: np.ndarray, name: str, severity: int, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """`images` (uint8 N, C, H, W) with corruption `name` at `severity` (1..5), one generator per image;
    uint8 (N, C, H, W) back, truncated as make_cifar_c.py's np.uint8 truncates."""
    if name not in OPS:
        raise DataError(f"unknown corruption {name!r}; valid names: {', '.join(ALL)}")
    if severity not in SEVERITIES:
        raise DataError(f"corruption severity must be 1..5, got {severity!r}")
    check_images(images)
    if len(rngs) != len(images):
        raise DataError(f"corrupt: {len(rngs)} generators for {len(images)} images")
    if not len(images):
        return images.copy()
    x = images.transpose(0, 2, 3, 1).astype(np.float64) / 255
    grey_via_rgb = x.shape[-1] == 1 and name in THROUGH_RGB
    out = OPS[name](np.repeat(x, 3, axis=-1) if grey_via_rgb else x, severity, list(rngs))
    if grey_via_rgb:
        out = luminance(out)
    out = np.floor(np.clip(out, 0, 1) * 255 + 1e-6).astype(np.uint8)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


__all__ = ["ALL", "EXTRA", "IMPLEMENTATION_VERSION", "MIN_SIZE", "OFFICIAL", "OPS", "OfficialSet", "SEVERITIES",
           "STANDARD", "check_images", "corrupt", "fetch_official", "find_official", "image_rngs", "official_set",
           "read_official"]
