"""`robustcl.load_encoder`: any encoder file (robustcl's, a published checkpoint of any layout, zoo:NAME) as a
plain module, pixels in [0, 1] -> L2-normalised pooled features, through one BN branch."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from robustcl.data import dataset_info
from robustcl.encoders import zoo
from robustcl.encoders.errors import EncoderError
from robustcl.encoders.published import Reading, is_robustcl_file, read_published
from robustcl.export import FixedBranchEncoder, load_encoder


def load_plain(source: str | Path, branch: str | int = "headline", *, layout: str | None = None,
               stem_padding: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, data: str | None = None) -> FixedBranchEncoder:
    """`source` (a path, else zoo:NAME) read through `branch`: headline, benign, adversarial or a BN copy index."""
    path = Path(zoo.resolve(source)[0])
    if not path.exists():
        raise FileNotFoundError(f"no encoder at {source}; give a run directory, an encoder file or zoo:NAME")
    if path.is_dir() or is_robustcl_file(path):
        if layout is not None or stem_padding is not None or mean is not None or std is not None:
            raise EncoderError(f"{path} is a robustcl encoder: layout, stem_padding, mean and std do not apply")
        return load_encoder(path, str(branch))
    bn_branch = None if branch == "headline" else branch
    encoder, meta = read_published(path, dataset_info(data) if data else None, mean, std,
                                   Reading(layout, bn_branch, stem_padding))
    return FixedBranchEncoder(encoder, meta["headline_branch"]).eval()


__all__ = ["load_plain"]
