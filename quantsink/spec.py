"""Spec strings: ``name[:key=value,...]`` -> a frozen, validated config.

Schemes and mitigations are both written this way on the command line,
e.g. ``w8a8:act_bits=6,act_gran=token`` or ``sink-fp:k=1,smooth:alpha=0.8``.
A comma-separated list of specs is split where a part has no ``=`` or has a
``:`` (a new name); ``key=value`` parts continue the previous spec.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from .errors import UsageError


@dataclass(frozen=True)
class Spec:
    name: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)


def parse_spec(text: str) -> Spec:
    """``"w8a8:act_bits=6"`` -> ``Spec("w8a8", (("act_bits", "6"),))``."""
    text = text.strip()
    name, _, rest = text.partition(":")
    if not name or any(c in name for c in "=, "):
        raise UsageError(f"malformed spec {text!r}: write name[:key=value,...]")
    params = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise UsageError(f"malformed spec {text!r}: {part!r} is not key=value")
        params.append((key.strip(), value.strip()))
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise UsageError(f"malformed spec {text!r}: a key is given twice")
    return Spec(name.strip().lower(), tuple(params))


def split_specs(text: str) -> list[Spec]:
    """``"sink-fp:k=2,smooth"`` -> two specs; ``"a:x=1,y=2"`` -> one."""
    groups: list[list[str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        starts_new = ":" in part or "=" not in part or not groups
        if starts_new:
            groups.append([part])
        else:
            groups[-1].append(part)
    return [parse_spec(",".join(g)) for g in groups]


def _coerce(value: str, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin is typing.Literal:
        choices = [str(c) for c in get_args(hint)]
        if value not in choices:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return get_args(hint)[choices.index(value)]
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UsageError as err:
                errors.append(str(err))
        raise UsageError(errors[-1] if errors else f"{where}: cannot read {value!r}")
    if hint is bool:
        table = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
        if value.lower() not in table:
            raise UsageError(f"{where}: {value!r} is not a boolean (true/false)")
        return table[value.lower()]
    if hint in (int, float, str):
        try:
            number = hint(value)
        except ValueError:
            raise UsageError(f"{where}: {value!r} is not a valid {hint.__name__}") from None
        if hint is float and not math.isfinite(number):
            raise UsageError(f"{where}: {value!r} is not a finite number")
        return number
    raise UsageError(f"{where}: cannot be set from a spec string")


def build(cls: type, spec: Spec, base: Any | None = None, **fixed: Any) -> Any:
    """Instantiate the dataclass ``cls`` (or replace fields of ``base``) from ``spec``.

    Unknown keys raise a ``UsageError`` listing the valid ones; values are
    coerced to the annotated field types; ``__post_init__`` validates.
    """
    hints = typing.get_type_hints(cls)
    settable = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("spec", True)}
    values: dict[str, Any] = dict(fixed)
    for key, raw in spec.params:
        if key not in settable:
            raise UsageError(f"{spec.name}: unknown parameter {key!r}; valid: "
                             f"{', '.join(sorted(settable)) or '(none)'}")
        values[key] = _coerce(raw, hints[key], f"{spec.name}:{key}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{spec}: {err}") from None


def params_of(config: Any) -> dict[str, Any]:
    """The spec-settable fields of a config, as plain JSON-able values."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("spec", True) and f.name != "name"}
