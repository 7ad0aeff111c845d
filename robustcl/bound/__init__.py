"""The generalisation bound's terms (arXiv 2311.09671) measured for a run: `robustcl bound`."""
from robustcl.bound.estimates import critic_bound, critic_bounds, mmd2_unbiased, spearman
from robustcl.bound.measure import BoundSettings, measure_run
from robustcl.bound.sharpness import ball_sharpness

__all__ = ["BoundSettings", "ball_sharpness", "critic_bound", "critic_bounds", "measure_run", "mmd2_unbiased",
           "spearman"]
