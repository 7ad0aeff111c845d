"""The parser of every subcommand, and the one place a command's error becomes one line or a bug report."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from robustcl.cli import phases, sweep, tools, zoo

DESCRIPTION = ("Adversarially robust contrastive learning: pretrain, finetune and evaluate a run (or `run` all "
               "three), evaluate any encoder (`evaluate --encoder FILE`), sweep, bound, bench, transfer, export, "
               "demo, configs, data.")
DOCS = ("documentation: docs/index.md in the source tree is the map of every page; `make docs` builds the "
        "site into site/ (open site/index.html)")


def build_parser() -> argparse.ArgumentParser:
    """The `robustcl` parser: every family of commands registers its own subcommands."""
    parser = argparse.ArgumentParser(prog="robustcl", description=DESCRIPTION, epilog=DOCS)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (phases, sweep, tools, zoo):
        family.register(sub)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are a user's mistake (bad input, a run directory in the way): one line, exit 2."""
    from robustcl.config import ConfigError
    from robustcl.data import DataError
    from robustcl.runs import RunError
    from robustcl.train.pretrain import CatastrophicOverfitting, NonFiniteLoss

    return (ConfigError, DataError, RunError, NonFiniteLoss, CatastrophicOverfitting, FileNotFoundError)


def environment_error(exc: BaseException) -> str | None:
    """One line for an error of the machine rather than of robustcl (I/O, memory), else None."""
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}; check that path (free space, permissions, mounts) and run again"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = (str(exc).strip().splitlines() or ["out of memory"])[0]
        return f"out of memory ({first}); lower train.batch_size, eval.batch_size or finetune.batch_size"
    return None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse with `key=value` overrides allowed anywhere among the options (`pretrain a=1 --config x b=2`).

    argparse takes the first run of positionals as the overrides; later `key=value` words come back as
    unrecognised and are appended in order. Anything else unrecognised is argparse's usual error.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray or (extra and not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def report_bug() -> None:
    """A bug's traceback and where to report it."""
    traceback.print_exc()
    print("robustcl: this is a bug in robustcl, not in your input; report it at the project's issue "
          "tracker with this traceback", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: errors of the user's input or environment are one line (exit 2); a bug in robustcl
    shows its traceback and where to report it (exit 1)."""
    args = parse_args(build_parser(), argv)
    try:
        import robustcl.methods  # noqa: F401 - registers the methods configs are built with (after --help: no torch)

        return args.fn(args)
    except user_errors() as exc:
        if phases.on_rank_zero():  # under torchrun every rank raises the same error: say it once
            print(f"robustcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustcl: interrupted; resume with --resume --out <run dir>", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader closed the pipe: entry() ends quietly
    except Exception as exc:  # noqa: BLE001 - the last word: one line, or a bug's traceback
        line = environment_error(exc)
        if phases.on_rank_zero():
            if line is not None:
                print(f"robustcl: error: {line}", file=sys.stderr)
            else:
                report_bug()
        return 2 if line is not None else 1


def entry() -> int:
    """The `robustcl` console script: main(), and a reader that closed the pipe (`robustcl configs | head -1`)
    ends the command quietly, as the Python docs recommend (stdout pointed at devnull, exit status 1)."""
    try:
        try:
            return main()
        finally:
            if sys.stdout is not None:  # None when the shell closed it (`robustcl configs >&-`): nothing to flush
                sys.stdout.flush()  # inside the try, so a closed pipe surfaces here and not at interpreter exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(entry())
