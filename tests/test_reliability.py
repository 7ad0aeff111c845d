"""Hostile input, full disks and a second writer: each failure is one line, and nothing is lost (issue 11).

Read-only directories and full disks are real where the test may make them (a read-only bind mount
and a small tmpfs, as root), else chmod (a non-root user) or a failing fsync (no mount permission).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import one_line_error
import torch

from robustcl.cli import main
from robustcl.config import ConfigError, load_config
from robustcl.methods.gbrcl import Gbrcl
from robustcl.runs import RunDir
from robustcl.train.pretrain import NonFiniteLoss, pretrain

QUIET = ["--quiet", "train.threads=1"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _Evil:
    """A pickle that runs a shell command when loaded without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


def hostile_zip(marker: Path) -> bytes:
    """A torch zip checkpoint whose data.pkl carries code."""
    buffer = io.BytesIO()
    torch.save({"model": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for item in source.infolist():
            data = evil_pickle(marker) if item.filename.endswith("data.pkl") else source.read(item.filename)
            zf.writestr(item, data)
    return out.getvalue()


CORRUPTIONS: dict[str, Callable[[bytes, Path], bytes]] = {
    "pickle-with-code": lambda good, marker: evil_pickle(marker),
    "torch-zip-with-hostile-data-pkl": lambda good, marker: hostile_zip(marker),
    "not-a-model-file": lambda good, marker: b"this is a text file, not a checkpoint\n" * 40,
    "truncated": lambda good, marker: good[: len(good) // 2],
    "empty": lambda good, marker: b"",
}

# file inside a run -> the commands that read it
READERS: dict[str, list[list[str]]] = {
    "checkpoints/last.pt": [["pretrain", "--resume", "--out", "{run}", *QUIET], ["bound", "--run", "{run}", "--quiet"]],
    "encoder.safetensors": [["finetune", "--run", "{run}", "--overwrite", "--protocol", "slf", *QUIET],
                            ["evaluate", "--run", "{run}", *QUIET]],
    "heads/slf.pt": [["evaluate", "--run", "{run}", "--protocol", "slf", *QUIET]],
}
READ_CASES = [(name, i) for name, commands in READERS.items() for i in range(len(commands))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run: pretrain, SLF/ALF heads, results."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["run", "--config", "smoke", "--out", str(out), *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory) -> Path:
    """A smoke run of another architecture (ConvNet widths 4-8-8-16: 16-d features instead of 32)."""
    out = tmp_path_factory.mktemp("reliability-other") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), *QUIET, "model.widths=[4, 8, 8, 16]"]) == 0
    assert main(["finetune", "--run", str(out), "--protocol", "slf", *QUIET]) == 0
    return out




def unfinish(run: Path) -> Path:
    """Make a finished run look interrupted after its last checkpoint (so --resume loads it)."""
    (run / "pretrain.done").unlink()
    (run / "encoder.safetensors").unlink()
    return run


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str]:
    """Make `path` read-only for this process: a read-only bind mount as root, chmod otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root without mount permission: cannot make a read-only directory ({mounted.stderr!r})")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only")
        yield "read-only bind mount"
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes at `path` (root only; skips the test otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    if not can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                         capture_output=True).returncode != 0:
        pytest.skip("no permission to mount a tmpfs (the fsync-based test covers this case)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> None:
    """Write into `folder` until its file system is full."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)


