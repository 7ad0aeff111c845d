"""How a sweep's runs are launched: LaunchSettings (`robustcl sweep --jobs/--shard/--launcher/--slurm-*`, parsed in
robustcl/cli/sweep.py) and shards (`--shard i/n`).

A shard is every n-th run of the plan's order starting at i, so any scheduler can run shard 0..n-1 of the same
spec. 
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

from robustcl.config import ConfigError

SHARD_RE = re.compile(r"^(\d+)/(\d+)$")
LAUNCHERS = ("local", "submitit")
SUBMITIT_CLUSTERS = ("slurm", "local")
RunT = TypeVar("RunT")  # a planned run (robustcl/sweep/plan.py): shards only count positions


@dataclass(frozen=True)
class LaunchSettings:
    """How a sweep's runs are executed: worker count, this process's shard, the launcher and its cluster options."""
    jobs: int = 1
    shard: tuple[int, int] | None = None     # (i, n): runs k with k % n == i
    launcher: str = "local"                  # local processes, or submitit (SLURM)
    cluster: str = "slurm"                   # submitit only: slurm, or local (submitit's LocalExecutor, one machine)
    partition: str | None = None             # SLURM partition
    time_min: int | None = None              # job time limit in minutes
    gpus: int | None = None                  # GPUs per job
    cpus: int | None = None                  # CPUs per job (also each job's torch thread cap)

    def validate(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"sweep --jobs {self.jobs} must be >= 1")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"sweep --launcher {self.launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if self.cluster not in SUBMITIT_CLUSTERS:
            raise ConfigError(f"sweep --submitit-cluster {self.cluster!r} must be one of {', '.join(SUBMITIT_CLUSTERS)}")
        for flag, value in (("--slurm-time", self.time_min), ("--slurm-gpus", self.gpus), ("--slurm-cpus", self.cpus)):
            if value is not None and value < (0 if flag == "--slurm-gpus" else 1):
                raise ConfigError(f"sweep {flag} {value} must be {'>= 0' if flag == '--slurm-gpus' else '>= 1'}")
        slurm_only = {"--slurm-partition": self.partition, "--slurm-time": self.time_min, "--slurm-gpus": self.gpus,
                      "--slurm-cpus": self.cpus}
        given = [flag for flag, value in slurm_only.items() if value is not None]
        if given and self.launcher != "submitit":
            raise ConfigError(f"sweep {given[0]} applies to --launcher submitit only; add it or drop {given[0]}")

    @property
    def serial(self) -> bool:
        """True for the default: every run in this process, one after another."""
        return self.jobs == 1 and self.launcher == "local"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; a one-line ConfigError otherwise."""
    match = SHARD_RE.match(text.strip())
    if not match:
        raise ConfigError(f"sweep --shard {text!r} must look like i/n, e.g. 0/4 (shards 0..n-1 of n)")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or i >= n:
        raise ConfigError(f"sweep --shard {text}: need n >= 1 and 0 <= i < n (shards are numbered 0..{max(n, 1) - 1})")
    return i, n


def shard_runs(runs: Sequence[RunT], shard: tuple[int, int] | None) -> list[RunT]:
    """The runs of one shard: positions k of the plan with k % n == i (every run is in exactly one shard)."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]


__all__ = ["LAUNCHERS", "SUBMITIT_CLUSTERS", "LaunchSettings", "parse_shard", "shard_runs"]
