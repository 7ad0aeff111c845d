"""Phase-1 step throughput for a preset: median images/s after warm-up, FLOPs per image, GEMM peak.

A first piece of issue 5's benchmark harness (no per-phase split yet). Usage:
    python benchmarks/step_throughput.py --config fmnist-gbrcl [--steps 10] [--warmup 3] [key=value ...]
Prints one JSON line: config, method, batch, precision, median step seconds, images/s, FLOPs per
image (torch.utils.flop_counter over one step), achieved GFLOP/s and the fraction of a bf16/fp32
torch.mm peak measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from robustcl.config import load_config
from robustcl.runs import RunDir
from robustcl.train.pretrain import Pretrainer


class FlopCount(TorchDispatchMode):
    """Counts FLOPs of every op in torch's flop registry (conv, mm, ...), forward and backward.

    torch's FlopCounterMode tracks modules with hooks that autograd.grad on an input (the attack)
    does not support, so this counts at the dispatch level only, with the same formulas.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            shape = lambda x: x.shape if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.total += flop_registry[packet](*tree_map(shape, args), **tree_map(shape, kwargs),
                                                out_val=tree_map(shape, out))
        return out


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best torch.mm GFLOP/s for an n x n product in `dtype` on the CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "diagnostics.every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Pretrainer(cfg, RunDir(tmp))
        method, ctx = trainer.method, trainer.ctx
        batch = trainer.batch(0)
        for _ in range(args.warmup):
            method.training_step(batch, ctx)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            method.training_step(batch, ctx)
            times.append(time.perf_counter() - t0)
        counter = FlopCount()
        with counter:
            method.training_step(batch, ctx)
    step = statistics.median(times)
    b = cfg.train.batch_size
    flops = counter.total / b
    achieved = flops * b / step / 1e9
    peak = gemm_peak(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    print(json.dumps({"config": args.config, "method": cfg.method.name, "batch": b,
                      "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
                      "threads": torch.get_num_threads(), "step_s_median": round(step, 4),
                      "images_per_s": round(b / step, 1), "gflop_per_image": round(flops / 1e9, 3),
                      "achieved_gflops": round(achieved, 1), "gemm_peak_gflops": round(peak, 1),
                      "fraction_of_peak": round(achieved / peak, 3)}))


if __name__ == "__main__":
    main()
