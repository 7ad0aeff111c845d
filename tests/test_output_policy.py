"""Hostile input, round two: the output-file policy every writer follows (issue 23; docs/reliability.md).

A command replaces only its own files in a directory it owns (a run; a sweep directory of the same spec); it
refuses devices, FIFOs, sockets and symbolic links, other people's files, another command's files and another
spec's sweep directory (the last one unless --overwrite). Written files follow the umask as open() would.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import one_line_error
import torch

from robustcl import api
from robustcl.cli import main
from robustcl.config import dump_yaml, load_config
from robustcl.data import dataset_info
from robustcl.export import export_encoder
from robustcl.methods.factory import encoder_export_fields
from robustcl.models import build_encoder
from robustcl.runs import RunDir, RunError, atomic_write_text, save_torch_atomic

QUIET = ["--quiet", "train.threads=1"]
FAST = ["train.max_steps=2", "finetune.protocols=[slf]", "eval.eps_curve=[]", "eval.limit=32", "train.threads=1"]
BENCH = ["data.synthetic.size=8", "model.widths=[4,4]", "method.attack.steps=1", "train.threads=1", "--config", "smoke",
         "--batch-size", "4", "--precision", "fp32", "--steps", "1", "--warmup", "0", "--gemm-size", "64"]
REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------------ helpers


def make_fifo(path: Path) -> str:
    os.mkfifo(path)
    return "a FIFO (named pipe)"


def make_null_device(path: Path) -> str:
    if not ROOT:
        pytest.skip("mknod of a character device needs root")
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    return "a character device"


def make_link_to_stdout(path: Path) -> str:
    path.symlink_to("/dev/stdout")
    return "a symbolic link (to /dev/stdout)"


def make_link_to_a_file(path: Path) -> str:
    outside = path.parent / "outside-target.txt"
    outside.write_text("not robustcl's\n")
    path.symlink_to(outside)
    return "a symbolic link"


def make_folder(path: Path) -> str:
    path.mkdir()
    return "a directory"


NON_REGULAR: dict[str, Callable[[Path], str]] = {"fifo": make_fifo, "char-device": make_null_device,
                                                 "symlink-to-dev-stdout": make_link_to_stdout,
                                                 "symlink-to-a-file": make_link_to_a_file, "folder": make_folder}


def same_kind(path: Path, made: Callable[[Path], str], tmp: Path) -> bool:
    """`path` is still the kind of thing `made` made (compared with a fresh one)."""
    fresh = tmp / f"fresh-{made.__name__}"
    made(fresh)
    return stat.S_IFMT(os.lstat(path).st_mode) == stat.S_IFMT(os.lstat(fresh).st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (pretrain, SLF/ALF heads, results, report), made under umask 022."""
    out = tmp_path_factory.mktemp("policy") / "run"
    with umask(0o022):
        assert main(["run", "--config", "smoke", "--out", str(out), *QUIET]) == 0
    return out




@pytest.fixture(scope="module")
def resnet_template(tmp_path_factory) -> Path:
    """A run directory holding a ResNet-18 encoder (what `robustcl export` reads), a checkpoint and results."""
    root = tmp_path_factory.mktemp("resnet") / "run"
    cifar, cfg = dataset_info("cifar10"), load_config("cifar10-gbrcl")
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 3, cifar.mean, cifar.std, dual_bn=True, stem="cifar").eval()
    run = RunDir(root)
    run.prepare(dump_yaml(cfg), resume=False, overwrite=False)
    export_encoder(encoder, run.encoder, cifar, cfg, **encoder_export_fields(cfg, cifar))
    save_torch_atomic({"step": 1}, run.checkpoint)
    atomic_write_text(run.results, '{"protocols": {}}\n')
    return root


