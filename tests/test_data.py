"""Tests for robustcl.data: official file formats, safety, resolution, download, synthetic data, fetch."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from robustcl.data import (
    DATASETS,
    ArrayDataset,
    DataError,
    DatasetInfo,
    dataset_info,
    load_dataset,
    locate_dataset,
    verify_files,
)
from robustcl.data import cifar, fetch, files, idx, synthetic

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- file writers (official formats)

def _idx(array: np.ndarray, magic: int) -> bytes:
    """IDX bytes: big-endian magic, big-endian dims, then the uint8 data."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fmnist(directory: Path, n_train: int = 12, n_test: int = 7, gz: bool = True,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny Fashion-MNIST in the official file names; returns the arrays written per split."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_name, label_name = idx.SPLIT_FILES[split]
        for name, blob in ((image_name, _idx(images, 0x803)), (label_name, _idx(labels, 0x801))):
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
            else:
                (directory / name).write_bytes(blob)
        written[split] = (images, labels)
    return written


def _py2_save(obj: Any, out: bytearray, reconstruct_module: str) -> None:
    """Append `obj` the way Python 2 cPickle protocol 2 wrote the CIFAR batches (str -> STRING opcodes)."""
    if isinstance(obj, np.ndarray):
        out += (f"c{reconstruct_module}\n_reconstruct\n".encode() + b"cnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01")
        _py2_save(tuple(obj.shape), out, reconstruct_module)
        out += (b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
                b"\x89")
        _py2_save(obj.tobytes(), out, reconstruct_module)
        out += b"tb"
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    elif isinstance(obj, int):
        out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"M" + struct.pack("<H", obj) if 0 <= obj < 65536 \
            else b"J" + struct.pack("<i", obj)
    elif isinstance(obj, tuple):
        for item in obj:
            _py2_save(item, out, reconstruct_module)
        out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
    elif isinstance(obj, list):
        out += b"](" if obj else b"]"
        for item in obj:
            _py2_save(item, out, reconstruct_module)
        out += b"e" if obj else b""
    elif isinstance(obj, dict):
        out += b"}("
        for key, value in obj.items():
            _py2_save(key, out, reconstruct_module)
            _py2_save(value, out, reconstruct_module)
        out += b"u"
    else:
        raise TypeError(type(obj))


def _py2_pickle(obj: Any, reconstruct_module: str = "numpy.core.multiarray") -> bytes:
    """A protocol-2 pickle as Python 2 cPickle wrote it (real CIFAR python batches)."""
    out = bytearray(b"\x80\x02")
    _py2_save(obj, out, reconstruct_module)
    return bytes(out + b".")


