"""Accuracy under common corruptions: the third number of the RobustSSL benchmark (clean / AutoAttack / corrupted).

One model (a protocol's headline branch and head) is read on every configured corruption and severity
(robustcl/evaluation/corrupted_sets.py says where those images come from). The record, results.json's
`corruptions` of each protocol: `per` {name: {severity: accuracy}}, `per_severity` {severity: mean over the
corruptions} (CS-1..CS-5), `mean` (over every corruption and severity: the benchmark's CA when `standard`,
i.e. the 15 corruptions at severities 1-5), `n` images per cell, `source`, and the clean accuracy on the
same `n` images, so CA is read against the clean number it degrades.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from robustcl.config import Config
from robustcl.data.corruptions import SEVERITIES, STANDARD
from robustcl.evaluation.corrupted_sets import CorruptedSets
from robustcl.evaluation.robust import correct_under, fraction
from robustcl.runs.progress import SILENT, Progress


def corruption_record(model: torch.nn.Module, sets: CorruptedSets, clean_flags: torch.Tensor, cfg: Config,
                      autocast, parts: Progress = SILENT) -> dict[str, Any]:
    """`model`'s accuracy on each corruption and severity of `sets`, per severity, and their mean (one part of
    `parts`, "corruptions": every cell's images, their reading or generation included)."""
    per: dict[str, dict[str, float]] = {}
    seconds = 0.0
    n, cells = len(sets.labels), len(sets.names) * len(sets.severities)
    with parts.part("corruptions", n * cells) as part:
        for name in sets.names:
            per[name] = {}
            for severity in sets.severities:
                images = sets.images(name, severity)  # read or generated outside the timed forward passes
                t0 = time.perf_counter()
                flags = correct_under(model, images, sets.labels, None, cfg.eval.batch_size, autocast,
                                      tick=part.update)
                seconds += time.perf_counter() - t0
                per[name][str(severity)] = fraction(flags)
    per_severity = {str(s): statistics.fmean(per[n][str(s)] for n in sets.names) for s in sets.severities}
    same = clean_flags if sets.positions is None else clean_flags[sets.positions]
    return {"per": per, "per_severity": per_severity, "mean": statistics.fmean(per_severity.values()),
            "n": n, "source": sets.source, "names": list(sets.names), "severities": list(sets.severities),
            "standard": tuple(sets.names) == STANDARD and tuple(sets.severities) == SEVERITIES,
            "clean_on_same_images": fraction(same), "seconds": seconds,
            "images_per_second": n * cells / seconds if seconds > 0 else None}


def generation_record(sets: CorruptedSets) -> dict[str, Any]:
    """How many corrupted images this evaluation generated (0: all read from the official set or the cache)."""
    return {"generated_images": sets.generated_images, "generation_seconds": sets.generation_seconds,
            "source": sets.source}


__all__ = ["corruption_record", "generation_record"]
