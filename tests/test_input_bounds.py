"""Hostile input, round two (issue 23): numbers out of range, files and YAML that never end, no home directory.

Each case is one `robustcl: error:` line and exit status 2, never a traceback or memory exhaustion.
docs/reliability.md ("Input bounds") lists the cases, the line a user gets and the test covering each.
"""
from __future__ import annotations

import os
import pwd
import tempfile
import time
from pathlib import Path

import pytest
from conftest import one_line_error

from robustcl.cli import main
from robustcl.config import ConfigError, load_config

QUIET = ["--quiet", "train.threads=1"]
BIG = str(2 ** 70)
BILLION_LAUGHS = """\
name: bomb
seeds: [0]
grid:
  base: smoke
  axes:
    train.lr: &a [0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1]
    train.momentum: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    train.weight_decay: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    train.min_lr: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    train.epochs: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    train.batch_size: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""
SPEC = "name: ok\nseeds: [0]\nruns:\n  - {name: a, config: smoke}\n"




def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command that must exit 2."""
    assert main(argv) == 2
    return one_line_error(capsys)


def _spec(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (pretrain, SLF/ALF heads, results) for `evaluate`."""
    out = tmp_path_factory.mktemp("bounds") / "run"
    assert main(["run", "--config", "smoke", "--out", str(out), *QUIET]) == 0
    return out


# ------------------------------------------------------------------------ 9. numbers out of range
@pytest.mark.parametrize("override, message", [
    ("train.lr=1e400", r"train.lr='1e400' must be a finite number"),
    ("train.lr=.inf", r"train.lr=inf must be a finite number"),
    ("train.lr=-.inf", r"train.lr=-inf must be a finite number"),
    ("train.lr=.nan", r"train.lr=nan must be a finite number"),
    (f"train.lr={10 ** 400}", r"train.lr=1000000000\.\.\. \(401 digits\) must be a finite number"),
    ("eval.eps_curve=[0.1, 1e400]", r"eval.eps_curve\[1\]='1e400' must be a finite number"),
    ("method.attack.eps=-1e400", r"method.attack.eps='-1e400' must be a finite number"),
    (f"seed={2 ** 63 - 1}", r"seed=9223372036854775807 must be an integer in \[0, 4294967295\]"),
    (f"seed={BIG}", r"seed=1180591620\.\.\. \(22 digits\) must be an integer in \[0, 4294967295\]"),
    ("seed=-1", r"seed=-1 must be an integer in \[0, 4294967295\]"),
    (f"eval.subset_seed={2 ** 32}", r"eval.subset_seed=4294967296 must be an integer in \[0, 4294967295\]"),
    (f"train.epochs={BIG}", r"train.epochs=1180591620\.\.\. \(22 digits\) must be an integer in "
                            r"\[-9007199254740992, 9007199254740992\]"),
    (f"model.widths=[4, {BIG}]", r"model.widths\[1\]=.* must be an integer in"),
])
def test_a_number_out_of_range_is_refused_where_it_enters_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_the_widest_numbers_still_accepted_are_the_documented_ones():
    cfg = load_config("smoke", ["seed=4294967295", "eval.subset_seed=0", "train.lr=1e300",
                                "train.epochs=9007199254740992"])
    assert (cfg.seed, cfg.eval.subset_seed, cfg.train.lr, cfg.train.epochs) == (2 ** 32 - 1, 0, 1e300, 2 ** 53)


def test_pretrain_with_an_overflowing_value_is_one_line_before_any_work(tmp_path, capsys):
    line = refused(["pretrain", "--config", "smoke", "--out", str(tmp_path / "r"), *QUIET, "train.lr=1e400"], capsys)
    assert line == ("robustcl: error: config value train.lr='1e400' must be a finite number (inf, nan and values "
                    "beyond ±1.8e308 are refused); give a finite value")
    argv = ["pretrain", "--config", "smoke", "--out", str(tmp_path / "r"), *QUIET, f"seed={2 ** 63 - 1}"]
    line = refused(argv, capsys)
    assert "seed=9223372036854775807 must be an integer in [0, 4294967295]" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--eps", "1e400"], "eval.eps_curve[0]='1e400' must be a finite number"),
    (["--seed", BIG], "seed=1180591620... (22 digits) must be an integer in [0, 4294967295]"),
    (["--seed", str(2 ** 63 - 1)], "seed=9223372036854775807 must be an integer in [0, 4294967295]"),
])
def test_evaluate_seed_and_eps_go_through_the_same_check(finished, capsys, flags, message):
    assert message in refused(["evaluate", "--run", str(finished), *flags, "--quiet"], capsys)


@pytest.mark.parametrize("text, flags, message", [
    (f"name: s\nseeds: [{BIG}]\nruns:\n  - {{name: a, config: smoke}}\n", [],
     "config value seeds[0]=1180591620... (22 digits) must be an integer in [0, 4294967295]"),
    (SPEC, ["--seeds", "0", BIG],
     "config value --seeds[1]=1180591620... (22 digits) must be an integer in [0, 4294967295]"),
    (SPEC, ["--seeds", "-3"], "config value --seeds[0]=-3 must be an integer in [0, 4294967295]"),
    ("name: g\nseeds: [0]\ngrid:\n  base: smoke\n  axes:\n    train.lr: [0.1, 1e400]\n", [],
     "config value train.lr='1e400' must be a finite number"),
])
def test_sweep_seeds_and_grid_values_go_through_the_same_check_dry_run_included(tmp_path, capsys, text, flags, message):
    spec = _spec(tmp_path, text)
    assert message in refused(["sweep", "--spec", spec, "--out", str(tmp_path / "o"), "--dry-run", *flags], capsys)


# --------------------------------------------------------------- 10. what is read and expanded is bounded
def _deep_config(depth: int) -> str:
    return "extends: smoke\ndata:\n  options: " + "{a: " * depth + "1" + "}" * depth + "\n"


@pytest.mark.parametrize("what", ["config", "spec", "override"])
def test_yaml_nested_500_deep_is_one_line(tmp_path, capsys, what):
    if what == "config":
        (tmp_path / "deep.yaml").write_text(_deep_config(500))
        argv = ["pretrain", "--config", str(tmp_path / "deep.yaml"), "--out", str(tmp_path / "r"), *QUIET]
    elif what == "spec":
        argv = ["sweep", "--spec", _spec(tmp_path, SPEC + "baseline: " + "[" * 500 + "]" * 500 + "\n"), "--dry-run"]
    else:
        argv = ["pretrain", "--config", "smoke", "--out", str(tmp_path / "r"), *QUIET,
                "data.options.size=" + "[" * 500 + "]" * 500]
    assert "nests deeper than 32 levels" in refused(argv, capsys)


def test_nesting_up_to_the_cap_still_loads():
    from robustcl.config.inputs import MAX_DEPTH, load_yaml

    assert MAX_DEPTH == 32
    nested: list = []
    for _ in range(30):
        nested = [nested]
    assert load_yaml("a: " + "[" * 31 + "]" * 31, "test") == {"a": nested}
    with pytest.raises(ConfigError, match="test nests deeper than 32 levels"):
        load_yaml("a: " + "[" * 32 + "]" * 32, "test")


def test_a_yaml_alias_bomb_in_a_sweep_grid_is_one_line_and_quick(tmp_path, capsys):
    spec = _spec(tmp_path, BILLION_LAUGHS)
    started = time.monotonic()
    line = refused(["sweep", "--spec", spec, "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert "expands to more than 100000 values (YAML aliases repeat what they point to)" in line
    assert "batch_size" not in line and time.monotonic() - started < 30


def test_an_alias_bomb_in_a_config_and_a_recursive_alias_are_one_line(tmp_path, capsys):
    bomb = "extends: smoke\ndata:\n  options:\n" + "".join(
        f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '0'}]\n" for i in range(9))
    (tmp_path / "bomb.yaml").write_text(bomb)
    line = refused(["pretrain", "--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert "expands to more than 100000 values" in line
    (tmp_path / "loop.yaml").write_text("extends: smoke\ndata:\n  options:\n    a: &a [1, *a]\n")
    line = refused(["pretrain", "--config", str(tmp_path / "loop.yaml"), "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert "refers to itself through an alias" in line


def test_aliases_that_expand_a_little_still_work(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: smoke\ntrain: &t {lr: 0.25}\nfinetune: {lr: 0.25}\n")
    assert load_config(str(tmp_path / "a.yaml")).train.lr == 0.25


def test_a_grid_of_ten_billion_runs_is_refused_before_it_is_expanded(tmp_path, capsys):
    axes = "".join(f"    train.k{i}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n" for i in range(10))
    spec = _spec(tmp_path, "name: g\nseeds: [0, 1]\ngrid:\n  base: smoke\n  axes:\n" + axes)
    started = time.monotonic()
    line = refused(["sweep", "--spec", spec, "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert "20000000000 runs (10000000000 configurations x 2 seeds) are more than 10000" in line
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("what", ["rows", "config", "spec"])
def test_dev_zero_and_a_fifo_are_refused_not_read(tmp_path, capsys, what):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for source in ("/dev/zero", str(fifo)):
        if what == "rows":
            argv = ["sweep", "--spec", _spec(tmp_path, SPEC), "--out", str(tmp_path / "o"), "--summarize", "--rows",
                    source]
        elif what == "config":
            argv = ["pretrain", "--config", source, "--out", str(tmp_path / "r"), *QUIET]
        else:
            argv = ["sweep", "--spec", source, "--dry-run"]
        line = refused(argv, capsys)
        assert f"{source} is not a regular file (a device, pipe or directory); give" in line, line


def test_files_above_the_size_cap_are_refused(tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.yaml"
    big.write_text("extends: smoke\n" + "# padding\n" * 110_000)  # 1.1 MB: a config is a few KB
    line = refused(["pretrain", "--config", str(big), "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert f"config file {big} is larger than 1 MiB" in line
    import robustcl.config.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_ROWS_BYTES", 1000)  # the real cap, 64 MiB, is too big to write in a test
    rows = tmp_path / "rows.csv"
    rows.write_text("x" * 1001)
    line = refused(["sweep", "--spec", _spec(tmp_path, SPEC), "--out", str(tmp_path / "o"), "--summarize", "--rows",
                    str(rows)], capsys)
    assert f"--rows file {rows} is larger than" in line


def test_a_yaml_integer_past_pythons_digit_limit_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("extends: smoke\nseed: " + "9" * 5000 + "\n")
    line = refused(["pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), *QUIET], capsys)
    assert "an integer of 5000 digits" in line


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
