"""The public Python API: each `robustcl` command as a typed function (also reachable as `robustcl.<name>`).

A config is a `Config`, a preset name (`robustcl configs`) or a YAML path, plus `key=value` overrides as
on the command line; a run is a directory path. Each function writes what its command writes (config.yaml,
checkpoints, encoder.safetensors, heads, results.json, report.md, ...) and returns what it measured.
Progress bars and per-run lines are off unless `progress=True`. Bad input raises the command's one-line
error (`ConfigError`, `DataError`, `RunError`, `FileNotFoundError`) before anything is written.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypedDict, TypeVar, Union

if TYPE_CHECKING:  # each function imports what it runs: `import robustcl` stays light (no torch)
    from robustcl.bound.measure import BoundSettings
    from robustcl.config import Config
    from robustcl.export import FixedBranchEncoder
    from robustcl.sweep import Sweep, SweepOutcome

PathLike = Union[str, "os.PathLike[str]"]
ConfigLike = Union["Config", str, "os.PathLike[str]"]


class _HeadRecord(TypedDict):
    protocol: str            # slf | alf | aff
    branch: str              # the BN branch the head reads (benign | adversarial)
    best_epoch: int          # chosen on the validation split, never on the test set
    val_acc: float           # validation accuracy of that epoch (clean for SLF, PGD for ALF/AFF)
    selected_on: str
    n_train: int
    n_val: int
    seconds: float
    finetune: dict[str, Any]  # the finetune.* settings it was fitted with


class HeadRecord(_HeadRecord, total=False):
    """One fitted phase-2 model (what `finetune` returns per protocol; also stored in `heads/<protocol>.pt`)."""
    aff: dict[str, Any]       # AFF only: its loss (trades | pgd-at) and beta


class Results(TypedDict):
    """results.json: the headline protocol's numbers at the top, every protocol's in `protocols`."""
    method: str
    dataset: str
    protocol: str                    # the headline protocol (the first of slf, alf, aff that was evaluated)
    branch: str
    clean_acc: float
    robust: dict[str, float]         # attack name (e.g. pgd20-linf-eps0.1) -> accuracy
    n_eval: int
    eval_subset: str
    attack: dict[str, Any]           # the headline PGD attack's settings
    branch_note: str
    suspect: dict[str, list[str]]    # protocol -> failed integrity checks (empty: all passed)
    protocols: dict[str, dict[str, Any]]  # per protocol: clean_acc, robust, eps_curve, integrity, best_epoch, ...


@dataclass(frozen=True)
class Pretrained:
    """What `pretrain` did: `trained` is False when the run's phase 1 had already finished (nothing to do)."""
    run_dir: Path
    encoder: Path                    # encoder.safetensors (load it with `load_encoder`)
    trained: bool
    steps: int                       # optimiser steps of phase 1 in total
    seconds: float | None            # this call's training time (None when nothing was trained)
    images_per_second: float | None
    last: dict[str, float]           # the last logged loss terms of this call ({} when nothing was trained)


@dataclass(frozen=True)
class RunOutcome:
    """`run`: phase 1, the phase-2 heads, and the evaluation of one run directory."""
    run_dir: Path
    pretrained: Pretrained
    heads: dict[str, HeadRecord]
    results: Results
    report: Path


@dataclass(frozen=True)
class Transferred:
    """`transfer`: the new run directory (the source encoder, heads fitted on the target data) and its results."""
    run_dir: Path
    results: Results
    report: Path


@dataclass(frozen=True)
class BoundSweepOutcome:
    """`bound_sweep`: bound_summary.md (with .csv and bound_vs_robust.png beside it) and the runs that failed."""
    summary: Path
    failed: dict[str, str]


F = TypeVar("F", bound=Callable[..., Any])


def _threads_as_found(command: F) -> F:
    """`command` leaves torch's thread count and `train.threads: auto`'s governor as the caller had them
    (runtime.threads_as_found; imported when called: `import robustcl` stays light)."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from robustcl.runtime import threads_as_found

        with threads_as_found():
            return command(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _quiet(_: str) -> None:
    """A progress sink that says nothing."""


def _echo(progress: bool, stream: Any = None) -> Callable[[str], None]:
    return (lambda line: print(line, file=stream or sys.stdout)) if progress else _quiet


def load_config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A validated `Config` from a preset name, a YAML path or a `Config`, with `key=value` overrides applied."""
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with
    from robustcl import config as schema

    if isinstance(config, schema.Config):
        data = config.to_dict()
        schema.apply_overrides(data, tuple(overrides))
        return schema.from_mapping(data)
    return schema.load_config(os.fspath(config), tuple(overrides))