def failing_fsync(monkeypatch: pytest.MonkeyPatch, when: Callable[[str], bool]) -> None:
    """os.fsync raises ENOSPC for files whose /proc path satisfies `when` (a full disk, without a mount)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if when(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# ------------------------------------------------------------------ 1. --overwrite and the user's files
def test_overwrite_refuses_a_directory_robustcl_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "figures" / "fig1.png").write_bytes(b"png")
    (mine / "notes.txt").write_text("my notes")
    (mine / "results.json").write_text('{"mine": true}')
    before = tree(mine)
    assert main(["pretrain", "--config", "smoke", "--out", str(mine), "--overwrite", *QUIET]) == 2
    line = one_line_error(capsys)
    assert "not made by robustcl" in line and "notes.txt" in line and "figures" in line and "lock" not in line
    assert tree(mine) == before


def test_overwrite_replaces_a_robustcl_run_but_keeps_the_users_own_files(run_copy):
    (run_copy / "notes.txt").write_text("mine")
    assert main(["pretrain", "--config", "smoke", "--out", str(run_copy), "--overwrite", *QUIET]) == 0
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert not (run_copy / "results.json").exists() and not (run_copy / "heads").exists()


# ------------------------------------------------------------------------------ 2. a second writer
def test_resume_while_the_run_is_being_written_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    cfg = load_config("smoke", ["train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1",
                                "train.threads=1"])
    original = Gbrcl.training_step
    calls = {"n": 0, "second": None}

    def step(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # a checkpoint exists (step 2): a second process resumes into the run now
            calls["second"] = main(["pretrain", "--resume", "--out", str(out), *QUIET])
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", step)
    pretrain(cfg, RunDir(out), progress=False)
    assert calls["second"] == 2
    line = one_line_error(capsys)
    assert f"pid {os.getpid()}" in line and "being written" in line
    steps = [r["step"] for r in RunDir(out).iter_metrics("pretrain")]
    assert steps == list(range(1, 7))  # one writer: increasing steps, none duplicated


HOLD_LOCK = """
import os, sys
from robustcl.runs.guard import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
if sys.argv[2] == "die":
    os._exit(9)  # killed while holding it: the lock file stays behind
