"""robustcl: adversarially robust contrastive learning (arXiv 2311.09671) in one framework."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder", "__version__"]


def __getattr__(name: str) -> Any:
    """`robustcl.load_encoder` imported on first use, so `import robustcl.<module>` needs no safetensors."""
    if name == "load_encoder":
        from robustcl.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'robustcl' has no attribute {name!r}")