def _stored_config(run_dir: Path, overrides: Sequence[str]) -> Config:
    """A run directory's own config.yaml (with overrides): what resuming, fine-tuning and evaluating use."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a robustcl run (no config.yaml); pass the directory of a pretrain run")
    return load_config(run_dir / "config.yaml", overrides)


@_threads_as_found
def pretrain(config: ConfigLike | None, out: PathLike | None, overrides: Sequence[str] = (), *, resume: bool = False,
             overwrite: bool = False, progress: bool = False) -> Pretrained:
    """Phase 1 of `config` into run directory `out` (`robustcl pretrain`; None: runs/<config name>); with
    `resume`, continue it from its last checkpoint with its own config.yaml (a `config` given too must
    say the same). Data-parallel under torchrun."""
    from robustcl.config import ConfigError
    from robustcl.runs import RunDir
    from robustcl.runs.guard import run_dir_for
    from robustcl.train.pretrain import pretrain as train_phase1

    if resume:
        if out is None:
            raise ConfigError("--resume needs --out DIR (the run directory to continue)")
        cfg = _stored_config(Path(out), overrides)
        if config is not None:
            _refuse_other_config(cfg, config, overrides, Path(out))
    elif config is None:
        raise ConfigError("pretrain needs --config NAME|PATH (see `robustcl configs`); to continue a run, "
                          "pass resume=True (--resume)")
    else:
        cfg = load_config(config, overrides)
    run = RunDir(out if out is not None else run_dir_for(cfg.name))
    result = train_phase1(cfg, run, resume=resume, overwrite=overwrite, progress=progress)
    if result is None:
        return Pretrained(run.root, run.encoder, False, int(run.pretrain_done.read_text().strip() or 0), None, None, {})
    return Pretrained(run.root, run.encoder, True, result.steps, result.seconds, result.images_per_second,
                      dict(result.last))


def _refuse_other_config(cfg: Config, config: ConfigLike, overrides: Sequence[str], out: Path) -> None:
    """Resuming with a config: the run continues with its own config.yaml, so `config` must say the same."""
    from robustcl.config import ConfigError
    from robustcl.runtime import config_change

    changed = config_change(cfg.to_dict(), load_config(config, overrides), ("name", "train.threads"))
    if changed:
        raise ConfigError(f"--resume continues {out} with its own config.yaml and --config {config} differs "
                          f"from it ({changed}); drop --config (pass changes as key=value overrides)")


@_threads_as_found
def finetune(run: PathLike, protocols: Sequence[str] | None = None, overrides: Sequence[str] = (), *,
             schedule: str | None = None, overwrite: bool = False, progress: bool = False) -> dict[str, HeadRecord]:
    """Fit the phase-2 models of a run (`robustcl finetune`): SLF/ALF heads on the frozen encoder, AFF
    fine-tuning; epochs chosen on the validation split. `schedule`: linear-reference | linear-benchmark."""
    from robustcl.config import schedule_overrides
    from robustcl.runs import RunDir
    from robustcl.train.finetune import finetune as fit_heads

    run_dir = RunDir(run)
    cfg = _stored_config(run_dir.root, [*(schedule_overrides(schedule) if schedule else []), *overrides])
    records = fit_heads(cfg, run_dir, tuple(protocols) if protocols else None, progress=progress, overwrite=overwrite)
    return records  # type: ignore[return-value]


@_threads_as_found
def evaluate(run: PathLike, overrides: Sequence[str] = (), *, protocols: Sequence[str] | None = None,
             report: bool = True, progress: bool = False) -> Results:
    """Clean and robust accuracy of a run's fitted models with the integrity checks (`robustcl evaluate`);
    writes results.json (returned) and, with `report`, report.md. Attacks and curves: eval.* overrides."""
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs import RunDir
    from robustcl.runs.report import write_report

    run_dir = RunDir(run)
    cfg = _stored_config(run_dir.root, overrides)
    results = evaluate_run(cfg, run_dir, progress=progress, protocols=tuple(protocols) if protocols else None)
    if report:
        write_report(run_dir)
    return results  # type: ignore[return-value]


@_threads_as_found
def run(config: ConfigLike | None, out: PathLike | None, overrides: Sequence[str] = (), *, resume: bool = False,
        overwrite: bool = False, progress: bool = False) -> RunOutcome | None:
    """pretrain -> finetune -> evaluate -> report.md in one call (`robustcl run`). Under torchrun phase 1
    runs on every rank and the rest on rank 0; the other ranks return None."""
    from robustcl.runs import RunDir

    pretrained = pretrain(config, out, overrides, resume=resume, overwrite=overwrite, progress=progress)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    heads = finetune(pretrained.run_dir, overwrite=True, progress=progress)  # this flow owns the run
    results = evaluate(pretrained.run_dir, progress=progress)
    return RunOutcome(pretrained.run_dir, pretrained, heads, results, RunDir(pretrained.run_dir).report)


@_threads_as_found
def transfer(run: PathLike, data: str, *, size: int | None = None, root: str | None = None, val_size: int = 500,
             out: PathLike | None = None, protocols: Sequence[str] | None = None, overrides: Sequence[str] = (),
             overwrite: bool = False, progress: bool = False) -> Transferred:
    """A run's encoder fine-tuned and evaluated on dataset `data` in a new run directory (`robustcl transfer`;
    default `<run>/transfer-<data>[-<size>px]`); the source run is left untouched."""
    from robustcl.transfer import transfer_run

    target, results = transfer_run(run, data, size, root, val_size, tuple(overrides), out,
                                   tuple(protocols) if protocols else None, overwrite, progress)
    return Transferred(target.root, results, target.report)  # type: ignore[arg-type]


@_threads_as_found
def sweep(spec: str | PathLike | Sweep, out: PathLike | None = None, overrides: Sequence[str] = (), *,
          seeds: Sequence[int] | None = None, overwrite: bool = False, progress: bool = False,
          rows: Sequence[PathLike] = (), echo: Callable[[str], None] | None = None, **launch: Any) -> SweepOutcome:
    """Every configuration x seed of a sweep spec through pretrain -> finetune -> evaluate (`robustcl sweep`),
    finished runs skipped and interrupted ones resumed; summary.md/.csv under `out` (`runs/sweeps/<name>`).
    `rows`: summary.csv files of runs finished elsewhere, joined to the summary; `echo` receives the per-run
    lines (default: stdout with `progress`, else nothing). `launch` says how the runs are executed: `jobs`,
    `shard` ("i/n" or (i, n)), `launcher` (local | submitit), `cluster`, `partition`, `time_min`, `gpus`,
    `cpus` (the `robustcl sweep` options of those names)."""
    from robustcl.sweep import Sweep, run_sweep

    return run_sweep(spec if isinstance(spec, Sweep) else os.fspath(spec), out, tuple(overrides), overwrite,
                     progress=progress, echo=echo or _echo(progress), seeds=seeds, launch=_launch_settings(launch),
                     rows=tuple(rows))


def _launch_settings(launch: dict[str, Any]) -> Any:
    """LaunchSettings from `sweep`'s launch keywords, validated (a one-line ConfigError)."""
    from robustcl.config import ConfigError
    from robustcl.sweep.options import LaunchSettings, parse_shard

    known = {"jobs", "shard", "launcher", "cluster", "partition", "time_min", "gpus", "cpus"}
    unknown = sorted(set(launch) - known)
    if unknown:
        raise ConfigError(f"unknown sweep launch option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    shard = launch.get("shard")
    settings = LaunchSettings(**{**launch, "shard": parse_shard(shard) if isinstance(shard, str) else shard})
    settings.validate()
    return settings


def sweep_plan(spec: str | PathLike | Sweep, out: PathLike | None = None, overrides: Sequence[str] = (), *,
               seeds: Sequence[int] | None = None, overwrite: bool = False, **launch: Any) -> str:
    """The runs a sweep would do, one line each with its status (`robustcl sweep --dry-run`); runs nothing.
    The launch keywords are `sweep`'s, checked the same way; `shard` narrows the list to that shard."""
    from robustcl.sweep import Sweep, format_plan, plan_sweep, shard_runs

    settings = _launch_settings(launch)
    plan = plan_sweep(spec if isinstance(spec, Sweep) else os.fspath(spec), out, tuple(overrides), overwrite, seeds)
    plan.runs = shard_runs(plan.runs, settings.shard)
    return format_plan(plan)


def sweep_summary(spec: str | PathLike | Sweep, out: PathLike | None = None, overrides: Sequence[str] = (), *,
                  seeds: Sequence[int] | None = None, rows: Sequence[PathLike] = (), overwrite: bool = False) -> Path:
    """Write summary.md/.csv of the runs finished so far, and of `rows`' runs (`robustcl sweep --summarize`);
    `overwrite` takes over another spec's sweep directory."""
    from robustcl.sweep import Sweep, summarize_sweep

    return summarize_sweep(spec if isinstance(spec, Sweep) else os.fspath(spec), out, tuple(overrides), seeds,
                           tuple(rows), overwrite)


@_threads_as_found
def bench(config: str | PathLike | Sequence[str | PathLike], overrides: Sequence[str] = (), *,
          batch_sizes: Sequence[int] | None = None, precisions: Sequence[str] | None = None,
          channels_last: bool | None = None, compile: bool = False, compile_backend: str = "inductor",
          steps: int = 5, warmup: int = 2, profile_steps: int = 1, threads: int | None = None,
          device: str | None = None, gemm_size: int | None = None, phase_timing: str = "auto",
          progress: bool = False) -> dict[str, Any]:
    """Time the phase-1 step of one or more configs (`robustcl bench`; `robustcl bench --help` says what is
    measured); returns the report (schema robustcl.bench/1, one entry per case in "results")."""
    from robustcl.bench import BenchOptions, run_bench

    names = (config,) if isinstance(config, (str, os.PathLike)) else tuple(config)
    opts = BenchOptions(configs=tuple(os.fspath(c) for c in names), overrides=tuple(overrides),
                        batch_sizes=tuple(batch_sizes) if batch_sizes else None,
                        precisions=tuple(precisions) if precisions else None, channels_last=channels_last,
                        compile=compile, compile_backend=compile_backend, steps=steps, warmup=warmup,
                        profile_steps=profile_steps, threads=threads, device=device, gemm_size=gemm_size,
                        phase_timing=phase_timing)
    return run_bench(opts, _echo(progress, sys.stderr))


def _bound_settings(settings: BoundSettings | None, threads: int) -> BoundSettings:
    from robustcl.bound.measure import BoundSettings
    from robustcl.config import ConfigError

    settings = settings or BoundSettings()
    settings.validate()
    if threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1")
    return settings


@_threads_as_found
def bound(run: PathLike, settings: BoundSettings | None = None, *, overwrite: bool = False, geometry: bool = False,
          threads: int = 1, progress: bool = False, stages: bool | None = None) -> dict[str, Any]:
    """The generalisation bound's terms of one run on its held-out split (`robustcl bound --run`): writes
    bound.json (returned; reused when measured with the same settings) and the report's section; with
    `progress`, prints the headline terms and whether they were measured or reused, and shows each stage (a
    bar on a terminal, a line elsewhere; `stages` decides that alone when given)."""
    from robustcl.bound.measure import measure_run
    from robustcl.bound.report import describe
    from robustcl.runs import RunDir
    from robustcl.runs.progress import Progress

    measured, fresh = measure_run(Path(run), _bound_settings(settings, threads), overwrite, geometry, threads,
                                  Progress("bound", show=progress if stages is None else stages))
    if progress:
        geometry_file = f"; geometry: {Path(run) / measured['geometry']['path']}" if measured.get("geometry") else ""
        print(f"{describe(measured)}\n{'measured' if fresh else 'reused'}: {RunDir(run).bound}{geometry_file}")
    return measured


@_threads_as_found
def bound_sweep(sweep_dir: PathLike, settings: BoundSettings | None = None, *, overwrite: bool = False,
                geometry: bool = False, threads: int = 1, progress: bool = False) -> BoundSweepOutcome:
    """`bound` for every run of a sweep directory, then bound_summary.md/.csv and the rank correlations
    with robust error (`robustcl bound --sweep`)."""
    from robustcl.bound.summary import measure_sweep
    from robustcl.runs.progress import Progress

    path, failed = measure_sweep(Path(sweep_dir), _bound_settings(settings, threads), overwrite, geometry,
                                 _echo(progress), threads, Progress("bound", show=progress))
    return BoundSweepOutcome(path, failed)


def load_encoder(path: PathLike, branch: str | int = "headline", *, layout: str | None = None,
                 stem_padding: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, data: str | None = None) -> FixedBranchEncoder:
    """Any encoder file as a plain nn.Module in eval mode: pixels in [0, 1], shape (N, C, H, W) -> L2-normalised
    pooled features (N, D), read through `branch`.

    `path`: a run directory, an encoder.safetensors, a published checkpoint of any layout (detected from its keys,
    `layout` forces one) or "zoo:NAME". `branch`: headline (a robustcl encoder's reporting branch; a published
    file's adversarial copy, copy 1), benign, adversarial, or a published file's BN copy index. The features are
    those the layout's own linear evaluation uses, up to L2 normalisation. `mean`/`std` (or `data`, a dataset
    whose statistics to use) normalise a torchvision file that holds none."""
    from robustcl.encoders.plain import load_plain

    return load_plain(path, branch, layout=layout, stem_padding=stem_padding, mean=mean, std=std, data=data)


@_threads_as_found
def evaluate_encoder(encoder: Any, data: str, out: PathLike | None = None, *, config: str | None = None,
                     overrides: Sequence[str] = (), protocols: Sequence[str] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     overwrite: bool = False, progress: bool = False, layout: str | None = None,
                     bn_branch: str | int | None = None, stem_padding: int | None = None,
                     protocol_of: str | None = None, compare: str | bool | None = None,
                     announce: Callable[[str], None] | None = None) -> Results:
    """Any encoder (an nn.Module, a file of any published layout, "zoo:NAME" or "module:callable") fine-tuned and
    evaluated on `data` (`robustcl evaluate --encoder`): heads fitted, attacks and integrity checks run,
    results.json and report.md written under `out` (default runs/encoders/<name>-<data>); returns results.json's
    content, whose "encoder" says how a file was read (layout, branch, normalisation, stem, dropped keys).
    `layout`, `bn_branch`, `stem_padding`, `protocol_of` ("benchmark": the RobustSSL benchmark's reading and
    settings) and `compare` as `robustcl evaluate`'s --format, --bn-branch, --stem-padding, --protocol-of, --compare."""
    from robustcl.encoders import evaluate_encoder as evaluate_any

    return evaluate_any(encoder, data, out, config=config, overrides=overrides, protocols=protocols,  # type: ignore[return-value]
                        mean=mean, std=std, overwrite=overwrite, progress=progress, layout=layout,
                        bn_branch=bn_branch, stem_padding=stem_padding, protocol_of=protocol_of, compare=compare,
                        announce=announce)


def zoo_catalogue() -> dict[str, Any]:
    """The shipped catalogue of published robust-SSL checkpoints (`robustcl zoo`): {"sources", "entries"}."""
    from robustcl.encoders import zoo

    return zoo.catalogue()


def zoo_fetch(name: str) -> Path:
    """Catalogue entry `name`'s file in the cache (downloaded, resumed, checksum-verified where one is known)."""
    from robustcl.encoders import zoo

    return zoo.fetch(name)


def export_torchvision(run: PathLike, branch: str = "headline", out: PathLike | None = None, *,
                       overwrite: bool = False) -> dict[str, Any]:
    """One BN branch of a run's ResNet encoder as a torchvision-layout state dict (`robustcl export`); returns
    what was written (path, arch, stem, branch, mean, std). An existing `out` is replaced only with `overwrite`,
    and never a file of a run, the encoder read or anything but a regular file (docs/reliability.md)."""
    from robustcl.export import export_torchvision as write_torchvision
    from robustcl.runs import RunError

    try:
        return write_torchvision(Path(run), branch, out, overwrite)
    except ValueError as exc:  # not a ResNet, or not a robustcl encoder file
        raise RunError(str(exc)) from None


@_threads_as_found
def demo(out: PathLike = "runs/demo", overrides: Sequence[str] = (), *, overwrite: bool = False,
         progress: bool = False) -> Path:
    """gbrcl against SimCLR on Fashion-MNIST, end to end (`robustcl demo`); returns the report's path.
    Finished runs are reused and interrupted ones resumed unless `overwrite`."""
    from robustcl.demo import run_demo

    return run_demo(Path(out), overwrite=overwrite, progress=progress, overrides=overrides)


__all__ = ["BoundSweepOutcome", "ConfigLike", "HeadRecord", "PathLike", "Pretrained", "Results", "RunOutcome",
           "Transferred", "bench", "bound", "bound_sweep", "demo", "evaluate", "evaluate_encoder", "export_torchvision", "finetune",
           "load_config", "load_encoder", "pretrain", "run", "sweep", "sweep_plan", "sweep_summary", "transfer",
           "zoo_catalogue", "zoo_fetch"]
