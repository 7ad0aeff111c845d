"""Class-structured random images of any shape, generated in memory, deterministic from a seed.

Each class has a fixed smooth prototype per channel (a random mix of low-frequency cosine/sine
patterns, scaled to mean 0.5 and std `PROTO_STD`). An image is its class prototype, circularly
shifted by up to `size // 14` pixels each way, plus Gaussian pixel noise (`NOISE_STD`), clipped to
[0, 1] and quantised to uint8. Prototypes come from one child seed of `seed`; train and test draw
their samples from two other child seeds, so the splits are disjoint draws from the same classes.

Normalisation: `mean`/`std` in the DatasetInfo are the fixed nominal values 0.5 / 0.25 per channel
(the construction targets them: sqrt(PROTO_STD**2 + NOISE_STD**2) = 0.25); they are not measured.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset, DataError, DatasetInfo

NAME = "synthetic"
DEFAULTS: dict[str, int] = {"num_classes": 10, "channels": 1, "size": 28, "n_train": 2000, "n_test": 500,
                            "seed": 0}
MINIMUMS: dict[str, int] = {"num_classes": 2, "channels": 1, "size": 4, "n_train": 1, "n_test": 1, "seed": 0}
MEAN, STD = 0.5, 0.25
PROTO_STD = 0.2
NOISE_STD = 0.15
MAX_FREQ = 3  # spatial frequencies 0..MAX_FREQ-1 cycles per image along each axis
CHUNK = 1024  # images generated per step, bounding peak memory for large requests


def _check(options: dict[str, Any]) -> dict[str, int]:
    """Options as validated ints (bools rejected); DataError naming the bad option and its minimum."""
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < MINIMUMS[key]:
            raise DataError(f"synthetic option {key}={value!r} must be an integer >= {MINIMUMS[key]}")
    return {key: int(value) for key, value in options.items()}


def _basis(size: int) -> np.ndarray:
    """Low-frequency cosine and sine patterns on a size x size grid, shape (B, size, size)."""
    coords = np.arange(size, dtype=np.float64) / size
    freqs = [(a, b) for a in range(MAX_FREQ) for b in range(MAX_FREQ) if (a, b) != (0, 0)]
    phase = np.stack([2 * np.pi * (a * coords[:, None] + b * coords[None, :]) for a, b in freqs])
    return np.concatenate([np.cos(phase), np.sin(phase)])


def prototypes(num_classes: int, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One smooth pattern per class and channel, mean 0.5 and std PROTO_STD, shape (K, C, S, S)."""
    basis = _basis(size)
    coefficients = rng.standard_normal((num_classes, channels, basis.shape[0]))
    protos = np.einsum("kcb,bhw->kchw", coefficients, basis)
    protos -= protos.mean(axis=(2, 3), keepdims=True)
    protos /= protos.std(axis=(2, 3), keepdims=True) + 1e-12
    return (0.5 + PROTO_STD * protos).astype(np.float32)


def _shifted(protos: np.ndarray, labels: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each label's prototype circularly shifted by (dy, dx), gathered without a per-image loop."""
    size = protos.shape[-1]
    grid = np.arange(size)
    rows = (grid[None, :] - dy[:, None]) % size
    cols = (grid[None, :] - dx[:, None]) % size
    n, c = labels.shape[0], protos.shape[1]
    return protos[labels[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]].reshape(n, c, size, size)


def _sample(protos: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` balanced, shuffled labels and their noisy shifted uint8 images."""
    num_classes, channels, size, _ = protos.shape
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
    images = np.empty((count, channels, size, size), dtype=np.uint8)
    max_shift = size // 14
    for start in range(0, count, CHUNK):
        part = labels[start:start + CHUNK]
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, part.shape[0]))
        x = _shifted(protos, part, dy, dx)
        x += NOISE_STD * rng.standard_normal(x.shape, dtype=np.float32)
        images[start:start + CHUNK] = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, labels


def generate(split: str, num_classes: int, channels: int, size: int, n_train: int, n_test: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, S, S) uint8 and labels int64 for `split`, deterministic in all arguments."""
    proto_seed, train_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    protos = prototypes(num_classes, channels, size, np.random.default_rng(proto_seed))
    if split == "train":
        return _sample(protos, n_train, np.random.default_rng(train_seed))
    return _sample(protos, n_test, np.random.default_rng(test_seed))


class SyntheticReader:
    """Registry entry for the in-memory synthetic dataset (root and download are ignored)."""

    name = NAME
    defaults = DEFAULTS

    def info(self, **options: Any) -> DatasetInfo:
        """Shape and nominal normalisation for these options."""
        opts = _check({**DEFAULTS, **options})
        c = opts["channels"]
        return DatasetInfo(NAME, opts["num_classes"], c, opts["size"], opts["size"], (MEAN,) * c, (STD,) * c)

    def load(self, split: str, root: str | os.PathLike[str] | None, download: bool,
             **options: Any) -> ArrayDataset:
        """Generate one split."""
        opts = _check({**DEFAULTS, **options})
        images, labels = generate(split, **opts)
        return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), self.info(**opts))


SYNTHETIC = SyntheticReader()
