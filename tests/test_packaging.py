"""Packaging: a non-editable install ships every preset, sweep spec, schedule and py.typed; the torch range."""
from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def shipped_data_files() -> list[str]:
    """Every non-Python file of the package that an install must carry (paths relative to robustcl/)."""
    package = ROOT / "robustcl"
    return sorted(str(p.relative_to(package)) for p in package.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_package_data_globs_cover_every_preset_and_py_typed():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["robustcl"]
    files = shipped_data_files()
    assert "py.typed" in files and "smoke.yaml" in [Path(f).name for f in files]
    assert len([f for f in files if f.startswith("presets/sweeps/")]) >= 4
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert uncovered == []


def test_the_torch_range_admits_torch_2_15_and_the_console_script_is_entry():
    torch_req = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert torch_req == "torch>=2.4,<2.16"
    assert PYPROJECT["project"]["scripts"]["robustcl"] == "robustcl.cli:entry"


@pytest.mark.slow
def test_a_built_wheel_holds_every_data_file(tmp_path):
    """The wheel `pip install .` installs, built from a clean copy of the tree (a build/ folder left in the
    tree would hand on files of an earlier build) without network: no build isolation, no dependencies."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "robustcl", source / "robustcl", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("robustcl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"robustcl/{f}" for f in shipped_data_files()} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "robustcl = robustcl.cli:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()
