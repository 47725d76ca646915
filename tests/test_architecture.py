"""The import graph (module-level and function-level imports alike): the library never imports the
CLI, and no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "quantsink"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every quantsink module ``path`` imports, at module level or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):  # `from .x import y`: x (and x.y if a module); `from . import y`: y
            base = _absolute(package, node.module, node.level)
            found |= ({base} if node.module else set()) | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "quantsink" or m.startswith("quantsink.")}


def _absolute(package: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(base + ([module] if module else []))


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_nothing_outside_the_cli_imports_it():
    entry_points = ("quantsink.cli", "quantsink.__main__")  # `python -m quantsink` is the CLI
    offenders = [name for name, deps in graph().items()
                 if not name.startswith(entry_points) and any(d.startswith("quantsink.cli") for d in deps)]
    assert offenders == []


def test_the_graph_sees_relative_imports():
    deps = graph()
    assert "quantsink.common" not in deps["quantsink.cli"]
    assert {"quantsink.cli.common", "quantsink.cli.eval_cmd"} <= deps["quantsink.cli"]
    assert "quantsink.env" in deps["quantsink.cli.common"] and "quantsink.pipeline.execute" in deps["quantsink.cli.eval_cmd"]


def registration(importer: str, imported: str) -> bool:
    """A package's ``__init__`` importing its own plug-in modules to register them (``schemes``,
    ``mitigations``): those modules import the package for its base classes, by design."""
    return imported.startswith(importer + ".") and importer.count(".") == 1


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(deps[node]):
            if registration(node, dep):
                continue
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_cycles():
    assert cycles(graph()) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"quantsink.schemes": {"quantsink.schemes.bnb"}, "quantsink.schemes.bnb": {"quantsink.schemes"}}) == []


def test_no_module_is_named_like_a_public_function():
    """``import quantsink.X`` always gives a module: no submodule shares a name with the API's functions,
    and loading every submodule leaves ``quantsink.run`` / ``quantsink.evaluate`` the functions."""
    import importlib
    import types

    import quantsink

    public = {name for name in quantsink.__all__ if callable(getattr(quantsink, name))}
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert public and not (public & names)
    for module in graph():
        importlib.import_module(module) if not module.endswith("__main__") else None
    assert isinstance(quantsink.run, types.FunctionType) and quantsink.run.__module__ == "quantsink.api"
    assert isinstance(quantsink.evaluate, types.FunctionType)
    assert isinstance(importlib.import_module("quantsink.pipeline.run"), types.ModuleType)


def test_the_package_root_holds_at_most_ten_modules():
    """The stages are folders (``docs/architecture.md``); the root keeps the API and the shared basics."""
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root
