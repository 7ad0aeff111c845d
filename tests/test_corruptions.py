"""Common corruptions (issue 24): the 19 corruptions, the official CIFAR-10-C / CIFAR-100-C reader, the generated
and cached sets, the evaluation record, the config and CLI, and the report and sweep columns."""
from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robustcl.config import ConfigError, load_config
from robustcl.data import DataError, load_dataset
from robustcl.data.corruptions import (ALL, EXTRA, STANDARD, THROUGH_RGB, corrupt, find_official, image_rngs,
                                       read_official)
from robustcl.data.corruptions.official import CIFAR10_C
from robustcl.evaluation.corrupted_sets import corrupted_sets, read_cache
from robustcl.evaluation.corruptions import corruption_record



def fmnist_found() -> bool:
    try:
        load_dataset("fashion-mnist", "test")
    except DataError:
        return False
    return True


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-ish uint8 test images: smooth random colour fields with a bright square (no flat 0 or 255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = []
    for _ in range(n):
        a = rng.uniform(0.2, 0.8, (channels, 3))
        image = a[:, :1, None] * xx + a[:, 1:2, None] * yy + a[:, 2:, None] * (1 - xx * yy)
        lo, hi = sorted(rng.integers(size // 6, size - size // 6, 2))
        image[:, lo:hi + 1, lo:hi + 1] = rng.uniform(0.3, 0.95, (channels, 1, 1))
        out.append(image / image.max() * 0.9 + 0.05)
    return np.round(np.stack(out) * 255).astype(np.uint8)


def test_all_is_the_benchmarks_15_and_the_extra_ones_are_named_ones():
    assert len(STANDARD) == 15 and len(EXTRA) == 4
    assert load_config("smoke", ["eval.corruptions=all"]).eval.corruption_names() == STANDARD
    assert load_config("smoke", [f"eval.corruptions=[{', '.join(EXTRA)}]"]).eval.corruption_names() == EXTRA


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("name", ALL)
def test_every_corruption_at_every_severity_changes_the_image_and_stays_uint8(name, channels, size):
    images = smooth_images(4, channels, size)
    for severity in range(1, 6):
        out = corrupt(images, name, severity, image_rngs(0, name, severity, range(4)))
        assert out.shape == images.shape and out.dtype == np.uint8  # uint8: in 0..255 by construction
        if channels == 1 and name == "saturate" and severity <= 3:  # documented: a grey pixel has no saturation
            assert (out == images).all()
        else:
            assert (out != images).any(), f"{name} severity {severity} left the images unchanged"


def test_a_corrupted_image_depends_on_its_test_index_and_seed_only():
    images = smooth_images(5, 3, 32)
    whole = corrupt(images, "snow", 3, image_rngs(7, "snow", 3, range(10, 15)))
    alone = corrupt(images[2:3], "snow", 3, image_rngs(7, "snow", 3, [12]))
    assert (whole[2] == alone[0]).all()
    other_seed = corrupt(images[2:3], "snow", 3, image_rngs(8, "snow", 3, [12]))
    assert (other_seed != alone).any()


def test_unknown_names_severities_and_shapes_are_one_line_data_errors():
    images = smooth_images(1, 3, 32)
    for call in (lambda: corrupt(images, "rain", 1, image_rngs(0, "rain", 1, [0])),
                 lambda: corrupt(images, "fog", 6, image_rngs(0, "fog", 6, [0])),
                 lambda: corrupt(smooth_images(1, 3, 32)[:, :2], "fog", 1, image_rngs(0, "fog", 1, [0]))):
        with pytest.raises(DataError) as info:
            call()
        assert "\n" not in str(info.value)


def test_the_config_refuses_unknown_corruptions_and_severities_outside_1_to_5_in_one_line():
    assert load_config("smoke", ["eval.corruptions=all"]).eval.corruption_names() == STANDARD
    assert load_config("smoke", ["eval.corruptions=[all, spatter, fog]"]).eval.corruption_names() == (*STANDARD,
                                                                                                       "spatter")
    assert load_config("smoke").eval.corruption_names() == ()
    for override, words in (("eval.corruptions=[fog, rain]", "rain"), ("eval.corruption_severities=[0, 2]", "1..5"),
                            ("eval.corruption_severities=[6]", "1..5"), ("eval.corruption_severities=[2, 2]", "repeat"),
                            ("eval.corruptions_limit=0", ">= 1")):
        with pytest.raises(ConfigError) as info:
            load_config("smoke", [override])
        assert words in str(info.value) and "\n" not in str(info.value)


def test_evaluate_options_become_eval_overrides():
    from robustcl.cli.phases import evaluate_overrides

    args = argparse.Namespace(attacks=None, eps=None, steps=None, limit=None, batch_size=None, seed=None, restarts=None,
                              mixed_reading=False, corruptions=["all", "spatter"], severities=[1, 5],
                              corruptions_limit=100)
    assert evaluate_overrides(args) == ["eval.corruptions=[all, spatter]", "eval.corruption_severities=[1, 5]",
                                        "eval.corruptions_limit=100"]


# ----------------------------------------------------------------------------- the official layout
def write_official(folder: Path, n_test: int, labels: np.ndarray, names=("fog", "snow")) -> dict[str, np.ndarray]:
    """CIFAR-10-C's layout for an n_test-image test split: <name>.npy (5 n_test, 32, 32, 3) + labels.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {n: rng.integers(0, 256, (5 * n_test, 32, 32, 3), dtype=np.uint8) for n in names}
    for n, a in arrays.items():
        np.save(folder / f"{n}.npy", a)
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))
    return arrays


def test_the_official_reader_round_trips_the_published_layout(tmp_path):
    labels = np.array([3, 8])
    arrays = write_official(tmp_path / "CIFAR-10-C", 2, labels)
    folder = find_official("cifar10", ("fog", "snow"), tmp_path)
    assert folder == tmp_path / "CIFAR-10-C"
    for severity in range(1, 6):
        got = read_official(folder, "fog", severity, np.array([1, 0]), labels[[1, 0]], 2)
        want = arrays["fog"][[(severity - 1) * 2 + 1, (severity - 1) * 2]].transpose(0, 3, 1, 2)
        assert got.shape == (2, 3, 32, 32) and got.dtype == np.uint8 and (got == want).all()
    with pytest.raises(DataError, match="lacks frost.npy"):  # a partial -C folder is not silently replaced
        find_official("cifar10", ("fog", "frost"), tmp_path)
    assert find_official("cifar10", ("fog",), tmp_path / "elsewhere") is None  # no -C set: generate


def test_a_truncated_or_wrong_shaped_or_mislabelled_official_file_is_a_one_line_error_naming_it(tmp_path):
    labels = np.array([3, 8])
    folder = tmp_path / "CIFAR-10-C"
    write_official(folder, 2, labels)
    data = (folder / "fog.npy").read_bytes()
    (folder / "fog.npy").write_bytes(data[: len(data) // 2])
    np.save(folder / "snow.npy", np.zeros((10, 28, 28, 3), np.uint8))
    cases = [("fog", labels, "fog.npy"), ("snow", labels, "snow.npy")]
    for name, want_labels, file in cases:
        with pytest.raises(DataError) as info:
            read_official(folder, name, 1, np.array([0, 1]), want_labels, 2)
        assert file in str(info.value) and "\n" not in str(info.value)
    np.save(folder / "snow.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="labels.npy does not match"):
        read_official(folder, "snow", 2, np.array([0, 1]), np.array([3, 9]), 2)
    with pytest.raises(DataError, match="checksum mismatch"):
        read_official(folder, "snow", 2, np.array([0, 1]), labels, 2, verify=True, spec=CIFAR10_C)


def fake_cifar10(root: Path, test_images: np.ndarray, test_labels: np.ndarray) -> None:
    """cifar-10-batches-py with tiny batches (the reader accepts any number of images)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    flat = test_images.reshape(len(test_images), -1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": flat, b"labels": [int(v) for v in test_labels]}, fh)


def test_cifar10_evaluations_read_the_official_set_in_the_test_splits_order(tmp_path):
    images = smooth_images(4, 3, 32)
    labels = np.array([1, 0, 3, 2])
    fake_cifar10(tmp_path, images, labels)
    arrays = write_official(tmp_path / "CIFAR-10-C", 4, labels, names=STANDARD)
    cfg = load_config("smoke", ["data.name=cifar10", f"data.root={tmp_path}", "data.val_size=1",
                                "eval.corruptions=all", "eval.corruptions_limit=null"])
    test = load_dataset("cifar10", "test", root=tmp_path)
    sets = corrupted_sets(cfg, test.images[[2, 3]], test.labels[[2, 3]], torch.tensor([2, 3]))
    assert sets.source.startswith("official CIFAR-10-C")
    got = sets.images("frost", 4).numpy()
    assert (got == arrays["frost"][[3 * 4 + 2, 3 * 4 + 3]].transpose(0, 3, 1, 2)).all()


# ---------------------------------------------------------------------------- generated, cached sets
def test_generated_sets_are_cached_atomically_and_shared_by_later_evaluations(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    cfg = load_config("smoke", ["eval.corruptions=[fog, saturate]", "eval.corruption_severities=[2, 5]",
                                "eval.corruptions_limit=5"])
    test = load_dataset("synthetic", "test", **cfg.data.reader_options(cfg.seed))
    index = torch.arange(10, 30)
    first = corrupted_sets(cfg, test.images[index], test.labels[index], index)
    assert first.source.startswith("generated") and len(first.labels) == 5
    made = first.images("fog", 5)
    assert first.generated_images == 5
    files = sorted(p.name for p in first.cache.iterdir())
    assert files == ["fog-s5.npz"]  # nothing half-written beside it
    again = corrupted_sets(cfg, test.images[index], test.labels[index], index)
    assert (again.images("fog", 5) == made).all() and again.generated_images == 0
    wider = load_config("smoke", ["eval.corruptions=[fog]", "eval.corruption_severities=[5]",
                                  "eval.corruptions_limit=null"])
    everything = corrupted_sets(wider, test.images, test.labels, torch.arange(len(test)))
    all_five = everything.images("fog", 5)
    assert everything.generated_images == len(test) - 5  # the 5 cached ones are reused
    assert (all_five[first.test_index] == made).all()
    index_stored, stored = read_cache(first.cache / "fog-s5.npz", tuple(test.images.shape[1:]))
    assert len(index_stored) == len(test) and (np.diff(index_stored) > 0).all()


class ConstantModel(torch.nn.Module):
    """Ignores its input: always the same logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def test_a_model_that_ignores_its_input_scores_chance_on_every_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    cfg = load_config("smoke", ["eval.corruptions=all", "eval.corruption_severities=[1, 5]",
                                "eval.corruptions_limit=null"])
    test = load_dataset("synthetic", "test", **cfg.data.reader_options(cfg.seed))
    k = cfg.data.synthetic.num_classes
    per_class = [torch.nonzero(test.labels == c)[:4, 0] for c in range(k)]
    index = torch.cat(per_class).sort().values  # balanced: 4 images of each class
    sets = corrupted_sets(cfg, test.images[index], test.labels[index], index)
    model = ConstantModel(k).eval()
    record = corruption_record(model, sets, torch.ones(len(index), dtype=torch.bool), cfg, _no_autocast)
    assert all(acc == pytest.approx(1 / k) for cells in record["per"].values() for acc in cells.values())
    assert record["mean"] == pytest.approx(1 / k) and record["standard"] is False and record["n"] == len(index)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.skipif(not fmnist_found(), reason="Fashion-MNIST is not installed here")
def test_more_severe_corruptions_cost_a_trained_model_more_accuracy_beyond_noise():
    """A least-squares linear classifier fitted on 20,000 Fashion-MNIST images (~80% clean): averaged over the 15
    corruptions, severity 1 > 3 > 5, and severity 1 beats 5 by more than 3 standard errors of the paired
    per-image difference (200 images x 15 corruptions)."""
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    x = torch.cat([train.images[:20000].double().flatten(1) / 255, torch.ones(20000, 1, dtype=torch.float64)], 1)
    targets = torch.nn.functional.one_hot(train.labels[:20000], 10).double()
    weights = torch.linalg.solve(x.T @ x + 1.0 * torch.eye(x.shape[1], dtype=torch.float64), x.T @ targets)
    images, labels = test.images[:200].numpy(), test.labels[:200]

    def correct(batch: np.ndarray) -> np.ndarray:
        flat = torch.cat([torch.from_numpy(batch).double().flatten(1) / 255, torch.ones(len(batch), 1).double()], 1)
        return ((flat @ weights).argmax(1) == labels).numpy()

    assert correct(images).mean() > 0.75
    flags = {s: np.concatenate([correct(corrupt(images, n, s, image_rngs(0, n, s, range(200)))) for n in STANDARD])
             for s in (1, 3, 5)}
    means = {s: f.mean() for s, f in flags.items()}
    assert means[1] > means[3] > means[5]
    diff = flags[1].astype(float) - flags[5].astype(float)
    assert diff.mean() > 3 * diff.std(ddof=1) / np.sqrt(len(diff))


def test_the_through_rgb_set_is_the_two_colour_corruptions():
    assert THROUGH_RGB == {"saturate", "spatter"}


# ---------------------------------------------------------------------------- report and sweep columns
def corruption_result(mean: float) -> dict:
    per = {n: {str(s): mean for s in range(1, 6)} for n in STANDARD}
    return {"per": per, "per_severity": {str(s): mean for s in range(1, 6)}, "mean": mean, "n": 10,
            "source": "generated", "names": list(STANDARD), "severities": [1, 2, 3, 4, 5], "standard": True,
            "clean_on_same_images": 0.9, "seconds": 1.0, "images_per_second": 750.0}


def test_the_report_has_a_corruption_table_and_plot(tmp_path):
    from robustcl.runs.report import corruption_section

    results = {"protocols": {"slf": {"branch": "adversarial", "corruptions": corruption_result(0.5)}}}
    lines = corruption_section([("run", results)], tmp_path / "plots" / "corruptions.png")
    text = "\n".join(lines)
    assert "| fog | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |" in text and "CA (the benchmark's 15" in text
    assert (tmp_path / "plots" / "corruptions.png").is_file()
    assert corruption_section([("run", {"protocols": {"slf": {"branch": "benign"}}})], tmp_path / "x.png") == []


def test_sweep_summaries_carry_a_ca_column_with_its_interval():
    from robustcl.sweep.stats import raw_csv
    from robustcl.sweep.summary import aggregate, summary_csv, summary_markdown_table

    class Planned:
        def __init__(self, seed: int) -> None:
            self.label, self.seed, self.name = "a", seed, f"a-seed{seed}"

    entries = [(Planned(s), {"method": "gbrcl", "protocols": {"slf": {
        "branch": "adversarial", "clean_acc": 0.8, "robust": {"pgd20-linf-0.1": 0.4},
        "corruptions": corruption_result(m)}}}) for s, m in ((0, 0.5), (1, 0.6), (2, 0.7))]
    rows = aggregate(entries)
    assert rows[0].corruption[0] == pytest.approx(0.6) and rows[0].corruption_ci.lo < 0.6 < rows[0].corruption_ci.hi
    table = summary_markdown_table(rows)
    assert "CA (%) | CA 95% CI |" in table and "60.00 ± 10.00" in table
    assert summary_csv(rows).splitlines()[1].split(",")[-4] == repr(0.6)
    assert "corruption_acc" in raw_csv(entries).splitlines()[0] and raw_csv(entries).splitlines()[1].endswith(",0.5")
    plain = [(p, {**r, "protocols": {"slf": {k: v for k, v in r["protocols"]["slf"].items() if k != "corruptions"}}})
             for p, r in entries]
    assert "CA (%)" not in summary_markdown_table(aggregate(plain))


def test_npz_cache_reader_ignores_a_damaged_file(tmp_path):
    path = tmp_path / "fog-s1.npz"
    path.write_bytes(b"not a zip")
    index, images = read_cache(path, (1, 28, 28))
    assert len(index) == 0 and images.shape == (0, 1, 28, 28)
    buffer = io.BytesIO()
    np.savez(buffer, index=np.arange(2), images=np.zeros((2, 3, 32, 32), np.uint8))
    path.write_bytes(buffer.getvalue())
    assert len(read_cache(path, (1, 28, 28))[0]) == 0  # another shape: not this dataset's


def test_the_official_tar_is_downloaded_md5_checked_and_extracted_into_the_cache(tmp_path, monkeypatch,
                                                                                  data_http_server):
    """fetch_official on a loopback server: a small tar in the published layout (its md5 put in place of
    Zenodo's, which only the real 2.9 GB tar has); a tar with another md5 is refused."""
    import dataclasses
    import tarfile

    from robustcl.data.corruptions import OFFICIAL, fetch_official
    from robustcl.data.files import file_digest

    www, url = data_http_server
    labels = np.array([3, 8])
    write_official(tmp_path / "src" / "CIFAR-10-C", 2, labels)
    with tarfile.open(www / "CIFAR-10-C.tar", "w") as tar:
        tar.add(tmp_path / "src" / "CIFAR-10-C", arcname="CIFAR-10-C")
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTCL_CIFAR_C_URL", url)
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(CIFAR10_C, tarball_md5="0" * 32))
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_official("cifar10")
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(CIFAR10_C, tarball_md5=file_digest(www / "CIFAR-10-C.tar", "md5")))
    folder = fetch_official("cifar10")
    assert folder == tmp_path / "cache" / "cifar10" / "CIFAR-10-C"
    assert find_official("cifar10", ("fog", "snow"), None) == folder
    assert read_official(folder, "snow", 3, np.array([1]), labels[[1]], 2).shape == (1, 3, 32, 32)


def test_evaluations_that_need_the_official_tar_at_once_download_and_extract_it_once(tmp_path, monkeypatch):
    """Three callers of fetch_official at the same moment (a sweep's workers): one request, one extraction,
    every caller gets the complete folder (the waiters no longer extract over a folder another one reads)."""
    import dataclasses
    import tarfile
    import threading

    from range_server import Server

    from robustcl.data.corruptions import OFFICIAL, fetch_official
    from robustcl.data.files import file_digest

    labels = np.array([3, 8])
    write_official(tmp_path / "src" / "CIFAR-10-C", 2, labels)
    with tarfile.open(tmp_path / "CIFAR-10-C.tar", "w") as tar:
        tar.add(tmp_path / "src" / "CIFAR-10-C", arcname="CIFAR-10-C")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(
        CIFAR10_C, tarball_md5=file_digest(tmp_path / "CIFAR-10-C.tar", "md5")))
    server = Server(files={"/CIFAR-10-C.tar": (tmp_path / "CIFAR-10-C.tar").read_bytes()}, delay=0.3)
    got, errors = [], []

    def evaluation() -> None:
        try:
            folder = fetch_official("cifar10")
            got.append(read_official(folder, "snow", 3, np.array([1]), labels[[1]], 2).shape)
        except Exception as exc:  # noqa: BLE001 - collected and shown below
            errors.append(exc)

    with server as base:
        monkeypatch.setenv("ROBUSTCL_CIFAR_C_URL", base)
        workers = [threading.Thread(target=evaluation) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    assert errors == [] and got == [(1, 3, 32, 32)] * 3 and server.requests == [None]
    assert not [p.name for p in (tmp_path / "cache" / "cifar10").iterdir() if p.name.startswith(".")]


def test_paired_differences_carry_the_ca_difference_over_seeds():
    from robustcl.sweep.stats import DIFF_COLUMNS, differences_csv, differences_markdown, paired_differences

    class Planned:
        def __init__(self, label: str, seed: int) -> None:
            self.label, self.seed, self.name = label, seed, f"{label}-seed{seed}"

    def entry(label: str, seed: int, ca: float | None) -> tuple:
        protocol = {"branch": "adversarial", "clean_acc": 0.8, "robust": {"pgd20-linf-0.1": 0.4}}
        if ca is not None:
            protocol["corruptions"] = corruption_result(ca)
        return Planned(label, seed), {"method": "m", "from_rows": "rows.csv", "protocols": {"slf": protocol}}

    entries = [entry("base", s, 0.5) for s in (0, 1, 2)] + [entry("new", s, v) for s, v in ((0, 0.6), (1, 0.65), (2, 0.7))]
    (diff,) = paired_differences(entries, "base")
    assert diff.corruption_t.estimate == pytest.approx(0.15) and diff.corruption_t.lo > 0
    assert "Δ CA, t (seeds)" in "\n".join(differences_markdown([diff], "base"))
    assert DIFF_COLUMNS[-3:] == ["corruption_t_estimate", "corruption_t_lo", "corruption_t_hi"]
    assert differences_csv([diff], "base").splitlines()[1].split(",")[-3] == repr(diff.corruption_t.estimate)
    without = [entry("base", s, None) for s in (0, 1)] + [entry("new", s, 0.6) for s in (0, 1)]
    (diff,) = paired_differences(without, "base")
    assert diff.corruption_t is None and "Δ CA" not in "\n".join(differences_markdown([diff], "base"))