def _cifar_batches(num_classes: int, sizes: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random batches: data (n, 3072) uint8, fine and coarse labels."""
    rng = np.random.default_rng(seed)
    return [{"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "fine": rng.integers(0, num_classes, n), "coarse": rng.integers(0, 20, n)} for n in sizes]


def _cifar_split_batches(name: str, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Train/test batch contents matching the official member lists (5+1 for CIFAR-10, 1+1 for 100)."""
    if name == "cifar10":
        batches = _cifar_batches(10, [3, 2, 4, 1, 3, 5], seed)
        return {"train": batches[:5], "test": batches[5:]}
    batches = _cifar_batches(100, [9, 4], seed)
    return {"train": batches[:1], "test": batches[1:]}


def _write_cifar(directory: Path, name: str, kind: str, content: dict[str, list[dict[str, np.ndarray]]],
                 reconstruct_module: str = "numpy.core.multiarray") -> Path:
    """Write `content` in the official python or binary layout under `directory`; return the folder."""
    reader = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    fmt = next(f for f in reader.formats if f.kind == kind)
    folder = directory / fmt.folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, members in fmt.splits.items():
        for member, batch in zip(members, content[split]):
            if kind == "python":
                labels = [int(v) for v in batch["fine"]]
                obj = {b"batch_label": b"batch", b"data": batch["data"],
                       b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
                if name == "cifar10":
                    obj[b"labels"] = labels
                else:
                    obj[b"fine_labels"] = labels
                    obj[b"coarse_labels"] = [int(v) for v in batch["coarse"]]
                blob = _py2_pickle(obj, reconstruct_module)
            else:
                heads = [batch["fine"][:, None]] if name == "cifar10" else [batch["coarse"][:, None],
                                                                            batch["fine"][:, None]]
                blob = np.concatenate([*(h.astype(np.uint8) for h in heads), batch["data"]], axis=1).tobytes()
            (folder / member).write_bytes(blob)
    return folder


def _tar(folder: Path, tar_path: Path) -> Path:
    """Gzip tarball of `folder` with its official top-level directory name."""
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return tar_path


def _expected(content: dict[str, list[dict[str, np.ndarray]]], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated data rows and fine labels of a split."""
    batches = content[split]
    return np.concatenate([b["data"] for b in batches]), np.concatenate([b["fine"] for b in batches])


def _md5(path: Path) -> str:
    """Hex md5 of a file."""
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate every test: cache under tmp_path, no system dirs, no URL overrides, empty memo."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTCL_DATA", str(cache))
    monkeypatch.delenv("ROBUSTCL_FASHION_MNIST_URL", raising=False)
    monkeypatch.delenv("ROBUSTCL_CIFAR_URL", raising=False)
    monkeypatch.setattr(idx.FASHION_MNIST, "system_dirs", (tmp_path / "system" / "fashion-mnist",))
    files.clear_memo()
    yield cache
    files.clear_memo()




def _closed_port_url() -> str:
    """A loopback URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ---------------------------------------------------------------- registry, info, ArrayDataset

def test_registry_names_and_static_info() -> None:
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "synthetic", "stl10", "imagefolder")
    assert dataset_info("fashion-mnist") == DatasetInfo("fashion-mnist", 10, 1, 28, 28, (0.2860,), (0.3530,))
    c10, c100 = dataset_info("cifar10"), dataset_info("cifar100")
    assert (c10.num_classes, c10.channels, c10.height, c10.width) == (10, 3, 32, 32)
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)
    assert c100.num_classes == 100 and c100.mean == (0.5071, 0.4865, 0.4409) and c100.std == (0.2673, 0.2564, 0.2762)
    syn = dataset_info("synthetic", channels=3, size=20, num_classes=4)
    assert syn == DatasetInfo("synthetic", 4, 3, 20, 20, (0.5,) * 3, (0.25,) * 3)


def test_unknown_name_split_option_list_valid_ones() -> None:
    with pytest.raises(DataError, match="valid names: fashion-mnist, cifar10, cifar100, synthetic"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="valid splits: train, test"):
        load_dataset("synthetic", "val")
    with pytest.raises(DataError, match=r"bogus.*valid options: num_classes, channels, size, n_train, n_test, seed"):
        load_dataset("synthetic", "train", bogus=1)
    with pytest.raises(DataError, match="size.*valid options: verify"):
        dataset_info("cifar10", size=32)
    with pytest.raises(DataError, match="channels=0 must be an integer >= 1"):
        load_dataset("synthetic", "train", channels=0)
    with pytest.raises(DataError, match="seed=True"):
        dataset_info("synthetic", seed=True)


def test_array_dataset_subset_and_validation() -> None:
    info = DatasetInfo("toy", 3, 1, 2, 2, (0.5,), (0.25,))
    images = torch.arange(5 * 4, dtype=torch.uint8).reshape(5, 1, 2, 2)
    data = ArrayDataset(images, torch.tensor([0, 1, 2, 0, 1]), info)
    assert len(data) == 5
    sub = data.subset(torch.tensor([4, 0]))
    assert sub.labels.tolist() == [1, 0] and torch.equal(sub.images, images[[4, 0]]) and sub.images.is_contiguous()
    masked = data.subset(data.labels == 1)
    assert masked.labels.tolist() == [1, 1] and masked.info is info
    with pytest.raises(DataError, match="integer or boolean"):
        data.subset(torch.tensor([0.5]))
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(images.float(), data.labels, info)
    with pytest.raises(DataError, match="5 images but 4 labels"):
        ArrayDataset(images, data.labels[:4], info)
    with pytest.raises(DataError, match="does not match info"):
        ArrayDataset(images.reshape(5, 4, 1, 1), data.labels, info)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    written = _write_fmnist(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        data = load_dataset("fashion-mnist", split, root=tmp_path / "fm")
        images, labels = written[split]
        assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
        assert tuple(data.images.shape) == (len(labels), 1, 28, 28) and data.images.is_contiguous()
        assert np.array_equal(data.images[:, 0].numpy(), images)
        assert np.array_equal(data.labels.numpy(), labels.astype(np.int64))
        assert data.info == dataset_info("fashion-mnist")


def test_loaded_tensors_are_private_copies(tmp_path: Path) -> None:
    written = _write_fmnist(tmp_path / "fm")
    first = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    first.images.zero_()
    first.labels.fill_(7)
    second = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    assert np.array_equal(second.images[:, 0].numpy(), written["train"][0])
    assert np.array_equal(second.labels.numpy(), written["train"][1])


def test_memo_notices_replaced_files(tmp_path: Path) -> None:
    _write_fmnist(tmp_path / "fm", seed=0)
    load_dataset("fashion-mnist", "test", root=tmp_path / "fm")
    written = _write_fmnist(tmp_path / "fm", n_test=9, seed=1)
    again = load_dataset("fashion-mnist", "test", root=tmp_path / "fm")
    assert np.array_equal(again.images[:, 0].numpy(), written["test"][0])


def _corrupt_case(directory: Path, case: str) -> Path:
    """Damage one file of a tiny Fashion-MNIST copy in a named way; return the damaged file."""
    images = np.zeros((4, 28, 28), np.uint8)
    labels = np.array([1, 2, 3, 4], np.uint8)
    blobs = {"train-images-idx3-ubyte": _idx(images, 0x803), "train-labels-idx1-ubyte": _idx(labels, 0x801)}
    target = "train-images-idx3-ubyte"
    if case == "magic":
        blobs[target] = _idx(images, 0x801)
    elif case == "truncated":
        blobs[target] = blobs[target][:-10]
    elif case == "trailing":
        blobs[target] += b"\x00"
    elif case == "count":
        target = "train-labels-idx1-ubyte"
        blobs[target] = _idx(labels[:3], 0x801)
    elif case == "label-range":
        target = "train-labels-idx1-ubyte"
        blobs[target] = _idx(np.array([1, 2, 3, 10], np.uint8), 0x801)
    elif case == "dims":
        blobs[target] = _idx(np.zeros((4, 28, 27), np.uint8), 0x803)
    directory.mkdir(parents=True)
    for name, blob in blobs.items():
        compressed = gzip.compress(blob, mtime=0)
        (directory / f"{name}.gz").write_bytes(compressed[:-20] if case == "gzip" and name == target else compressed)
    return directory / f"{target}.gz"


@pytest.mark.parametrize("case, detail", [
    ("magic", "magic 0x00000801, expected 0x00000803"),
    ("truncated", "truncated"),
    ("trailing", "trailing bytes"),
    ("count", "3 labels for 4 images"),
    ("label-range", "label 10 outside 0..9"),
    ("dims", r"dims \(4, 28, 27\)"),
    ("gzip", "bad gzip stream"),
])
def test_corrupt_idx_raises_naming_file(tmp_path: Path, case: str, detail: str) -> None:
    bad = _corrupt_case(tmp_path / "fm", case)
    with pytest.raises(DataError, match=detail) as err:
        idx.FASHION_MNIST.read(tmp_path / "fm", "train")
    assert f"corrupt IDX file {bad}" in str(err.value) and "re-download" in str(err.value)


def test_verify_files_accepts_official_or_recompressed_and_rejects_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "fm"
    _write_fmnist(directory)
    for name in idx.RAW_MD5:  # pretend the generated files are the official ones
        gz_path = directory / f"{name}.gz"
        monkeypatch.setitem(idx.RAW_MD5, name, hashlib.md5(gzip.decompress(gz_path.read_bytes())).hexdigest())
        monkeypatch.setitem(idx.GZ_MD5, gz_path.name, _md5(gz_path))
    assert len(verify_files("fashion-mnist", directory)) == 4
    # Re-compressed (as Debian ships it): gzip md5 differs, decompressed content still matches.
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=12345))
    assert _md5(path) != idx.GZ_MD5[path.name]
    assert len(verify_files("fashion-mnist", directory)) == 4
    # Different content: rejected, naming the file.
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=f"checksum mismatch for {path}"):
        verify_files("fashion-mnist", directory)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion-mnist", "test", root=directory, verify=True)
    assert len(load_dataset("fashion-mnist", "test", root=directory)) == 7  # verify is opt-in