@pytest.fixture
def resnet_run(resnet_template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "resnet-run"
    shutil.copytree(resnet_template, dst)
    return dst


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------- 2. export never replaces what it should not
@pytest.mark.parametrize("own", ["checkpoints/last.pt", "encoder.safetensors", "results.json", "heads/slf.pt"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_writes_over_a_runs_own_file(resnet_run, capsys, own, overwrite):
    before = tree(resnet_run)
    argv = ["export", "--run", str(resnet_run), "--out", str(resnet_run / own)]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    line = one_line_error(capsys)
    assert f"{resnet_run / own} is a file of the run {resnet_run}" in line and "--overwrite or not" in line
    assert tree(resnet_run) == before


def test_export_refuses_an_existing_file_unless_overwrite(resnet_run, tmp_path, capsys):
    out = tmp_path / "mine.pth"
    out.write_text("my own file\n")
    assert main(["export", "--run", str(resnet_run), "--out", str(out)]) == 2
    assert f"{out} already exists; pass --overwrite to replace it" in one_line_error(capsys)
    assert out.read_text() == "my own file\n"
    assert main(["export", "--run", str(resnet_run), "--out", str(out), "--overwrite"]) == 0
    assert "conv1.weight" in torch.load(out, weights_only=True)
    assert main(["export", "--run", str(resnet_run)]) == 0  # the default beside the encoder: new, then
    assert main(["export", "--run", str(resnet_run)]) == 2  # an existing file like any other
    assert "resnet-adversarial.pth already exists" in one_line_error(capsys)


def test_api_export_torchvision_takes_overwrite(resnet_run, tmp_path):
    out = tmp_path / "mine.pth"
    out.write_text("my own file\n")
    with pytest.raises(RunError, match="already exists"):
        api.export_torchvision(resnet_run, out=out)
    assert out.read_text() == "my own file\n"
    assert api.export_torchvision(resnet_run, out=out, overwrite=True)["path"] == str(out)
    with pytest.raises(RunError, match="is a file of the run"):
        api.export_torchvision(resnet_run, out=resnet_run / "checkpoints" / "last.pt", overwrite=True)


def test_export_never_writes_over_the_encoder_it_reads(resnet_run, tmp_path, capsys):
    loose = tmp_path / "loose.safetensors"  # an encoder file outside any run
    shutil.copy(resnet_run / "encoder.safetensors", loose)
    before = loose.read_bytes()
    assert main(["export", "--run", str(loose), "--out", str(loose), "--overwrite"]) == 2
    assert "is the file this command reads" in one_line_error(capsys)
    assert loose.read_bytes() == before


# ------------------------------------------------------------------- 3. never a device, a FIFO or a link
@pytest.mark.parametrize("kind", NON_REGULAR)
def test_export_refuses_a_target_that_is_not_a_regular_file(resnet_run, tmp_path, capsys, kind):
    target = tmp_path / "x"
    said = NON_REGULAR[kind](target)
    assert main(["export", "--run", str(resnet_run), "--out", str(target), "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert f"{target} is {said}" in line and "not a regular file" in line
    assert same_kind(target, NON_REGULAR[kind], tmp_path)


@pytest.mark.parametrize("kind", NON_REGULAR)
def test_the_atomic_writer_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    target = tmp_path / "x"
    said = NON_REGULAR[kind](target)
    with pytest.raises(RunError, match=f"is {said.split(' (')[0]}.*not a regular file"):
        atomic_write_text(target, "text\n")
    assert same_kind(target, NON_REGULAR[kind], tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # no temp file left


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_a_device_or_fifo_among_a_runs_files_is_refused(run_copy, tmp_path, capsys, kind):
    (run_copy / "results.json").unlink()
    said = NON_REGULAR[kind](run_copy / "results.json")
    assert main(["evaluate", "--run", str(run_copy), "--protocol", "slf", *QUIET]) == 2
    line = one_line_error(capsys)
    assert f"{run_copy / 'results.json'} is {said}, not a regular file" in line
    assert same_kind(run_copy / "results.json", NON_REGULAR[kind], tmp_path)


def test_bench_json_refuses_a_link_to_dev_stdout_before_measuring(tmp_path, capsys, monkeypatch):
    link = tmp_path / "bench.json"
    link.symlink_to("/dev/stdout")
    measured = []
    real = api.bench
    monkeypatch.setattr(api, "bench", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main(["bench", *BENCH, "--json", str(link), "--overwrite"]) == 2
    line = one_line_error(capsys)
    assert f"{link} is a symbolic link (to /dev/stdout), not a regular file" in line and "- writes to stdout" in line
    assert link.is_symlink() and not measured


def test_bench_json_refuses_an_existing_file_and_a_runs_file(run_copy, tmp_path, capsys):
    mine = tmp_path / "bench.json"
    mine.write_text("mine\n")
    assert main(["bench", *BENCH, "--json", str(mine)]) == 2
    assert f"{mine} already exists; pass --overwrite" in one_line_error(capsys)
    assert mine.read_text() == "mine\n"
    before = (run_copy / "results.json").read_bytes()
    assert main(["bench", *BENCH, "--json", str(run_copy / "results.json"), "--overwrite"]) == 2
    assert "is a file of the run" in one_line_error(capsys)
    assert (run_copy / "results.json").read_bytes() == before
    assert main(["bench", *BENCH, "--json", str(mine), "--overwrite"]) == 0
    assert json.loads(mine.read_text())["results"]


# ------------------------------------------------------------------------------- 12. modes follow the umask
RUN_FILES = ["config.yaml", "metrics.jsonl", "results.json", "per_image.npz", "report.md", "encoder.safetensors",
             "heads/slf.pt", "heads/alf.pt", "checkpoints/last.pt", "robustcl-run.json", "plots"]


def test_a_runs_files_follow_the_umask(finished):
    for name in RUN_FILES:
        path = finished / name
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        assert files, name
        for file in files:
            assert mode(file) == 0o644, f"{file}: {oct(mode(file))}"


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_makes_files_as_open_would(tmp_path, mask, expected):
    run = RunDir(tmp_path / "r")
    with umask(mask):
        atomic_write_text(run.results, "{}\n")
        save_torch_atomic({"step": 1}, run.checkpoint)
        run.log({"phase": "pretrain", "step": 1})
        with open(tmp_path / "by-open", "w"):
            pass
    assert mode(tmp_path / "by-open") == expected
    assert [mode(p) for p in (run.results, run.checkpoint, run.metrics)] == [expected] * 3


def test_a_replaced_file_keeps_its_mode_as_with_open(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}\n")
    path.chmod(0o640)
    atomic_write_text(path, '{"a": 1}\n')
    assert mode(path) == 0o640 and path.read_text() == '{"a": 1}\n'


# ------------------------------------------------------------------------- a run's own files, derived
def test_overwrite_takes_a_run_made_before_the_marker_that_holds_per_image_npz(run_copy, capsys):
    from robustcl.runs.layout import MARKER

    (run_copy / MARKER).unlink()  # an older run: robustcl's files only, per_image.npz among them
    assert (run_copy / "per_image.npz").is_file()
    assert main(["pretrain", "--config", "smoke", "--out", str(run_copy), "--overwrite", *QUIET]) == 0
    assert not (run_copy / "per_image.npz").exists() and not (run_copy / "results.json").exists()


def test_every_file_a_run_holds_is_declared_once_in_its_layout(finished):
    from robustcl.runs.guard import is_owned
    from robustcl.runs.layout import RunLayout

    assert {p.name for p in finished.iterdir()} <= RunLayout.top_names()
    for path in finished.rglob("*"):
        if path.is_file():
            assert RunLayout.entry_for(path.relative_to(finished)) is not None, path
    declared = [entry.name for entry in RunLayout.FILES]
    assert len(declared) == len(set(declared))
    assert RunDir(finished).per_image == finished / "per_image.npz" and is_owned(finished)


def test_overwrite_clears_exactly_the_declared_files(tmp_path):
    from robustcl.runs.layout import RunLayout

    run = RunDir(tmp_path / "r")
    run.prepare("a: 1\n", resume=False, overwrite=False)
    for entry in RunLayout.FILES:
        path = run.root / entry.name
        if entry.folder:
            path.mkdir(parents=True, exist_ok=True)
            (path / "f").write_text("x")
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    (run.root / "notes.txt").write_text("mine")
    (run.root / "checkpoints" / "best-by-hand.pt").write_text("mine")
    (run.root / RunLayout.lock.name).unlink()
    run.prepare("a: 2\n", resume=False, overwrite=True)
    left = {str(p.relative_to(run.root)) for p in run.root.rglob("*") if p.is_file()}
    kept = {f"{e.name}/f" if e.folder else e.name for e in RunLayout.FILES if not e.cleared} - {RunLayout.lock.name}
    assert left == kept | {"notes.txt", "checkpoints/best-by-hand.pt"}
    assert run.config.read_text() == "a: 2\n"


# -------------------------------------------------------------------------------- 1. sweep directories
def write_spec(folder: Path, name: str, seeds: str = "[0]", file: str | None = None) -> Path:
    path = folder / (file or f"{name}.yaml")
    path.write_text(f"# {name} (test)\nname: {name}\nseeds: {seeds}\nruns:\n  - {{name: g, config: smoke}}\n")
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path]:
    """(spec a, its sweep directory) after one finished sweep."""
    folder = tmp_path_factory.mktemp("swept")
    spec = write_spec(folder, "a")
    assert main(["sweep", "--spec", str(spec), "--out", str(folder / "out"), "--quiet", *FAST]) == 0
    return spec, folder / "out"


@pytest.fixture
def sweep_copy(swept, tmp_path) -> Path:
    dst = tmp_path / "sweep"
    shutil.copytree(swept[1], dst)
    return dst


@pytest.mark.parametrize("theirs", ["summary.md", "sweep.yaml", "summary.csv"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_sweep_never_replaces_a_file_in_a_directory_it_did_not_make(tmp_path, capsys, theirs, overwrite):
    out = tmp_path / "d"
    out.mkdir()
    (out / theirs).write_text("mine\n")
    spec = write_spec(tmp_path, "tiny")
    argv = ["sweep", "--spec", str(spec), "--out", str(out), "--quiet", *FAST]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    line = one_line_error(capsys)
    assert f"{out / theirs} was not written by robustcl" in line and "never replaces it" in line
    assert sorted(p.name for p in out.iterdir()) == [theirs] and (out / theirs).read_text() == "mine\n"


def test_a_second_spec_is_refused_in_a_sweep_directory_unless_overwrite(swept, sweep_copy, tmp_path, capsys):
    before = tree(sweep_copy)
    other = write_spec(tmp_path, "b")
    assert main(["sweep", "--spec", str(other), "--out", str(sweep_copy), "--quiet", *FAST]) == 2
    line = one_line_error(capsys)
    assert f"{sweep_copy} holds sweep 'a'" in line and "not 'b'" in line and "--overwrite" in line
    assert main(["sweep", "--spec", str(other), "--out", str(sweep_copy), "--summarize", *FAST]) == 2
    assert "holds sweep 'a'" in one_line_error(capsys)
    assert tree(sweep_copy) == before
    assert main(["sweep", "--spec", str(other), "--out", str(sweep_copy), "--summarize", "--overwrite", *FAST]) == 0
    assert (sweep_copy / "summary.md").read_text().startswith("# Sweep b")
    assert json.loads((sweep_copy / "robustcl-sweep.json").read_text())["name"] == "b"


def test_the_same_spec_keeps_its_directory_edited_copied_or_made_before_the_marker(swept, sweep_copy, tmp_path, capsys):
    spec, _ = swept
    copy = tmp_path / "copy-of-a.yaml"
    shutil.copy(spec, copy)  # the same content elsewhere
    assert main(["sweep", "--spec", str(copy), "--out", str(sweep_copy), "--summarize", *FAST]) == 0
    copy.write_text(copy.read_text().replace("seeds: [0]", "seeds: [0, 1]") + "  - {name: h, config: smoke}\n")
    assert main(["sweep", "--spec", str(copy), "--out", str(sweep_copy), "--summarize", *FAST]) == 0  # edited
    assert "1 of 4 runs finished" in (sweep_copy / "summary.md").read_text()
    (sweep_copy / "robustcl-sweep.json").unlink()  # a sweep made before the marker: known by its sweep.yaml
    assert main(["sweep", "--spec", str(write_spec(tmp_path, "b")), "--out", str(sweep_copy), "--summarize"]) == 2
    assert "holds sweep 'a'" in one_line_error(capsys)
    assert main(["sweep", "--spec", str(spec), "--out", str(sweep_copy), "--summarize", *FAST]) == 0
    assert json.loads((sweep_copy / "robustcl-sweep.json").read_text())["name"] == "a"


def test_a_run_and_a_sweep_directory_are_not_taken_for_one_another(swept, sweep_copy, run_copy, tmp_path, capsys):
    spec, _ = swept
    assert main(["sweep", "--spec", str(spec), "--out", str(run_copy), "--summarize", *FAST]) == 2
    assert f"{run_copy} is a robustcl run, not a sweep directory" in one_line_error(capsys)
    assert main(["pretrain", "--config", "smoke", "--out", str(sweep_copy), "--overwrite", *QUIET]) == 2
    assert "is a sweep directory" in one_line_error(capsys)
    assert main(["bench", *BENCH, "--json", str(sweep_copy / "summary.md"), "--overwrite"]) == 2
    assert f"is a file of the sweep directory {sweep_copy}" in one_line_error(capsys)


# ------------------------------------------------------------------- a second sweep running the same runs
HOLDER = """
import fcntl, os, sys, time
from robustcl.config import dump_yaml
from robustcl.runs import open_run
from robustcl.runs.guard import RunLock
from robustcl.runtime import open_runtime
from robustcl.sweep.plan import plan_sweep

planned = plan_sweep(sys.argv[1], sys.argv[2], sys.argv[3:]).runs[0]
planned.root.mkdir(parents=True)
fd = os.open(planned.root, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)  # what a live sweep's worker holds for the whole run
cfg = open_runtime(planned.cfg).cfg  # `auto` resolved, as pretrain stores it
open_run(planned.run, RunLock(planned.root), dump_yaml(cfg), False, False, "the test")  # and the run's lock
print("holding", planned.name, flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def another_sweep_running_the_first_run(spec: Path, out: Path, overrides: list[str]) -> Iterator[str]:
    """A process that holds the spec's first run as a live sweep's worker does (the run started, its lock held)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(spec), str(out), *overrides], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("holding"), line
        yield line.split()[1]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_run_another_live_sweep_is_running_is_left_to_it_not_failed(tmp_path, capsys, jobs):
    spec = write_spec(tmp_path, "two", seeds="[0, 1]")
    out = tmp_path / "out"
    with another_sweep_running_the_first_run(spec, out, FAST) as busy:
        assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", jobs, "--quiet", *FAST]) == 0
    printed = capsys.readouterr()
    assert f"{busy}: running in another process" in printed.out and "failed" not in printed.out + printed.err
    summary = (out / "summary.md").read_text()
    assert "1 of 2 runs finished" in summary and "failed" not in summary
    assert f"Running in another process when this summary was written (that sweep writes the summary again when it " \
           f"ends): {busy}" in summary
    assert (out / "g-s1" / "results.json").is_file() and not (out / busy / "results.json").exists()


def test_a_run_another_sweep_is_just_starting_is_not_a_conflict(tmp_path):
    from robustcl.runs.guard import RunLock, write_marker
    from robustcl.sweep.plan import plan_sweep

    spec = write_spec(tmp_path, "two", seeds="[0, 1]")
    root = tmp_path / "out" / "g-s0"
    root.mkdir(parents=True)
    lock = RunLock(root)
    lock.acquire()  # open_run's first steps: the lock, the marker, config.yaml being written
    write_marker(root)
    (root / ".config.yaml.0123abcd.tmp").write_text("half a config")
    try:
        assert [r.status for r in plan_sweep(str(spec), tmp_path / "out").runs] == ["new", "new"]
        (root / "notes.txt").write_text("mine")
        assert plan_sweep(str(spec), tmp_path / "out").runs[0].status.startswith("conflict")
    finally:
        lock.release()


@pytest.mark.slow  # two real `--jobs 2` sweeps at once on one directory: ~1 min on 2 busy cores
def test_two_concurrent_parallel_sweeps_run_every_run_once_and_both_succeed(tmp_path):
    spec = write_spec(tmp_path, "par", seeds="[0, 1, 2, 3]")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", "robustcl", "sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2",
            "--quiet", *FAST]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    second = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_out, _ = first.communicate()
    assert (first.returncode, second.returncode) == (0, 0), first_out + second.stdout
    assert "failed" not in first_out + second.stdout
    assert "running in another process" in first_out + second.stdout  # they met on at least one run
    assert "4 of 4 runs finished" in (out / "summary.md").read_text()
