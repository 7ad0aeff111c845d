"""The `robustcl` command line: pretrain, finetune, evaluate, run, sweep, demo, configs, data."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # robustcl.config (yaml, the schema) is imported when a command runs, so --help stays fast
    from robustcl.config import Config

# Modules that add their own subcommand through `register(subparsers)`; one line each.
EXTRA_COMMANDS: tuple[str, ...] = (
    "robustcl.transfer",
    "robustcl.bench_cli",
    "robustcl.bound.cli",
    "robustcl.export_cli",
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from robustcl.config import ConfigError
    from robustcl.data import DataError
    from robustcl.runs import RunError
    from robustcl.train.pretrain import CatastrophicOverfitting, NonFiniteLoss

    return (ConfigError, DataError, RunError, NonFiniteLoss, CatastrophicOverfitting, FileNotFoundError)


def _run_config(run_dir: Path, overrides: Sequence[str]) -> Config:
    from robustcl.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a robustcl run (no config.yaml); pass the --out of a pretrain run")
    return load_config(str(path), list(overrides))


def _refuse_other_config(args: argparse.Namespace, cfg: Config) -> None:
    """`--resume --config X`: the run continues with its own config.yaml, so X must say the same (else refused)."""
    from robustcl.config import ConfigError, first_difference, load_config
    from robustcl.runtime import resolve_device, resolve_runtime

    other = load_config(args.config, args.overrides)  # `auto` as this run resolved it, so only real changes count
    other = resolve_runtime(other, resolve_device(other.train.device), cfg.to_dict())
    changed = first_difference(cfg.to_dict(), other.to_dict(), ignore=("name", "train.threads"))
    if changed:
        raise ConfigError(f"--resume continues {args.out} with its own config.yaml and --config {args.config} differs "
                          f"from it ({changed}); drop --config (pass changes as key=value overrides)")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from robustcl.config import ConfigError, load_config
    from robustcl.runs import RunDir
    from robustcl.runs.guard import run_dir_for
    from robustcl.train.pretrain import pretrain

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR (the run directory to continue)")
        cfg = _run_config(Path(args.out), args.overrides)
        if args.config is not None:
            _refuse_other_config(args, cfg)
    else:
        if args.config is None:
            raise ConfigError("pretrain needs --config NAME|PATH (see `robustcl configs`)")
        cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out or run_dir_for(cfg.name))
    result = pretrain(cfg, run, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if not main_process():
        return 0
    if result is None:
        print(f"{run.root}: phase 1 already finished; nothing to do")
    else:
        print(f"{run.root}: {result.steps} steps, {result.images_per_second:.0f} images/s; encoder at {run.encoder}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from robustcl.runs import RunDir
    from robustcl.train.finetune import finetune

    from robustcl.config import schedule_overrides

    run = RunDir(args.run)
    schedule = schedule_overrides(args.schedule) if getattr(args, "schedule", None) else []
    cfg = _run_config(run.root, [*schedule, *args.overrides])
    out = finetune(cfg, run, tuple(args.protocol) if args.protocol else None, progress=not args.quiet,
                   overwrite=args.overwrite)
    for protocol, record in out.items():
        print(f"{protocol.upper()} ({record['branch']} branch): best epoch {record['best_epoch']}, "
              f"{record['selected_on']} {100 * record['val_acc']:.2f}%; head at {run.head(protocol)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from robustcl.config import ConfigError

    if getattr(args, "encoder", None) is not None:  # any encoder: robustcl/evaluation/external.py
        from robustcl.evaluation.external import cmd_evaluate_encoder

        if args.run is not None:
            raise ConfigError("evaluate takes --run DIR or --encoder SPEC, not both")
        return cmd_evaluate_encoder(args, [*evaluate_overrides(args), *args.overrides])
    if args.run is None:
        raise ConfigError("evaluate needs --run DIR (a robustcl run) or --encoder PATH|module:callable --data NAME")
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs import RunDir
    from robustcl.runs.report import results_table, write_report

    run = RunDir(args.run)
    cfg = _run_config(run.root, [*evaluate_overrides(args), *args.overrides])
    results = evaluate_run(cfg, run, progress=not args.quiet,
                           protocols=tuple(args.protocol) if getattr(args, "protocol", None) else None)
    report = write_report(run)
    print(results_table([(run.root.name, results)]))
    print(f"results: {run.results}\nreport: {report}")
    return 0


def evaluate_overrides(args: argparse.Namespace) -> list[str]:
    """The `evaluate` options as eval.* overrides (explicit key=value overrides still win)."""
    out = []
    if getattr(args, "attacks", None):
        out.append(f"eval.attacks=[{', '.join(dict.fromkeys(['pgd', *args.attacks]))}]")
    if getattr(args, "eps", None):
        out.append(f"eval.eps_curve=[{', '.join(args.eps)}]")
    if getattr(args, "steps", None):
        out.append(f"eval.steps_curve=[{', '.join(str(s) for s in args.steps)}]")
    for flag, key in (("limit", "eval.limit"), ("batch_size", "eval.batch_size"), ("seed", "seed"),
                      ("restarts", "eval.restarts")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "mixed_reading", False):
        out.append("eval.mixed_reading=true")
    return out


def main_process() -> bool:
    """False on the non-zero ranks of a torchrun job: they train, rank 0 alone reports and goes on."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_run(args: argparse.Namespace) -> int:
    """pretrain -> finetune -> evaluate in one go (under torchrun: phase 1 on every rank, the rest on rank 0)."""
    from robustcl.config import load_config

    cmd_pretrain(args)
    if not main_process():
        return 0
    from robustcl.runs.guard import run_dir_for

    cfg = load_config(args.config, args.overrides) if not args.resume else _run_config(Path(args.out), args.overrides)
    run_dir = args.out or str(run_dir_for(cfg.name))
    ns = argparse.Namespace(run=run_dir, overrides=[], protocol=None, quiet=args.quiet, overwrite=True)
    cmd_finetune(ns)
    return cmd_evaluate(ns)


