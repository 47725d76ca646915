"""Grids: (model x corpus x scheme x mitigation) from the command line or a YAML file, checked before
anything runs (see ``quantsink.sweep.local`` for how a sweep runs them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantsink.config import RunConfig, check_types
from quantsink.errors import UsageError
from quantsink.spec import split_specs

AXES = {"models": "model", "corpora": "corpus", "schemes": "scheme", "mitigations": "mitigation"}
SWEEP_KEYS = ("results", "jobs", "subgrids", "executor", "address", "num_cpus", "num_gpus")



def common_fields() -> list[str]:
    """RunConfig fields a grid may set for every run (all but the four axes)."""
    return [f.name for f in dataclasses.fields(RunConfig) if f.name not in AXES.values()]


def split_axis(axis: str, value: Any) -> tuple[str, ...]:
    """One axis of a grid -> its entries.  A string is comma-separated (a spec's ``key=value``
    parts stay with it); a YAML list gives one entry per item.  ``+`` composes mitigations."""
    if isinstance(value, str):
        items = ([str(spec) for spec in split_specs(value)] if axis in ("schemes", "mitigations")
                 else [v.strip() for v in value.split(",")])
    elif isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        items = [str(v).strip() for v in value]
    else:
        raise UsageError(f"grid key {axis!r}: give a list of names or a comma-separated string")
    if axis == "mitigations":
        items = [v.replace("+", ",") for v in items]
    if not items or not all(items):
        raise UsageError(f"grid key {axis!r} has an empty entry: name at least one, no empty ones")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class Grid:
    """The axes, the options common to every run, and optional sub-grids."""

    axes: dict[str, tuple[str, ...]]
    common: dict[str, Any] = field(default_factory=dict)
    subgrids: tuple[dict[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "grid") -> "Grid":
        """Validate keys; axis values -> entries; the rest -> RunConfig overrides."""
        if not isinstance(data, dict):
            raise UsageError(f"{where}: expected a mapping of grid keys")
        valid = list(AXES) + common_fields() + list(SWEEP_KEYS)
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise UsageError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        axes = {a: split_axis(a, data[a]) for a in AXES if data.get(a) is not None}
        common = {k: data[k] for k in common_fields() if data.get(k) is not None}
        try:
            check_types(common)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
        subgrids = tuple(_subgrid(sub, f"{where}: subgrids[{i}]") for i, sub in enumerate(data.get("subgrids") or []))
        return cls(axes, common, subgrids)

    def blocks(self) -> list[dict[str, tuple[str, ...]]]:
        """Each sub-grid completed by the top-level axes (or the top level alone)."""
        blocks = [{**self.axes, **sub} for sub in self.subgrids] or [dict(self.axes)]
        defaults = {"models": ("smollm2-135m",), "corpora": ("python-docs",), "mitigations": ("none",)}
        for block in blocks:
            for axis in AXES:
                if axis not in block and axis not in defaults:
                    raise UsageError(f"the grid names no {axis}: give --{axis} or a {axis!r} key")
                block.setdefault(axis, defaults.get(axis, ()))
        return blocks

    def configs(self, overrides: dict[str, Any] | None = None) -> list[RunConfig]:
        """Every run of the grid, runs of one (model, corpus) adjacent, duplicates dropped."""
        common = {**self.common, **(overrides or {})}
        seen: dict[RunConfig, None] = {}
        for block in self.blocks():
            for model in block["models"]:
                for corpus in block["corpora"]:
                    for scheme in block["schemes"]:
                        for mitigation in block["mitigations"]:
                            config = RunConfig(**common, model=model, corpus=corpus,
                                               scheme=scheme, mitigation=mitigation)
                            seen.setdefault(config, None)
        groups = list(dict.fromkeys((c.model, c.corpus) for c in seen))
        return sorted(seen, key=lambda c: groups.index((c.model, c.corpus)))  # stable: grid order within


def _subgrid(data: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where}: expected a mapping of axes ({', '.join(AXES)})")
    unknown = [k for k in data if k not in AXES]
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; a sub-grid sets only {', '.join(AXES)}")
    return {a: split_axis(a, v) for a, v in data.items()}


def _unique_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
    """A YAML mapping whose keys are each given once (a duplicate would silently keep the last value)."""
    import yaml

    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _unique_key_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return Loader


def load_grid(path: str | Path) -> tuple[Grid, dict[str, Any]]:
    """A YAML grid file -> (grid, sweep options ``results``/``jobs`` found in it)."""
    import yaml

    from quantsink.io import read_text_file

    path = Path(path)
    text = read_text_file(path, "grid file")  # one line for a missing, folder, non-UTF-8 or unreadable file
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - SafeLoader
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    grid = Grid.from_mapping(data, str(path))
    options = {k: data[k] for k in SWEEP_KEYS if k != "subgrids" and data.get(k) is not None}
    check_options(options, str(path))
    return grid, options


def check_options(options: dict[str, Any], where: str) -> None:
    """The sweep's own keys: ``results`` a path (string), ``jobs`` an integer >= 1."""
    results, jobs = options.get("results", ""), options.get("jobs", 1)
    if not isinstance(results, str):
        raise UsageError(f"{where}: results {results!r}: expected a directory path")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"{where}: jobs {jobs!r}: expected an integer >= 1")
    for key in ("executor", "address"):
        if not isinstance(options.get(key, ""), str):
            raise UsageError(f"{where}: {key} {options[key]!r}: expected a string")
    for key in ("num_cpus", "num_gpus"):
        value = options.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UsageError(f"{where}: {key} {value!r}: expected a number >= 0")
