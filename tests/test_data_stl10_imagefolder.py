"""Tests for the STL-10 reader (official binary format, transfer relabelling) and the ImageFolder reader."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustcl.config import ConfigError, load_config
from robustcl.data import DataError, dataset_info, load_dataset, verify_files
from robustcl.data import files, stl10
from robustcl.splits import load_split

N_TRAIN, N_TEST = 7, 5
# The official lists, copied from STL-10's class_names.txt and CIFAR-10's batches.meta label_names.
OFFICIAL_STL10 = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
OFFICIAL_CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cache under tmp_path, no URL override, tiny official split sizes, empty memo."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTCL_DATA", str(cache))
    monkeypatch.delenv(stl10.URL_ENV, raising=False)
    monkeypatch.setattr(stl10, "COUNTS", {"train": N_TRAIN, "test": N_TEST})
    files.clear_memo()
    yield cache
    files.clear_memo()




# ---------------------------------------------------------------- STL-10 writers (official format)

def _stl_bytes(images: np.ndarray) -> bytes:
    """X.bin bytes written pixel by pixel at the official offset: image*27648 + channel*9216 + col*96 + row."""
    n_idx, c_idx, r_idx, col_idx = (axis.reshape(-1) for axis in np.indices(images.shape))
    out = np.zeros(images.size, np.uint8)
    out[n_idx * 27648 + c_idx * 9216 + col_idx * 96 + r_idx] = images.reshape(-1)
    return out.tobytes()


def _write_stl(parent: Path, seed: int = 0, labels: dict[str, np.ndarray] | None = None
               ) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A tiny STL-10 (7 train, 5 test) in `parent/stl10_binary`; returns the folder and images + 1-based labels."""
    rng = np.random.default_rng(seed)
    folder = parent / stl10.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = labels[split] if labels else rng.integers(1, 11, n).astype(np.uint8)
        x_name, y_name = stl10.SPLIT_FILES[split]
        (folder / x_name).write_bytes(_stl_bytes(images))
        (folder / y_name).write_bytes(y.astype(np.uint8).tobytes())
        written[split] = (images, y.astype(np.int64))
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)))
    (folder / "class_names.txt").write_text("\n".join(OFFICIAL_STL10) + "\n")
    (folder / "fold_indices.txt").write_text("0 1 2\n3 4\n")
    return folder, written


