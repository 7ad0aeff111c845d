"""The config reference, generated from the schema: every key with its type, default and meaning.

Meanings are read from the schema's own source: the `# comment` at the end of a field's line (and its
indented continuation lines), or the comment block directly above the field; a section's meaning is the
comment on its field, else its class's docstring. An inherited field without a comment of its own takes
its base class's. The docs build (docs/hooks.py) renders this as reference/config.md, so the page cannot
drift from the code; `python -m robustcl.docs_reference --missing` lists the keys without a meaning.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from robustcl.config import Config, config_fields

REFERENCE_PAGE = "reference/config.md"  # where the docs site puts it (relative to docs/)


@dataclass(frozen=True)
class Key:
    """One leaf key of the schema: its dotted path, type, default (as YAML writes it) and meaning."""
    path: str
    type: str
    default: str
    meaning: str


@dataclass
class Section:
    """A dataclass section of the schema: its dotted path, meaning, leaf keys and sub-sections."""
    path: str
    meaning: str
    keys: list[Key]
    sections: list[Section]
    title: str = ""

    def walk(self) -> Iterator[Section]:
        """This section and every section below it, depth first."""
        yield self
        for child in self.sections:
            yield from child.walk()


# ------------------------------------------------------------------------------------- comments
@functools.cache
def own_field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment text that the class body of `cls` itself writes beside or above it."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a built-in or a class made at run time)
        return {}
    source = textwrap.dedent("".join(lines))
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    comments: dict[int, tuple[int, str, bool]] = {}  # line -> (column, text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line[:tok.start[1]].strip() == ""
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), alone)
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = _block_above(comments, stmt.lineno, stmt.col_offset)
        beside = [comments[n][1] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                  if n in comments and not comments[n][2]]
        beside += _continuation(comments, (stmt.end_lineno or stmt.lineno) + 1, stmt.col_offset) if beside else []
        text = " ".join(part for part in (*above, *beside) if part)
        if text:
            out[stmt.target.id] = text
    return out


def _block_above(comments: dict[int, tuple[int, str, bool]], line: int, column: int) -> list[str]:
    """The comment lines directly above `line` at the field's own indentation (no blank line between)."""
    block: list[str] = []
    n = line - 1
    while n in comments and comments[n][2] and comments[n][0] == column:
        block.insert(0, comments[n][1])
        n -= 1
    return block


def _continuation(comments: dict[int, tuple[int, str, bool]], line: int, column: int) -> list[str]:
    """Comment lines after a field's trailing comment, indented deeper than the field: its continuation."""
    more: list[str] = []
    while line in comments and comments[line][2] and comments[line][0] > column:
        more.append(comments[line][1])
        line += 1
    return more


def field_meanings(cls: type) -> dict[str, str]:
    """Field name -> meaning for every field of dataclass `cls`, a base class's comment where `cls` has none."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(own_field_comments(klass))
    return out


def class_meaning(cls: type) -> str:
    """The first paragraph of a class's own docstring, on one line ("" without one)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):  # dataclasses make a signature docstring for bare classes
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


