"""The 19 corruptions of CIFAR-10-C with make_cifar_c.py's constants (github.com/hendrycks/robustness,
ImageNet-C/create_c/make_cifar_c.py; Hendrycks & Dietterich 2019), written anew in numpy and Pillow.

Each op takes a batch (N, H, W, C) of floats in [0, 1] (C = 1 or 3), a severity 1..5 and one random
generator per image, and returns the corrupted batch in [0, 1]; `corrupt` (in __init__) quantises it to
uint8 by truncation, as the script's `np.uint8(...)` does. Constants given in pixels for 32x32 images
(IMSIZE, the 32 of glass blur's loop, pixelate's 32 * c, the crop windows) follow the image's own size;
blur sigmas, noise levels and kernel radii stay in CIFAR's pixels. One-channel images: see `corrupt`.
Where an op departs from the script its docstring says so; docs/corruptions.md lists every departure.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from .filters import (affine_from_points, bilinear, clipped_zoom, disk_kernel, filter2d, gaussian, gaussian_2d,
                      hsv_to_rgb, luminance, motion_blur_one, plasma_fractal, rgb_to_hsv, warp_affine)
from .frost import TEXTURES, frost_texture

Rngs = list[np.random.Generator]
Op = Callable[[np.ndarray, int, Rngs], np.ndarray]


def _each(rngs: Rngs, draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Per-image random draws, stacked: image k's randomness comes from its own generator only."""
    return np.stack([draw(r) for r in rngs])


