"""Procedural frost: the stand-in for the six frost photographs that make_cifar_c.py reads from disk.

make_cifar_c.py draws one of the photos frost1.png .. frost5.jpg (`np.random.randint(5)`: frost6.jpg is
never drawn), shrinks it to a fifth, cuts a random 32x32 window and blends it: clip(a * image + b * frost).
The photos ship with github.com/hendrycks/robustness and not with robustcl, so generated sets use five
textures made here instead, each fixed by its own seed (like the photos, they do not depend on the
corruption seed; only the window does). A texture is a faint diamond-square haze plus a few hundred
anti-aliased ice needles with side branches, tinted blue-white, mean about 0.5. It looks like frost but is
NOT calibrated against the photos: frost accuracy on a generated set is not comparable with CIFAR-10-C's
frost column (the official sets, when found, hold the real frost).
"""
from __future__ import annotations

import functools

import numpy as np

from .filters import gaussian_2d, plasma_fractal

TEXTURES = 5                 # frost1 .. frost5: the ones make_cifar_c.py's randint(5) can draw
TEXTURE_SEED = 20190109      # the five textures come from TEXTURE_SEED + k (the CIFAR-10-C record's date)
TEXTURE_SIZE = 192           # pixels a side; the photos are about 150-300 px after the script's 0.2 resize
NEEDLES = 420
TINT = np.array([0.84, 0.92, 1.0])  # blue-white


def _splat(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, value: np.ndarray) -> None:
    """Add `value` at float positions, spread bilinearly over the four nearest pixels (wrapping around)."""
    size = canvas.shape[0]
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    ty, tx = ys - y0, xs - x0
    for dy, wy in ((0, 1 - ty), (1, ty)):
        for dx, wx in ((0, 1 - tx), (1, tx)):
            np.add.at(canvas, ((y0 + dy) % size, (x0 + dx) % size), value * wy * wx)


def _needle(canvas: np.ndarray, rng: np.random.Generator, y: float, x: float, angle: float, length: float,
            value: float, depth: int) -> None:
    """One straight needle from (y, x), sampled every half pixel, with up to three side branches at +-60 deg."""
    t = np.arange(0, length, 0.5)
    _splat(canvas, y + t * np.sin(angle), x + t * np.cos(angle), np.full(t.shape, value))
    if depth == 0:
        return
    for _ in range(rng.integers(0, 4)):
        at = rng.uniform(0.2, 0.9) * length
        turn = np.pi / 3 * rng.choice([-1.0, 1.0])
        _needle(canvas, rng, y + at * np.sin(angle), x + at * np.cos(angle), angle + turn,
                length * rng.uniform(0.2, 0.45), value * 0.8, depth - 1)


@functools.lru_cache(maxsize=TEXTURES)
def frost_texture(k: int) -> np.ndarray:
    """Texture k (0..4): (TEXTURE_SIZE, TEXTURE_SIZE, 3) float in [0, 1], the same on every machine."""
    rng = np.random.default_rng(TEXTURE_SEED + k)
    canvas = np.zeros((TEXTURE_SIZE, TEXTURE_SIZE))
    for _ in range(NEEDLES):
        _needle(canvas, rng, rng.uniform(0, TEXTURE_SIZE), rng.uniform(0, TEXTURE_SIZE), rng.uniform(0, 2 * np.pi),
                rng.uniform(4, 28), rng.uniform(0.35, 0.9), depth=2)
    crystals = 1 - np.exp(-1.6 * gaussian_2d(canvas[None], 0.6, mode="reflect")[0])
    haze = plasma_fractal(rng, 256, 2.0)[:TEXTURE_SIZE, :TEXTURE_SIZE]
    grain = rng.uniform(0, 0.08, canvas.shape)
    level = np.clip(0.22 + 0.25 * haze + 0.75 * crystals + grain, 0, 1)
    return np.clip(level[..., None] * TINT, 0, 1)