# ---------------------------------------------------------------------------------- type/default
def type_name(tp: Any) -> str:
    """A schema type as a config author reads it: int | null, "pgd" | "cw", list[float], [float, float]."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]" if args else "mapping"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def default_text(value: Any) -> str:
    """A default as YAML writes it (null, true, [0.2, 1.0]); a long float that is k/255 shown as that fraction."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        k = value * 255
        if len(repr(value)) > 8 and abs(k - round(k)) < 1e-9:  # 8/255, not 0.2 (= 51/255 too)
            return f"{round(k)}/255"
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {default_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


# ------------------------------------------------------------------------------------------ walk
def _section_class(tp: Any) -> type | None:
    """The dataclass of a section field typed `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1 \
            and dataclasses.is_dataclass(options[0]):
        return options[0]  # type: ignore[no-any-return]
    return None


def section(cls: type, instance: Any, path: str, meaning: str = "", skip: tuple[str, ...] = ()) -> Section:
    """The Section of dataclass `cls` at `path`, defaults read from `instance` (a default-built one)."""
    hints = typing.get_type_hints(cls)
    meanings = field_meanings(cls)
    out = Section(path, meaning or class_meaning(cls), [], [])
    for f in config_fields(cls):  # not the code-only fields (CODE_ONLY): they are no config keys
        if f.name in skip:
            continue
        full = f"{path}.{f.name}" if path else f.name
        value = getattr(instance, f.name)
        sub = _section_class(hints[f.name])
        if sub is not None:
            own = meanings.get(f.name, "") or class_meaning(sub)
            if value is None:  # an optional section, null by default: document its keys' own defaults
                value = sub()
                own = f"{own} (the section is null by default)" if own else ""
            out.sections.append(section(sub, value, full, own))
        else:
            out.keys.append(Key(full, type_name(hints[f.name]), default_text(value), meanings.get(f.name, "")))
    return out


def method_sections() -> list[Section]:
    """One `method` section per registered method (robustcl.methods.METHODS), titled by its name."""
    from robustcl.methods import METHODS

    out = []
    for name, method in METHODS.items():
        cfg_cls = method.config_class
        about = " ".join(part for part in (class_meaning(method), class_meaning(cfg_cls)) if part)
        sec = section(cfg_cls, cfg_cls(), "method", about)
        sec.title = name
        out.append(sec)
    return out


def reference_sections() -> list[Section]:
    """The schema as documented: the top level and each section of Config, `method` once per method."""
    top = section(Config, Config(), "", "Keys at the top level of a config.", skip=("method",))
    top.title = "top level"
    sections, methods = top.sections, method_sections()
    top.sections = []
    return [top, *sections[:3], *methods, *sections[3:]]  # in Config's order: data, views, model, method, ...


def all_keys() -> list[Key]:
    """Every leaf key of the schema, each method's section included."""
    return [key for root in reference_sections() for sec in root.walk() for key in sec.keys]


def missing_meanings() -> list[str]:
    """Dotted keys and sections without a meaning (`method.*` ones named with their method)."""
    out = []
    for root in reference_sections():
        where = f" ({root.title})" if root.path == "method" else ""
        for sec in root.walk():
            if sec.path and not sec.meaning:
                out.append(f"{sec.path}{where} [section]")
            out += [f"{key.path}{where}" for key in sec.keys if not key.meaning]
    return out


# ---------------------------------------------------------------------------------------- render
def _text(text: str) -> str:
    """Schema text as Markdown prose: angle brackets (runs/<name>) as entities, not HTML tags."""
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: also pipes escaped."""
    return _text(text).replace("|", "\\|")


def _code(text: str) -> str:
    """A code span (in a table cell too: Markdown takes its pipes and angle brackets literally)."""
    return f"`{text}`"


def _render_section(sec: Section, level: int) -> list[str]:
    heading = sec.title or sec.path
    lines = [f"{'#' * level} {_code(heading) if not sec.title else heading}", ""]
    if sec.meaning:
        lines += [_text(sec.meaning), ""]
    if sec.keys:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| {_code(k.path)} | {_code(k.type)} | {_code(k.default)} | {_cell(k.meaning)} |" for k in sec.keys]
        lines.append("")
    for child in sec.sections:
        lines += _render_section(child, min(level + 1, 6))
    return lines


INTRO = """\
# Config reference

Every key of a robustcl config, generated from the schema when the site is built (`robustcl/docs_reference.py`
reads each field's type, its default and the comment the schema writes beside it). A config is a YAML
preset or file (`robustcl configs` lists the presets, `robustcl configs --show NAME` prints one resolved)
changed with `key=value` overrides, e.g. `train.lr=0.1` or `method.attack.eps=8/255`.
Types: `a | b` is either, `null` is YAML's null, `list[x]` is a YAML list, `[x, y]` a list of exactly
those; a default shown as `8/255` is that fraction (YAML may write it so).

The `method` section depends on `method.name`: each method's keys are listed under its name, with that
method's defaults.
"""


def render() -> str:
    """The config reference page (Markdown)."""
    lines = [INTRO]
    for root in reference_sections():
        if root.path == "method" and root.title == next(iter(_method_names())):
            lines += ["## `method`", "", "The phase-1 method; `method.name` chooses which of these sections applies.", ""]
        lines += _render_section(root, 3 if root.path == "method" else 2)
    return "\n".join(lines).rstrip() + "\n"


def _method_names() -> list[str]:
    from robustcl.methods import METHODS

    return list(METHODS)


def main(argv: list[str] | None = None) -> int:
    """Print the reference page, or (--missing) the keys without a meaning, exiting 1 if there are any."""
    parser = argparse.ArgumentParser(prog="python -m robustcl.docs_reference", description=main.__doc__)
    parser.add_argument("--missing", action="store_true", help="list the keys and sections without a meaning")
    args = parser.parse_args(argv)
    if not args.missing:
        sys.stdout.write(render())
        return 0
    missing = missing_meanings()
    print("\n".join(missing) if missing else "every key has a meaning")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
