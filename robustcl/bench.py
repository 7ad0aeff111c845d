"""The measurement behind `robustcl bench` (what is measured, in which order, and the JSON keys:
`robustcl bench --help`, written in robustcl/cli/tools.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


from robustcl.config import Config, ConfigError, load_config
from robustcl.hardware import cpu_capability, native_bf16, resolve_threads

if TYPE_CHECKING:
    from robustcl.data import DatasetInfo

SCHEMA = "robustcl.bench/1"
PHASE_PREFIX = "robustcl::"
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Keys of each entry of the report's "results" list (documented in `robustcl bench --help`).
RESULT_KEYS = ("config", "method", "batch", "precision", "channels_last", "compiled", "compile_error",
               "compile_s", "steps", "warmup", "step_s", "step_s_median", "images_per_s", "images_per_s_min",
               "images_per_s_max", "gflop_per_image", "achieved_gflops", "gemm_peak_gflops", "native_precision", "fraction_of_peak",
               "phases_s", "phase_fractions", "gflop_per_image_by_phase", "phase_gflops", "profiled_step_s",
               "phase_timing", "peak_memory_mib", "memory_kind")


# ------------------------------------------------------------------------------------------ FLOPs
class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every op in torch's flop registry (mm, conv, ...), forward and backward.

    Dispatch level only (no module hooks), so it works through `autograd.grad` on inputs. Each op's
    FLOPs also go to the innermost phase on `phases` (a stack the caller maintains), else to "other".
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.phases: list[str] = []
        self.by_phase: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:  # called as FlopCounterMode calls it (torch 2.13 and 2.15): raw arguments
            # and out_val; each formula reduces them to shapes itself unless registered with get_raw=True
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            self.total += flops
            self.by_phase[self.phases[-1] if self.phases else "other"] += flops
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` dispatches (forward, backward, optimiser), by torch's formulas."""
    counter = FlopCount()
    with counter:
        fn()
    return int(counter.total)


