"""`robustcl sweep`: a list or grid of configs through pretrain -> finetune -> evaluate, one comparison table.

A spec (YAML: shipped in robustcl/presets/sweeps/, or a path) names runs explicitly and/or as a grid
(a base config x the product of override axes); every run is repeated per seed in <out>/<name>-s<seed>.
Finished runs (results.json) are skipped, interrupted ones (checkpoints/last.pt) resumed, and
summary.md, summary_stats.csv and clean_vs_robust.png aggregate all results.json files (mean ± std and a 95%
t-interval over seeds; paired differences to the spec's `baseline`, robustcl/sweep/stats.py); summary.csv
keeps the raw per-seed rows.

The modules, each importing only those above it in this list:
spec (read and check a spec, the shipped specs), options (launch settings, shards),
plan (planned runs and their status), run (execute one planned run), launch (the serial loop, local processes,
submitit jobs), stats (raw rows, paired differences), rows (--rows summary.csv files read back), summary (summary.md,
.csv, plot), flow (a whole sweep: run_sweep, summarize_sweep).

The names below are imported from their module on first use, so `import robustcl.sweep` needs no torch.
`robustcl.sweep(...)` itself runs robustcl.api.sweep (robustcl/__init__.py).
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "spec": ("GridSpec", "NAME_RE", "RunEntry", "SWEEP_FOLDER", "SWEEP_PACKAGE", "Sweep", "SweepSpec", "UNSAFE_CHARS",
             "check_overrides", "comparisons", "configurations", "grid_runs", "list_sweeps", "load_spec", "safe_name"),
    "options": ("LaunchSettings", "parse_shard", "shard_runs"),
    "plan": ("PlannedRun", "SweepPlan", "finished_results", "format_plan", "load_run_config", "plan_sweep",
             "run_status", "write_sweep_yaml"),
    "run": ("TaskResult", "execute_planned_run", "thread_cap"),
    "launch": ("launch_runs", "run_serial", "run_task"),
    "stats": ("SUBSET_SEED",),
    "rows": ("MergedRows", "merge_rows"),
    "summary": ("CSV_COLUMNS", "EXTRA_MARKERS", "MARKERS", "SummaryRow", "aggregate", "mean_std",
                "plot_clean_vs_robust", "summary_csv", "summary_markdown_table", "write_summary"),
    "flow": ("SweepOutcome", "run_sweep", "summarize_sweep"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """`robustcl.sweep.<name>` from its module, imported on first use."""
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"robustcl.sweep.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'robustcl.sweep' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's attributes and the names it re-exports."""
    return sorted({*globals(), *__all__})
