"""Phase-1 step throughput of one preset as one JSON line: a thin wrapper over `robustcl bench`.

Kept so the first step measurements (docs/performance.md) stay reproducible with the same command; `robustcl bench`
(robustcl/bench.py) holds the logic and does more (several batch sizes and precisions, the phase
split, peak memory, a table, --json). Usage:
    python benchmarks/step_throughput.py --config fmnist-gbrcl [--steps 10] [--warmup 3] [key=value ...]
Prints one JSON line per case with the keys of the first version (config, method, batch, precision,
channels_last, threads, step_s_median, images_per_s, gflop_per_image, achieved_gflops,
gemm_peak_gflops, fraction_of_peak) plus the phase split (phases_s).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from robustcl.bench import BenchOptions, run_bench
from robustcl.config import ConfigError
from robustcl.data import DataError

ROUNDING = {"step_s_median": 4, "images_per_s": 1, "gflop_per_image": 3, "achieved_gflops": 1,
            "gemm_peak_gflops": 1, "fraction_of_peak": 3}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the first version's options, run the bench on the config's own batch and precision, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gemm-size", type=int, help="n of the n x n torch.mm peak (default: the bench's)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        report = run_bench(BenchOptions(configs=(args.config,), overrides=tuple(args.overrides), steps=args.steps,
                                        warmup=args.warmup, gemm_size=args.gemm_size))
    except (ConfigError, DataError) as exc:
        print(f"step_throughput: error: {exc}", file=sys.stderr)
        return 2
    for r in report["results"]:
        line = {k: r[k] for k in ("config", "method", "batch", "precision", "channels_last")}
        line["threads"] = report["threads"]
        line |= {k: round(r[k], digits) for k, digits in ROUNDING.items()}
        line["phases_s"] = {k: round(v, 4) for k, v in r["phases_s"].items()}
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
