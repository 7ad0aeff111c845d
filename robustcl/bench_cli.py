"""`robustcl bench`: phase-1 step throughput, its split by phase, FLOPs, GEMM-peak fraction, memory.

For each config x batch size x precision it builds the method, optimisers, SAM and StepContext
exactly as `Pretrainer` does (without reading the dataset: the batch is random uint8 data of the
dataset's shape) and measures, in this order:

* FLOPs per image: one eager step under a dispatch-level counter that applies torch's own flop
  formulas (`torch.utils.flop_counter.flop_registry`). torch's FlopCounterMode cannot be used: its
  module hooks fail under `autograd.grad` w.r.t. inputs (the attack), still so in torch 2.13.
* images/s: median (and min/max) of `--steps` timed steps after `--warmup` steps (CUDA-synchronised).
* the phase split, in a separate pass so profiling does not slow the timed steps: the time inside
  each `robustcl::<phase>` range (methods/step.py `phase`), nested ranges subtracted from their
  parent (sam_second_pass runs inside encoder_step), and "other" = step wall time - phases. On CPU
  the ranges come from torch.profiler; on CUDA ("synced") each range is timed with the device
  synchronised at its start and end, so it holds the GPU work launched inside it.
* the fraction of a torch.mm peak (same dtype, device and process; the best of one run just before
  and one just after the timed steps) that the step achieves, and
  peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, ru_maxrss).

Run as `robustcl bench ...` or, without the CLI's other imports, `python -m robustcl.bench ...`.
The three step kinds of issue 5 (the paper's step, plain adversarial InfoNCE, SimCLR) in one run:
    robustcl bench --config cifar10-gbrcl --config cifar10-ablation-adv-only --config cifar10-simclr
                   --batch-size 32 --precision fp32 bf16 --channels-last --steps 3 --warmup 1 --threads 2
(one command line; key=value overrides go before the options and apply to every config).

--json writes {schema, torch, threads, flop_counter, cuda_device, loadavg_before, loadavg_after,
options, results}; each result has RESULT_KEYS: config, method, batch, precision, channels_last,
compiled, compile_error, compile_s (first compiled step), steps, warmup, step_s (timed steps),
step_s_median, images_per_s (batch / median step), images_per_s_min/_max, gflop_per_image,
achieved_gflops, gemm_peak_gflops, fraction_of_peak, phases_s and phase_fractions (per phase and
"other", from the profiled pass), gflop_per_image_by_phase (FLOPs counted in each innermost phase
range), phase_gflops (a phase's FLOPs / its profiled time: which phase uses the hardware worst),
profiled_step_s, phase_timing (profiler | synced), peak_memory_mib, memory_kind.
"""
from __future__ import annotations

import argparse
import json
import sys

# This module imports no torch: `robustcl --help` and `robustcl bench --help` stay fast; the
# measurement (robustcl/bench.py) is imported when the bench runs.
DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's command-line options (shared by `robustcl bench` and `python -m robustcl.bench`)."""
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every config (put them before the list options)")
    p.add_argument("--config", action="append", required=True,
                   help="preset name or YAML path; repeat to bench several (e.g. gbrcl, adv-only, simclr)")
    p.add_argument("--batch-size", type=int, nargs="+", help="batch sizes (default: the config's)")
    p.add_argument("--precision", nargs="+", help="fp32 and/or bf16 (default: the config's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the config's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder and projection head")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--profile-steps", type=int, default=1, help="steps of the separate phase-split pass (default 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the config's, else torch's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's train.device)")
    p.add_argument("--gemm-size", type=int, help="n of the n x n torch.mm peak (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--phase-timing", default="auto",
                   help="auto (profiler on CPU, synced on CUDA), profiler or synced")
    p.add_argument("--json", metavar="PATH|-", help="write the report as JSON (atomically) to PATH, or stdout with -")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; print the table (stderr when the JSON goes to stdout)."""
    from robustcl.bench import BenchOptions, format_table, run_bench

    opts = BenchOptions(configs=tuple(args.config), overrides=tuple(args.overrides),
                        batch_sizes=tuple(args.batch_size) if args.batch_size else None,
                        precisions=tuple(args.precision) if args.precision else None,
                        channels_last=args.channels_last, compile=args.compile, compile_backend=args.compile_backend,
                        steps=args.steps, warmup=args.warmup, profile_steps=args.profile_steps, threads=args.threads,
                        device=args.device, gemm_size=args.gemm_size, phase_timing=args.phase_timing)
    report = run_bench(opts)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(report), file=table_out)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        from robustcl.runs import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}", file=table_out)
    return 0


HELP = "time the phase-1 step: images/s, phase split, FLOPs/image, fraction of GEMM peak, peak memory"


def register(sub: argparse._SubParsersAction) -> None:
    """Add `robustcl bench` to the CLI."""
    p = sub.add_parser("bench", help=HELP, description=DESCRIPTION)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_arguments(p)
    p.set_defaults(fn=cmd_bench)


__all__ = ["DESCRIPTION", "HELP", "add_arguments", "cmd_bench", "register"]
