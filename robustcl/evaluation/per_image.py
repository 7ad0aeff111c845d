"""per_image.npz beside results.json: which test images each protocol got right, clean and under the headline PGD.

Stored so that sweeps can pair two runs image by image (a paired bootstrap over the test images,
docs/statistics.md). Flags are bit-packed (np.packbits: 10,000 images are 1,250 bytes a flag set);
`index` holds each evaluated image's position in the full test split, so two runs pair only when
they saw the same images in the same order. Read with allow_pickle=False (plain arrays only).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustcl.runs import RunDir, atomic_write_bytes

FORMAT = 1


@dataclass
class PerImage:
    """Per-image correctness of every protocol: index into the test split, attack key, flags per protocol."""
    index: np.ndarray                          # int64 (n,): position of each evaluated image in the test split
    attack: str                                # results.json `robust` key the robust flags belong to
    clean: dict[str, np.ndarray]               # protocol -> bool (n,)
    robust: dict[str, np.ndarray]              # protocol -> bool (n,)

    def matches(self, other: "PerImage") -> bool:
        """Same images in the same order and the same attack: the two runs can be paired image by image."""
        return self.attack == other.attack and np.array_equal(self.index, other.index)


def path_of(run: RunDir) -> Path:
    """Where a run keeps its per-image flags (RunLayout.per_image)."""
    return run.per_image


def write_per_image(run: RunDir, flags: PerImage) -> Path:
    """per_image.npz, written atomically (packed flags, the index, a JSON header naming protocols and attack)."""
    n = len(flags.index)
    header = {"format": FORMAT, "n": n, "attack": flags.attack, "protocols": list(flags.clean)}
    arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header)),
                                     "index": np.asarray(flags.index, dtype=np.int64)}
    for protocol in flags.clean:
        for kind, table in (("clean", flags.clean), ("robust", flags.robust)):
            values = np.asarray(table[protocol], dtype=bool)
            if values.shape != (n,):
                raise ValueError(f"per-image {kind} flags of {protocol} have shape {values.shape}, expected ({n},)")
            arrays[f"{protocol}.{kind}"] = np.packbits(values)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = path_of(run)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_per_image(run: RunDir) -> PerImage | None:
    """The run's per-image flags, or None when it has none (evaluated before they were stored) or they are unreadable."""
    path = path_of(run)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            n = int(header["n"])
            unpack = lambda key: np.unpackbits(data[key], count=n).astype(bool)  # noqa: E731
            return PerImage(data["index"].astype(np.int64), str(header["attack"]),
                            {p: unpack(f"{p}.clean") for p in header["protocols"]},
                            {p: unpack(f"{p}.robust") for p in header["protocols"]})
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def as_numpy(flags: torch.Tensor) -> np.ndarray:
    """A bool tensor of per-image flags as a numpy array."""
    return flags.detach().cpu().numpy().astype(bool)


__all__ = ["PerImage", "as_numpy", "path_of", "read_per_image", "write_per_image"]