# ---------------------------------------------------------------- CIFAR

def test_cifar_pixel_layout_is_rgb_planes_row_major(tmp_path: Path) -> None:
    content = _cifar_split_batches("cifar10")
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[1 * 32 + 2] = 200            # red plane, row 1, column 2
    row[1024 + 31 * 32 + 0] = 201    # green plane, row 31, column 0
    content["test"][0]["data"][0] = row
    _write_cifar(tmp_path, "cifar10", "python", content)
    image = load_dataset("cifar10", "test", root=tmp_path).images[0]
    assert image[0, 1, 2] == 200 and image[0, 2, 1] == 10
    assert image[1, 31, 0] == 201 and image[1, 0, 31] == 20
    assert (image[2] == 30).all()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar_python_extracted_and_tarball(tmp_path: Path, name: str, module: str) -> None:
    content = _cifar_split_batches(name, seed=3)
    folder = _write_cifar(tmp_path / "extracted", name, "python", content, reconstruct_module=module)
    tar_dir = tmp_path / "tarball"
    tar_dir.mkdir()
    reader = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    _tar(folder, tar_dir / reader.formats[0].tarball)
    for root in (tmp_path / "extracted", folder, tar_dir):  # parent dir, the folder itself, tarball
        for split in ("train", "test"):
            data = load_dataset(name, split, root=root)
            pixels, labels = _expected(content, split)
            assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
            assert tuple(data.images.shape) == (len(labels), 3, 32, 32) and data.images.is_contiguous()
            assert np.array_equal(data.images.reshape(len(labels), -1).numpy(), pixels)
            assert np.array_equal(data.labels.numpy(), labels)
    assert sorted(p.name for p in tar_dir.iterdir()) == [reader.formats[0].tarball]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_equals_pickle(tmp_path: Path, name: str) -> None:
    content = _cifar_split_batches(name, seed=5)
    _write_cifar(tmp_path / "py", name, "python", content)
    bin_folder = _write_cifar(tmp_path / "bin", name, "binary", content)
    reader = cifar.CIFAR10 if name == "cifar10" else cifar.CIFAR100
    tar_dir = tmp_path / "bintar"
    tar_dir.mkdir()
    _tar(bin_folder, tar_dir / reader.formats[1].tarball)
    for split in ("train", "test"):
        from_pickle = load_dataset(name, split, root=tmp_path / "py")
        for root in (tmp_path / "bin", tar_dir):
            from_binary = load_dataset(name, split, root=root)
            assert torch.equal(from_pickle.images, from_binary.images)
            assert torch.equal(from_pickle.labels, from_binary.labels)
    if name == "cifar100":  # fine labels (second byte), not coarse ones
        assert np.array_equal(load_dataset(name, "train", root=tmp_path / "bin").labels.numpy(),
                              content["train"][0]["fine"])


