"""Hostile input, round two (issue 23): numbers out of range, files and YAML that never end, no home directory.

Each case is one `robustcl: error:` line and exit status 2, never a traceback or memory exhaustion.
docs/reliability.md ("Input bounds") lists the cases, the line a user gets and the test covering each.
"""
from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest

from robustcl.cli import main

QUIET = ["--quiet", "train.threads=1"]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `robustcl: error:` line the command printed (no traceback, nothing else)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: "), err
    return lines[0]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command that must exit 2."""
    assert main(argv) == 2
    return one_line_error(capsys)


# ------------------------------------------------------------------------- 11. no home directory
@pytest.fixture
def no_home(monkeypatch, tmp_path):
    """HOME unset and no passwd entry for the user (`docker --user 12345`): Path.home() raises RuntimeError, as it
    does there (os.path.expanduser finds no home and pathlib refuses the unexpanded `~`)."""
    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("ROBUSTCL_DATA", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(RuntimeError, match="Could not determine home directory"):
        Path.home()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def test_without_a_home_the_data_cache_falls_back_under_the_temp_dir(no_home, tmp_path, capsys):
    from robustcl.data.files import cache_root

    root = cache_root()
    assert root == no_home / f"robustcl-cache-{os.getuid()}" and root.is_dir()
    assert root.stat().st_mode & 0o777 == 0o700
    line = refused(["pretrain", "--config", "cifar10-simclr", "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert line.startswith(f"robustcl: error: cifar10 not found in {root / 'cifar10'}")


def test_without_a_home_a_tilde_path_is_one_line(no_home, tmp_path, capsys, monkeypatch):
    line = refused(["pretrain", "--config", "cifar10-simclr", "--out", str(tmp_path / "r"), *QUIET,
                    "data.root=~/data"], capsys)
    assert "data.root ~/data starts with ~ but this process has no home directory" in line
    monkeypatch.setenv("ROBUSTCL_DATA", "~/cache")
    line = refused(["pretrain", "--config", "cifar10-simclr", "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert "ROBUSTCL_DATA ~/cache starts with ~ but this process has no home directory" in line


def test_a_fallback_cache_someone_else_could_write_is_refused(no_home, tmp_path, capsys):
    planted = no_home / f"robustcl-cache-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    argv = ["pretrain", "--config", "cifar10-simclr", "--out", str(tmp_path / "r"), *QUIET]
    assert refused(argv, capsys) == (
        f"robustcl: error: the data cache {planted} (used because this process has no home directory) is writable "
        "by other users; remove it, or set ROBUSTCL_DATA to a directory of yours")
    planted.rmdir()
    planted.symlink_to(tmp_path)
    assert f"the data cache {planted} (used because this process has no home directory) is not a directory" \
        in refused(argv, capsys)