def cmd_configs(args: argparse.Namespace) -> int:
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with
    from robustcl.config import ConfigError, dump_yaml, list_presets, load_config
    from robustcl.sweep import list_sweeps

    if args.show:
        print(dump_yaml(load_config(args.show, args.overrides)), end="")
        return 0
    if args.overrides:
        raise ConfigError(f"overrides ({args.overrides[0]} ...) need --show NAME: `robustcl configs --show NAME key=value`")
    for name, description in list_presets().items():
        print(f"{name:24s} {description}")
    print("\nsweep specs (robustcl sweep --spec NAME):")
    for name, description in list_sweeps().items():
        print(f"{name:24s} {description}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A list or grid of configs, pretrain -> finetune -> evaluate each, one comparison table."""
    from robustcl.sweep import format_plan, plan_sweep, run_sweep, summarize_sweep
    from robustcl.sweep_launch import launch_settings, shard_runs

    launch = launch_settings(args)
    if args.dry_run:
        plan = plan_sweep(args.spec, args.out, args.overrides, args.overwrite, args.seeds)
        plan.runs = shard_runs(plan.runs, launch.shard)
        print(format_plan(plan))
        return 0
    if args.summarize:
        print(f"summary: {summarize_sweep(args.spec, args.out, args.overrides, args.seeds, args.rows)}")
        return 0
    try:
        outcome = run_sweep(args.spec, args.out, args.overrides, args.overwrite, progress=not args.quiet,
                            seeds=args.seeds, launch=launch, rows=args.rows)
    except KeyboardInterrupt:
        print("robustcl: sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    for name, message in outcome.failed.items():
        print(f"robustcl: run {name} failed: {message}", file=sys.stderr)
    print(f"summary: {outcome.summary}")
    return 1 if outcome.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from robustcl.demo import run_demo

    t0 = time.perf_counter()
    report = run_demo(Path(args.out), overwrite=args.overwrite, progress=not args.quiet, overrides=args.overrides)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s\nreport: {report}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from robustcl.data.fetch import main as fetch_main

    return fetch_main([args.name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustcl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.1")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    for name, fn, text in (("pretrain", cmd_pretrain, "phase 1: contrastive pre-training"),
                           ("run", cmd_run, "pretrain, finetune and evaluate in one go")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="preset name or YAML path")
        p.add_argument("--out", help="run directory (default runs/<config name>)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
        add_common(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("finetune", help="phase 2: fit SLF/ALF linear heads on a run's frozen encoder")
    p.add_argument("--run", required=True, help="run directory written by pretrain")
    p.add_argument("--protocol", nargs="+", choices=["slf", "alf", "aff"],
                   help="protocols (default: finetune.protocols); aff fine-tunes the encoder too (TRADES or PGD-AT)")
    p.add_argument("--schedule", help="a phase-2 schedule preset: linear-reference (100 epochs, lr 0.1) or "
                                      "linear-benchmark (25 epochs, lr 0.01)")
    p.add_argument("--overwrite", action="store_true", help="refit heads that already exist")
    add_common(p)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("evaluate", help="clean and robust accuracy of a run's heads; results.json and report.md")
    p.add_argument("--run", help="run directory")
    p.add_argument("--encoder", help="instead of --run: an encoder file (encoder.safetensors, torchvision-layout "
                                     "ResNet-18/50 state dict) or module:callable returning an nn.Module; heads "
                                     "are fitted (--protocol, default finetune.protocols) and evaluated")
    p.add_argument("--data", help="with --encoder: the dataset to fit heads on and evaluate, e.g. cifar10")
    p.add_argument("--config", help="with --encoder: preset or YAML whose finetune/eval settings are used "
                                    "(default: the dataset's reference preset)")
    p.add_argument("--out", help="with --encoder: results directory (default runs/encoders/<name>-<data>)")
    p.add_argument("--mean", nargs="+", type=float, help="with a torchvision-layout --encoder: input normalisation "
                                                        "mean per channel (default: the dataset's)")
    p.add_argument("--std", nargs="+", type=float, help="with a torchvision-layout --encoder: input std per channel")
    p.add_argument("--overwrite", action="store_true", help="with --encoder: redo an earlier evaluation in --out")
    p.add_argument("--protocol", nargs="+", choices=["slf", "alf", "aff"], help="evaluate only these fitted models")
    p.add_argument("--attacks", nargs="+", choices=["pgd", "cw", "pgd-l2", "autoattack"],
                   help="attacks to report besides PGD (eval.attacks)")
    p.add_argument("--eps", nargs="+", help="eps values for the robustness curve, e.g. 2/255 4/255 (eval.eps_curve)")
    p.add_argument("--steps", nargs="+", type=int, help="PGD step counts for the steps curve (eval.steps_curve)")
    p.add_argument("--limit", type=int, help="evaluate on a seeded random subset of N test images (eval.limit)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (eval.batch_size)")
    p.add_argument("--seed", type=int, help="seed of the attacks' random starts (the run's seed by default)")
    p.add_argument("--restarts", type=int, help="PGD/CW/L2 random restarts, worst case per image (eval.restarts)")
    p.add_argument("--mixed-reading", action="store_true",
                   help="also report the reference protocol's mixed reading (clean via benign BN, robust via "
                        "adversarial BN), labelled as such")
    add_common(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("sweep", help="a list or grid of configs x seeds, end to end, with one comparison table")
    p.add_argument("--spec", required=True, help="shipped sweep spec name (robustcl configs) or YAML path")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs (name, config, overrides, status) and exit")
    p.add_argument("--overwrite", action="store_true", help="redo every run, finished ones included")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run instead of the spec's list (e.g. --seeds 0)")
    p.add_argument("--rows", nargs="+", metavar="SUMMARY_CSV", default=[],
                   help="join the runs in these summary.csv files (finished on another machine or in an earlier "
                        "session) to the summary; where this directory has the run too, its own is used and "
                        "summary.md says whether they agree (rows never skip a run: use --summarize to run nothing)")
    p.add_argument("--summarize", action="store_true",
                   help="write the summary of the runs finished so far (and of --rows) and run nothing")
    importlib.import_module("robustcl.sweep_launch").add_launch_options(p)  # --jobs, --shard, --launcher, --slurm-*
    add_common(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("configs", help="list the shipped presets and sweep specs, or print one config resolved")
    p.add_argument("--show", metavar="NAME|PATH", help="print this preset or YAML file as the resolved YAML a run "
                                                     "stores in config.yaml (extends and overrides applied)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to --show's config")
    p.set_defaults(fn=cmd_configs)

    p = sub.add_parser("demo", help="gbrcl vs simclr on Fashion-MNIST, end to end, with a report")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs instead of reusing them")
    add_common(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("data", help="obtain a dataset (Debian package, cache or download)")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("name", help="dataset name, e.g. fashion-mnist")
    p.set_defaults(fn=cmd_data)
    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def environment_error(exc: BaseException) -> str | None:
    """One line for an error of the machine rather than of robustcl (I/O, memory), else None."""
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}; check that path (free space, permissions, mounts) and run again"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = (str(exc).strip().splitlines() or ["out of memory"])[0]
        return f"out of memory ({first}); lower train.batch_size, eval.batch_size or finetune.batch_size"
    return None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with `key=value` overrides allowed anywhere among the options (`pretrain a=1 --config x b=2`).

    argparse takes the first run of positionals as the overrides; later `key=value` words come back as
    unrecognised and are appended in order. Anything else unrecognised is argparse's usual error.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray or (extra and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: errors of the user's input or environment are one line (exit 2); a bug in robustcl
    shows its traceback and where to report it (exit 1)."""
    args = parse_args(build_parser(), argv)
    try:
        import robustcl.methods  # noqa: F401 - registers the methods configs are built with

        return args.fn(args)
    except _user_errors() as exc:
        if main_process():  # under torchrun every rank raises the same error: say it once
            print(f"robustcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustcl: interrupted; resume with --resume --out <run dir>", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader closed the pipe: entry() ends quietly
    except Exception as exc:  # noqa: BLE001 - the last word: one line, or a bug's traceback
        line = environment_error(exc)
        if main_process():
            if line is not None:
                print(f"robustcl: error: {line}", file=sys.stderr)
            else:
                traceback.print_exc()
                print("robustcl: this is a bug in robustcl, not in your input; report it at the project's issue "
                      "tracker with this traceback", file=sys.stderr)
        return 2 if line is not None else 1


def entry() -> int:
    """The `robustcl` console script: main(), and a reader that closed the pipe (`robustcl configs | head -1`)
    ends the command quietly, as the Python docs recommend (stdout pointed at devnull, exit status 1)."""
    try:
        try:
            return main()
        finally:
            sys.stdout.flush()  # inside the try, so a closed pipe surfaces here and not at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(entry())
