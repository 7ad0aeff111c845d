"""make_cifar_c.py's `spatter` (one of the four extra corruptions) and the OpenCV steps it needs, in numpy.

Severities 1-3 splash pale-turquoise water whose shading comes from OpenCV's Canny edges of the liquid
layer, their 5x5-chamfer distance transform, histogram equalisation and an emboss filter; severities 4-5
cover the image with mud-brown blobs. The departures from OpenCV (named in docs/corruptions.md): Canny's
tie-breaking on equal gradient magnitudes, and a liquid layer above 1 clipped rather than wrapped modulo
256 by a uint8 cast (the script's `astype(np.uint8)`); a layer with no liquid at all leaves the image as it
is where the script divides by zero.
"""
from __future__ import annotations

import numpy as np

from .filters import correlate_axis, filter2d, gaussian_2d

# make_cifar_c.py: spatter c = [(0.62,0.1,0.7,0.7,0.5,0), (0.65,0.1,0.8,0.7,0.5,0), (0.65,0.3,1,0.69,0.5,0),
# (0.65,0.1,0.7,0.69,0.6,1), (0.65,0.1,0.5,0.68,0.6,1)]: liquid mean, std, blur sigma, threshold, then the
# water's strength (or the mud's blur sigma), and 0 = water / 1 = mud
SPATTER = [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
           (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)]
WATER = np.array([175, 238, 238]) / 255.0  # "water is pale turquoise" (the script's BGR triple read as RGB)
MUD = np.array([63, 42, 20]) / 255.0       # "mud brown"
EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
CHAMFER = [((0, 1), 1.0), ((1, 0), 1.0), ((0, -1), 1.0), ((-1, 0), 1.0),
           ((1, 1), 1.4), ((1, -1), 1.4), ((-1, 1), 1.4), ((-1, -1), 1.4),
           *[((dy, dx), 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))]]


def _shift(a: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx] over (N, H, W), `fill` outside."""
    out = np.full_like(a, fill)
    h, w = a.shape[1:]
    out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = a[:, max(0, dy):h + min(0, dy),
                                                                       max(0, dx):w + min(0, dx)]
    return out


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(image, low, high) of uint8 maps (N, H, W) -> bool edges: 3x3 Sobel (edges replicated), L1
    magnitude, non-maximum suppression in four directions, hysteresis over 8-neighbours."""
    x = image.astype(np.float64)[..., None]
    smooth, diff = np.array([1.0, 2.0, 1.0]), np.array([-1.0, 0.0, 1.0])
    gx = correlate_axis(correlate_axis(x, diff, 2, "nearest"), smooth, 1, "nearest")[..., 0]
    gy = correlate_axis(correlate_axis(x, diff, 1, "nearest"), smooth, 2, "nearest")[..., 0]
    mag = np.abs(gx) + np.abs(gy)
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < ax * np.tan(np.pi / 8)
    vertical = ay > ax * np.tan(3 * np.pi / 8)
    s = np.where(gx * gy < 0, -1, 1)
    keep = np.where(horizontal, (mag > _shift(mag, 0, -1, 0)) & (mag >= _shift(mag, 0, 1, 0)),
                    np.where(vertical, (mag > _shift(mag, -1, 0, 0)) & (mag >= _shift(mag, 1, 0, 0)),
                             np.where(s > 0, (mag > _shift(mag, -1, -1, 0)) & (mag > _shift(mag, 1, 1, 0)),
                                      (mag > _shift(mag, -1, 1, 0)) & (mag > _shift(mag, 1, -1, 0)))))
    weak = keep & (mag > low)
    edges = weak & (mag > high)
    while True:
        grown = edges.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= _shift(edges, dy, dx, False) & weak
        if (grown == edges).all():
            return edges
        edges = grown


def chamfer_distance(zero: np.ndarray, cap: float) -> np.ndarray:
    """cv2.distanceTransform(DIST_L2, 5) capped at `cap` (then cv2.threshold(..., THRESH_TRUNC)): the 5x5
    chamfer distance (1, 1.4, 2.1969) from each pixel to the nearest `zero` pixel of (N, H, W)."""
    d = np.where(zero, 0.0, cap)
    for _ in range(int(cap) + 2):
        best = d
        for (dy, dx), step in CHAMFER:
            best = np.minimum(best, _shift(d, dy, dx, np.inf) + step)
        if (best == d).all():
            break
        d = best
    return np.minimum(d, cap)


def box3_uint8(x: np.ndarray, round_result: bool) -> np.ndarray:
    """cv2.blur(x, (3, 3)) of (N, H, W), BORDER_REFLECT_101; rounded as for a uint8 input when asked."""
    out = filter2d(x[..., None], np.full((3, 3), 1 / 9))[..., 0]
    return np.rint(out) if round_result else out


def equalize_hist(x: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist of uint8 maps (N, H, W): lut[j] = round(255 (cdf[j] - hist[first]) / (total - hist[first]))."""
    out = np.empty_like(x)
    for k, image in enumerate(x.astype(np.int64)):
        hist = np.bincount(image.ravel(), minlength=256)
        first = int(np.nonzero(hist)[0][0])
        total = image.size
        if hist[first] == total:
            out[k] = first
            continue
        cdf = np.cumsum(hist) - hist[first]
        lut = np.clip(np.rint(cdf * (255.0 / (total - hist[first]))), 0, 255)
        lut[first] = 0
        out[k] = lut[image]
    return out


def water(x: np.ndarray, liquid: np.ndarray, strength: float) -> np.ndarray:
    """Severities 1-3: the water's shading from the liquid layer's edges, added in pale turquoise."""
    liquid8 = np.clip(np.floor(liquid * 255), 0, 255)
    dist = chamfer_distance(canny(liquid8, 50, 150), 20)
    dist = equalize_hist(np.floor(box3_uint8(dist, round_result=False)))
    dist = np.clip(np.rint(filter2d(dist[..., None], EMBOSS)[..., 0]), 0, 255)
    m = liquid8 * box3_uint8(dist, round_result=True)
    top = m.reshape(len(m), -1).max(1).reshape(-1, 1, 1)
    m = np.where(top > 0, m / np.where(top > 0, top, 1), 0.0) * strength
    return np.clip(x + m[..., None] * WATER, 0, 1)


def spatter(x: np.ndarray, severity: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """make_cifar_c.py `spatter` on RGB (N, H, W, 3) in [0, 1]; see SPATTER for the constants."""
    c = SPATTER[severity - 1]
    noise = np.stack([r.normal(c[0], c[1], x.shape[1:3]) for r in rngs])
    liquid = gaussian_2d(noise, c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        return water(x, liquid, c[4])
    m = gaussian_2d(np.where(liquid > c[3], 1.0, 0.0), c[4])
    m[m < 0.8] = 0
    return np.clip(x * (1 - m[..., None]) + MUD * m[..., None], 0, 1)
