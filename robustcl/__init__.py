"""robustcl: adversarially robust contrastive learning (arXiv 2311.09671) in one framework."""
from robustcl.export import load_encoder

__version__ = "0.1.0"
__all__ = ["load_encoder", "__version__"]
