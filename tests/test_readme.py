"""The reference's (docs/reference.md) record table is the schema: one row per RunRecord field, each row listing its own fields."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from quantsink.records.schema import RunRecord

README = Path(__file__).parent.parent / "docs" / "reference.md"  # the record table lives in the reference


def record_table() -> dict[str, list[str]]:
    """field -> the backticked names before the row's `—` (the field's own fields)."""
    text = README.read_text(encoding="utf-8").split("## The run record", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", text, flags=re.M)
    return {name: re.findall(r"`(\w+)`", content.split(" — ")[0]) if " — " in content else [] for name, content in rows}


def own_fields(hint: typing.Any) -> list[str] | None:
    """The dataclass fields of a field's type (through Optional and tuple[...]); None for plain values."""
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg) and arg.__module__ == RunRecord.__module__:
            return [f.name for f in dataclasses.fields(arg)]
    return None


def test_readme_record_table_matches_the_schema():
    table, hints = record_table(), typing.get_type_hints(RunRecord)
    assert list(table) == [f.name for f in dataclasses.fields(RunRecord)]
    for name, listed in table.items():
        expected = own_fields(hints[name])
        assert listed == (expected or []), name


def test_the_table_parser_reads_a_row():
    assert re.findall(r"`(\w+)`", "`a`, `b` — free `c`".split(" — ")[0]) == ["a", "b"]
    assert own_fields(typing.get_type_hints(RunRecord)["mitigation"])[0] == "name"
