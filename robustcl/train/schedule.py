"""The authors' phase-1 learning-rate schedule (reference.schedule), step by step.

Their loop sets the learning rate *after* each optimiser step, from the step just taken, and the
cosine once per epoch, at the epoch's end; the optimiser starts at the full rate. With n steps per
epoch, E epochs, W warm-up epochs, base rate b and floor m, and epochs numbered from 1:
  cos(t)     = m + (b - m) (1 + cos(pi t / E)) / 2
  warm(e, i) = m + (i + (e - 1) n) / (W n) * (cos(W) - m)     (their warmup_lr)
the rate of global step s = (e - 1) n + i (0 <= i < n) is
  b               for s = 0 (the very first step runs at the full rate),
  cos(e - 1)      for i = 0, s > 0 (set at the end of epoch e - 1; during warm-up too, so each warm-up
                  epoch's first step runs at nearly the full rate),
  warm(e, i - 1)  for i > 0 while e < W (set after step i - 1; step 1 runs at the floor),
  cos(e - 1)      for i > 0 once e >= W (b in epoch 1): constant within the epoch.
For W <= 1 there is no warm-up at all (their test is `epoch < W`). E may be fractional (a run cut
by train.max_steps: E = total steps / n), so the cosine ends where the run ends, as robustcl's does.
"""
from __future__ import annotations

import math


def _cosine(base: float, floor: float, t: float, epochs: float) -> float:
    return floor + (base - floor) * (1 + math.cos(math.pi * t / epochs)) / 2


def reference_learning_rate(step: int, steps_per_epoch: int, epochs: float, warmup_epochs: float,
                            base: float, floor: float) -> float:
    """The learning rate the authors' loop uses for optimiser step `step` (0-based); see the module docstring."""
    if step < 0 or steps_per_epoch < 1 or epochs <= 0:
        raise ValueError(f"need step >= 0, steps_per_epoch >= 1, epochs > 0; got {step}, {steps_per_epoch}, {epochs}")
    done, i = divmod(step, steps_per_epoch)  # epochs completed before this step, index within the epoch
    epoch = done + 1                         # the authors' 1-based epoch
    if step == 0:
        return base
    if i == 0:
        return _cosine(base, floor, done, epochs)
    if epoch < warmup_epochs:
        end = _cosine(base, floor, warmup_epochs, epochs)
        progress = (i - 1 + (epoch - 1) * steps_per_epoch) / (warmup_epochs * steps_per_epoch)
        return floor + progress * (end - floor)
    return base if done == 0 else _cosine(base, floor, done, epochs)
