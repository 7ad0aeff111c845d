"""The image primitives make_cifar_c.py borrows from scipy, scikit-image, OpenCV and ImageMagick, in numpy.

Every array here is a batch (N, H, W, C) of floats unless a docstring says otherwise. Each function names
the library call it stands for and how closely it follows it; docs/corruptions.md collects the departures.
"""
from __future__ import annotations

import math

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma: OpenCV's RGB2GRAY and Pillow's "L"


def pad_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source positions of positions -before .. n-1+after of an axis of length n, extended by `mode`.

    scipy's names: "nearest" repeats the edge pixel (a a | a b c | c c), "reflect" is half-sample symmetric
    (b a | a b c | c b), "mirror" is whole-sample symmetric (c b | a b c | b a; OpenCV's BORDER_REFLECT_101)."""
    i = np.arange(-before, n + after)
    if mode == "nearest" or n == 1:
        return np.clip(i, 0, n - 1)
    if mode == "reflect":
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":
        i = np.mod(i, 2 * n - 2)
        return np.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"unknown extension mode {mode!r}")


def correlate_axis(x: np.ndarray, weights: np.ndarray, axis: int, mode: str) -> np.ndarray:
    """1-D correlation of `x` with an odd-length kernel along `axis`, the ends extended by `mode`."""
    radius = len(weights) // 2
    n = x.shape[axis]
    padded = np.take(x, pad_index(n, radius, radius, mode), axis=axis)
    out = np.zeros(x.shape, dtype=np.result_type(x, np.float64))
    for k, w in enumerate(weights):
        if w != 0:
            out += w * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * offsets ** 2 / sigma ** 2)
    return w / w.sum()


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True): scipy's gaussian_filter over H and W only
    (mode "nearest" and truncate 4 are skimage's defaults); sigma 0 leaves x as it is, as scipy does."""
    if sigma <= 1e-15:
        return x.astype(np.float64)
    w = gaussian_weights(sigma, truncate)
    return correlate_axis(correlate_axis(x, w, 1, mode), w, 2, mode)


def gaussian_2d(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """`gaussian` of a batch of single-channel maps (N, H, W)."""
    return gaussian(x[..., None], sigma, mode, truncate)[..., 0]


def cv_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(size, sigma) for sigma > 0: exp(-(i - (size-1)/2)^2 / (2 sigma^2)), normalised."""
    i = np.arange(size) - (size - 1) / 2
    w = np.exp(-(i ** 2) / (2 * sigma ** 2))
    return w / w.sum()


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's `disk`: a 17x17 aliased disk (X^2 + Y^2 <= r^2, r <= 8), normalised, then
    cv2.GaussianBlur with a 3x3 kernel of sigma alias_blur (border BORDER_REFLECT_101), in float32."""
    if radius > 8:
        raise ValueError("disk_kernel follows make_cifar_c.py's radius <= 8 branch only")
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    w = cv_gaussian_kernel(3, alias_blur)
    blurred = correlate_axis(correlate_axis(disk[None, :, :, None], w, 1, "mirror"), w, 2, "mirror")
    return blurred[0, :, :, 0].astype(np.float32)


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D(x, -1, kernel) per channel: correlation centred on the kernel, BORDER_REFLECT_101."""
    kh, kw = kernel.shape
    ry, rx = kh // 2, kw // 2
    h, w = x.shape[1:3]
    padded = np.take(np.take(x, pad_index(h, ry, ry, "mirror"), axis=1), pad_index(w, rx, rx, "mirror"), axis=2)
    out = np.zeros(x.shape, dtype=np.float64)
    for dy, dx in zip(*np.nonzero(kernel)):
        out += float(kernel[dy, dx]) * padded[:, dy:dy + h, dx:dx + w]
    return out


def linear_zoom_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """scipy.ndimage.zoom(order=1) along one axis: output j samples input (in-1)/(out-1) * j, linearly."""
    n = x.shape[axis]
    coords = np.arange(out_size) * ((n - 1) / (out_size - 1) if out_size > 1 else 0.0)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    t = coords - lo
    shape = [1] * x.ndim
    shape[axis] = out_size
    t = t.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - t) + np.take(x, hi, axis=axis) * t


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c.py's `clipped_zoom`: crop the central ceil(size / factor) pixels, zoom them by `factor`
    with scipy's zoom (order 1, output size round(crop * factor)) and cut the centre back to the input size;
    per axis, so non-square images keep their shape."""
    out = x
    for axis in (1, 2):
        size = x.shape[axis]
        crop = int(np.ceil(size / factor))
        top = (size - crop) // 2
        part = np.take(out, np.arange(top, top + crop), axis=axis)
        zoomed = linear_zoom_axis(part, axis, int(round(crop * factor)))
        trim = (zoomed.shape[axis] - size) // 2
        out = np.take(zoomed, np.arange(trim, trim + size), axis=axis)
    return out


def bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Linear interpolation of one image (H, W, C) at float positions (H, W), the outside extended by `mode`
    (scipy.ndimage.map_coordinates(order=1) in "reflect"; OpenCV's warpAffine in "mirror")."""
    h, w = image.shape[:2]
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    tr, tc = (rows - r0)[..., None], (cols - c0)[..., None]
    ri = pad_index(h, h + 2, h + 2, mode)
    ci = pad_index(w, w + 2, w + 2, mode)
    rs = [ri[np.clip(r, -h - 2, 2 * h + 1) + h + 2] for r in (r0, r0 + 1)]
    cs = [ci[np.clip(c, -w - 2, 2 * w + 1) + w + 2] for c in (c0, c0 + 1)]
    top = image[rs[0], cs[0]] * (1 - tc) + image[rs[0], cs[1]] * tc
    bottom = image[rs[1], cs[0]] * (1 - tc) + image[rs[1], cs[1]] * tc
    return top * (1 - tr) + bottom * tr


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform: the 2x3 matrix taking three (x, y) points `src` to `dst`."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def warp_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(image, M, (W, H), borderMode=BORDER_REFLECT_101), bilinear: each output (x, y) reads the
    input at M^-1 (x, y), the position rounded to 1/32 pixel as OpenCV's fixed-point INTER_LINEAR does (its
    two-stage rounding is not reproduced bit for bit)."""
    h, w = image.shape[:2]
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    return bilinear(image, np.rint(src_y * 32) / 32, np.rint(src_x * 32) / 32, "mirror")


def motion_offsets(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """ImageMagick's MotionBlurImage kernel: width 2*ceil(radius)+1 (GetOptimalKernelWidth1D), weights
    exp(-i^2 / (2 sigma^2)) normalised, tap i at (dx, dy) = (ceil(i cos a - 0.5), ceil(i sin a - 0.5))."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    a = math.radians(angle)
    px, py = width * math.sin(a), width * math.cos(a)
    norm = math.hypot(px, py)
    taps = [(math.ceil(k * py / norm - 0.5), math.ceil(k * px / norm - 0.5)) for k in range(width)]
    return weights, taps


def motion_blur_one(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur of one 8-bit image (H, W, C) in 0..255: a one-sided line average towards
    `angle`, edge pixels repeated (the default virtual-pixel method), rounded back to 8 bits."""
    h, w = image.shape[:2]
    weights, taps = motion_offsets(radius, sigma, angle)
    out = np.zeros(image.shape, dtype=np.float64)
    rows, cols = np.arange(h), np.arange(w)
    for weight, (dx, dy) in zip(weights, taps):
        out += weight * image[np.clip(rows + dy, 0, h - 1)][:, np.clip(cols + dx, 0, w - 1)]
    return np.clip(np.rint(out), 0, 255)


def plasma_fractal(rng: np.random.Generator, mapsize: int, wibbledecay: float) -> np.ndarray:
    """make_cifar_c.py's `plasma_fractal`: a diamond-square height map of side `mapsize` (a power of two),
    scaled to [0, 1]. Starting at 0 with wibble 100, each midpoint is the mean of its four neighbours plus
    wibble * U(-wibble, wibble) (the script's noise is wibble times a uniform of half-width wibble), and
    wibble is divided by `wibbledecay` after each halving of the step."""
    grid = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def displaced(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half::step, half::step] = displaced(square)
        centres, corners = grid[half::step, half::step], grid[0::step, 0::step]
        grid[0::step, half::step] = displaced(centres + np.roll(centres, 1, axis=0)
                                              + corners + np.roll(corners, -1, axis=1))
        grid[half::step, 0::step] = displaced(centres + np.roll(centres, 1, axis=1)
                                              + corners + np.roll(corners, -1, axis=0))
        step, wibble = half, wibble / wibbledecay
    grid -= grid.min()
    return grid / grid.max()


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv of (..., 3) in [0, 1]: hue in [0, 1), S = (max - min) / max (0 for grey)."""
    v = x.max(-1)
    delta = v - x.min(-1)
    safe = np.where(delta == 0, 1.0, delta)
    s = np.where(v == 0, 0.0, delta / np.where(v == 0, 1.0, v))
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h = np.where(r == v, (g - b) / safe, 0.0)
    h = np.where(g == v, 2.0 + (b - r) / safe, h)  # skimage's order: blue over green over red on ties
    h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    return np.stack([h, np.where(delta == 0, 0.0, s), v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb: the six hue sectors."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6)
    f = h * 6 - sector
    sector = sector.astype(int) % 6
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (r, g, b) in enumerate(table):
        mask = sector == k
        out[mask] = np.stack([r[mask], g[mask], b[mask]], axis=-1)
    return out


def luminance(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H, W, 1): 0.299 R + 0.587 G + 0.114 B."""
    return (x @ LUMA)[..., None]