def count_flops_by_phase(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of `fn()` per innermost robustcl::<phase> range ("other": outside every range)."""
    counter = FlopCount()
    with phase_hooks(counter.phases.append, lambda name: counter.phases.pop()), counter:
        fn()
    return dict(counter.by_phase)


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n torch.mm in `dtype` on `device` (the yardstick for the step)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------------ phase times
Interval = tuple[str, float, float]  # (phase name, start s, end s)


def exclusive_phase_times(intervals: Sequence[Interval]) -> dict[str, float]:
    """Seconds per phase with each range's nested phase ranges subtracted from it (ranges nest properly)."""
    totals: dict[str, float] = defaultdict(float)
    stack: list[Interval] = []
    for name, start, end in sorted(intervals, key=lambda r: (r[1], -r[2])):
        while stack and stack[-1][2] <= start:
            stack.pop()
        totals[name] += end - start
        if stack:
            totals[stack[-1][0]] -= end - start
        stack.append((name, start, end))
    return dict(totals)


def profiler_intervals(events: Sequence[Any]) -> list[Interval]:
    """The robustcl::<phase> ranges of a torch.profiler run as (phase, start s, end s)."""
    return [(e.name[len(PHASE_PREFIX):], e.time_range.start / 1e6, e.time_range.end / 1e6)
            for e in events if e.name.startswith(PHASE_PREFIX) and e.device_type == torch.autograd.DeviceType.CPU]


@contextlib.contextmanager
def phase_hooks(on_enter: Callable[[str], Any], on_exit: Callable[[str], Any]) -> Iterator[None]:
    """Inside the block, on_enter(phase) / on_exit(phase) run at the start / end of every robustcl::<phase> range.

    methods/step.py `phase` looks `torch.profiler.record_function` up at each call, so swapping that
    attribute for a subclass reaches every range; the original is restored on exit.
    """
    base = torch.autograd.profiler.record_function

    class HookedRange(base):  # type: ignore[misc, valid-type]
        def __enter__(self) -> Any:
            if self.name.startswith(PHASE_PREFIX):
                on_enter(self.name[len(PHASE_PREFIX):])
            return super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            out = super().__exit__(*exc)
            if self.name.startswith(PHASE_PREFIX):
                on_exit(self.name[len(PHASE_PREFIX):])
            return out

    saved = torch.profiler.record_function
    torch.profiler.record_function = HookedRange  # type: ignore[misc]
    try:
        yield
    finally:
        torch.profiler.record_function = saved  # type: ignore[misc]


@contextlib.contextmanager
def synced_phase_ranges(device: torch.device, log: list[Interval]) -> Iterator[None]:
    """Inside the block, every robustcl::<phase> range syncs `device` at entry and exit and logs its wall time."""
    starts: list[float] = []

    def enter(name: str) -> None:
        _sync(device)
        starts.append(time.perf_counter())

    def leave(name: str) -> None:
        _sync(device)
        log.append((name, starts.pop(), time.perf_counter()))

    with phase_hooks(enter, leave):
        yield


def measure_phases(step: Callable[[], Any], device: torch.device, steps: int,
                   mode: str) -> tuple[dict[str, float], float]:
    """(seconds per phase per step incl. "other", wall seconds per step) over `steps` profiled steps."""
    walls: list[float] = []

    def run() -> None:
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            walls.append(time.perf_counter() - t0)

    if mode == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        intervals = profiler_intervals(prof.events())
    else:
        intervals = []
        with synced_phase_ranges(device, intervals):
            run()
    wall = sum(walls) / steps
    phases = {name: total / steps for name, total in exclusive_phase_times(intervals).items()}
    phases["other"] = wall - sum(phases.values())
    return phases, wall


# ------------------------------------------------------------------------------------- the step
@dataclass
class StepSetup:
    """A ready-to-run phase-1 step: `method.training_step(images, ctx)`."""
    method: Any
    ctx: Any
    images: torch.Tensor

    def step(self) -> Any:
        """One phase-1 optimisation step on the fixed batch."""
        return self.method.training_step(self.images, self.ctx)


def step_info(cfg: Config) -> DatasetInfo:
    """The shape and normalisation of cfg's images without reading the dataset (synthetic options, then
    data.options, as the trainer passes them).

    A dataset whose info needs its files (imagefolder: class count and mean/std are measured on them) gets
    a stand-in of the configured size and channels, mean 0.5 and std 0.25 per channel: the cost of a step
    does not depend on those values.
    """
    from robustcl.data import DataError, DatasetInfo, dataset_info, dataset_options
    from robustcl.methods.factory import image_side

    d = cfg.data
    options = d.reader_options()
    try:
        return dataset_info(d.name, **options)
    except DataError:
        channels = dataset_options(d.name, options).get("channels")
        if not isinstance(channels, int) or isinstance(channels, bool):
            raise
        side = image_side(cfg)
        return DatasetInfo(d.name, 2, channels, side, side, (0.5,) * channels, (0.25,) * channels)


def build_step(cfg: Config, device: torch.device) -> StepSetup:
    """Method, optimisers, SAM and StepContext as Pretrainer builds them (`build_training`), on a random uint8 batch.

    The dataset is not read: its shape and normalisation come from `step_info`.
    """
    from robustcl.methods.factory import build_training

    info = step_info(cfg)
    training = build_training(cfg, info, device)
    images = torch.randint(0, 256, (cfg.train.batch_size, info.channels, info.height, info.width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    return StepSetup(training.method, training.ctx, images)


def compile_step(setup: StepSetup, backend: str) -> None:
    """torch.compile the encoder and projection head in place (compilation happens at the next step).

    One step calls them in ~8 variants (train/eval, BN branch, batch B or 2B, SAM's frozen BN), each its
    own graph: the recompile limit is raised so none silently falls back to eager.
    """
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    setup.method.encoder.compile(backend=backend)
    setup.method.projector.compile(backend=backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """`Outer: message (Cause: message)` on one line: compile errors wrap the real cause (`raise ... from`)."""
    def first(e: BaseException) -> str:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}".rstrip(": ")
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = first(exc) if root is exc else f"{first(exc)} ({first(root)})"
    return text[:limit]


def _peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it is): CUDA max_memory_allocated since the last reset (the timed steps), or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda max_memory_allocated over the timed steps"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "process peak RSS (ru_maxrss, whole run so far)"


# ------------------------------------------------------------------------------------ the bench
@dataclass
class BenchOptions:
    """What to measure; see `robustcl bench --help`."""
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] | None = None   # None: each config's train.batch_size
    precisions: tuple[str, ...] | None = None    # None: each config's train.precision
    channels_last: bool | None = None            # None: each config's train.channels_last
    compile: bool = False
    compile_backend: str = "inductor"
    steps: int = 5
    warmup: int = 2
    profile_steps: int = 1
    threads: int | None = None
    device: str | None = None                    # None: each config's train.device
    gemm_size: int | None = None                 # None: 2048 on CPU, 8192 on CUDA
    phase_timing: str = "auto"                   # auto: profiler on CPU, synced on CUDA

    def validate(self) -> None:
        """One-line ConfigError for a value the bench cannot run with."""
        if not self.configs:
            raise ConfigError("bench needs --config NAME|PATH (see `robustcl configs`)")
        for b in self.batch_sizes or ():
            if b < 2:
                raise ConfigError(f"--batch-size {b} must be >= 2 (a contrastive batch needs negatives)")
        for p in self.precisions or ():
            if p not in PRECISIONS:
                raise ConfigError(f"--precision {p!r} is not one of {', '.join(PRECISIONS)}")
        checks = (("--steps", self.steps, 1), ("--warmup", self.warmup, 0), ("--profile-steps", self.profile_steps, 1))
        for flag, value, low in checks:
            if value < low:
                raise ConfigError(f"{flag} {value} must be >= {low}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} must be >= 1")
        if self.gemm_size is not None and self.gemm_size < 16:
            raise ConfigError(f"--gemm-size {self.gemm_size} must be >= 16")
        if self.phase_timing not in ("auto", "profiler", "synced"):
            raise ConfigError(f"--phase-timing {self.phase_timing!r} must be auto, profiler or synced")
        if self.device is not None and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r} must be cpu, cuda or cuda:N")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device} but torch sees no CUDA device; use --device cpu")


