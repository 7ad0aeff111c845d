"""Reading what a user hands robustcl, bounded: config files, sweep specs, `--rows` CSVs and their YAML.

One reader of files, `read_bounded`: a regular file only (a device such as /dev/zero, a FIFO or a directory
is refused before a byte is read, and opening never blocks), and at most a cap of bytes. One YAML loader,
`load_yaml`: nesting at most MAX_DEPTH levels, at most MAX_NODES values once aliases are expanded (a
"billion laughs" of a few hundred bytes is refused, not expanded), no alias inside what it names, no
integer past Python's digit limit. Each refusal is a one-line ConfigError naming the input.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from robustcl.config.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file or sweep spec: the shipped ones are under 4 KB
# a --rows summary.csv: a row is ~300 bytes; a sweep's cap (robustcl.sweep.spec.MAX_RUNS, 10,000 runs) x 3
# protocols x 4 attacks is ~36 MB
MAX_ROWS_BYTES = 64 << 20
MAX_DEPTH = 32  # levels of nesting: a config needs 4 (method.attack.eps), a sweep grid 5; Python recurses ~1000 deep
MAX_NODES = 100_000  # values once aliases are expanded: a config holds ~150, a large sweep spec a few thousand


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"


def read_bounded(path: Path | str, what: str, limit: int) -> bytes:
    """The bytes of the regular file `path` (a `what`: "config file", "--rows file"), refused when it is not a
    regular file or holds more than `limit` bytes. OSError (missing, unreadable) is the caller's to word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))  # a FIFO opens without a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{what} {path} is not a regular file (a device, pipe or directory); give a file")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > limit:
        raise ConfigError(f"{what} {path} is larger than {_size(limit)}, far more than a {what} holds; "
                          "is it the right file?")
    return b"".join(chunks)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing nesting deeper than MAX_DEPTH while it composes (before Python's recursion
    limit) and integers past Python's digit limit."""

    def __init__(self, text: str, origin: str) -> None:
        super().__init__(text)
        self.origin, self.depth = origin, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ConfigError(_too_deep(self.origin))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            digits = sum(c.isdigit() for c in str(node.value))
            raise ConfigError(f"{self.origin} holds an integer of {digits} digits; no setting takes one "
                              "that large") from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _too_deep(origin: str) -> str:
    return (f"{origin} nests deeper than {MAX_DEPTH} levels; robustcl's configs and sweep specs need fewer "
            "than 10: flatten it")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def refuse_repeated_keys(node: yaml.Node, origin: str) -> None:
    """A mapping that gives one key twice is refused (PyYAML would keep the last value and drop the first
    without a word), naming the key and both lines."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":  # merge keys may repeat
            continue
        line = key.start_mark.line + 1
        if key.value in seen:
            raise ConfigError(f"{origin} gives the key {key.value!r} twice (lines {seen[key.value]} and {line}); "
                              "YAML would keep only the last: keep one")
        seen[key.value] = line


def _expanded(node: yaml.Node, depth: int, known: dict[int, tuple[int, int]], open_: set[int],
              origin: str) -> tuple[int, int]:
    """(values, levels) of `node` with every alias expanded, memoised per node (linear in the document)."""
    if id(node) in open_:
        raise ConfigError(f"{origin} refers to itself through an alias (like &a [*a]): it never ends; "
                          "write the value out")
    if depth > MAX_DEPTH:
        raise ConfigError(_too_deep(origin))
    if id(node) not in known:
        open_.add(id(node))
        refuse_repeated_keys(node, origin)
        count, levels = 1, 1
        for child in _children(node):
            values, below = _expanded(child, depth + 1, known, open_, origin)
            count, levels = count + values, max(levels, below + 1)
            if count > MAX_NODES:
                raise ConfigError(f"{origin} expands to more than {MAX_NODES} values (YAML aliases repeat what "
                                  "they point to); configs and sweep specs need a few thousand: write the values out")
        open_.discard(id(node))
        known[id(node)] = (count, levels)
    if depth + known[id(node)][1] - 1 > MAX_DEPTH:
        raise ConfigError(_too_deep(origin))
    return known[id(node)]


def load_yaml(text: str, origin: str) -> Any:
    """A YAML document as Python data, its nesting and its expanded size bounded (ConfigError naming `origin`);
    yaml.YAMLError for text that is not YAML, as yaml.safe_load."""
    loader = _BoundedLoader(text, origin)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, 1, {}, set(), origin)
        return loader.construct_document(node)
    finally:
        loader.dispose()