def test_cifar_binary_partial_record_is_corrupt(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, "cifar10", "binary", _cifar_split_batches("cifar10"))
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"corrupt CIFAR file .*test_batch\.bin: .*3073-byte records"):
        load_dataset("cifar10", "test", root=tmp_path)


def _malicious(kind: str, marker: Path) -> bytes:
    """Pickles that would touch `marker` if their globals were resolved."""
    command = f"touch {marker}".encode()
    call = f"open('{marker}', 'w')".encode()
    if kind == "os.system":
        return b"cos\nsystem\n(S'" + command + b"'\ntR."
    if kind == "posix.system":
        return b"cposix\nsystem\n(S'" + command + b"'\ntR."
    if kind == "__builtin__.eval":
        return b'c__builtin__\neval\n(S"' + call + b'"\ntR.'
    # protocol 2, hidden inside an otherwise normal-looking batch dict
    return b"\x80\x02}(U\x04datacbuiltins\neval\nU" + bytes([len(call)]) + call + b"\x85Ru."


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "__builtin__.eval", "builtins.eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    folder = _write_cifar(tmp_path / "root", "cifar10", "python", _cifar_split_batches("cifar10"))
    (folder / "test_batch").write_bytes(_malicious(kind, marker))
    with pytest.raises(DataError, match=rf"refusing to unpickle .*test_batch: it references {kind}, "):
        load_dataset("cifar10", "test", root=tmp_path / "root")
    assert not marker.exists()


