"""Mitigations: frozen configs parsed from spec strings, composable (``a,b``).

A mitigation may transform the model before quantizing (``prepare``), change
the windows (``transform_windows``, e.g. a prepended sink token), tell the
scheme which positions to keep in full precision (``quant_context``), and hook
the candidate while it runs (``attach``).  Each says whether it works on a
trained model (``post-hoc``) or ``needs-training``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, ContextManager

from ..registry import Registry
from ..spec import Spec, build, params_of, split_specs


@dataclass(frozen=True)
class Mitigation:
    name: str = field(default="", metadata={"spec": False})
    kind: ClassVar[str] = "post-hoc"

    def prepare(self, model: Any, ctx: Any) -> Any:
        """Transform the (copied) model before the scheme quantizes it."""
        return model

    def transform_windows(self, windows: Any, tokenizer: Any) -> Any:
        return windows

    def quant_context(self, ctx: Any) -> Any:
        return ctx

    def attach(self, model: Any) -> ContextManager[Any]:
        return nullcontext()

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": params_of(self)}


MITIGATIONS: Registry[Mitigation] = Registry("mitigation")
MITIGATIONS.register("none", Mitigation(name="none"), help="no mitigation")


def parse_mitigations(text: str) -> list[Mitigation]:
    """``"none"`` -> []; ``"a,b:x=1"`` -> [a, b] (validated)."""
    out = []
    for spec in split_specs(text or "none"):
        entry = MITIGATIONS.entry(spec.name)
        if entry.name == "none":
            continue
        out.append(build(type(entry.obj), Spec(entry.name, spec.params), base=entry.obj))
    return out
