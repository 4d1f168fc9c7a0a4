"""The package's import graph: no circles, core below every method, no method reaching into another.

Read from the source with ``ast`` (imports inside functions count too), so the test sees what a reader
sees, whatever is installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "model_compress"
ROOT = PACKAGE.name


def module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


MODULES = module_names()
METHODS = sorted(file.parent.name for file in PACKAGE.glob("*/method.py"))


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (a ``from P import m`` of a submodule counts as importing ``P.m``)."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def room(name: str) -> str:
    """The top-level part of the package a module belongs to: core, a method, eval, cli (or the root)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def test_the_methods_are_found():
    assert METHODS == ["fff", "rpq"]


def circle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (a path that comes back to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def package_of(name: str) -> str:
    """The package a module sits in (a package's ``__init__`` is the package itself)."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def test_no_module_imports_in_a_circle():
    circle = circle_in(GRAPH)
    assert circle is None, " -> ".join(circle)


def test_no_package_imports_in_a_circle():
    """Folders stack: a subpackage never imports the package above it, two siblings never import each other."""
    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        packages.setdefault(package_of(name), set()).update(package_of(t) for t in targets if package_of(t) != package_of(name))
    circle = circle_in(packages)
    assert circle is None, " -> ".join(circle)


@pytest.mark.parametrize(
    "lower, higher",
    [("core", method) for method in ["fff", "rpq"]] + [("core", "eval"), ("core", "cli"), ("eval", "cli")]
    + [(method, "eval") for method in ["fff", "rpq"]] + [(method, "cli") for method in ["fff", "rpq"]],
)
def test_a_lower_room_never_imports_a_higher_one(lower, higher):
    offending = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if room(name) == lower for target in targets if room(target) == higher)
    assert not offending, offending


def test_eval_and_methods_ask_the_registry_not_each_other():
    offending = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if room(target) in METHODS and room(name) in [*METHODS, "eval"] and room(name) != room(target)
    )
    assert not offending, offending


def test_nothing_inside_imports_the_package_root():
    """The root (``model_compress/__init__``) imports the rooms; a room importing it back runs upward."""
    offending = sorted(name for name, targets in GRAPH.items() if ROOT in targets)
    assert not offending, offending
