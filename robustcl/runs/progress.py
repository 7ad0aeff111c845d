"""Progress of a long command, part by part: a tqdm bar on a terminal, one line per part when stderr is not a
terminal, nothing when quiet; each finished part is also a record of the run's metrics.jsonl, quiet or not.
Training loops use `StepBar`: the same bar on a terminal, a line a minute (and one at the end) elsewhere.

A part counts images: its code calls `update(n)` after each batch of n. `Progress("evaluate", show, run)` is
made once per command and handed down; `scoped(protocol="slf")` names the parts of one model ("slf/clean").
A part with nothing to do (total 0) says nothing and records nothing. Reporting never touches an RNG, so the
numbers a part computes are the same with or without it.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

import torch
from tqdm import tqdm

from robustcl.runs.rundir import RunDir

Tick = Callable[[int], None]  # called with the number of images just done
PHASE = "progress"            # metrics.jsonl's phase of a part record


def on_terminal(stream: IO[str]) -> bool:
    """True when `stream` is a terminal (a closed stream or one without isatty is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Part:
    """One part under way: `update(n)` after each batch of n images moves its bar and its count."""

    def __init__(self, total: int, bar: Any = None) -> None:
        self.total, self.bar, self.done = total, bar, 0

    def update(self, n: int) -> None:
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(int(n))


class Progress:
    """Where the parts of one command report: `part(name, total)` gives a bar, a line or nothing (`show` off)."""

    def __init__(self, command: str, show: bool = False, run: RunDir | None = None, stream: IO[str] | None = None,
                 **labels: str) -> None:
        self.command, self.show, self.run, self.stream, self.labels = command, show, run, stream, labels

    def scoped(self, **labels: str) -> Progress:
        """The same reporter with more labels (e.g. protocol="slf"), which prefix each part's title."""
        return Progress(self.command, self.show, self.run, self.stream, **{**self.labels, **labels})

    def title(self, name: str) -> str:
        """A part's name with the labels before it: "slf/pgd20-linf-0.031"."""
        return "/".join([*self.labels.values(), name])

    def _stream(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr  # looked up late: a redirected stderr counts

    @contextmanager
    def part(self, name: str, total: int) -> Iterator[Part]:
        """One part of `total` images: a bar while it runs on a terminal; at its end (an exception ends it
        silently) a line elsewhere and, with a run, a metrics.jsonl record. A finished part did all its images."""
        stream = self._stream()
        bar = None
        if self.show and total > 0 and on_terminal(stream):
            bar = tqdm(total=total, desc=f"{self.command} {self.title(name)}", unit="img", file=stream,
                       dynamic_ncols=True, mininterval=1.0)
        part, t0 = Part(total, bar), time.perf_counter()
        try:
            yield part
            if part.done < total:  # a part that could not count as it went (one call for all its images)
                part.update(total - part.done)
        finally:
            if bar is not None:
                bar.close()
        if part.done > 0:
            self._report(name, part.done, time.perf_counter() - t0, line=self.show and bar is None)

    def _report(self, name: str, images: int, seconds: float, line: bool) -> None:
        """The finished part as a line on stderr (when `line`) and a record in the run's metrics.jsonl."""
        rate = images / seconds if seconds > 0 else 0.0
        if line:
            noun = "image" if images == 1 else "images"
            self.say(f"robustcl {self.command} {self.title(name)}: {images} {noun} in {seconds:.1f} s "
                     f"({rate:.1f} img/s)")
        if self.run is not None:
            self.run.log({"phase": PHASE, "command": self.command, **self.labels, "part": name, "images": images,
                          "seconds": round(seconds, 4), "images_per_s": round(rate, 2),
                          "threads": torch.get_num_threads()})

    def say(self, line: str) -> None:
        """One line on stderr, unless quiet (a phase of a flow, a finished part)."""
        if self.show:
            print(line, file=self._stream(), flush=True)


class StepBar:
    """A training loop's progress (tqdm's update / set_postfix / close): a bar on a terminal; on a stderr that is not
    one (a log file, a batch job's output) a line every `every` seconds and one at the end, never a carriage
    return; nothing when `show` is off."""

    def __init__(self, total: int, desc: str, show: bool, initial: int = 0, unit: str = "step", every: float = 60.0,
                 stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.done = self.start = initial
        self.postfix: dict[str, str] = {}
        self.bar = (tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True, mininterval=1.0)
                    if show and on_terminal(self.stream) else None)
        self.lines = show and self.bar is None
        self.t0 = self.said = clock()
        self.said_at, self.news = initial, False  # the count the last line showed; postfix set since then

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.clock() - self.said >= self.every:
            self._line()

    def set_postfix(self, values: dict[str, str] | None = None, refresh: bool = False, **more: str) -> None:
        self.postfix, self.news = {**(values or {}), **more}, True
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=refresh)

    def close(self) -> None:
        """The bar closed, or the last line (when a step was done or a value set since the last one)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.done > self.start and (self.done > self.said_at or self.news):
            self._line()
        self.lines = False

    def _line(self) -> None:
        now = self.clock()
        rate = (self.done - self.start) / (now - self.t0) if now > self.t0 else 0.0
        left = f", ETA {_clock_time((self.total - self.done) / rate)}" if 0 < rate and self.done < self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        percent = 100 * self.done / self.total if self.total else 100.0
        pace = f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.2f} {self.unit}/s"  # as tqdm shows it
        print(f"robustcl {self.desc}: {self.done}/{self.total} {self.unit}s ({percent:.0f}%), {pace}{left}{extra}",
              file=self.stream, flush=True)
        self.said, self.said_at, self.news = now, self.done, False


def _clock_time(seconds: float) -> str:
    """1:02:03 / 2:03 (what tqdm shows)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


SILENT = Progress("", show=False)  # no bar, no line, no record: for callers without a command or a run

__all__ = ["PHASE", "SILENT", "Part", "Progress", "StepBar", "Tick", "on_terminal"]