def test_malicious_payloads_would_run_unrestricted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(_malicious("builtins.eval", marker), encoding="bytes")
    assert marker.exists()  # the payload is live, so the refusal test above is meaningful


def test_restricted_unpickler_rejects_other_numpy_globals() -> None:
    blob = pickle.dumps({"data": np.load}, protocol=2)
    with pytest.raises(DataError, match="numpy.*load"):
        cifar.parse_pickle_batch(blob, "crafted", "labels", 10)


def test_truncated_pickle_is_corrupt(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, "cifar10", "python", _cifar_split_batches("cifar10"))
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DataError, match=r"corrupt CIFAR file .*test_batch: unreadable pickle"):
        load_dataset("cifar10", "test", root=tmp_path)


def _evil_tar(path: Path, kind: str) -> None:
    """A tarball with one unsafe member of the given kind."""
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/ok")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
        if kind == "symlink":
            link = tarfile.TarInfo("cifar-10-batches-py/link")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
        else:
            name = "../escaped" if kind == "dotdot" else str(path.parent / "escaped_abs")
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_safe_extract_rejects_unsafe_members(tmp_path: Path, kind: str) -> None:
    tar_path = tmp_path / "evil.tar.gz"
    _evil_tar(tar_path, kind)
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(DataError, match=r"unsafe member .* refusing to extract"):
        files.safe_extract(tar_path, dest)
    assert not (tmp_path / "dest" / "escaped").exists() and not (tmp_path / "escaped_abs").exists()
    assert list(dest.iterdir()) == []  # nothing extracted, staging removed


# ---------------------------------------------------------------- resolution order

def test_resolution_root_then_cache_then_system(tmp_path: Path, data_env: Path) -> None:
    system = idx.FASHION_MNIST.system_dirs[0]
    sys_data = _write_fmnist(system, n_test=3, seed=1)
    assert load_dataset("fashion-mnist", "test").labels.tolist() == sys_data["test"][1].tolist()
    cache_data = _write_fmnist(data_env / "fashion-mnist", n_test=4, seed=2)
    assert load_dataset("fashion-mnist", "test").labels.tolist() == cache_data["test"][1].tolist()
    root_data = _write_fmnist(tmp_path / "explicit", n_test=5, seed=3)
    got = load_dataset("fashion-mnist", "test", root=str(tmp_path / "explicit"))
    assert got.labels.tolist() == root_data["test"][1].tolist()
    assert locate_dataset("fashion-mnist") == data_env / "fashion-mnist"


def test_explicit_root_missing_does_not_fall_through(tmp_path: Path, data_env: Path) -> None:
    _write_fmnist(data_env / "fashion-mnist")
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=f"fashion-mnist not found in root {empty}"):
        load_dataset("fashion-mnist", "train", root=empty)
    with pytest.raises(DataError, match=f"cifar10 not found in root {empty}"):
        load_dataset("cifar10", "train", root=empty, download=True)