def _tar(folder: Path, tar_path: Path) -> Path:
    """Gzip tarball of `folder` under its own name."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return tar_path


# ---------------------------------------------------------------- STL-10

def test_stl10_pixels_are_column_major_planes_and_labels_shift(tmp_path: Path) -> None:
    _, written = _write_stl(tmp_path / "root", labels={"train": np.array([1, 10, 3, 4, 5, 6, 2], np.uint8),
                                                       "test": np.array([10, 9, 8, 7, 1], np.uint8)})
    marker_file = tmp_path / "root" / stl10.FOLDER / "train_X.bin"
    blob = bytearray(marker_file.read_bytes())
    blob[2 * 27648 + 1 * 9216 + 70 * 96 + 5] = 0  # image 2, channel 1 (green), row 5, column 70
    blob[2 * 27648 + 1 * 9216 + 5 * 96 + 70] = 255  # the transposed position: row 70, column 5
    marker_file.write_bytes(bytes(blob))
    train = load_dataset("stl10", "train", root=tmp_path / "root")
    assert tuple(train.images.shape) == (N_TRAIN, 3, 96, 96) and train.images.dtype == torch.uint8
    assert int(train.images[2, 1, 5, 70]) == 0 and int(train.images[2, 1, 70, 5]) == 255
    expected = written["train"][0].copy()
    expected[2, 1, 5, 70], expected[2, 1, 70, 5] = 0, 255
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == [0, 9, 2, 3, 4, 5, 1]
    test = load_dataset("stl10", "test", root=tmp_path / "root" / stl10.FOLDER)  # the folder itself as root
    assert np.array_equal(test.images.numpy(), written["test"][0]) and test.labels.tolist() == [9, 8, 7, 6, 0]
    assert train.info == dataset_info("stl10") and train.info.mean == (0.4467, 0.4398, 0.4066)


def test_stl10_tarball_equals_extracted_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, written = _write_stl(tmp_path / "src", seed=3)
    tarball = _tar(folder, tmp_path / "tar_root" / stl10.TARBALL)
    for split in ("train", "test"):
        data = load_dataset("stl10", split, root=tmp_path / "tar_root")
        assert np.array_equal(data.images.numpy(), written[split][0])
        assert np.array_equal(data.labels.numpy(), written[split][1] - 1)
    with pytest.raises(DataError, match=rf"checksum mismatch for {tarball}"):
        verify_files("stl10", root=tmp_path / "tar_root")
    monkeypatch.setattr(stl10, "TARBALL_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    assert verify_files("stl10", root=tmp_path / "tar_root") == [tarball]
    assert [p.name for p in verify_files("stl10", root=tmp_path / "src")] == \
        ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]


def test_stl10_resize_shape_constant_and_axes(tmp_path: Path) -> None:
    folder, _ = _write_stl(tmp_path / "root")
    images = np.zeros((N_TEST, 3, 96, 96), np.uint8)
    images[0] = 137                     # constant image
    images[1, :, :, 48:] = 255          # left half black, right half white (columns)
    images[2, 0, 30:60, 12:84] = 200    # a wide red rectangle: rows 30..59, columns 12..83
    images[3, :, :, 1::2] = 255         # one-pixel vertical stripes
    (folder / "test_X.bin").write_bytes(_stl_bytes(images))
    small = load_dataset("stl10", "test", root=tmp_path / "root", size=32)
    assert tuple(small.images.shape) == (N_TEST, 3, 32, 32)
    assert (small.info.height, small.info.width) == (32, 32) and small.info == dataset_info("stl10", size=32)
    assert torch.all(small.images[0] == 137)
    edge = small.images[1]
    assert torch.all(edge == edge[:, :1, :])                      # every row identical: no row/column mix-up
    assert torch.all(edge[:, :, :15] == 0) and torch.all(edge[:, :, 17:] == 255)
    box = small.images[2, 0].float()  # rows 10..19, columns 4..27 at 1/3 scale; edges blurred by one pixel
    assert box[11:19, 5:27].min() == 200 and box[:9].max() == 0 and box[21:].max() == 0
    assert box[:, :3].max() == 0 and box[:, 29:].max() == 0
    assert torch.all(small.images[2, 1:] == 0)
    # Odd columns 255. Antialiased bilinear at 1/3 scale is a triangle filter with weights (1,2,3,2,1)/9 on
    # input columns 3i-1..3i+3, so interior output i is 255*4/9 = 113.3 (i odd) or 255*5/9 = 141.7 (i even);
    # at the borders the missing column is dropped and (2,3,2,1)/8 gives 127.5 -> 128 (round half to even).
    # Plain bilinear would alias to 0/255 and truncation would give 141 / 127.
    stripes = small.images[3]
    expected_row = [128] + [113 if i % 2 else 142 for i in range(1, 31)] + [128]
    assert torch.all(stripes == torch.tensor(expected_row, dtype=torch.uint8))
    big = load_dataset("stl10", "test", root=tmp_path / "root")
    assert np.array_equal(big.images.numpy(), images)             # default size 96: untouched


def test_cifar10_label_map_matches_official_class_lists() -> None:
    assert list(stl10.STL10_CLASSES) == OFFICIAL_STL10 and list(stl10.CIFAR10_CLASSES) == OFFICIAL_CIFAR10
    mapping = stl10.cifar10_label_map()
    assert mapping == (0, 2, 1, 3, 4, 5, 7, -1, 8, 9)
    for stl_label, cifar_label in enumerate(mapping):
        name = OFFICIAL_STL10[stl_label]
        if cifar_label < 0:
            assert name == "monkey"
        else:
            assert OFFICIAL_CIFAR10[cifar_label] == {"car": "automobile"}.get(name, name)
    assert sorted(c for c in mapping if c >= 0) == [i for i in range(10) if OFFICIAL_CIFAR10[i] != "frog"]


def test_stl10_cifar10_shared_drops_monkey_and_relabels(tmp_path: Path) -> None:
    stl_labels = np.array([8, 3, 1, 2, 10, 7, 5], np.uint8)  # 1-based: monkey, car, airplane, bird, truck, horse, deer
    _, written = _write_stl(tmp_path / "root", labels={"train": stl_labels, "test": np.arange(1, 6, dtype=np.uint8)})
    data = load_dataset("stl10", "train", root=tmp_path / "root", classes="cifar10-shared", size=48)
    assert data.labels.tolist() == [1, 0, 2, 9, 7, 4]  # automobile, airplane, bird, truck, horse, deer
    assert data.info.num_classes == 10 and tuple(data.images.shape) == (6, 3, 48, 48)
    full = load_dataset("stl10", "train", root=tmp_path / "root", classes="cifar10-shared")
    assert np.array_equal(full.images.numpy(), written["train"][0][1:])  # the monkey (first image) is gone


def test_stl10_truncated_file_and_bad_label_are_clear_errors(tmp_path: Path) -> None:
    folder, _ = _write_stl(tmp_path / "root")
    x_path = folder / "train_X.bin"
    x_path.write_bytes(x_path.read_bytes()[:-27648])  # one whole image short: still a multiple of 27648
    with pytest.raises(DataError, match=rf"truncated or corrupt STL-10 file {x_path}: 165888 bytes, expected "
                                        r"193536 .*re-download"):
        load_dataset("stl10", "train", root=tmp_path / "root")
    with pytest.raises(DataError, match=rf"truncated or corrupt STL-10 file {x_path}"):
        verify_files("stl10", root=tmp_path / "root")
    y_path = folder / "test_y.bin"
    y_path.write_bytes(bytes([1, 2, 11, 4, 5]))
    with pytest.raises(DataError, match=rf"corrupt STL-10 file {y_path}: label 11 outside 1..10"):
        load_dataset("stl10", "test", root=tmp_path / "root")
    y_path.write_bytes(bytes([1, 0, 3, 4, 5]))
    with pytest.raises(DataError, match="label 0 outside 1..10"):
        load_dataset("stl10", "test", root=tmp_path / "root")
    y_path.write_bytes(bytes([1, 2, 3, 4]))
    with pytest.raises(DataError, match=rf"{y_path}: 4 bytes, expected 5"):
        load_dataset("stl10", "test", root=tmp_path / "root")


def test_stl10_bad_options() -> None:
    with pytest.raises(DataError, match="size=0 must be an integer >= 1"):
        dataset_info("stl10", size=0)
    with pytest.raises(DataError, match="classes='cifar10' must be one of all, cifar10-shared"):
        load_dataset("stl10", "test", classes="cifar10")
    with pytest.raises(DataError, match="bogus.*valid options: verify, size, classes"):
        dataset_info("stl10", bogus=1)


def test_stl10_download_with_md5(data_http_server: tuple[Path, str], data_env: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    www, url = data_http_server
    folder, written = _write_stl(tmp_path / "src", seed=5)
    tarball = _tar(folder, www / stl10.TARBALL)
    monkeypatch.setenv(stl10.URL_ENV, url)
    monkeypatch.setattr(stl10, "TARBALL_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch for stl10_binary.tar.gz"):
        load_dataset("stl10", "test", download=True)
    assert not (data_env / "stl10" / stl10.TARBALL).exists()
    monkeypatch.setattr(stl10, "TARBALL_MD5", hashlib.md5(tarball.read_bytes()).hexdigest())
    data = load_dataset("stl10", "test", download=True, size=32)
    assert tuple(data.images.shape) == (N_TEST, 3, 32, 32)
    assert np.array_equal(data.labels.numpy(), written["test"][1] - 1)
    cache = data_env / "stl10"
    assert (cache / stl10.FOLDER / "train_X.bin").is_file() and (cache / stl10.TARBALL).is_file()
    assert np.array_equal(load_dataset("stl10", "train").images.numpy(), written["train"][0])


# ---------------------------------------------------------------- ImageFolder

COLOURS = {"ant": (200, 10, 10), "bee": (10, 200, 10), "cat": (10, 10, 200)}


def _solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    """A solid-colour image (width, height) saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def _write_folder(root: Path) -> None:
    """train: ant x2 (png, jpg), bee x1 (bmp, in a subfolder), cat x3 (png, webp, PNG); test: one png each."""
    _solid(root / "train" / "ant" / "b.jpg", COLOURS["ant"])
    _solid(root / "train" / "ant" / "a.png", COLOURS["ant"], (9, 31))
    _solid(root / "train" / "bee" / "sub" / "x.bmp", COLOURS["bee"])
    for name in ("c.png", "a.webp", "b.PNG"):
        _solid(root / "train" / "cat" / name, COLOURS["cat"])
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    for name, colour in COLOURS.items():
        _solid(root / "test" / name / "0.png", colour)


