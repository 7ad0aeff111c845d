"""The configured dataset's splits: `load_split` reads a split of cfg's dataset, `train_val_indices` holds out
the seeded validation images of its training split.

The data side of a run, one layer above `robustcl.data` (which knows no config) because it reads the
config's `data` section and seed.
"""
from __future__ import annotations

import torch

from robustcl.config import Config
from robustcl.data import ArrayDataset, DataError, load_dataset


def load_split(cfg: Config, split: str) -> ArrayDataset:
    """The configured dataset's split (synthetic options, then data.options, passed through)."""
    d = cfg.data
    options = vars(d.synthetic).copy() if d.name == "synthetic" else {}
    if d.name == "synthetic":
        options["seed"] = cfg.seed
    options.update(d.options or {})
    return load_dataset(d.name, split, root=d.root, download=d.download, **options)


def train_val_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of the training data: (train indices, held-out validation indices).

    The validation images are never seen in phase 1 and serve phase-2 epoch selection, so no
    choice is ever made on the test set.
    """
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images out of {n}; lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[val_size:], perm[:val_size]


__all__ = ["load_split", "train_val_indices"]
