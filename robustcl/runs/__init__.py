"""Run directories: resolved config, metrics, atomic checkpoints, exported weights, results, report."""
from robustcl.runs.atomic import RunError, atomic_write_bytes, atomic_write_text, save_torch_atomic
from robustcl.runs.rundir import RunDir, open_run

__all__ = ["RunDir", "RunError", "atomic_write_bytes", "atomic_write_text", "open_run", "save_torch_atomic"]
