"""The import graph: the library never imports the CLI."""

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
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
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
    assert "quantsink.env" in deps["quantsink.cli.common"] and "quantsink.run" in deps["quantsink.cli.eval_cmd"]
