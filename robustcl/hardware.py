"""What this machine really offers: native bf16 or not, and how many cores this process may use.

`precision: auto` and `threads: auto` resolve here, once per run (docs/algorithm.md lists the
defaults). bf16 autocast pays only where the hardware computes bf16 natively: a CUDA device with
bf16 support, or a CPU with AVX512-BF16 or AMX. On an AVX2-only CPU oneDNN emulates bf16 and a
training step runs ~7x slower than in fp32 (measured on fmnist-gbrcl: 230 vs 33 images/s), so `auto`
picks fp32 there.
"""
from __future__ import annotations

import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class CpuCapability:
    """The CPU's vector ISA as torch dispatches it, and its native bf16 instructions."""
    isa: str               # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, DEFAULT, ...
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        """One word for reports: AMX, AVX512-BF16, AVX-512, AVX2 or torch's name for the ISA."""
        if self.amx:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512-BF16"
        return {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(self.isa, self.isa)


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, family, model and stepping (x86 /proc/cpuinfo): fp32 kernels, and so a run's
    last digits, can differ between CPU models that share an ISA, so results record which one computed them."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    ids = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                        ("stepping", "stepping")) if key in fields]
    return f"{name} ({', '.join(ids)})" if ids else name


def _torch_says(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


CAPABILITY_ENV = "ROBUSTCL_CPU_CAPABILITY"  # AVX2 | AVX-512 | AVX512-BF16 | AMX: overrides detection
_NAMED = {"AVX2": CpuCapability("AVX2", False, False), "AVX-512": CpuCapability("AVX512", False, False),
          "AVX512-BF16": CpuCapability("AVX512", True, False), "AMX": CpuCapability("AVX512", True, True)}


def cpu_capability() -> CpuCapability:
    """Read from what torch reports (its dispatch ISA, its bf16/AMX probes) and the kernel's CPU flags.

    The environment variable ROBUSTCL_CPU_CAPABILITY names a capability instead (the test suite sets
    AVX2 so that `auto` means fp32 on every CI machine; a user may set it to force a choice).
    """
    forced = os.environ.get(CAPABILITY_ENV)
    if forced:
        if forced not in _NAMED:
            raise ValueError(f"{CAPABILITY_ENV}={forced!r} is not one of {', '.join(_NAMED)}; unset it to detect")
        return _NAMED[forced]
    flags = _cpu_flags()
    return CpuCapability(
        isa=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=_torch_says("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        amx=_torch_says("_is_amx_tile_supported") or "amx_bf16" in flags,
    )


def native_bf16(device: torch.device) -> bool:
    """True where bf16 autocast runs on native instructions (CUDA with bf16 support, or an AVX512-BF16/AMX CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_capability().native_bf16
    return False


def device_description(device: torch.device) -> str:
    """The device for a report line: the CUDA device name, or the CPU's capability word."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_capability().describe()}"


def resolve_precision(requested: str, device: torch.device, where: str = "train.precision") -> str:
    """`auto` -> bf16 where native, else fp32; an explicit bf16 on an emulating device warns with its cost."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device):
        warnings.warn(f"{where}=bf16 on a {device_description(device)} without native bf16: it is emulated and a "
                      f"step runs several times slower than fp32 (~7x on an AVX2 CPU); use {where}=auto or fp32",
                      stacklevel=2)
    return requested


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max, v1 cpu.cfs_quota_us/period), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The cores this process may really use: its affinity mask, capped by a cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


# The fields of a /proc/stat cpu line that are work (user, nice, system, irq, softirq, steal: a hypervisor
# running another guest on this core counts as work, since our threads could not run either); idle and
# iowait are not, and guest time is already in user.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def busy_cpu_seconds(cpus: Collection[int], stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds spent working on `cpus` since boot, every process together (/proc/stat); None where it
    cannot be read (not Linux)."""
    wanted = {f"cpu{n}" for n in cpus}
    try:
        lines = stat.read_text().splitlines()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy, seen = 0, set()
    for line in lines:
        name, *fields = line.split()
        if name in wanted:
            busy += sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields))
            seen.add(name)
    return busy / ticks if seen == wanted else None  # a /proc/stat that numbers cores otherwise (LXCFS): unknown


class FreeCores:
    """How many of this process's cores other processes left idle since the last `sample()`: the cores of
    its affinity mask minus the work done on them that was not its own (`time.process_time`)."""

    def __init__(self, stat: Path = Path("/proc/stat"), cpus: Collection[int] | None = None,
                 wall: Callable[[], float] = time.monotonic, own: Callable[[], float] = time.process_time) -> None:
        if cpus is None:
            try:
                cpus = os.sched_getaffinity(0)
            except AttributeError:  # not on Linux
                cpus = range(os.cpu_count() or 1)
        self.cpus, self.stat, self.wall, self.own = sorted(cpus), stat, wall, own
        self.last = self._reading()

    def _reading(self) -> tuple[float, float | None, float]:
        return self.wall(), busy_cpu_seconds(self.cpus, self.stat), self.own()

    def sample(self) -> float | None:
        """Idle cores (0 to len(cpus)) averaged since the previous sample; None when /proc/stat is unreadable
        or no time has passed."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self.last, self._reading()
        self.last = (wall1, busy1, own1)
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
        return max(0.0, len(self.cpus) - others)


def threads_for(free_cores: float, limit: int) -> int:
    """Intra-op threads for `free_cores` idle cores: one per free core, rounded down unless within 0.4 of
    the next (a core another process keeps half busy is not free: its thread would stall the others at
    every barrier), at least 1 and at most `limit`."""
    return max(1, min(limit, math.floor(free_cores + 0.4)))


def local_ranks() -> int:
    """The torchrun ranks sharing this machine (LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def resolve_threads(requested: int | str | None) -> int | None:
    """`auto` -> usable cores divided among the local torchrun ranks (`local_ranks`); an int is kept."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return max(1, usable_cpus() // local_ranks())


__all__ = ["BUSY_FIELDS", "CAPABILITY_ENV", "PRECISION_CHOICES", "CpuCapability", "FreeCores", "busy_cpu_seconds",
           "cpu_capability", "device_description", "local_ranks", "native_bf16", "resolve_precision", "resolve_threads", "threads_for",
           "usable_cpus"]