def test_not_found_names_places_and_both_fixes(data_env: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", "train")
    message = str(err.value)
    assert "\n" not in message
    assert str(data_env / "fashion-mnist") in message and str(idx.FASHION_MNIST.system_dirs[0]) in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "download=True / data.download=true" in message
    with pytest.raises(DataError, match=r"cifar100 not found in .*cifar-100-python\.tar\.gz.*download=True"):
        load_dataset("cifar100", "test")


def test_default_cache_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ROBUSTCL_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_dir("cifar10") == tmp_path / "home" / ".cache" / "robustcl" / "cifar10"


# ---------------------------------------------------------------- download

def _serve_fmnist(www: Path, monkeypatch: pytest.MonkeyPatch, base_url: str) -> dict[str, Any]:
    """Serve a tiny Fashion-MNIST and register its md5s as the expected ones."""
    written = _write_fmnist(www)
    for name in idx.GZ_MD5:
        monkeypatch.setitem(idx.GZ_MD5, name, _md5(www / name))
    monkeypatch.setenv("ROBUSTCL_FASHION_MNIST_URL", base_url)
    return written


def test_download_fashion_mnist_with_checksum(data_http_server: tuple[Path, str], data_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    www, url = data_http_server
    written = _serve_fmnist(www, monkeypatch, url)
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist", "train")
    data = load_dataset("fashion-mnist", "train", download=True)
    assert np.array_equal(data.images[:, 0].numpy(), written["train"][0])
    cached = sorted(p.name for p in (data_env / "fashion-mnist").iterdir())
    assert cached == sorted(idx.GZ_MD5)  # all four files, no temp leftovers
    assert len(load_dataset("fashion-mnist", "test")) == 7  # now resolves from the cache


def test_download_checksum_mismatch_leaves_nothing(data_http_server: tuple[Path, str], data_env: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    www, url = data_http_server
    _serve_fmnist(www, monkeypatch, url)
    monkeypatch.setitem(idx.GZ_MD5, "train-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(DataError, match=r"checksum mismatch for train-images-idx3-ubyte.gz: expected 0{32}, "
                                        r"got [0-9a-f]{32}; the download is corrupt, retry"):
        load_dataset("fashion-mnist", "train", download=True)
    assert not (data_env / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
    assert not [p for p in (data_env / "fashion-mnist").iterdir() if p.name.endswith(".part")]


def test_an_interrupted_dataset_download_is_resumed_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dropped connection keeps what arrived in <file>.part; the next try asks only for the rest (HTTP Range),
    checks the md5 of the whole and leaves neither the part nor the lock behind."""
    from range_server import PAYLOAD, Server

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    dest = tmp_path / "cache" / "d.bin"
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    server = Server(cut=1, files={"/d.bin": PAYLOAD})
    with server as base:
        with pytest.raises(DataError, match=rf"could not download {base}/d.bin: .*the \d+ bytes received are kept in "
                                            rf"{dest}.part and resumed next time\); get it by hand"):
            files.download_file(f"{base}/d.bin", dest, md5, "get it by hand")
        assert 0 < (tmp_path / "cache" / "d.bin.part").stat().st_size < len(PAYLOAD) and not dest.exists()
        assert files.download_file(f"{base}/d.bin", dest, md5, "get it by hand") == dest
    assert dest.read_bytes() == PAYLOAD and server.requests == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["d.bin"]  # no part, validator or lock left


def test_a_part_of_a_file_changed_on_the_server_is_not_joined_to_the_new_one(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The resumed request is conditional (If-Range: the ETag the part came with): a file replaced on the server
    comes whole again instead of its tail being appended to the old file's head."""
    from range_server import PAYLOAD, Server

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    dest = tmp_path / "cache" / "d.bin"
    new = bytes(reversed(PAYLOAD))
    server = Server(cut=1, files={"/d.bin": PAYLOAD})
    with server as base:
        with pytest.raises(DataError, match="resumed next time"):
            files.download_file(f"{base}/d.bin", dest, hashlib.md5(new).hexdigest(), "by hand")
        server.files["/d.bin"], server.etag = new, '"v2"'  # a new version is published meanwhile
        files.download_file(f"{base}/d.bin", dest, hashlib.md5(new).hexdigest(), "by hand")
    assert dest.read_bytes() == new and server.requests == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["d.bin"]


def test_processes_that_need_one_file_download_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep workers needing the same dataset at once: one downloads, the others wait for the lock and find it."""
    import threading

    from range_server import PAYLOAD, Server

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    dest = tmp_path / "cache" / "d.bin"
    server = Server(files={"/d.bin": PAYLOAD}, delay=0.5)  # slow enough that all three are waiting at once
    got: list[Path] = []
    with server as base:
        workers = [threading.Thread(target=lambda: got.append(files.download_file(
            f"{base}/d.bin", dest, hashlib.md5(PAYLOAD).hexdigest(), "by hand"))) for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    assert got == [dest] * 3 and dest.read_bytes() == PAYLOAD
    assert server.requests == [None]  # one download
    assert sorted(p.name for p in dest.parent.iterdir()) == ["d.bin"]


def test_download_network_failures_name_url(data_http_server: tuple[Path, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    www, url = data_http_server  # nothing served: 404
    monkeypatch.setenv("ROBUSTCL_FASHION_MNIST_URL", url)
    with pytest.raises(DataError, match=rf"could not download {url}train-images-idx3-ubyte.gz: .*404.*apt-get"):
        load_dataset("fashion-mnist", "train", download=True)
    dead = _closed_port_url()
    monkeypatch.setenv("ROBUSTCL_CIFAR_URL", dead)
    with pytest.raises(DataError, match=rf"could not download {dead}cifar-10-python.tar.gz: .*manually"):
        load_dataset("cifar10", "train", download=True)


def test_download_cifar_tarball_and_extract(data_http_server: tuple[Path, str], data_env: Path,
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    www, url = data_http_server
    content = _cifar_split_batches("cifar100", seed=9)
    folder = _write_cifar(tmp_path / "src", "cifar100", "python", content)
    tarball = _tar(folder, www / "cifar-100-python.tar.gz")
    fmt = cifar.CIFAR100.formats[0]
    member_md5 = {m: _md5(folder / m) for m in ("train", "test")}
    monkeypatch.setattr(cifar.CIFAR100, "formats", (cifar.Format(
        fmt.kind, fmt.folder, fmt.tarball, _md5(tarball), fmt.splits, member_md5), *cifar.CIFAR100.formats[1:]))
    monkeypatch.setenv("ROBUSTCL_CIFAR_URL", url)
    data = load_dataset("cifar100", "test", download=True)
    assert np.array_equal(data.images.reshape(len(data), -1).numpy(), _expected(content, "test")[0])
    cache = data_env / "cifar100"
    assert (cache / "cifar-100-python" / "train").is_file() and (cache / "cifar-100-python.tar.gz").is_file()
    assert verify_files("cifar100") == [cache / "cifar-100-python" / "train", cache / "cifar-100-python" / "test"]


# ---------------------------------------------------------------- real Fashion-MNIST

@pytest.mark.skipif(not (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx.FASHION_MNIST, "system_dirs", (REAL_FMNIST,))
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train")
    elapsed = time.perf_counter() - start
    test = load_dataset("fashion-mnist", "test")
    assert elapsed < 2.0, f"loading the train split took {elapsed:.2f} s"
    assert tuple(train.images.shape) == (60000, 1, 28, 28) and tuple(test.images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10 and torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    pixels = train.images.double() / 255
    assert abs(pixels.mean().item() - 0.2860) < 1e-3 and abs(pixels.std().item() - 0.3530) < 1e-3
    assert verify_files("fashion-mnist") == [REAL_FMNIST / f"{n}.gz" for pair in idx.SPLIT_FILES.values() for n in pair]


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_and_split_specific() -> None:
    a = load_dataset("synthetic", "train", seed=4, n_train=300)
    b = load_dataset("synthetic", "train", seed=4, n_train=300)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_seed = load_dataset("synthetic", "train", seed=5, n_train=300)
    assert not torch.equal(a.images, other_seed.images)
    test = load_dataset("synthetic", "test", seed=4, n_test=300)
    assert not torch.equal(a.images, test.images)
    assert torch.bincount(a.labels).tolist() == [30] * 10


def test_synthetic_any_shape() -> None:
    data = load_dataset("synthetic", "test", num_classes=3, channels=3, size=9, n_test=7, seed=1)
    assert tuple(data.images.shape) == (7, 3, 9, 9) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and int(data.labels.max()) < 3
    assert data.info == dataset_info("synthetic", num_classes=3, channels=3, size=9)


def test_synthetic_nearest_class_mean_beats_chance() -> None:
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert (len(train), len(test)) == (2000, 500)
    x_train = train.images.reshape(len(train), -1).float() / 255
    means = torch.stack([x_train[train.labels == k].mean(0) for k in range(10)])
    x_test = test.images.reshape(len(test), -1).float() / 255
    accuracy = (torch.cdist(x_test, means).argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.8
    assert abs(x_train.mean().item() - 0.5) < 0.05 and abs(x_train.std().item() - 0.25) < 0.03
    assert x_train.std(0).mean().item() > 0.1  # noisy, not constant per class


# ---------------------------------------------------------------- fetch

def _run_fetch(capsys: pytest.CaptureFixture[str], *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    """fetch.main with injected hooks; returns (exit code, stdout, stderr)."""
    code = fetch.main(*args, **kwargs)
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_apt(package: str) -> int:
    raise AssertionError(f"apt must not run (asked for {package})")


def test_fetch_already_present(capsys: pytest.CaptureFixture[str], data_env: Path) -> None:
    _write_fmnist(data_env / "fashion-mnist")
    code, out, _ = _run_fetch(capsys, ["fashion-mnist"], apt_runner=_no_apt, root_check=lambda: True,
                              has_apt=lambda: True)
    assert code == 0 and out.strip() == f"fashion-mnist: found at {data_env / 'fashion-mnist'}"


def test_fetch_uses_apt_as_root(capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake_apt(package: str) -> int:
        calls.append(package)
        _write_fmnist(idx.FASHION_MNIST.system_dirs[0])
        return 0

    code, out, _ = _run_fetch(capsys, ["fashion-mnist"], apt_runner=fake_apt, root_check=lambda: True,
                              has_apt=lambda: True)
    assert code == 0 and calls == ["dataset-fashion-mnist"]
    assert f"found at {idx.FASHION_MNIST.system_dirs[0]}" in out


def test_fetch_downloads_when_not_root(capsys: pytest.CaptureFixture[str], data_http_server: tuple[Path, str],
                                       data_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    www, url = data_http_server
    _serve_fmnist(www, monkeypatch, url)
    code, out, _ = _run_fetch(capsys, ["fashion-mnist"], apt_runner=_no_apt, root_check=lambda: False,
                              has_apt=lambda: True)
    assert code == 0 and f"found at {data_env / 'fashion-mnist'}" in out
    assert len(load_dataset("fashion-mnist", "train")) == 12


def test_fetch_fails_with_both_ways(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTCL_FASHION_MNIST_URL", _closed_port_url())
    calls = []
    code, out, err = _run_fetch(capsys, ["fashion-mnist"], apt_runner=lambda p: calls.append(p) or 100,
                                root_check=lambda: True, has_apt=lambda: True)
    assert code == 1 and calls == ["dataset-fashion-mnist"] and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("could not obtain fashion-mnist:")
    assert "apt-get install -y dataset-fashion-mnist" in last and "download it into" in last


def test_fetch_synthetic_and_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_fetch(capsys, ["synthetic"], apt_runner=_no_apt)
    assert code == 0 and "nothing to fetch" in out
    with pytest.raises(SystemExit):
        fetch.main(["imagenet"])


def test_safe_extract_never_touches_outside_dest_even_without_member_checks(tmp_path: Path, monkeypatch) -> None:
    # With the member check disabled, an absolute member must still not let extraction replace '/'.
    monkeypatch.setattr(files, "_check_member", lambda member, tar_path: None)
    tar_path = tmp_path / "evil.tar.gz"
    _evil_tar(tar_path, "absolute")
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="unsafe member"):
        files.safe_extract(tar_path, dest)
    assert Path("/usr").is_dir()
