"""Fashion-MNIST's `size` option: resized splits (antialiased bilinear), info that follows, bad sizes refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustcl.config import ConfigError, load_config
from robustcl.data import DataError, dataset_info, load_dataset
from robustcl.data.stl10 import resize_images

from test_data import _write_fmnist


def test_size_32_resizes_every_split_and_the_info(tmp_path: Path) -> None:
    written = _write_fmnist(tmp_path / "fm", n_train=5, n_test=3)
    for split in ("train", "test"):
        big = load_dataset("fashion-mnist", split, root=tmp_path / "fm", size=32)
        original = torch.from_numpy(written[split][0]).unsqueeze(1)
        assert big.images.shape == (len(original), 1, 32, 32) and big.images.dtype == torch.uint8
        assert torch.equal(big.images, resize_images(original, 32))
        assert big.labels.tolist() == written[split][1].tolist()
        assert not torch.equal(big.images[:, :, :28, :28], original)  # resized, not padded
    assert dataset_info("fashion-mnist", size=32).height == 32 and dataset_info("fashion-mnist").height == 28
    same = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", size=28)
    assert torch.equal(same.images, torch.from_numpy(written["test"][0]).unsqueeze(1))


def test_a_resized_split_is_a_copy(tmp_path: Path) -> None:
    _write_fmnist(tmp_path / "fm", n_train=5, n_test=3)
    first = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", size=32)
    first.images.zero_()  # the caller's copy: the memoised resize is not touched
    assert load_dataset("fashion-mnist", "test", root=tmp_path / "fm", size=32).images.sum() > 0


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_sizes_are_refused(size) -> None:
    with pytest.raises(DataError, match="fashion-mnist option size=.* must be an integer >= 1"):
        dataset_info("fashion-mnist", size=size)


def test_config_accepts_size_and_names_the_valid_options() -> None:
    assert load_config("fmnist-gbrcl", ["data.options={size: 32}"]).data.options == {"size": 32}
    with pytest.raises(ConfigError, match="valid options: verify, size"):
        load_config("fmnist-gbrcl", ["data.options={side: 32}"])
