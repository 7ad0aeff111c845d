"""`robustcl transfer`: a 3-channel encoder fine-tuned and evaluated on STL-10 files in the official format."""
from __future__ import annotations

import json

import numpy as np

from robustcl.cli import main
from robustcl.data import files, stl10


def _write_tiny_stl10(folder, n_train: int, n_test: int) -> None:
    """stl10_binary/ with column-major planes (image*27648 + channel*9216 + col*96 + row) and labels 1..10."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(1, 11, n).astype(np.uint8)
        images = np.repeat(np.repeat((labels * 20).astype(np.uint8)[:, None, None, None], 3, 1), 96, 2)
        images = np.repeat(images, 96, 3) + rng.integers(0, 10, (n, 3, 96, 96), dtype=np.uint8)
        x_name, y_name = stl10.SPLIT_FILES[split]
        (folder / x_name).write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / y_name).write_bytes(labels.tobytes())


def test_transfer_fits_heads_on_stl10_in_a_new_run_and_leaves_the_source_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(stl10, "COUNTS", {"train": 60, "test": 20})
    files.clear_memo()
    _write_tiny_stl10(tmp_path / "stl" / stl10.FOLDER, 60, 20)
    source = tmp_path / "src"
    assert main(["pretrain", "--config", "smoke", "--out", str(source), "--quiet", "data.synthetic.channels=3",
                 "data.synthetic.size=32"]) == 0
    before = sorted(p.name for p in source.iterdir())
    assert main(["transfer", "--run", str(source), "--data", "stl10", "--size", "32", "--root", str(tmp_path / "stl"),
                 "--val-size", "20", "--protocol", "slf", "--quiet", "finetune.epochs=1"]) == 0
    target = source / "transfer-stl10-32px"
    results = json.loads((target / "results.json").read_text())
    assert results["dataset"] == "synthetic"  # the encoder's own training set, from its metadata
    assert results["n_eval"] == 20 and set(results["protocols"]) == {"slf"}
    assert (target / "encoder.safetensors").read_bytes() == (source / "encoder.safetensors").read_bytes()
    assert "name: stl10" in (target / "config.yaml").read_text()
    assert sorted(p.name for p in source.iterdir()) == sorted([*before, "transfer-stl10-32px"])
    capsys.readouterr()
    assert main(["transfer", "--run", str(source), "--data", "stl10", "--size", "32", "--root", str(tmp_path / "stl"),
                 "--val-size", "20", "--protocol", "slf", "--quiet"]) == 2  # a finished transfer is not replaced
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["transfer", "--run", str(source), "--data", "stl10", "--size", "32", "--root", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "t2"), "--quiet"]) == 2
    assert "stl10" in capsys.readouterr().err and not (tmp_path / "t2").exists()  # nothing written on bad input


def test_transfer_refuses_an_encoder_with_another_channel_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(stl10, "COUNTS", {"train": 60, "test": 20})
    files.clear_memo()
    _write_tiny_stl10(tmp_path / "stl" / stl10.FOLDER, 60, 20)
    source = tmp_path / "grey"
    assert main(["pretrain", "--config", "smoke", "--out", str(source), "--quiet", "train.max_steps=1"]) == 0
    capsys.readouterr()
    assert main(["transfer", "--run", str(source), "--data", "stl10", "--size", "16", "--root", str(tmp_path / "stl"),
                 "--val-size", "20", "--quiet"]) == 2
    assert "takes 1-channel images but stl10 has 3" in capsys.readouterr().err
    assert not (source / "transfer-stl10-16px").exists()
