"""CLI manners: overrides anywhere among the options, `configs --show`, --help without torch, a closed pipe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustcl.cli import build_parser, main, parse_args
from robustcl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_overrides_may_come_before_between_and_after_the_options():
    args = parse_args(build_parser(), ["pretrain", "a.b=1", "--config", "smoke", "c.d=2", "--out", "o", "--quiet",
                                       "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"]  # in the order given, so a later one wins
    assert (args.config, args.out, args.quiet) == ("smoke", "o", True)
    args = parse_args(build_parser(), ["evaluate", "eval.limit=8", "--run", "r", "seed=1", "--mixed-reading"])
    assert args.overrides == ["eval.limit=8", "seed=1"] and args.run == "r" and args.mixed_reading


@pytest.mark.parametrize("argv, unrecognised", [
    (["pretrain", "a=1", "--config", "smoke", "--bogus"], "--bogus"),       # an unknown option
    (["pretrain", "a=1", "--config", "smoke", "stray"], "stray"),           # a word that is no override
    (["data", "fetch", "fashion-mnist", "a=1"], "a=1"),                     # a command without overrides
])
def test_words_that_are_not_overrides_are_still_refused(argv, unrecognised, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(build_parser(), argv)
    assert info.value.code == 2
    assert f"unrecognized arguments: {unrecognised}" in capsys.readouterr().err


def test_configs_show_prints_the_resolved_yaml_with_overrides_from_anywhere(capsys, tmp_path):
    assert main(["configs", "train.lr=0.5", "--show", "smoke", "seed=3", "train.lr=0.25"]) == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed)
    expected = load_config("smoke", ["train.lr=0.5", "seed=3", "train.lr=0.25"])
    assert shown == expected.to_dict()
    assert shown["train"]["lr"] == 0.25 and shown["seed"] == 3  # the last override of a key wins
    assert shown["method"]["sam"]["mode"] == "asam"             # the preset's values, resolved in full
    saved = tmp_path / "shown.yaml"  # what is printed is a config file that loads to the same config
    saved.write_text(printed)
    assert load_config(str(saved)).to_dict() == expected.to_dict()


@pytest.mark.parametrize("argv, message", [
    (["configs", "train.lr=1"], "overrides (train.lr=1 ...) need --show NAME"),
    (["configs", "--show", "nope"], "unknown preset 'nope'"),
    (["configs", "--show", "smoke", "train.lrr=1"], "unknown config key train.lrr"),
])
def test_configs_show_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustcl: error: ") and message in err and err.count("\n") == 1


def test_help_of_every_command_imports_no_torch():
    """`robustcl --help` and each subcommand's --help build the parser without importing torch (fast)."""
    code = """
import json, sys
from robustcl.cli import build_parser, main
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
seen = {}
for argv in [[], *[[c] for c in commands]]:
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
    seen[" ".join(argv) or "robustcl"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"commands": commands, "torch": seen}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert {"pretrain", "finetune", "evaluate", "run", "sweep", "configs", "bench", "bound", "transfer"} <= set(
        report["commands"])
    assert report["torch"] == {name: [] for name in report["torch"]}
    assert len(report["torch"]) == len(report["commands"]) + 1


def test_help_points_to_the_documentation(capsys):
    """`robustcl --help` names the documentation's map (docs/index.md) and how to build the site."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "docs/index.md" in printed and "`make docs`" in printed


@pytest.mark.parametrize("argv, status", [(["configs"], 1), (["--help"], 0)])
def test_a_closed_pipe_ends_the_command_without_a_traceback(argv, status):
    """`robustcl configs | head -1`: the reader is gone before we write; no BrokenPipeError, exit status 1
    (argparse itself ignores a failed write of --help and exits 0)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write of the child now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "robustcl", *argv], cwd=ROOT, env=ENV, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.stderr == "" and proc.returncode == status


def test_the_format_option_names_every_layout_the_reader_knows():
    """`evaluate --format`'s help is written out (the parser imports no torch); it must name every layout."""
    from robustcl.encoders.layouts import LAYOUTS

    sub = next(a for a in build_parser()._actions if a.dest == "command" or getattr(a, "choices", None))
    evaluate = sub.choices["evaluate"]
    help_text = next(a.help for a in evaluate._actions if "--format" in a.option_strings)
    named = set(help_text.split("(", 1)[1].split(")", 1)[0].replace(" ", "").split(","))
    assert named == set(LAYOUTS)