def test_imagefolder_labels_order_colours_and_stats(tmp_path: Path) -> None:
    _write_folder(tmp_path / "root")
    train = load_dataset("imagefolder", "train", root=tmp_path / "root", size=8)
    assert train.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert tuple(train.images.shape) == (6, 3, 8, 8) and train.info.num_classes == 3
    for image, label in zip(train.images, train.labels.tolist()):
        colour = torch.tensor(COLOURS[sorted(COLOURS)[label]], dtype=torch.int16).view(3, 1, 1)
        assert (image.to(torch.int16) - colour).abs().max() <= 3  # JPEG may move a solid colour slightly
    # train order within a class is by path: ant/a.png then ant/b.jpg (png is exact, jpeg approximate)
    assert torch.all(train.images[0] == torch.tensor(COLOURS["ant"], dtype=torch.uint8).view(3, 1, 1))
    pixels = train.images.double() / 255
    expected_mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    expected_std = tuple(pixels.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).tolist())
    assert np.allclose(train.info.mean, expected_mean, atol=1e-12)
    assert np.allclose(train.info.std, expected_std, atol=1e-12)
    hand_mean_r = (2 * 200 + 10 + 3 * 10) / 6 / 255  # approximately, the jpeg aside
    assert abs(train.info.mean[0] - hand_mean_r) < 2 / 255
    test = load_dataset("imagefolder", "test", root=tmp_path / "root", size=8)
    assert test.labels.tolist() == [0, 1, 2] and test.info == train.info  # test normalised with train stats


