"""The `robustcl` command line: each subcommand parses its arguments and calls one public API function.

One module per family of commands, each with a `register(subparsers)`: `phases` (pretrain, finetune,
evaluate, run), `sweep`, `tools` (bench, bound, transfer, export, demo, configs, data); `app` puts
them together, runs one command and turns a user's mistake into one line. Nothing here imports torch
until a command runs, so `robustcl --help` stays fast.
"""
from robustcl.cli.app import build_parser, entry, main, parse_args

__all__ = ["build_parser", "entry", "main", "parse_args"]
