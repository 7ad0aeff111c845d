"""A sweep resolved against its output directory: every (configuration, seed) as a planned run with its status.

Each run lives in <out>/<configuration>-s<seed>. Its status says what running the sweep does to it: done
(results.json covers every protocol: skipped), resume (checkpoints/last.pt or a finished pretrain: resumed),
new, or conflict (the directory holds another config or something else).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

import robustcl.methods  # noqa: F401 - registers the methods the planned configs are built with
from robustcl.config import Config, ConfigError, load_config
from robustcl.runs import RunDir, atomic_write_text
from robustcl.runs.layout import SweepLayout
from robustcl.runtime import config_change
from robustcl.sweep.spec import Sweep, check_overrides, configurations, load_spec, seed_list


@dataclass
class PlannedRun:
    """One (configuration, seed) of a sweep: its resolved config, directory and status."""
    label: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    root: Path
    cfg: Config = field(repr=False, default=None)  # type: ignore[assignment]
    status: str = "new"

    @property
    def name(self) -> str:
        """The run directory's name, <configuration>-s<seed>."""
        return self.root.name

    @property
    def run(self) -> RunDir:
        """The run directory."""
        return RunDir(self.root)


@dataclass
class SweepPlan:
    """A sweep resolved against an output directory: every run loaded and given a status."""
    sweep: Sweep
    out: Path
    overrides: tuple[str, ...]
    runs: list[PlannedRun]


def _config_ref(ref: str, folder: Path | None) -> str:
    """A run's config: a preset name, or a YAML path (relative paths first tried beside the spec file)."""
    if folder is not None and Path(ref).suffix in (".yaml", ".yml") and not Path(ref).is_absolute():
        beside = folder / ref
        if beside.is_file():
            return str(beside)
    return ref


def _is_finished(run: RunDir, cfg: Config) -> bool:
    """results.json exists and covers every protocol the config fine-tunes."""
    results = run.read_results()
    return bool(results) and set(cfg.finetune.protocols) <= set(results.get("protocols", {}))


def _being_started(run: RunDir) -> bool:
    """True when the directory holds only what `open_run` writes before config.yaml (lock, marker, their temp files
    and config.yaml's): a run another process is starting."""
    first = (run.lock.name, run.marker.name, run.config.name)
    return all(p.name in first[:2] or p.name.startswith(tuple(f".{n}." for n in first)) for p in run.root.iterdir())


def run_status(planned: PlannedRun, overwrite: bool) -> str:
    """done | resume | new, or 'conflict: ...' when the directory holds something else."""
    run, cfg = planned.run, planned.cfg
    if not run.root.exists() or not any(run.root.iterdir()):
        return "new"
    if _being_started(run):
        return "new"  # by another process: its lock and marker (or their temp files), no config.yaml yet
    if not run.config.is_file():
        return f"conflict: {run.root} exists but is not a robustcl run; choose another --out"
    if overwrite:
        return "new"
    diff = config_change(yaml.safe_load(run.config.read_text()) or {}, cfg)
    if diff:
        return f"conflict: {run.root} was made with another config ({diff}); pass --overwrite to redo it or choose another --out"
    if _is_finished(run, cfg):
        return "done"
    if run.checkpoint.is_file() or (run.pretrain_done.is_file() and run.encoder.is_file()):
        return "resume"
    return "new"


def load_run_config(run: PlannedRun) -> Config:
    """The run's config (its config reference with its overrides); a one-line ConfigError naming the run."""
    try:
        return load_config(run.config, list(run.overrides))
    except ConfigError as exc:
        raise ConfigError(f"sweep run {run.name} ({run.config}): {exc}") from None


def plan_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
               overwrite: bool = False, seeds: Sequence[int] | None = None) -> SweepPlan:
    """Resolve every run (config loaded with its overrides: a typo fails here) and its status.

    `seeds`, when given, replaces the spec's seed list (e.g. one seed for a quick pass).
    """
    sweep = load_spec(spec) if isinstance(spec, str) else spec
    if seeds:
        sweep.spec.seeds = seed_list(seeds)  # the config's range check, as the spec's own seeds
        sweep.spec.validate()
    check_overrides(overrides, "sweep command-line overrides")
    root = Path(out) if out is not None else Path("runs") / "sweeps" / sweep.spec.name
    runs = []
    for entry in configurations(sweep):
        for seed in sweep.spec.seeds:
            all_overrides = (*sweep.spec.overrides, *entry.overrides, *overrides, f"seed={seed}")
            runs.append(PlannedRun(entry.name, seed, _config_ref(entry.config, sweep.folder), all_overrides,
                                   root / f"{entry.name}-s{seed}"))
    for run in runs:
        run.cfg = load_run_config(run)
    for run in runs:
        run.status = run_status(run, overwrite)
    return SweepPlan(sweep, root, tuple(overrides), runs)


def format_plan(plan: SweepPlan) -> str:
    """The runs a sweep would do: name, config, overrides, status (the --dry-run listing)."""
    lines = [f"sweep {plan.sweep.spec.name} ({plan.sweep.origin}) -> {plan.out}: {len(plan.runs)} runs"]
    width = max((len(r.name) for r in plan.runs), default=0)
    config_width = max((len(r.config) for r in plan.runs), default=0)
    for r in plan.runs:
        lines.append(f"  {r.name:{width}s}  {r.status:6s}  {r.config:{config_width}s}  {' '.join(r.overrides)}")
    return "\n".join(lines)


def sweep_identity(sweep: Sweep) -> dict[str, str]:
    """What a sweep directory's marker names (robustcl.runs.policy.claim_sweep_dir): the spec's name, where it
    came from (a file's absolute path, or the shipped spec) and a fingerprint of its content without the seeds
    (--seeds or a spec given more seeds is the same sweep)."""
    origin = Path(sweep.origin)
    content = {k: v for k, v in dataclasses.asdict(sweep.spec).items() if k != "seeds"}
    fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": sweep.spec.name, "spec": str(origin.resolve()) if origin.is_file() else sweep.origin,
            "fingerprint": fingerprint}


def write_sweep_yaml(plan: SweepPlan) -> Path:
    """sweep.yaml: the resolved list of runs (directory, configuration, seed, config, overrides)."""
    data = {
        "name": plan.sweep.spec.name, "spec": plan.sweep.origin, "question": plan.sweep.description,
        "overrides": list(plan.overrides),
        "runs": [{"name": r.name, "configuration": r.label, "seed": r.seed, "config": r.config,
                  "overrides": list(r.overrides)} for r in plan.runs],
    }
    path = SweepLayout(plan.out).plan
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def finished_results(plan: SweepPlan) -> list[tuple[PlannedRun, dict[str, Any]]]:
    """Each run of the plan whose directory holds results, with them (the summary's entries)."""
    return [(r, res) for r in plan.runs if (res := r.run.read_results()).get("protocols")]