def test_imagefolder_centre_crop_then_resize(tmp_path: Path) -> None:
    root = tmp_path / "root"
    wide = Image.new("RGB", (30, 10), (255, 0, 0))
    wide.paste((0, 255, 0), (10, 0, 20, 10))   # centre square green
    wide.paste((0, 0, 255), (20, 0, 30, 10))   # right third blue
    root.joinpath("train", "k").mkdir(parents=True)
    wide.save(root / "train" / "k" / "wide.png")
    tall = Image.new("RGB", (6, 18), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 6, 6, 12))  # centre square white
    tall.save(root / "train" / "k" / "zz_tall.png")
    _solid(root / "test" / "k" / "t.png", (1, 2, 3))
    data = load_dataset("imagefolder", "train", root=root, size=5)
    assert torch.all(data.images[0] == torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1))
    assert torch.all(data.images[1] == 255)
    up = load_dataset("imagefolder", "train", root=root, size=20)  # upsampling works too
    assert tuple(up.images.shape) == (2, 3, 20, 20) and torch.all(up.images[1] == 255)


def test_imagefolder_greyscale(tmp_path: Path) -> None:
    _write_folder(tmp_path / "root")
    data = load_dataset("imagefolder", "test", root=tmp_path / "root", size=6, channels=1)
    assert tuple(data.images.shape) == (3, 1, 6, 6) and data.info.channels == 1 and len(data.info.mean) == 1
    for image, name in zip(data.images, sorted(COLOURS)):
        r, g, b = COLOURS[name]
        luma = round((r * 299 + g * 587 + b * 114) / 1000)  # ITU-R 601-2, Pillow's RGB -> L
        assert torch.all((image.to(torch.int16) - luma).abs() <= 1)


