"""`robustcl sweep`: a list or grid of configs x seeds, end to end, with one comparison table."""
from __future__ import annotations

import argparse
import signal
import sys

from robustcl.cli.phases import add_common
from robustcl.sweep.options import LAUNCHERS, SUBMITIT_CLUSTERS  # no torch: --help stays fast


def cmd_sweep(args: argparse.Namespace) -> int:
    """Plan (--dry-run), summarise (--summarize) or run the sweep; exit 1 when a run failed."""
    from robustcl import api

    launch = launch_options(args)
    if args.dry_run:
        print(api.sweep_plan(args.spec, args.out, args.overrides, overwrite=args.overwrite, seeds=args.seeds,
                             **launch))
        return 0
    if args.summarize:
        summary = api.sweep_summary(args.spec, args.out, args.overrides, seeds=args.seeds, rows=args.rows,
                                    overwrite=args.overwrite)
        print(f"summary: {summary}")
        return 0
    try:
        outcome = api.sweep(args.spec, args.out, args.overrides, seeds=args.seeds, overwrite=args.overwrite,
                            progress=not args.quiet, rows=args.rows, echo=print, **launch)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGINT/SIGHUP (sweep.launch.Stopped: its runs unwound)
        print(f"robustcl: sweep {exc or 'interrupted'}; run the same command again to resume its runs", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)  # as a shell reports it: 143 for SIGTERM, 130 for SIGINT
    for name, message in outcome.failed.items():
        print(f"robustcl: run {name} failed: {message}", file=sys.stderr)
    print(f"summary: {outcome.summary}")
    return 1 if outcome.failed else 0


def launch_options(args: argparse.Namespace) -> dict:
    """The launch options as `api.sweep` keywords (validated there)."""
    return {"jobs": args.jobs, "shard": args.shard, "launcher": args.launcher, "cluster": args.submitit_cluster,
            "partition": args.slurm_partition, "time_min": args.slurm_time, "gpus": args.slurm_gpus,
            "cpus": args.slurm_cpus}


def add_launch_options(parser: argparse.ArgumentParser) -> None:
    """Options for parallel execution (the default, --jobs 1, is the serial in-process sweep)."""
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to N runs at once in local processes, torch threads split between them "
                             "(default 1: one after another in this process); with submitit: the job array's "
                             "parallelism")
    parser.add_argument("--shard", help="run only shard i/n of the runs (every n-th run from i; 0 <= i < n), "
                                        "for any scheduler: e.g. --shard $SLURM_ARRAY_TASK_ID/4")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local processes (default) or submitit (a SLURM job per run)")
    parser.add_argument("--submitit-cluster", choices=SUBMITIT_CLUSTERS, default="slurm",
                        help="submitit: slurm (default), or local (submitit's local executor: one machine, for tests)")
    parser.add_argument("--slurm-partition", help="submitit: SLURM partition")
    parser.add_argument("--slurm-time", type=int, metavar="MINUTES", help="submitit: time limit per job in minutes")
    parser.add_argument("--slurm-gpus", type=int, help="submitit: GPUs per job")
    parser.add_argument("--slurm-cpus", type=int, help="submitit: CPUs per job (and its torch thread cap)")




def register(sub: argparse._SubParsersAction) -> None:
    """Add `robustcl sweep`."""
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
    add_launch_options(p)
    add_common(p)
    p.set_defaults(fn=cmd_sweep)
