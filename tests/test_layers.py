"""The lower layers of the package import only downwards, and no module of them takes part in an import circle.

Every `import robustcl...` / `from robustcl... import` statement counts, also those inside functions. The
layers, top to bottom, of the part checked here (the layers above it: train, evaluation, the commands):

    robustcl.methods | robustcl.export
    robustcl.models
    robustcl.objectives | robustcl.views
    robustcl.distributed
    robustcl.runtime | robustcl.splits
    robustcl.config
    robustcl.runs | robustcl.data | robustcl.hardware | robustcl.stats
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "robustcl"
LAYERS = [
    ("robustcl.methods", "robustcl.export"),
    ("robustcl.models",),
    ("robustcl.objectives", "robustcl.views"),
    ("robustcl.distributed",),
    ("robustcl.runtime", "robustcl.splits"),
    ("robustcl.config",),
    ("robustcl.runs", "robustcl.data", "robustcl.hardware", "robustcl.stats"),
]
CHECKED = [unit for layer in LAYERS[:-1] for unit in layer]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a robustcl module, None outside the layers above (e.g. robustcl.train)."""
    for depth, layer in enumerate(LAYERS):
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return depth, unit
    return None


def is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every robustcl module `path` imports, at any depth of its code (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("robustcl")}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("robustcl"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if is_module(f"{node.module}.{alias.name}")}
    return found


def graph() -> dict[str, set[str]]:
    """module -> the robustcl modules it imports, for every module of the checked layers."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        where = unit_of(name)
        if where is not None and where[1] in CHECKED:
            modules[name] = imports(path)
    return modules


def test_the_lower_layers_import_only_their_own_unit_or_lower_layers():
    wrong = []
    for module, targets in graph().items():
        depth, unit = unit_of(module)  # type: ignore[misc]
        for target in sorted(targets):
            where = unit_of(target)
            if where is None or (where[1] != unit and where[0] <= depth):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_module_of_the_lower_layers_is_in_an_import_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    assert circles == []