def plan_cases(opts: BenchOptions) -> list[tuple[str, Config]]:
    """Every (config, batch, precision) case as (config name, validated Config); bad input fails here, before any work."""
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with

    cases = []
    for name in opts.configs:
        base = load_config(name, [*opts.overrides, "diagnostics.every=0"])
        extra = [f"train.device={opts.device}"] if opts.device else []
        if opts.channels_last is not None:
            extra.append(f"train.channels_last={str(opts.channels_last).lower()}")
        for b in opts.batch_sizes or (base.train.batch_size,):
            for p in opts.precisions or (base.train.precision,):
                cases.append((name, load_config(name, [*opts.overrides, "diagnostics.every=0", *extra,
                                                       f"train.batch_size={b}", f"train.precision={p}"])))
    return cases


def bench_case(cfg: Config, config_name: str, opts: BenchOptions, device: torch.device,
               flops_cache: dict[tuple[str, int], dict[str, int]], log: Callable[[str], None]) -> dict[str, Any]:
    """Measure one case (see the module docstring for what and in which order).

    The GEMM peak is the best of a torch.mm run just before and just after the timed steps, so a
    shared machine's load changes both numbers alike.
    """
    from robustcl.runtime import resolve_runtime

    cfg = resolve_runtime(cfg, device)  # precision auto -> what this device runs natively
    t = cfg.train
    native = t.precision == "fp32" or native_bf16(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    setup = build_step(cfg, device)
    key = (config_name, t.batch_size)
    if key not in flops_cache:  # one eager step, counted: the FLOPs do not depend on precision or layout
        flops_cache[key] = count_flops_by_phase(setup.step)
    compiled, compile_error, compile_s = False, None, None
    if opts.compile:
        setup, compile_error, compile_s = compiled_step(setup, cfg, device, opts.compile_backend, log)
        compiled = compile_error is None
    for _ in range(opts.warmup):
        setup.step()
    gemm_n = opts.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm_before = gemm_peak_gflops(DTYPES[t.precision], device, gemm_n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed steps, not of the GEMM buffers
    times = []
    for _ in range(opts.steps):
        _sync(device)
        t0 = time.perf_counter()
        setup.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    memory, memory_kind = _peak_memory(device)
    gemm_peak = max(gemm_before, gemm_peak_gflops(DTYPES[t.precision], device, gemm_n))
    mode = opts.phase_timing if opts.phase_timing != "auto" else ("synced" if device.type == "cuda" else "profiler")
    phases, profiled_wall = measure_phases(setup.step, device, opts.profile_steps, mode)
    return {
        "config": config_name, "method": cfg.method.name, "batch": t.batch_size, "precision": t.precision,
        "channels_last": t.channels_last, "compiled": compiled, "compile_error": compile_error,
        "compile_s": compile_s, "steps": opts.steps, "warmup": opts.warmup, "step_s": times,
        **throughput(times, t.batch_size, flops_cache[key], gemm_peak, native, phases, profiled_wall),
        "phase_timing": mode, "peak_memory_mib": memory, "memory_kind": memory_kind,
    }


def compiled_step(setup: Any, cfg: Config, device: torch.device, backend: str, log: Callable[[str], None]
                  ) -> tuple[Any, str | None, float | None]:
    """The step compiled with `backend` and run once (setup, None, seconds to the first compiled step); when
    compiling fails, a fresh eager step (setup, the error in one line, None), said through `log`."""
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        compile_step(setup, backend)
        setup.step()
        _sync(device)
        return setup, None, time.perf_counter() - t0
    except Exception as exc:  # no compiler, unsupported op, ...: report and measure eager instead
        error = _one_line(exc)
        log(f"robustcl bench: torch.compile failed ({error}); measuring without it")
        torch._dynamo.reset()
        return build_step(cfg, device), error, None


def throughput(times: list[float], b: int, flops: dict[str, int], gemm_peak: float, native: bool,
               phases: dict[str, float], profiled_wall: float) -> dict[str, Any]:
    """images/s (median, min, max), FLOPs per image and achieved, the fraction of the GEMM peak, and the
    phase split as fractions and GFLOP/s: one case's derived figures."""
    median = statistics.median(times)
    flops_per_image = sum(flops.values()) / b
    achieved = flops_per_image * b / median / 1e9
    return {
        "step_s_median": median, "images_per_s": b / median, "images_per_s_min": b / max(times),
        "images_per_s_max": b / min(times), "gflop_per_image": flops_per_image / 1e9,
        "achieved_gflops": achieved, "gemm_peak_gflops": gemm_peak, "native_precision": native,
        # an emulated precision's GEMM "peak" is no ceiling (the step's convolutions may run faster than it): None
        "fraction_of_peak": achieved / gemm_peak if native else None,
        "phases_s": phases, "phase_fractions": {k: v / profiled_wall for k, v in phases.items()},
        "gflop_per_image_by_phase": {k: v / b / 1e9 for k, v in flops.items()},
        "phase_gflops": {k: flops[k] / v / 1e9 for k, v in phases.items() if k in flops and v > 0},
        "profiled_step_s": profiled_wall,
    }


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """All cases of `opts`; returns the report (schema robustcl.bench/1, one entry per case in "results")."""
    from robustcl.runtime import resolve_device

    opts.validate()
    cases = plan_cases(opts)
    try:
        devices = [resolve_device(cfg.train.device) for _, cfg in cases]
    except RuntimeError as exc:  # train.device=cuda in a config, but no CUDA here
        raise ConfigError(str(exc)) from None
    threads = opts.threads or resolve_threads(cases[0][1].train.threads)
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    flops_cache: dict[tuple[str, int], dict[str, int]] = {}
    results = []
    for (name, cfg), device in zip(cases, devices):
        log(f"robustcl bench: {name} batch {cfg.train.batch_size} {cfg.train.precision}"
            f"{' channels-last' if cfg.train.channels_last else ''}{' compile' if opts.compile else ''} on {device}")
        results.append(bench_case(cfg, name, opts, device, flops_cache, log))
    cpu = cpu_capability()
    return {
        "schema": SCHEMA, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": cpu.describe(), "cpu_native_bf16": cpu.native_bf16,
        "flop_counter": "dispatch-level, torch.utils.flop_counter formulas (FlopCounterMode fails under autograd.grad)",
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "options": dataclasses.asdict(opts), "results": results,
    }


# ------------------------------------------------------------------------------------- output
def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables: throughput/FLOPs/memory per case, the phase split of the step, FLOPs by phase."""
    rows = ["config                      batch  prec  CL  compile  images/s (min-max)     GFLOP/img  GFLOP/s  "
            "of GEMM peak      memory MiB"]
    for r in report["results"]:
        compiled = "yes" if r["compiled"] else ("FAILED" if r["compile_error"] else "no")
        spread = f"{r['images_per_s']:.2f} ({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f})"
        peak = (f"{r['fraction_of_peak']:.2f} of {r['gemm_peak_gflops']:.0f}" if r.get("native_precision", True)
                else f"emulated ({r['gemm_peak_gflops']:.1f})")
        rows.append(f"{r['config']:27.27s} {r['batch']:5d}  {r['precision']:4s}  {'y' if r['channels_last'] else 'n':2s}  "
                    f"{compiled:7s}  {spread:21s}  {r['gflop_per_image']:9.3f}  {r['achieved_gflops']:7.1f}  "
                    f"{peak:16s}  {r['peak_memory_mib']:8.0f}")
    phases = list(dict.fromkeys(k for r in report["results"] for k in r["phases_s"] if k != "other")) + ["other"]
    rows += ["", "phase split (separate profiled pass; seconds per step and share of that step's wall time)",
             "config                      batch  prec  step s   " + "  ".join(f"{p:>18s}" for p in phases)]
    for r in report["results"]:
        cells = [f"{r['phases_s'][p]:8.3f} ({100 * r['phase_fractions'][p]:4.1f}%)" if p in r["phases_s"] else "-"
                 for p in phases]  # "-": the method has no such phase
        rows.append(f"{r['config']:27.27s} {r['batch']:5d}  {r['precision']:4s}  {r['profiled_step_s']:7.3f}  "
                    + "  ".join(f"{c:>18s}" for c in cells))
    rows += ["", "FLOPs by phase (GFLOP per image, and GFLOP/s: the phase's FLOPs over its profiled time)",
             "config                      batch  prec           " + "  ".join(f"{p:>18s}" for p in phases)]
    for r in report["results"]:
        per_image, rate = r["gflop_per_image_by_phase"], r["phase_gflops"]
        cells = [f"{per_image[p]:6.2f} {rate[p]:8.1f}/s" if p in rate else "-" for p in phases]
        rows.append(f"{r['config']:27.27s} {r['batch']:5d}  {r['precision']:4s}           "
                    + "  ".join(f"{c:>18s}" for c in cells))
    memory_kinds = sorted({r["memory_kind"] for r in report["results"]})
    rows += ["", f"CPU capability {report.get('cpu_capability', '?')} (bf16 "
             f"{'native' if report.get('cpu_native_bf16') else 'emulated: its GEMM peak is shown as emulated, not a ceiling'}"
             f"); cuda device {report.get('cuda_device')}"]
    rows += [f"threads {report['threads']}, torch {report['torch']}, FLOPs: {report['flop_counter']}; "
             f"memory: {'; '.join(memory_kinds)}; load average before {report['loadavg_before'][0]:.2f}, "
             f"after {report['loadavg_after'][0]:.2f}"]
    return "\n".join(rows)