sys.stdin.readline()
lock.release()
"""


def hold_lock(run: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run), mode], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_held_by_another_live_process_refuses_resume(run_copy, capsys):
    unfinish(run_copy)
    before = tree(run_copy / "checkpoints")
    proc = hold_lock(run_copy, "hold")
    try:
        assert main(["pretrain", "--resume", "--out", str(run_copy), *QUIET]) == 2
        line = one_line_error(capsys)
        assert f"pid {proc.pid}" in line and "being written" in line
    finally:
        proc.communicate("\n")
    assert tree(run_copy / "checkpoints") == before
    assert main(["pretrain", "--resume", "--out", str(run_copy), *QUIET]) == 0  # released: it proceeds


def test_a_stale_lock_of_a_killed_process_is_detected_and_taken_over(finished, run_copy, capsys):
    unfinish(run_copy)
    proc = hold_lock(run_copy, "die")
    assert proc.wait() == 9
    assert [p.name for p in run_copy.iterdir() if "lock" in p.name]  # it left its lock behind
    assert main(["pretrain", "--resume", "--out", str(run_copy), *QUIET]) == 0
    # the encoder is exported again from last.pt exactly (what the damaged-encoder message advises)
    assert (run_copy / "encoder.safetensors").read_bytes() == (finished / "encoder.safetensors").read_bytes()
    assert not [p.name for p in run_copy.iterdir() if "lock" in p.name]


def _write_lock(root: Path, **holder) -> None:
    from robustcl.runs.guard import LOCK

    (root / LOCK).write_text(json.dumps({"since": "earlier", **holder}))


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    import socket

    from robustcl.runs.guard import RunLock

    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), start="0")  # this pid, another start time
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads(lock.path.read_text())["start"] != "0"
    lock.release()
    assert not lock.path.exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
    from robustcl.runs import RunError
    from robustcl.runs.guard import RunLock

    _write_lock(tmp_path, pid=4_194_305, host="some-other-machine", start="1")  # above Linux's pid limit: not here
    with pytest.raises(RunError, match="pid 4194305 on some-other-machine"):
        RunLock(tmp_path).acquire()
    assert json.loads(RunLock(tmp_path).path.read_text())["host"] == "some-other-machine"


# ----------------------------------------------------------- 3. the last checkpoint is a good one
def test_a_checkpoint_with_a_non_finite_buffer_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.max_steps=6", "train.checkpoint_every=2", "train.threads=1"])
    original = Gbrcl.training_step
    calls = {"n": 0}

    def step(self, images, ctx):
        out = original(self, images, ctx)
        calls["n"] += 1
        if calls["n"] == 3:  # train-mode BN uses batch statistics: the loss stays finite, the running stats do not
            bn = next(m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(Gbrcl, "training_step", step)
    run = RunDir(tmp_path / "r")
    with pytest.raises(NonFiniteLoss, match=r"running_var") as info:
        pretrain(cfg, run, progress=False)
    assert "step 2" in str(info.value)
    state = torch.load(run.checkpoint, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------- 4. one line, never a traceback
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("target,reader", READ_CASES)
def test_a_damaged_or_hostile_run_file_is_one_line(run_copy, tmp_path, capsys, target, reader, corruption):
    if target == "checkpoints/last.pt" and reader == 0:
        unfinish(run_copy)
    marker = tmp_path / "code-ran"
    path = run_copy / target
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes(), marker))
    before = tree(run_copy)
    command = [a.replace("{run}", str(run_copy)) for a in READERS[target][reader]]
    assert main(command) == 2
    line = one_line_error(capsys)
    assert Path(target).name in line
    assert not marker.exists()
    assert tree(run_copy) == before


@pytest.mark.parametrize("content", ["checkpoint", "binary"])
def test_a_config_that_is_not_text_is_one_line(finished, tmp_path, capsys, content):
    path = tmp_path / "config.yaml"
    path.write_bytes((finished / "checkpoints" / "last.pt").read_bytes() if content == "checkpoint"
                     else bytes(range(256)) * 4)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "x"), *QUIET]) == 2
    assert str(path) in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


def test_bound_on_a_checkpoint_of_another_architecture_is_one_line(run_copy, other_arch, capsys):
    shutil.copy(other_arch / "checkpoints" / "last.pt", run_copy / "checkpoints" / "last.pt")
    assert main(["bound", "--run", str(run_copy), "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "last.pt" in line and "architecture" in line


def test_evaluate_with_a_head_of_another_architecture_is_one_line(run_copy, other_arch, capsys):
    shutil.copy(other_arch / "heads" / "slf.pt", run_copy / "heads" / "slf.pt")
    assert main(["evaluate", "--run", str(run_copy), "--protocol", "slf", *QUIET]) == 2
    line = one_line_error(capsys)
    assert "slf.pt" in line and "architecture" in line


@pytest.mark.parametrize("where", ["inside", "is"])
def test_out_in_or_at_a_regular_file_is_one_line(tmp_path, capsys, where):
    regular = tmp_path / "file.txt"
    regular.write_text("mine")
    out = regular / "run" if where == "inside" else regular
    assert main(["pretrain", "--config", "smoke", "--out", str(out), *QUIET]) == 2
    assert str(regular) in one_line_error(capsys)
    assert regular.read_text() == "mine"


def test_out_on_a_read_only_directory_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import robustcl.train.pretrain as pretrain_module

    parent = tmp_path / "ro"
    parent.mkdir()
    monkeypatch.setattr(pretrain_module, "load_split", lambda *a, **k: pytest.fail("work started"))
    with read_only(parent):
        assert main(["pretrain", "--config", "smoke", "--out", str(parent / "run"), *QUIET]) == 2
        line = one_line_error(capsys)
    assert str(parent) in line and "writ" in line


def test_evaluate_of_a_run_on_a_read_only_directory_is_one_line_before_any_work(run_copy, capsys, monkeypatch):
    import robustcl.evaluation.run_eval as run_eval

    monkeypatch.setattr(run_eval, "evaluate_model", lambda *a, **k: pytest.fail("work started"))
    before = tree(run_copy)
    with read_only(run_copy):
        assert main(["evaluate", "--run", str(run_copy), *QUIET]) == 2
        line = one_line_error(capsys)
    assert str(run_copy) in line and "writ" in line
    assert tree(run_copy) == before


def _checkpoint_tmp(name: str) -> bool:
    return "/checkpoints/.last.pt." in name


def test_enospc_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    original = Gbrcl.training_step
    calls = {"n": 0}

    def step(self, images, ctx):  # the disk fills after the first checkpoint (step 2)
        calls["n"] += 1
        if calls["n"] == 3:
            failing_fsync(monkeypatch, _checkpoint_tmp)
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", step)
    assert main(["pretrain", "--config", "smoke", "--out", str(out), *QUIET]) == 2
    line = one_line_error(capsys)
    assert "last.pt" in line and os.strerror(errno.ENOSPC) in line
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "last.pt"]  # no temp file left


def test_a_real_full_disk_while_writing_a_checkpoint_is_one_line(finished, tmp_path, capsys):
    size = (finished / "checkpoints" / "last.pt").stat().st_size
    with tmpfs(tmp_path / "small", size + size // 2 + 64 * 1024) as small:
        out = small / "r"
        assert main(["pretrain", "--config", "smoke", "--out", str(out), *QUIET]) == 2
        line = one_line_error(capsys)
        assert "last.pt" in line and os.strerror(errno.ENOSPC) in line
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


def test_resume_on_a_full_disk_is_one_line(run_copy, capsys, monkeypatch):
    unfinish(run_copy)
    before = tree(run_copy)
    failing_fsync(monkeypatch, lambda name: str(run_copy) in name)
    assert main(["pretrain", "--resume", "--out", str(run_copy), *QUIET]) == 2
    assert os.strerror(errno.ENOSPC) in one_line_error(capsys)
    assert tree(run_copy) == before


def test_resume_on_a_real_full_disk_is_one_line(finished, tmp_path, capsys):
    total = sum(len(v) for v in tree(finished).values())
    with tmpfs(tmp_path / "small", total + 256 * 1024) as small:
        run = small / "run"
        shutil.copytree(finished, run)
        unfinish(run)
        fill(small)
        assert main(["pretrain", "--resume", "--out", str(run), *QUIET]) == 2
        assert str(run) in one_line_error(capsys)
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "x"), *QUIET, "train.device=cuda"]) == 2
    assert "train.device=cuda" in one_line_error(capsys)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------- 5. refused instead of accepted
def test_finetune_refuses_an_encoder_of_another_architecture_than_its_config(run_copy, other_arch, capsys):
    shutil.copy(other_arch / "encoder.safetensors", run_copy / "encoder.safetensors")
    before = tree(run_copy / "heads")
    assert main(["finetune", "--run", str(run_copy), "--overwrite", "--protocol", "slf", *QUIET]) == 2
    line = one_line_error(capsys)
    assert "encoder.safetensors" in line and "model.widths" in line
    assert tree(run_copy / "heads") == before


@pytest.mark.parametrize("key", ["method.attack.eps", "finetune.attack.eps", "eval.attack.eps",
                                 "finetune.aff.attack.eps", "diagnostics.eps"])
def test_an_linf_radius_above_one_is_refused(key):
    with pytest.raises(ConfigError, match=rf"{key}=2.0 .*\[0, 1\]"):
        load_config("smoke", [f"{key}=2"])


def test_an_l2_radius_above_one_is_still_accepted():
    assert load_config("smoke", ["eval.l2.eps=2"]).eval.l2.eps == 2.0


def test_resume_of_a_finished_run_refuses_a_changed_phase1_setting(run_copy, capsys):
    before = tree(run_copy)
    assert main(["pretrain", "--resume", "--out", str(run_copy), *QUIET, "method.benign_weight=1.0"]) == 2
    assert "method.benign_weight: 2.0 -> 1.0" in one_line_error(capsys)
    assert tree(run_copy) == before


def test_resume_with_another_config_is_refused_not_ignored(run_copy, capsys):
    before = tree(run_copy)
    assert main(["pretrain", "--resume", "--out", str(run_copy), "--config", "fmnist-gbrcl", *QUIET]) == 2
    line = one_line_error(capsys)
    assert "--config fmnist-gbrcl" in line and "data.name" in line
    assert tree(run_copy) == before
    # the run's own config, given again, is no contradiction
    assert main(["pretrain", "--resume", "--out", str(run_copy), "--config", str(run_copy / "config.yaml"),
                 *QUIET]) == 0


def test_run_resume_honours_an_evaluation_override(run_copy):
    assert json.loads((run_copy / "results.json").read_text())["n_eval"] == 64
    assert main(["run", "--resume", "--out", str(run_copy), *QUIET, "eval.limit=32"]) == 0
    assert json.loads((run_copy / "results.json").read_text())["n_eval"] == 32


# --------------------------------------------------------------------------- 6. writes outside a run
@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE"])
def test_a_run_name_cannot_leave_the_runs_directory(tmp_path, monkeypatch, capsys, name):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    (work / "c.yaml").write_text(f"extends: smoke\nname: {name}\n")
    assert main(["pretrain", "--config", "c.yaml", *QUIET]) == 2
    assert "name" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.yaml", "deep", "work"]


def test_a_symlinked_metrics_file_is_refused(run_copy, tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("not robustcl's\n")
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(outside)
    before = tree(run_copy / "heads")
    assert main(["finetune", "--run", str(run_copy), "--overwrite", "--protocol", "slf", *QUIET]) == 2
    line = one_line_error(capsys)
    assert "metrics.jsonl" in line and "symbolic link" in line
    assert outside.read_text() == "not robustcl's\n"
    assert tree(run_copy / "heads") == before


def test_a_symlinked_plots_folder_is_refused(run_copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(run_copy / "plots")
    (run_copy / "plots").symlink_to(outside)
    assert main(["evaluate", "--run", str(run_copy), *QUIET]) == 2
    assert "plots" in one_line_error(capsys)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- 7. coherent guidance
def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.threads=1"])
    straight = RunDir(tmp_path / "straight")
    pretrain(cfg, straight, progress=False)
    original = Gbrcl.training_step

    def dying(self, images, ctx):
        raise KeyboardInterrupt

    killed = RunDir(tmp_path / "killed")
    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, progress=False)
    assert not killed.checkpoint.exists()
    monkeypatch.setattr(Gbrcl, "training_step", original)
    assert main(["pretrain", "--resume", "--out", str(killed.root), "--quiet"]) == 0
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (straight, killed))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_divergence_before_any_checkpoint_does_not_claim_one_was_kept(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), *QUIET, "train.lr=1e30"]) == 2
    line = one_line_error(capsys)
    assert "no checkpoint" in line and "keeps" not in line
    assert not (out / "checkpoints" / "last.pt").exists()
    # the guidance it gives works: the run's own config, a lower lr, --overwrite
    assert f"--config {out / 'config.yaml'} --out {out} --overwrite train.lr=" in line
    assert main(["pretrain", "--config", str(out / "config.yaml"), "--out", str(out), "--overwrite", *QUIET,
                 "train.lr=0.1"]) == 0


# --------------------------------------------------------------------------- the top-level handler
def test_a_real_bug_shows_its_traceback_and_where_to_report_it(monkeypatch, capsys):
    import robustcl.cli.tools as cli

    monkeypatch.setattr(cli, "cmd_configs", lambda args: 1 / 0)
    assert main(["configs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "report it at the project's issue tracker with this traceback" in err


def test_an_environment_error_is_one_line(monkeypatch, capsys):
    import robustcl.cli.tools as cli

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/where/file")

    monkeypatch.setattr(cli, "cmd_configs", denied)
    assert main(["configs"]) == 2
    line = one_line_error(capsys)
    assert "/some/where/file" in line and os.strerror(errno.EACCES) in line
