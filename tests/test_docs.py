"""The documentation site: `mkdocs build --strict` passes without a warning, and the generated config
reference gives every key of the schema (each method's section included) a type, a default and a meaning."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap
import typing
from html.parser import HTMLParser
from pathlib import Path

import pytest

import robustcl
from robustcl import docs_reference
from robustcl.config import Config, config_fields
from robustcl.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
HAS_MKDOCS = importlib.util.find_spec("mkdocs") is not None


def section_class(tp: typing.Any) -> type | None:
    """The dataclass behind a field typed X or X | None (the test's own reading of the schema)."""
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def leaf_keys(cls: type, prefix: str) -> list[str]:
    """Every dotted leaf key under dataclass `cls`, walked recursively."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in config_fields(cls):
        if cls is Config and f.name == "method":
            continue
        sub = section_class(hints[f.name])
        full = f"{prefix}{f.name}"
        out += leaf_keys(sub, f"{full}.") if sub is not None else [full]
    return out


def schema_keys() -> set[tuple[str, str]]:
    """(section, key) for every key: section "" for Config's, the method's name for `method.*` keys."""
    keys = {("", k) for k in leaf_keys(Config, "")}
    for name, method in METHODS.items():
        keys |= {(name, k) for k in leaf_keys(method.config_class, "method.")}
    return keys


# ------------------------------------------------------------------ the generator on a toy schema
TOY = '''
from dataclasses import dataclass, field


@dataclass
class Inner:
    """The inner section's docstring."""
    depth: int = 3


@dataclass
class Base:
    rate: float = 0.5        # the base's rate
    plain: int = 1


@dataclass
class Toy(Base):
    rate: float = 0.25
    # a block above,
    # on two lines
    above: str = "x"
    wide: tuple[int, ...] = field(
        default_factory=lambda: (1, 2))  # on the last line
    cont: bool = False       # a trailing comment
                             # and its continuation
    # a comment cut off by a blank line

    alone: int | None = None
    inner: Inner = field(default_factory=Inner)
    eps: float = 8 / 255     # a radius
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy_schema.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_schema", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_schema"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["toy_schema"]


def test_meanings_come_from_trailing_comments_blocks_above_and_base_classes(toy):
    assert docs_reference.field_meanings(toy.Toy) == {
        "rate": "the base's rate",                       # inherited: Toy's override has no comment
        "above": "a block above, on two lines",
        "wide": "on the last line",
        "cont": "a trailing comment and its continuation",
        "eps": "a radius",
    }  # plain, alone (the blank line detaches the comment) and inner (a section) have none


def test_section_lists_types_defaults_and_the_keys_without_meaning(toy):
    sec = docs_reference.section(toy.Toy, toy.Toy(), "toy")
    rows = {k.path: (k.type, k.default, k.meaning) for k in sec.keys}
    assert rows["toy.wide"] == ("list[int]", "[1, 2]", "on the last line")
    assert rows["toy.alone"] == ("int | null", "null", "")
    assert rows["toy.eps"] == ("float", "8/255", "a radius")
    assert rows["toy.rate"][1] == "0.25"
    assert [s.path for s in sec.sections] == ["toy.inner"]
    assert sec.sections[0].meaning == "The inner section's docstring."
    assert sec.sections[0].keys == [docs_reference.Key("toy.inner.depth", "int", "3", "")]
    assert docs_reference.default_text(0.2) == "0.2"  # = 51/255, but written short: not shown as a fraction


# ----------------------------------------------------------------------------- the real schema
def test_the_generator_walks_every_key_of_the_schema():
    generated = {k.path for k in docs_reference.all_keys()}
    assert {k for _, k in schema_keys()} == generated


def test_every_config_key_has_a_meaning_in_the_schema():
    missing = docs_reference.missing_meanings()
    assert not missing, ("keys without a meaning: write a `# comment` beside each field in the schema "
                         "(or a docstring on a section's class):\n" + "\n".join(missing))


# ----------------------------------------------------------------------------------- the build
class ReferenceTables(HTMLParser):
    """(section, key) -> the other cells of its row in the built config page; section as in schema_keys."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], list[str]] = {}
        self.heading: str | None = None      # text of the heading being read
        self.h3 = ""                         # the last h3: a method's name inside the method section
        self.cells: list[str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h2", "h3"):
            self.heading, self.level = "", tag
        elif tag == "tr":
            self.cells = []
        elif tag == "td" and self.cells is not None:
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.heading is not None:
            self.heading += data
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3") and self.heading is not None:
            text = self.heading.replace("¶", "").strip()
            if tag == "h3" or text != "method":
                self.h3 = text if tag == "h3" else ""
            self.heading = None
        elif tag == "td" and self.cell is not None and self.cells is not None:
            self.cells.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.cells:
            key = self.cells[0]
            self.rows[(self.h3 if key.startswith("method.") else "", key)] = self.cells[1:]
            self.cells = None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not HAS_MKDOCS:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (the dev extra includes it)")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, site


def test_strict_build_succeeds_without_warnings(built):
    proc, site = built
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("index.html", "quickstart/index.html", "reference/api/index.html", "adding-a-method/index.html",
                 "evaluating-your-encoder/index.html", "reproducing/index.html", "algorithm/index.html"):
        assert (site / page).is_file(), page
    api = (site / "reference/api/index.html").read_text()
    for name in (*(f"api.{n}" for n in robustcl.API), "encoders.evaluate_encoder"):
        assert f'id="robustcl.{name}"' in api, f"robustcl.{name} has no entry in docs/reference/api.md"


def test_built_reference_documents_every_key_with_type_default_and_meaning(built):
    proc, site = built
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parser = ReferenceTables()
    parser.feed((site / "reference/config/index.html").read_text())
    absent = sorted(k for k in schema_keys() if k not in parser.rows)
    assert not absent, f"keys missing from the built reference: {absent}"
    empty = sorted(k for k in schema_keys() if not all(parser.rows[k]))
    assert not empty, f"keys without a type, default or meaning in the built reference: {empty}"
