"""Batched, on-device augmentations for the two views of contrastive pre-training.

`strong_view` is the SimCLR-style view p (random resized crop, flip, colour jitter, grayscale,
Gaussian blur); `weak_view` is the view q (zero-padded random crop, flip). Every op is vectorised
over the batch: per-sample random parameters are tensors, there is no Python loop over images.
All randomness comes from a caller-supplied `torch.Generator`, which must live on the same device
as the images, so a resumed run with a restored generator state draws the same views.

Inputs are (N, C, H, W) with C in {1, 3}, either uint8 in [0, 255] or float in [0, 1]; outputs are
float32 in [0, 1] with the input's shape and device. Semantics follow torchvision's transforms,
with the deviations noted on each function (fixed jitter order, clamp-instead-of-retry crops).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustcl.config.schema import StrongViewConfig, WeakViewConfig  # the views' parameters: one schema
from robustcl.config.schema import check_jitter as _check_jitter
from robustcl.config.schema import check_kernel as _check_kernel

__all__ = [
    "StrongViewConfig",
    "WeakViewConfig",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur",
    "color_jitter",
    "crop_padded",
    "gaussian_blur",
    "gaussian_kernel1d",
    "hsv_to_rgb",
    "random_crop_padded",
    "random_flip",
    "random_grayscale",
    "random_resized_crop",
    "resized_crop",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "sample_crop_boxes",
    "strong_view",
    "to_unit",
    "weak_view",
]

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- input handling


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 (N,C,H,W) images to float32 in [0,1]; float input is only cast to float32, not rescaled."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) images with C in {{1, 3}}, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")
    return images.to(torch.float32)


def _check_generator(x: torch.Tensor, generator: torch.Generator) -> None:
    """Raise unless the generator lives on the data's device, so draws never cross devices."""
    gd, xd = generator.device, x.device
    if gd.type != xd.type or (gd.index is not None and xd.index is not None and gd.index != xd.index):
        raise ValueError(f"generator is on {gd} but images are on {xd}; they must share a device")


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform [0,1) float32 draws on the generator's device."""
    return torch.rand(*shape, generator=generator, device=generator.device)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """Reshape an (N,) per-sample parameter to (N,1,1,1) so it broadcasts over (N,C,H,W)."""
    return values.reshape(-1, 1, 1, 1)