def gaussian_noise(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: gaussian_noise c = [0.04, 0.06, .08, .09, .10]; x + N(0, c^2) per pixel and channel."""
    c = [0.04, 0.06, .08, .09, .10][severity - 1]
    return np.clip(x + _each(rngs, lambda r: r.normal(0, c, x.shape[1:])), 0, 1)


def shot_noise(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: shot_noise c = [500, 250, 100, 75, 50]; Poisson(x c) / c."""
    c = [500, 250, 100, 75, 50][severity - 1]
    return np.clip(np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / c, 0, 1)


def impulse_noise(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: impulse_noise c = [.01, .02, .03, .05, .07]; skimage's random_noise(mode='s&p',
    amount=c): each pixel and channel flipped with probability c, to 1 or 0 with even odds."""
    c = [.01, .02, .03, .05, .07][severity - 1]
    flipped = _each(rngs, lambda r: r.random(x.shape[1:]) < c)
    salted = _each(rngs, lambda r: r.random(x.shape[1:]) < 0.5)
    return np.where(flipped, np.where(salted, 1.0, 0.0), x)


def speckle_noise(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: speckle_noise c = [.06, .1, .12, .16, .2]; x + x N(0, c^2)."""
    c = [.06, .1, .12, .16, .2][severity - 1]
    return np.clip(x + x * _each(rngs, lambda r: r.normal(0, c, x.shape[1:])), 0, 1)


def gaussian_blur(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: gaussian_blur c = [.4, .6, 0.7, .8, 1]; skimage's gaussian (edges repeated, 4 sigma)."""
    c = [.4, .6, 0.7, .8, 1][severity - 1]
    return np.clip(gaussian(x, c), 0, 1)


def glass_blur(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: glass_blur c = [(0.05,1,1), (0.25,1,1), (0.4,1,1), (0.25,1,2), (0.4,1,2)] (sigma,
    max_delta, iterations). Blur, truncate to uint8, `iterations` passes of the script's local "swap", blur.

    The script walks h, w from size-1 down to 2 and writes `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on an
    (H, W, 3) array with (dy, dx) from randint(-1, 1), i.e. in {-1, 0}. Those are numpy views, so the line
    copies x[h', w'] into x[h, w] and leaves x[h', w'] as it was; and since (h', w') is never visited
    before (h, w), one pass is exactly "each pixel of rows and columns 2..size-1 takes the pre-pass value
    of itself or its up / left / up-left neighbour", which is what this does, vectorised (max_delta 1)."""
    sigma, delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][severity - 1]
    y = np.floor(gaussian(x, sigma) * 255 + 1e-6) / 255
    n, h, w = x.shape[:3]
    rows, cols = np.arange(delta + 1, h - delta + 1), np.arange(delta + 1, w - delta + 1)
    for it in range(iterations):
        step = _each(rngs, lambda r: r.integers(-delta, delta, size=(len(rows), len(cols), 2)))
        src_r = rows[None, :, None] + step[..., 0]
        src_c = cols[None, None, :] + step[..., 1]
        y[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = y[np.arange(n)[:, None, None], src_r, src_c]
    return np.clip(gaussian(y, sigma), 0, 1)


def defocus_blur(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: defocus_blur c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]
    (disk radius, alias blur); cv2.filter2D with the anti-aliased disk, borders mirrored (REFLECT_101)."""
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    return np.clip(filter2d(x, disk_kernel(radius, alias)), 0, 1)


def motion_blur(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: motion_blur c = [(6,1), (6,1.5), (6,2), (8,2), (9,2.5)] (radius, sigma), angle
    U(-45, 45); ImageMagick's MotionBlurImage through Wand, re-implemented (filters.motion_blur_one)."""
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
    angles = [r.uniform(-45, 45) for r in rngs]
    x8 = np.rint(x * 255)
    return np.stack([motion_blur_one(xi, radius, sigma, a) for xi, a in zip(x8, angles)]) / 255


def zoom_blur(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: zoom_blur c = np.arange(1, stop, 0.01) for stop in [1.06, 1.11, 1.16, 1.21, 1.26];
    the mean of the image and its clipped zooms by each factor (scipy zoom, order 1), in float32."""
    factors = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1], 0.01)
    x32 = x.astype(np.float32)
    out = np.zeros_like(x32)
    for factor in factors:
        out += clipped_zoom(x32, float(factor)).astype(np.float32)
    return np.clip((x32 + out) / (len(factors) + 1), 0, 1).astype(np.float64)


def _motion_blur_map(layer: np.ndarray, radius: float, sigma: float, angles: list[float]) -> np.ndarray:
    """ImageMagick's motion blur of 8-bit maps (N, H, W) in 0..255, back in [0, 1] at 8-bit levels."""
    return np.stack([motion_blur_one(m[..., None], radius, sigma, a)[..., 0] for m, a in zip(layer, angles)]) / 255


def snow(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: snow c = [(0.1,0.2,1,0.6,8,3,0.95), (0.1,0.2,1,0.5,10,4,0.9), (0.15,0.3,1.75,0.55,10,4,0.9),
    (0.25,0.3,2.25,0.6,12,6,0.85), (0.3,0.3,1.25,0.65,14,12,0.8)]: flakes N(c0, c1) zoomed by c2, kept above
    c3, motion-blurred (radius c4, sigma c5, angle U(-135, -45)); the image whitened by 1 - c6 towards
    max(x, 1.5 grey + 0.5); flakes added twice (the layer and its half-turn)."""
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
    layer = clipped_zoom(_each(rngs, lambda r: r.normal(c[0], c[1], x.shape[1:3]))[..., None], c[2])[..., 0]
    layer[layer < c[3]] = 0
    angles = [r.uniform(-135, -45) for r in rngs]
    flakes = _motion_blur_map(np.floor(np.clip(layer, 0, 1) * 255), c[4], c[5], angles)[..., None]
    grey = luminance(x.astype(np.float32)) if x.shape[-1] == 3 else x
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + flakes + flakes[:, ::-1, ::-1], 0, 1)


def frost(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: frost c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)];
    clip(c0 x + c1 frost) with a random window of one of five frost textures. DEPARTURE: the textures are
    procedural (robustcl/data/corruptions/frost.py), not the script's photographs."""
    a, b = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
    h, w = x.shape[1:3]
    layers = []
    for r in rngs:
        texture = frost_texture(int(r.integers(TEXTURES)))
        top, left = r.integers(0, texture.shape[0] - h), r.integers(0, texture.shape[1] - w)
        layers.append(texture[top:top + h, left:left + w])
    layer = np.stack(layers)
    return np.clip(a * x + b * (layer if x.shape[-1] == 3 else luminance(layer)), 0, 1)


def fog(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: fog c = [(.2,3), (.5,3), (0.75,2.5), (1,2), (1.5,1.75)] (strength, wibble decay);
    x + c0 plasma, rescaled by max(x) / (max(x) + c0); the plasma map is the next power of two >= the size."""
    strength, decay = [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
    h, w = x.shape[1:3]
    size = 1 << (max(h, w, 2) - 1).bit_length()
    plasma = _each(rngs, lambda r: plasma_fractal(r, size, decay)[:h, :w])
    top = x.reshape(len(x), -1).max(1).reshape(-1, 1, 1, 1)
    return np.clip((x + strength * plasma[..., None]) * top / (top + strength), 0, 1)


def brightness(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: brightness c = [.05, .1, .15, .2, .3]; HSV value + c (skimage's rgb2hsv/hsv2rgb).
    A one-channel image is its own value: clip(x + c), what the RGB formula gives a grey pixel."""
    c = [.05, .1, .15, .2, .3][severity - 1]
    if x.shape[-1] == 1:
        return np.clip(x + c, 0, 1)
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv_to_rgb(hsv), 0, 1)


def saturate(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: saturate c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)]; HSV S c0 + c1.
    RGB only: a one-channel image comes as (g, g, g) and leaves as luminance (`corrupt`), so severities
    1-3 leave it as it is (a grey pixel has no saturation to scale) and 4-5 tint it red (skimage's hue 0)."""
    c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv_to_rgb(hsv), 0, 1)


def contrast(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: contrast c = [.75, .5, .4, .3, 0.15]; (x - mean) c + mean, the mean per channel."""
    c = [.75, .5, .4, .3, 0.15][severity - 1]
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def _pil_mode(x8: np.ndarray) -> tuple[np.ndarray, str]:
    return (x8[..., 0], "L") if x8.shape[-1] == 1 else (x8, "RGB")


def _pil_each(x: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Each image through a Pillow transform (grey images as mode "L"), back to floats at 8-bit levels."""
    out = []
    for xi in np.rint(x * 255).astype(np.uint8):
        array, mode = _pil_mode(xi)
        result = np.asarray(transform(Image.fromarray(array, mode=mode)), dtype=np.float64)
        out.append(result.reshape(xi.shape))
    return np.stack(out) / 255


def jpeg_compression(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: jpeg_compression c = [80, 65, 58, 50, 40]; Pillow's JPEG at quality c (RGB with
    Pillow's default 4:2:0 chroma subsampling; a grey image as a one-channel JPEG)."""
    quality = [80, 65, 58, 50, 40][severity - 1]

    def transform(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue()))
    return _pil_each(x, transform)


def pixelate(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: pixelate c = [0.95, 0.9, 0.85, 0.75, 0.65]; Pillow BOX resize to int(size c), then back."""
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    h, w = x.shape[1:3]
    return _pil_each(x, lambda im: im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))


def elastic_transform(x: np.ndarray, severity: int, rngs: Rngs) -> np.ndarray:
    """make_cifar_c.py: elastic_transform c = [(0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05),
    (.1, .03, .03)] x IMSIZE (alpha, sigma, affine jitter), IMSIZE the image's size (32 in the script): a
    random affine (cv2.warpAffine, mirrored borders), then a smooth displacement field, bilinear, reflected."""
    size = min(x.shape[1:3])
    alpha, sigma, jitter = (size * f for f in [(0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05),
                                               (.1, .03, .03)][severity - 1])
    h, w = x.shape[1:3]
    centre, square = np.array([h // 2, w // 2], dtype=np.float64), size // 3
    src = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for r, xi in zip(rngs, x.astype(np.float32)):
        warped = warp_affine(xi, affine_from_points(src, src + r.uniform(-jitter, jitter, src.shape)))
        dx = gaussian_2d(r.uniform(-1, 1, (1, h, w)), sigma, mode="reflect", truncate=3)[0] * alpha
        dy = gaussian_2d(r.uniform(-1, 1, (1, h, w)), sigma, mode="reflect", truncate=3)[0] * alpha
        out.append(bilinear(warped, rows + dy.astype(np.float32), cols + dx.astype(np.float32), "reflect"))
    return np.clip(np.stack(out), 0, 1)
