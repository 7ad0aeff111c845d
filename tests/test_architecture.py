"""The package's shape: layers that point down and no import circle (import-linter, .importlinter), and no
function over 60 lines. The contract is shown failing on a copy of the package with an upward import and
with a circle inside one package added, so a broken contract cannot pass unnoticed."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.is_file(), reason="import-linter (the dev extra) is not installed")


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (n lines)' for every function or method longer than `limit` lines (def to last line)."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the robustcl package and the .importlinter file under `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), str(tree / ".importlinter"), "--no-cache"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def copied_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contract in a temporary directory (the mutations never touch the repo)."""
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "robustcl", tree / "robustcl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tree / ".importlinter")
    return tree


def test_no_function_is_longer_than_sixty_lines():
    assert long_functions(ROOT / "robustcl") == []


def test_the_length_check_finds_a_long_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 60 + "    return x\n")
    assert long_functions(package) == ["pkg/m.py:5 long (62 lines)"]


def test_the_import_contract_holds():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(copied_tree):
    """models importing train (a lower layer reaching up), even inside a function, is refused."""
    module = copied_tree / "robustcl" / "models" / "heads.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n\ndef reach_up():\n    from robustcl.train import pretrain\n\n    return pretrain\n")
        proc = lint(copied_tree)
    finally:
        module.write_text(original)
    assert proc.returncode != 0
    assert "robustcl.models is not allowed to import robustcl.train" in proc.stdout, proc.stdout[-3000:]


def test_a_circle_inside_a_package_is_refused(copied_tree):
    """data.base and data.files importing each other (the layers alone cannot see it) is refused."""
    module = copied_tree / "robustcl" / "data" / "base.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n\ndef circle():\n    from robustcl.data.files import FileReader\n\n"
                                     "    return FileReader\n")
        proc = lint(copied_tree)
    finally:
        module.write_text(original)
    assert proc.returncode != 0
    assert "No circle inside a package" in proc.stdout and "robustcl.data" in proc.stdout, proc.stdout[-3000:]


def test_every_top_level_module_has_a_layer():
    """A new module or package under robustcl/ must be placed in the contract, or the layers would not see it."""
    import configparser
    import pkgutil

    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    layered = {name.strip() for line in parser["importlinter:contract:layers"]["layers"].splitlines()
               for name in line.split("|") if name.strip()}
    modules = {m.name for m in pkgutil.iter_modules([str(ROOT / "robustcl")])}
    assert modules - layered == set(), "add these to a layer in .importlinter"
