"""`robustcl bench | bound | transfer | export | demo | configs | data`: the tools around a run."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from robustcl.cli.phases import add_common

if TYPE_CHECKING:  # the measurement imports torch; `robustcl --help` must not
    from robustcl.bound.measure import BoundSettings

BENCH_DESCRIPTION = """`robustcl bench`: phase-1 step throughput, its split by phase, FLOPs, GEMM-peak fraction, memory.

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
EXPORT_FORMATS = ("torchvision",)
BENCH_HELP = "time the phase-1 step: images/s, phase split, FLOPs/image, fraction of GEMM peak, peak memory"


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """`robustcl bench`'s options."""
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench; print the table (stderr when the JSON goes to stdout) and write the JSON report."""
    from robustcl import api
    from robustcl.bench import format_table
    from robustcl.runs import atomic_write_text
    from robustcl.runs.policy import claim_output_file

    if args.json and args.json != "-":  # refused before the measurement, not after it
        claim_output_file(args.json, args.overwrite, "--json")
    report = api.bench(args.config, args.overrides, batch_sizes=args.batch_size, precisions=args.precision,
                       channels_last=args.channels_last, compile=args.compile, compile_backend=args.compile_backend,
                       steps=args.steps, warmup=args.warmup, profile_steps=args.profile_steps, threads=args.threads,
                       device=args.device, gemm_size=args.gemm_size, phase_timing=args.phase_timing,
                       progress=True)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(report), file=table_out)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}", file=table_out)
    return 0


def bound_settings(args: argparse.Namespace) -> BoundSettings:
    """BoundSettings from the parsed options (`api.bound` validates them)."""
    from robustcl.bound.measure import BoundSettings

    return BoundSettings(images=args.images, batch_size=args.batch_size,
                         rho=tuple(args.rho) if args.rho else None, sharpness_mode=args.sharpness_mode,
                         sharpness_steps=args.sharpness_steps, sharpness_images=args.sharpness_images,
                         seed=args.seed, eps=args.eps, steps=args.steps,
                         alpha=args.alpha, critic_hidden=args.critic_hidden, critic_steps=args.critic_steps,
                         mmd_permutations=args.mmd_permutations, robust_loss=not args.no_robust_loss)


def cmd_bound(args: argparse.Namespace) -> int:
    """Measure one run (--run) or a sweep (--sweep); prints where the files are."""
    from robustcl import api

    settings = bound_settings(args)
    if args.run:
        api.bound(args.run, settings, overwrite=args.overwrite, geometry=args.geometry, threads=args.threads,
                  progress=True, stages=not args.quiet)  # the terms are the command's output; --quiet hides stages
        return 0
    outcome = api.bound_sweep(args.sweep, settings, overwrite=args.overwrite, geometry=args.geometry,
                              threads=args.threads, progress=not args.quiet)
    print(f"summary: {outcome.summary}")
    return 1 if outcome.failed else 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from robustcl import api
    from robustcl.runs.report import results_table

    done = api.transfer(args.run, args.data, size=args.size, root=args.root, val_size=args.val_size, out=args.out,
                        protocols=args.protocol, overrides=args.overrides, overwrite=args.overwrite,
                        progress=not args.quiet)
    print(results_table([(done.run_dir.name, done.results)]))
    print(f"results: {done.run_dir / 'results.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from robustcl import api

    done = api.export_torchvision(args.run, args.branch, args.out, overwrite=args.overwrite)
    print(f"{done['path']}: {done['arch']} ({done['stem']} stem), {done['branch']} BN branch, torchvision key names, "
          f"no fc (load with strict=False or after model.fc = nn.Identity()); normalise inputs with "
          f"mean={done['mean']} std={done['std']} (not stored in the file)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from robustcl import api

    t0 = time.perf_counter()
    report = api.demo(args.out, overrides=args.overrides, overwrite=args.overwrite, progress=not args.quiet)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s\nreport: {report}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from robustcl import api
    from robustcl.config import ConfigError, dump_yaml, list_presets
    from robustcl.sweep import list_sweeps

    if args.show:
        print(dump_yaml(api.load_config(args.show, args.overrides)), end="")
        return 0
    if args.overrides:
        raise ConfigError(f"overrides ({args.overrides[0]} ...) need --show NAME: `robustcl configs --show NAME key=value`")
    for name, description in list_presets().items():
        print(f"{name:24s} {description}")
    print("\nsweep specs (robustcl sweep --spec NAME):")
    for name, description in list_sweeps().items():
        print(f"{name:24s} {description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Obtain a dataset (Debian package, cache or download); a failure is one `robustcl: error:` line."""
    from robustcl.data.fetch import obtain

    obtain(args.name)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add bench, bound, transfer, export, demo, configs and data."""
    p = sub.add_parser("bench", help=BENCH_HELP, description=BENCH_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.set_defaults(fn=cmd_bench)
    register_bound(sub)
    register_transfer(sub)
    register_export(sub)
    register_small(sub)


def register_bound(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bound", help="measure the generalisation bound's terms (InfoNCE, sharpness, divergence) "
                                     "of a run or a sweep on held-out data")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory (config.yaml + checkpoints/last.pt)")
    where.add_argument("--sweep", help="sweep directory (runs/sweeps/<spec>): every run, plus bound_summary.*")
    p.add_argument("--images", type=int, default=1000, help="held-out validation images (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="InfoNCE batch size (default 250)")
    p.add_argument("--rho", type=float, nargs="+", help="sharpness radii (default asam: 0.1 0.5 1; sam: 0.01 0.05 0.1)")
    p.add_argument("--sharpness-mode", choices=["sam", "asam"], default="asam", help="the ball (default asam)")
    p.add_argument("--sharpness-steps", type=int, default=5, help="projected gradient-ascent steps (default 5)")
    p.add_argument("--sharpness-images", type=int, default=500,
                   help="images (first fixed batches) the sharpness is measured on (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of views, attack noise and critics (default 0)")
    p.add_argument("--eps", type=float, help="attack eps (default: the run's phase-1 attack)")
    p.add_argument("--steps", type=int, help="attack steps (default: the run's phase-1 attack)")
    p.add_argument("--alpha", type=float, help="attack step size (default: the run's, scaled with --eps)")
    p.add_argument("--critic-hidden", type=int, default=0, help="critic hidden width, 0 = linear (default 0)")
    p.add_argument("--critic-steps", type=int, default=1000, help="critic Adam steps (default 1000)")
    p.add_argument("--mmd-permutations", type=int, default=200, help="permutations of the MMD test (default 200)")
    p.add_argument("--no-robust-loss", action="store_true", help="skip the phase-2 robust cross-entropy (a PGD pass)")
    p.add_argument("--geometry", action="store_true", help="also write plots/geometry.png (2-D PCA of features)")
    p.add_argument("--overwrite", action="store_true", help="re-measure runs that already have bound.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while measuring (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or lines (each stage; per run of a sweep)")
    p.set_defaults(fn=cmd_bound)


def register_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="fine-tune and evaluate a run's encoder on another dataset (e.g. STL-10)")
    p.add_argument("--run", required=True, help="source run directory (its encoder.safetensors is used)")
    p.add_argument("--data", required=True, help="target dataset name, e.g. stl10 or imagefolder")
    p.add_argument("--size", type=int, help="resize target images to SIZE x SIZE (32 for a CIFAR encoder)")
    p.add_argument("--root", help="directory holding the target dataset (data.root)")
    p.add_argument("--val-size", type=int, default=500, help="held-out training images for epoch selection")
    p.add_argument("--protocol", nargs="+", choices=["slf", "alf", "aff"], help="protocols (default: the run's)")
    p.add_argument("--out", help="new run directory (default <run>/transfer-<data>[-<size>px])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing transfer run in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further overrides, e.g. finetune.epochs=10")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(fn=cmd_transfer)


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write one BN branch of a run's ResNet encoder as a torchvision state dict")
    p.add_argument("--run", required=True, help="run directory or encoder.safetensors file")
    p.add_argument("--branch", default="headline", choices=["headline", "benign", "adversarial"],
                   help="BN branch to export (default: the one the method is reported through)")
    p.add_argument("--format", default="torchvision", choices=EXPORT_FORMATS,
                   help="torchvision: conv1/bn1/layerI.J.*/downsample.* names, saved with torch.save")
    p.add_argument("--out", help="output file (default resnet-<branch>.pth beside the encoder); never a run's own file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(fn=cmd_export)


def register_small(sub: argparse._SubParsersAction) -> None:
    """demo, configs and data."""
    p = sub.add_parser("demo", help="gbrcl vs simclr on Fashion-MNIST, end to end, with a report")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="redo finished runs instead of reusing them")
    add_common(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("configs", help="list the shipped presets and sweep specs, or print one config resolved")
    p.add_argument("--show", metavar="NAME|PATH", help="print this preset or YAML file as the resolved YAML a run "
                                                     "stores in config.yaml (extends and overrides applied)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to --show's config")
    p.set_defaults(fn=cmd_configs)

    p = sub.add_parser("data", help="obtain a dataset (Debian package, cache or download)")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("name", help="dataset name, e.g. fashion-mnist")
    p.set_defaults(fn=cmd_data)
