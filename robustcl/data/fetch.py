"""Obtain a dataset for `make data`: `python -m robustcl.data.fetch fashion-mnist`.

Order: already resolvable -> print where, exit 0; else, as root with apt-get available and a Debian
package for the dataset -> `apt-get install -y <package>` and re-resolve; else download into the
user cache with md5 verification; else exit 1 with a one-line message naming both ways.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import Callable, Sequence

from .base import DATASETS, DataError, get_reader
from .files import FileReader, cache_dir

AptRunner = Callable[[str], int]


def is_root() -> bool:
    """Whether this process may run apt-get (effective uid 0)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_available() -> bool:
    """Whether an apt-get executable is on PATH."""
    return shutil.which("apt-get") is not None


def run_apt(package: str) -> int:
    """`apt-get install -y package`, refreshing the package lists once if the first try fails."""
    command = ["apt-get", "install", "-y", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env).returncode == 0:
        return 0
    subprocess.run(["apt-get", "update"], env=env)
    return subprocess.run(command, env=env).returncode


def _try_locate(reader: FileReader, download: bool) -> tuple[str | None, str]:
    """(where the dataset resolves, downloading if asked, or None; why it did not)."""
    try:
        return str(reader.locate(None, download)), ""
    except DataError as exc:
        return None, str(exc)


def obtain(name: str, apt_runner: AptRunner = run_apt, root_check: Callable[[], bool] = is_root,
           has_apt: Callable[[], bool] = apt_available) -> str | None:
    """Make dataset `name` resolvable by any available route; returns where it is (None: generated in memory).
    When no route works, one DataError line says why and what to do (`robustcl data fetch` prints it)."""
    reader = get_reader(name)
    if not isinstance(reader, FileReader):
        print(f"{name}: generated in memory, nothing to fetch")
        return None
    where, _ = _try_locate(reader, download=False)
    if where is None and reader.apt_package and root_check() and has_apt():
        print(f"{name}: installing Debian package {reader.apt_package}", file=sys.stderr)
        if apt_runner(reader.apt_package) == 0:
            where, _ = _try_locate(reader, download=False)
    why = ""
    if where is None:
        where, why = _try_locate(reader, download=True)
    if where is None:
        apt = (f"install Debian's {reader.apt_package} as root (apt-get install -y {reader.apt_package}) "
               "or " if reader.apt_package else "")
        raise DataError(f"could not obtain {name}: {apt}download it into {cache_dir(name)} when the network is "
                        f"reachable (robustcl data fetch {name}); the download said: {why}")
    print(f"{name}: found at {where}")
    return where


def main(argv: Sequence[str] | None = None, apt_runner: AptRunner = run_apt,
         root_check: Callable[[], bool] = is_root, has_apt: Callable[[], bool] = apt_available) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m robustcl.data.fetch",
                                     description="Make a dataset available locally (apt or download).")
    parser.add_argument("name", choices=DATASETS)
    args = parser.parse_args(argv)
    try:
        obtain(args.name, apt_runner, root_check, has_apt)
    except DataError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
