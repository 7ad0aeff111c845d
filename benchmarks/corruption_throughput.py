"""Cost of the common-corruption evaluation (docs/corruptions.md "What it costs"): generation and forward images/s.

    robustcl run --config fmnist-gbrcl --out /tmp/g train.max_steps=4 finetune.epochs=1 eval.limit=100
    PYTHONPATH=. python benchmarks/corruption_throughput.py /tmp/g 1000     # a run with an SLF head, N images

Generates (or reads from the cache: point ROBUSTCL_DATA at an empty directory to time the generation) the 15
corruptions x 5 severities of N test images, then times the SLF model's forward passes on them with 2 and 1
torch threads; wall and CPU seconds (the CPU seconds say more on a shared machine).
"""
from __future__ import annotations

import sys
import time

import torch

import robustcl.methods  # noqa: F401 - registers the methods the run's config names
from robustcl.config import load_config
from robustcl.evaluation.corrupted_sets import corrupted_sets
from robustcl.evaluation.robust import correct_under
from robustcl.evaluation.run_eval import indexed_test_subset, protocol_model, run_encoder
from robustcl.runs import RunDir


def main(run_dir: str, n: int) -> None:
    run = RunDir(run_dir)
    cfg = load_config(str(run.config), ["eval.corruptions=all", f"eval.corruptions_limit={n}", "eval.limit=null"])
    encoder, _ = run_encoder(cfg, run)
    encoder.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    model, _ = protocol_model(run, "slf", encoder, torch.device("cpu"))
    images, labels, _, index = indexed_test_subset(cfg)
    sets = corrupted_sets(cfg, images, labels, index)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = [sets.images(name, s) for name in sets.names for s in sets.severities]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"generation: {sets.generated_images} images generated, {sum(map(len, batches))} read; wall {wall:.1f} s, "
          f"cpu {cpu:.1f} s")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        wall, cpu = time.perf_counter(), time.process_time()
        for x in batches:
            correct_under(model, x, sets.labels, None, 500)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        total = sum(map(len, batches))
        print(f"forward, {threads} thread(s): {total} images, wall {wall:.1f} s ({total / wall:.0f} images/s), "
              f"cpu {cpu:.1f} s ({total / cpu:.0f} images per CPU-second)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
