"""Tests for robustcl.views: batched, generator-driven strong/weak contrastive views."""
from __future__ import annotations

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F

from robustcl import views as V


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Random float images in [0,1]."""
    return torch.rand(n, c, h, w, generator=gen(seed))


# ----------------------------------------------------------------------------- shapes and input handling


@pytest.mark.parametrize("view", [V.strong_view, V.weak_view])
@pytest.mark.parametrize("c,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("as_uint8", [True, False])
def test_shape_dtype_range(view, c: int, size: int, as_uint8: bool) -> None:
    x = images(16, c, size, size)
    if as_uint8:
        x = (x * 255).round().to(torch.uint8)
    y = view(x, gen(1))
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert y.device == x.device
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("view", [V.strong_view, V.weak_view])
def test_uint8_and_unit_float_give_same_view(view) -> None:
    x8 = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen(3))
    torch.testing.assert_close(view(x8, gen(5)), view(x8.float() / 255, gen(5)))


@pytest.mark.parametrize("view", [V.strong_view, V.weak_view])
@pytest.mark.parametrize("c", [1, 3])
def test_empty_batch(view, c: int) -> None:
    assert view(torch.zeros(0, c, 8, 8, dtype=torch.uint8), gen()).shape == (0, c, 8, 8)


def test_to_unit() -> None:
    x8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    torch.testing.assert_close(V.to_unit(x8), torch.tensor([0.0, 0.2, 1.0]).view(1, 3, 1, 1))
    xf = images(2)
    assert V.to_unit(xf) is xf
    assert V.to_unit(xf.double()).dtype == torch.float32
    with pytest.raises(ValueError):
        V.to_unit(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError):
        V.to_unit(torch.rand(3, 8, 8))
    with pytest.raises(TypeError):
        V.to_unit(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        V.StrongViewConfig(blur_kernel=4)
    with pytest.raises(ValueError):
        V.StrongViewConfig(crop_scale=(0.8, 0.2))
    with pytest.raises(ValueError):
        V.StrongViewConfig(jitter=(0.4, 0.4, 0.4, 0.6))
    with pytest.raises(ValueError):
        V.WeakViewConfig(flip_p=1.5)
    with pytest.raises(ValueError):
        V.WeakViewConfig(padding=-1)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("view", [V.strong_view, V.weak_view])
@pytest.mark.parametrize("c", [1, 3])
def test_determinism(view, c: int) -> None:
    x = images(16, c)
    a, b = view(x, gen(7)), view(x, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, view(x, gen(8)))
    g = gen(7)
    first, second = view(x, g), view(x, g)
    assert torch.equal(first, a)
    assert not torch.equal(first, second)  # the generator advances between calls


def test_resume_from_generator_state() -> None:
    x = images(8)
    g = gen(11)
    V.strong_view(x, g)
    state = g.get_state()
    expected = V.strong_view(x, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(V.strong_view(x, resumed), expected)


# ----------------------------------------------------------------------------- flip


def test_flip() -> None:
    x = images(8, 3, 8, 12)
    assert torch.equal(V.random_flip(x, gen(), 1.0), x.flip(-1))
    assert torch.equal(V.random_flip(x, gen(), 0.0), x)


def test_flip_is_per_sample() -> None:
    x = images(2000, 1, 2, 3)
    y = V.random_flip(x, gen(), 0.5)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert torch.all(flipped ^ same)
    assert 0.45 < flipped.float().mean().item() < 0.55


# ----------------------------------------------------------------------------- resized crop


def test_full_crop_is_identity() -> None:
    x = images(6, 3, 32, 32)
    y = V.random_resized_crop(x, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(32, 32), (28, 20)])
def test_resized_crop_matches_interpolate(h: int, w: int) -> None:
    x = images(4, 3, h, w)
    boxes = torch.tensor([[0, 0, h, w], [3, 5, 10, 7], [h - 9, w - 13, 9, 13], [2, 1, h - 4, w - 2]],
                         dtype=torch.float32)
    y = V.resized_crop(x, boxes)
    for i, (top, left, bh, bw) in enumerate(boxes.long().tolist()):
        box = x[i:i + 1, :, top:top + bh, left:left + bw]
        ref = F.interpolate(box, size=(h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(y[i:i + 1], ref, atol=1e-5, rtol=0)


def test_crop_boxes_fixed_size() -> None:
    boxes = V.sample_crop_boxes(4000, 32, 32, gen(), scale=(0.25, 0.25), ratio=(1.0, 1.0))
    top, left, h, w = boxes.T
    assert torch.all(h == 16) and torch.all(w == 16)
    for offset in (top, left):
        assert torch.equal(offset, offset.round())
        assert offset.min() == 0 and offset.max() == 16  # every valid offset reachable, none beyond


def test_crop_boxes_inside_image_and_in_range() -> None:
    height, width = 32, 24
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = V.sample_crop_boxes(5000, height, width, gen(), scale=scale, ratio=ratio)
    top, left, h, w = boxes.T
    assert torch.all(top >= 0) and torch.all(left >= 0) and torch.all(h >= 1) and torch.all(w >= 1)
    assert torch.all(top + h <= height) and torch.all(left + w <= width)
    unclamped = (h < height) & (w < width)
    frac = (h * w / (height * width))[unclamped]
    aspect = (w / h)[unclamped]
    assert frac.min() > 0.05 and frac.max() <= 1.0
    big = unclamped & (h >= 10) & (w >= 10)  # rounding error in the ratio is small for big boxes
    assert torch.all((w / h)[big] > 0.65) and torch.all((w / h)[big] < 1.5)
    assert aspect.numel() > 1000


# ----------------------------------------------------------------------------- colour


def test_hsv_round_trip_and_reference() -> None:
    x = torch.rand(64, 3, 5, 5, generator=gen(2))
    x[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey: hue/saturation 0
    x[0, :, 0, 1] = 0.0
    torch.testing.assert_close(V.hsv_to_rgb(V.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    hsv = V.rgb_to_hsv(x)
    for (r, g, b), hsv_px in zip(x[:4, :, 0, :].permute(0, 2, 1).reshape(-1, 3).tolist(),
                                hsv[:4, :, 0, :].permute(0, 2, 1).reshape(-1, 3).tolist()):
        assert hsv_px == pytest.approx(colorsys.rgb_to_hsv(r, g, b), abs=1e-5)


def test_hue_shift() -> None:
    x = images(4)
    for shift in (0.0, 1.0):
        torch.testing.assert_close(V.adjust_hue(x, torch.full((4,), shift)), x, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(V.adjust_hue(red, torch.tensor([1 / 3])),
                               torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.adjust_hue(red, torch.tensor([-1 / 3])),
                               torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1), atol=1e-5, rtol=0)


def test_brightness_on_constant_image() -> None:
    x = torch.full((3, 3, 4, 4), 0.4)
    y = V.adjust_brightness(x, torch.tensor([0.5, 1.5, 3.0]))
    torch.testing.assert_close(y[:, 0, 0, 0], torch.tensor([0.2, 0.6, 1.0]))
    assert torch.equal(y, y[:, :1, :1, :1].expand_as(y))


def test_contrast_zero_gives_grey_mean() -> None:
    x = images(3)
    y = V.adjust_contrast(x, torch.zeros(3))
    mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))
    torch.testing.assert_close(y, mean.view(3, 1, 1, 1).expand_as(x))
    torch.testing.assert_close(V.adjust_contrast(x, torch.ones(3)), x)
    x1 = images(3, 1)
    torch.testing.assert_close(V.adjust_contrast(x1, torch.zeros(3)),
                               x1.mean(dim=(1, 2, 3), keepdim=True).expand_as(x1))


def test_saturation() -> None:
    x = images(3)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    torch.testing.assert_close(V.adjust_saturation(x, torch.zeros(3)), grey.expand_as(x))
    torch.testing.assert_close(V.adjust_saturation(x, torch.ones(3)), x)


def test_grayscale() -> None:
    x = images(5)
    y = V.random_grayscale(x, gen(), 1.0)
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for ch in range(3):
        torch.testing.assert_close(y[:, ch], expected)
    assert torch.equal(V.random_grayscale(x, gen(), 0.0), x)
    x1 = images(5, 1)
    assert torch.equal(V.random_grayscale(x1, gen(), 1.0), x1)


def test_color_jitter_probability_and_factor_range() -> None:
    x = images(8)
    assert torch.equal(V.color_jitter(x, gen(), 0.4, 0.4, 0.4, 0.1, p=0.0), x)
    const = torch.full((500, 3, 2, 2), 0.5)
    y = V.color_jitter(const, gen(), 0.4, 0.0, 0.0, 0.0, p=1.0)
    factors = y[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
    assert factors.min() < 0.65 and factors.max() > 1.35  # the full range is used
    half = V.color_jitter(const, gen(), 0.4, 0.0, 0.0, 0.0, p=0.5)
    untouched = (half == const).flatten(1).all(1).float().mean().item()
    assert 0.4 < untouched < 0.6


def test_color_jitter_grey_skips_saturation_and_hue() -> None:
    x = images(16, 1)
    full = V.color_jitter(x, gen(4), 0.4, 0.4, 0.4, 0.1, p=1.0)
    bc_only = V.color_jitter(x, gen(4), 0.4, 0.4, 0.0, 0.0, p=1.0)
    assert torch.equal(full, bc_only)
    assert not torch.equal(full, x)


# ----------------------------------------------------------------------------- blur


def explicit_kernel(sigma: float, k: int) -> torch.Tensor:
    """Normalised 2-D Gaussian built by hand from the 1-D formula."""
    half = (k - 1) / 2
    taps = torch.tensor([math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(k)])
    taps = taps / taps.sum()
    return torch.outer(taps, taps)


def test_blur_constant_image_unchanged() -> None:
    x = torch.full((4, 3, 8, 8), 0.37)
    y = V.gaussian_blur(x, gen(), sigma=(0.1, 2.0), kernel=5, p=1.0)
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("k", [3, 5])
def test_blur_delta_gives_kernel(k: int) -> None:
    x = torch.zeros(2, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = V.gaussian_blur(x, gen(), sigma=(1.3, 1.3), kernel=k, p=1.0)
    r = k // 2
    ref = explicit_kernel(1.3, k)
    for n in range(2):
        for c in range(3):
            torch.testing.assert_close(y[n, c, 4 - r:5 + r, 4 - r:5 + r], ref)
    assert y.sum().item() == pytest.approx(6.0, abs=1e-5)


def test_blur_per_sample_sigma_matches_conv2d() -> None:
    x = images(3, 3, 10, 10)
    sigmas = torch.tensor([0.3, 1.0, 2.0])
    y = V.blur(x, sigmas, 3)
    for n, s in enumerate(sigmas.tolist()):
        weight = explicit_kernel(s, 3).expand(3, 1, 3, 3)
        ref = F.conv2d(F.pad(x[n:n + 1], (1, 1, 1, 1), mode="reflect"), weight, groups=3)
        torch.testing.assert_close(y[n:n + 1], ref)


def test_blur_probability_zero_is_identity() -> None:
    x = images(4)
    assert torch.equal(V.gaussian_blur(x, gen(), sigma=(0.1, 2.0), kernel=3, p=0.0), x)


# ----------------------------------------------------------------------------- weak view


def test_crop_padded_matches_slicing() -> None:
    p = 4
    x = images(5, 3, 12, 10)
    offsets = torch.tensor([[0, 0], [-4, -4], [4, 4], [-2, 3], [1, -4]])
    y = V.crop_padded(x, offsets)
    padded = F.pad(x, (p, p, p, p))
    for n, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(y[n], padded[n, :, p + dy:p + dy + 12, p + dx:p + dx + 10])


def test_weak_view_is_translated_copy() -> None:
    p = 2
    x = images(12, 3, 8, 8) * 0.9 + 0.05  # strictly positive so padding zeros are recognisable
    y = V.weak_view(x, gen(9), V.WeakViewConfig(padding=p, flip_p=0.5))
    allowed = torch.cat([x.flatten(), torch.zeros(1)])
    assert torch.isin(y, allowed).all()
    shifts = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
    seen_flip = set()
    for n in range(len(x)):
        candidates = {(s, flip): V.crop_padded(x[n:n + 1], torch.tensor([s]))[0] for s in shifts for flip in (0, 1)}
        matches = [(s, bool(flip)) for (s, flip), crop in candidates.items()
                   if torch.equal(y[n], crop.flip(-1) if flip else crop)]
        assert len(matches) == 1  # exactly one (shift, flip) explains the output
        seen_flip.add(matches[0][1])
    assert seen_flip == {False, True}


def signed_shift(zero_lines: torch.Tensor) -> torch.Tensor:
    """Signed window shift from a (N,L) mask of all-zero lines: leading zeros mean a negative shift."""
    count = zero_lines.sum(1)
    return torch.where(zero_lines[:, 0], -count, count)


def test_random_crop_offsets_cover_range() -> None:
    x = torch.ones(3000, 1, 6, 6)
    assert torch.equal(V.random_crop_padded(x, gen(), padding=0), x)
    y = V.random_crop_padded(x, gen(), padding=3)[:, 0]
    dy = signed_shift(y.sum(2) == 0)
    dx = signed_shift(y.sum(1) == 0)
    for shift in (dy, dx):
        assert set(shift.tolist()) == set(range(-3, 4))  # every RandomCrop offset, none beyond
    assert torch.all(y.flatten(1).sum(1) == (6 - dy.abs()) * (6 - dx.abs()))  # a pure translation


# ----------------------------------------------------------------------------- strong view composition


def test_strong_view_grey_variant_only_touches_grey_ops() -> None:
    cfg = V.StrongViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                             jitter=(0.0, 0.0, 0.4, 0.1), jitter_p=1.0, gray_p=1.0, blur_p=0.0)
    x1 = images(8, 1)
    torch.testing.assert_close(V.strong_view(x1, gen(), cfg), x1, atol=1e-5, rtol=0)
    x3 = images(8, 3)
    assert not torch.allclose(V.strong_view(x3, gen(), cfg), x3, atol=1e-3)


OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("enabled,expected", [
    ({}, lambda x: x),
    ({"flip_p": 1.0}, lambda x: x.flip(-1)),
    ({"gray_p": 1.0}, lambda x: V.rgb_to_grayscale(x).expand_as(x)),
    ({"blur_p": 1.0, "blur_sigma": (0.8, 0.8)}, lambda x: V.blur(x, torch.full((len(x),), 0.8), 3)),
    ({"crop_scale": (0.25, 0.25)}, None),
    ({"jitter_p": 1.0, "jitter": (0.4, 0.0, 0.0, 0.0)}, None),
])
def test_strong_view_composes_each_op(c: int, enabled: dict, expected) -> None:
    x = images(8, c)
    y = V.strong_view(x, gen(), V.StrongViewConfig(**{**OFF, **enabled}))
    if expected is None:  # random parameters: only check that the op ran
        assert not torch.allclose(y, x, atol=1e-3)
    else:
        torch.testing.assert_close(y, expected(x), atol=1e-5, rtol=0)


def test_strong_view_grayscale_always() -> None:
    cfg = V.StrongViewConfig(gray_p=1.0)
    y = V.strong_view(images(8), gen(), cfg)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


def test_generator_device_mismatch_raises() -> None:
    x = images(2)
    meta = x.to("meta")
    with pytest.raises(ValueError):
        V.weak_view(meta, gen())


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_fixed_parameters() -> None:
    x = images(4)
    xc = x.cuda()
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 10, 7], [1, 1, 20, 30], [8, 0, 24, 16]], dtype=torch.float32)
    torch.testing.assert_close(V.resized_crop(xc, boxes.cuda()).cpu(), V.resized_crop(x, boxes), atol=1e-5, rtol=0)
    offsets = torch.tensor([[0, 0], [-4, 4], [2, -1], [4, 4]])
    assert torch.equal(V.crop_padded(xc, offsets.cuda()).cpu(), V.crop_padded(x, offsets))
    sig = torch.tensor([0.3, 1.0, 1.5, 2.0])
    torch.testing.assert_close(V.blur(xc, sig.cuda(), 3).cpu(), V.blur(x, sig, 3), atol=1e-5, rtol=0)
    shift = torch.tensor([0.1, -0.2, 0.3, 0.05])
    torch.testing.assert_close(V.adjust_hue(xc, shift.cuda()).cpu(), V.adjust_hue(x, shift), atol=1e-5, rtol=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    for view in (V.strong_view, V.weak_view):
        y = view(xc, g)
        assert y.device == xc.device and y.shape == xc.shape and y.dtype == torch.float32
        g2 = torch.Generator(device="cuda").manual_seed(123)
        assert torch.equal(view(xc, g2), view(xc, torch.Generator(device="cuda").manual_seed(123)))
    with pytest.raises(ValueError):
        V.weak_view(xc, gen())