def test_imagefolder_class_mismatch_names_missing_classes(tmp_path: Path) -> None:
    _write_folder(tmp_path / "root")
    _solid(tmp_path / "root" / "train" / "dog" / "d.png", (5, 5, 5))
    _solid(tmp_path / "root" / "test" / "emu" / "e.png", (5, 5, 5))
    with pytest.raises(DataError, match=r"class folders differ .*missing from test/: dog; missing from train/: emu"):
        load_dataset("imagefolder", "train", root=tmp_path / "root")


def test_imagefolder_corrupt_and_empty_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^imagefolder needs data.root=DIR with train/ and test/ class folders$"):
        load_dataset("imagefolder", "train")
    with pytest.raises(DataError, match=r"test not found; imagefolder needs data.root"):
        _solid(tmp_path / "only_train" / "train" / "a" / "x.png", (1, 1, 1))
        load_dataset("imagefolder", "train", root=tmp_path / "only_train")
    _write_folder(tmp_path / "root")
    bad = tmp_path / "root" / "train" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=rf"cannot read image {bad} .*replace or delete the file"):
        load_dataset("imagefolder", "test", root=tmp_path / "root")  # train stats need every train image
    bad.unlink()
    truncated = tmp_path / "root" / "train" / "cat" / "d.png"  # header intact, pixel data cut short
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:6000])
    with pytest.raises(DataError, match=rf"cannot read image {truncated} \(OSError: .*truncated"):
        load_dataset("imagefolder", "train", root=tmp_path / "root")
    truncated.unlink()
    for path in (tmp_path / "root" / "test" / "ant").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=rf"no images .* in {tmp_path / 'root' / 'test' / 'ant'}"):
        load_dataset("imagefolder", "test", root=tmp_path / "root")
    with pytest.raises(DataError, match="no download"):
        load_dataset("imagefolder", "train", root=tmp_path / "root", download=True)
    with pytest.raises(DataError, match="channels=2 must be 3"):
        load_dataset("imagefolder", "train", root=tmp_path / "root", channels=2)
    with pytest.raises(DataError, match=r"load a split with load_dataset\('imagefolder'"):
        dataset_info("imagefolder")


def test_imagefolder_memo_notices_edited_files(tmp_path: Path) -> None:
    _write_folder(tmp_path / "root")
    first = load_dataset("imagefolder", "test", root=tmp_path / "root", size=4)
    first.images.zero_()  # a private copy: the memo must not change
    again = load_dataset("imagefolder", "test", root=tmp_path / "root", size=4)
    assert int(again.images[2, 2, 0, 0]) == 200
    _solid(tmp_path / "root" / "test" / "cat" / "0.png", (7, 8, 9), (33, 33))
    edited = load_dataset("imagefolder", "test", root=tmp_path / "root", size=4)
    assert edited.images[2, :, 0, 0].tolist() == [7, 8, 9]


def test_imagefolder_and_stl10_options_from_config(tmp_path: Path) -> None:
    _write_folder(tmp_path / "root")
    base = ["data.name=imagefolder", f"data.root={tmp_path / 'root'}"]
    cfg = load_config("fmnist-gbrcl", [*base, "data.options.size=8", "data.options.channels=1"])
    assert cfg.data.options == {"size": 8, "channels": 1}
    data = load_split(cfg, "train")
    assert tuple(data.images.shape) == (6, 1, 8, 8) and data.info.num_classes == 3
    default = load_split(load_config("fmnist-gbrcl", base), "test")
    assert tuple(default.images.shape) == (3, 3, 64, 64)
    with pytest.raises(ConfigError, match=r"data.options: unknown option\(s\) classes for dataset imagefolder; "
                                          "valid options: size, channels"):
        load_config("fmnist-gbrcl", [*base, "data.options.classes=all"])
    with pytest.raises(ConfigError, match="data.options must be a mapping"):
        load_config("fmnist-gbrcl", [*base, "data.options=8"])
    stl = load_config("fmnist-gbrcl", ["data.name=stl10", "data.options={size: 32, classes: cifar10-shared}"])
    assert stl.data.options == {"size": 32, "classes": "cifar10-shared"}