def _select(mask: torch.Tensor, applied: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between the transformed and the original batch (the `RandomApply` step)."""
    return torch.where(_per_sample(mask), applied, original)


# ----------------------------------------------------------------------------- geometry


def sample_crop_boxes(n: int, height: int, width: int, generator: torch.Generator,
                      scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Draw n integer RandomResizedCrop boxes as an (n,4) float tensor of (top, left, h, w) in pixels.

    Area fraction ~ U(scale) and log aspect (w/h) ~ U(log ratio), rounded to whole pixels as in
    torchvision. torchvision retries up to 10 times when the box does not fit and then falls back
    to a centre crop; this vectorised version instead clamps h and w to the image (a clamped side
    spans the whole image, i.e. is re-centred) and places the box uniformly among the valid
    integer offsets, so no sample is ever rejected.
    """
    u = _rand(generator, 4, n)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(area * aspect)).clamp(1, width)
    h = torch.round(torch.sqrt(area / aspect)).clamp(1, height)
    top = torch.minimum(torch.floor(u[2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[3] * (width - w + 1)), width - w)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize each sample's box (top, left, h, w in pixels) back to the full HxW.

    One `affine_grid` + `grid_sample` call (align_corners=False) for the whole batch. Sampling
    points are clamped to the box's outermost pixel centres, so for pixel-aligned boxes the result
    equals cropping the box and calling `F.interpolate(mode="bilinear", align_corners=False)` on it,
    which is what torchvision's resized_crop does (antialiasing is moot: a crop is never shrunk).
    """
    x = to_unit(x)
    n, _, height, width = x.shape
    if n == 0:  # affine_grid rejects an empty batch
        return x
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    top, left, h, w = boxes.unbind(dim=1)
    zeros = torch.zeros_like(top)
    # Output normalised coord u maps to source u*(w/W) + (2*centre/W - 1), centre = left + w/2.
    theta = torch.stack([
        torch.stack([w / width, zeros, (2 * left + w) / width - 1], dim=1),
        torch.stack([zeros, h / height, (2 * top + h) / height - 1], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    lo = torch.stack([(2 * left + 1) / width - 1, (2 * top + 1) / height - 1], dim=1)
    hi = torch.stack([(2 * (left + w) - 1) / width - 1, (2 * (top + h) - 1) / height - 1], dim=1)
    grid = torch.maximum(torch.minimum(grid, hi[:, None, None, :]), lo[:, None, None, :])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision RandomResizedCrop(size=(H,W), scale, ratio) per sample; see `sample_crop_boxes`."""
    x = to_unit(x)
    _check_generator(x, generator)
    n, _, height, width = x.shape
    return resized_crop(x, sample_crop_boxes(n, height, width, generator, scale, ratio))


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Per-sample horizontal flip with probability p (torchvision RandomHorizontalFlip)."""
    x = to_unit(x)
    _check_generator(x, generator)
    return _select(_rand(generator, x.shape[0]) < p, x.flip(-1), x)


def crop_padded(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-sample HxW window shifted by integer offsets (N,2) = (dy, dx), zero outside the image.

    Equals zero-padding by any p >= |offset| and slicing [p+dy : p+dy+H, p+dx : p+dx+W], but is
    done with two batched gathers on the unpadded image, so it needs no padded copy or host sync.
    """
    x = to_unit(x)
    n, c, height, width = x.shape
    offsets = offsets.to(device=x.device, dtype=torch.long)
    rows = offsets[:, :1] + torch.arange(height, device=x.device)  # (N,H) source row of each output row
    cols = offsets[:, 1:] + torch.arange(width, device=x.device)   # (N,W)
    out = x.gather(2, rows.clamp(0, height - 1)[:, None, :, None].expand(n, c, height, width))
    out = out.gather(3, cols.clamp(0, width - 1)[:, None, None, :].expand(n, c, height, width))
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    return torch.where(inside[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def random_crop_padded(x: torch.Tensor, generator: torch.Generator, padding: int) -> torch.Tensor:
    """torchvision RandomCrop(size=(H,W), padding, fill=0): uniform integer offset in [0, 2*padding] per axis."""
    x = to_unit(x)
    _check_generator(x, generator)
    offsets = torch.floor(_rand(generator, x.shape[0], 2) * (2 * padding + 1)).clamp(max=2 * padding)
    return crop_padded(x, offsets.long() - padding)


# ----------------------------------------------------------------------------- colour


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B as (N,1,H,W); a 1-channel batch is already grey."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB (N,3,H,W) in [0,1] to HSV with every channel in [0,1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    grey = chroma == 0
    s = torch.where(grey, 0.0, chroma / torch.where(grey, 1.0, maxc))
    div = torch.where(grey, 1.0, chroma)  # grey pixels: numerators below are 0, so hue is 0
    h = torch.where(maxc == r, (g - b) / div,
                    torch.where(maxc == g, 2.0 + (b - r) / div, 4.0 + (r - g) / div))
    return torch.stack([torch.remainder(h / 6.0, 1.0), s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV (N,3,H,W), channels in [0,1], back to RGB via c_n = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply each sample by its (N,) factor and clamp to [0,1] (torchvision adjust_brightness)."""
    return (x * _per_sample(factor)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with the mean of its grey-scale image by its (N,) factor, then clamp."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each RGB sample with its grey-scale image by its (N,) factor, then clamp."""
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each RGB sample's hue by its (N,) shift in turns (HSV round trip), then clamp."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0:1] + _per_sample(shift), 1.0)
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1)).clamp(0.0, 1.0)


def _factor(u: torch.Tensor, strength: float) -> torch.Tensor:
    """Map U[0,1) draws to a multiplicative factor ~ U[max(0, 1-strength), 1+strength]."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * u


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float, p: float) -> torch.Tensor:
    """RandomApply(ColorJitter(brightness, contrast, saturation, hue), p) with per-sample factors.

    Factors: brightness/contrast/saturation ~ U[max(0,1-s), 1+s], hue shift ~ U[-h, h]; a strength
    of 0 skips that op, as in torchvision. Deliberate simplification: the ops run in the fixed order
    brightness, contrast, saturation, hue, where torchvision draws a random order per call. On a
    1-channel batch saturation and hue are meaningless and skipped. Draws the same number of random
    values whatever the strengths or channel count, so the generator stream stays aligned.
    """
    x = to_unit(x)
    _check_generator(x, generator)
    _check_jitter(brightness, contrast, saturation, hue)
    u = _rand(generator, 5, x.shape[0])
    out = x
    if brightness > 0:
        out = adjust_brightness(out, _factor(u[1], brightness))
    if contrast > 0:
        out = adjust_contrast(out, _factor(u[2], contrast))
    if x.shape[1] == 3 and saturation > 0:
        out = adjust_saturation(out, _factor(u[3], saturation))
    if x.shape[1] == 3 and hue > 0:
        out = adjust_hue(out, (2.0 * u[4] - 1.0) * hue)
    return _select(u[0] < p, out, x)


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """torchvision RandomGrayscale(p): replace a sample by its luma replicated to 3 channels.

    A 1-channel batch is already grey and is returned unchanged (one draw per sample is still
    consumed, so the generator stream does not depend on the channel count).
    """
    x = to_unit(x)
    _check_generator(x, generator)
    mask = _rand(generator, x.shape[0]) < p
    if x.shape[1] == 1:
        return x
    return _select(mask, rgb_to_grayscale(x).expand_as(x), x)


# ----------------------------------------------------------------------------- blur


def gaussian_kernel1d(sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (N,kernel) for per-sample sigmas (N,), as torchvision builds them."""
    _check_kernel(kernel)
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable kxk Gaussian blur with per-sample (N,) sigma and reflect padding.

    The batch is viewed as (1, N*C, H, W) and filtered by one grouped conv per axis (groups=N*C),
    each channel with its sample's kernel; equal to torchvision's 2-D kernel (the outer product).
    """
    x = to_unit(x)
    n, c, height, width = x.shape
    if n == 0:  # a grouped conv needs at least one group
        return x
    taps = gaussian_kernel1d(sigma.to(device=x.device, dtype=torch.float32), kernel)
    taps = taps.repeat_interleave(c, dim=0)  # (N*C, k): channel j of sample i uses row i*C + j
    pad = kernel // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, height + 2 * pad, width + 2 * pad)
    out = F.conv2d(xp, taps[:, None, None, :], groups=n * c)
    out = F.conv2d(out, taps[:, None, :, None], groups=n * c)
    return out.reshape(n, c, height, width)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, sigma: tuple[float, float],
                  kernel: int, p: float) -> torch.Tensor:
    """RandomApply(GaussianBlur(kernel, sigma), p): per-sample sigma ~ U(sigma), reflect padding."""
    x = to_unit(x)
    _check_generator(x, generator)
    u = _rand(generator, 2, x.shape[0])
    s = sigma[0] + (sigma[1] - sigma[0]) * u[1]
    return _select(u[0] < p, blur(x, s, kernel), x)


# ----------------------------------------------------------------------------- views


def strong_view(images: torch.Tensor, generator: torch.Generator,
                cfg: StrongViewConfig = StrongViewConfig()) -> torch.Tensor:
    """SimCLR strong view p: resized crop, flip, colour jitter, grayscale, blur (torchvision order).

    Grey-scale variant: when C == 1 only crop, flip, brightness and contrast jitter and blur act;
    saturation, hue and random grayscale are meaningless on one channel and are skipped.
    """
    x = to_unit(images)
    _check_generator(x, generator)
    x = random_resized_crop(x, generator, cfg.crop_scale, cfg.crop_ratio)
    x = random_flip(x, generator, cfg.flip_p)
    x = color_jitter(x, generator, *cfg.jitter, p=cfg.jitter_p)
    x = random_grayscale(x, generator, cfg.gray_p)
    return gaussian_blur(x, generator, cfg.blur_sigma, cfg.blur_kernel, cfg.blur_p)


def weak_view(images: torch.Tensor, generator: torch.Generator,
              cfg: WeakViewConfig = WeakViewConfig()) -> torch.Tensor:
    """Weak view q: zero-padded random crop back to HxW, then horizontal flip (CIFAR standard)."""
    x = to_unit(images)
    _check_generator(x, generator)
    x = random_crop_padded(x, generator, cfg.padding)
    return random_flip(x, generator, cfg.flip_p)
