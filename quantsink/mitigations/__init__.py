"""Mitigations: frozen configs parsed from spec strings, composable (``a,b``).

A mitigation may refuse a scheme it cannot apply to (``check``), change the
windows (``transform_windows``, e.g. a prepended sink token; calibration
windows go through it too), transform the model before quantizing
(``prepare``), tell the scheme which positions to keep in full precision
(``quant_context``), and hook the candidate while it runs (``attach``).
Every hook gets an ``Env``: the float reference, the tokenizer, the (already
transformed) calibration windows, the scheme, and a ``notes`` dict where the
mitigation records what it actually did (it lands in the run record).
Each declares what it does (``changes_input``, ``hides_prefix``) as class attributes.

Order in a run: windows -> prepare -> quant_context -> scheme.apply -> attach
-> scheme.calibrate -> evaluation, each step over the mitigations in the order
given; static ranges are calibrated with every mitigation attached, on the
transformed calibration windows, so they are the ranges of the model as it is
evaluated.  Every hook goes through :func:`quantsink.hooks.attach`.
"""

from __future__ import annotations

import functools

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterator

from ..errors import UsageError
from quantsink.hooks.sites import attach
from ..registry import Registry
from ..spec import Spec, build, params_of, split_specs


@dataclass
class Env:
    """What a mitigation's hooks may use, and where each records what it did."""

    reference: Any = None  # the float reference model: read it, never modify it
    tokenizer: Any = None
    calibration: Callable[[], Any] | None = None  # calibration Windows, after every transform_windows
    scheme: Any = None
    notes: dict[str, Any] = field(default_factory=dict)
    sink_positions: tuple[int, ...] = ()  # of the windows the candidate sees (after every transform)
    state: dict[str, Any] = field(default_factory=dict)  # a mitigation's own objects between its steps; not recorded


@dataclass(frozen=True)
class Mitigation:
    name: str = field(default="", metadata={"spec": False})
    kind: ClassVar[str] = "post-hoc"
    hides_prefix: ClassVar[bool] = False  # the candidate never processes the sink prefix (no probes there)
    changes_input: ClassVar[bool] = False  # transform_windows changes what the model reads (lm-eval must see it)
    # (model, tokenizer) -> a model that applies the input change itself, for lm-eval; None: none offered
    wrap_for_lm_eval: ClassVar[Callable[..., Any] | None] = None

    def check(self, scheme: Any) -> None:
        """Raise ``UsageError`` (one line, saying why) when this cannot apply to ``scheme``."""

    def check_window(self, width: int) -> None:
        """Raise ``UsageError`` (one line) when a parameter reaches beyond windows of ``width`` positions."""

    def transform_windows(self, windows: Any, env: Env) -> Any:
        return windows

    def prepare(self, model: Any, env: Env) -> Any:
        """Transform the (copied) model before the scheme quantizes it."""
        return model

    def quant_context(self, ctx: Any, env: Env) -> Any:
        return ctx

    def attach(self, model: Any, env: Env) -> ContextManager[Any]:
        return nullcontext()

    def spec(self) -> str:
        defaults = MITIGATIONS.get(self.name)
        changed = [(k, str(v)) for k, v in params_of(self).items() if getattr(defaults, k) != v]
        return str(Spec(self.name, tuple(changed)))

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec(), "kind": self.kind, "params": params_of(self)}


def require_linear_scheme(mitigation: str, scheme: Any) -> None:
    """``mitigation`` changes Linear weights or inputs: refuse a scheme that quantizes neither (e.g. KV only),
    where it would change nothing the scheme quantizes."""
    widths = scheme.bit_widths
    if widths["weights"] is None and widths["activations"] is None:
        raise UsageError(f"{mitigation} reshapes Linear weights and inputs, but scheme {scheme.name!r} quantizes "
                         f"neither (only the KV cache): it would change nothing quantized; use a weight or "
                         f"activation scheme (e.g. w8a8, w4a16)")


MITIGATIONS: Registry[Mitigation] = Registry("mitigation")
MITIGATIONS.register("none", Mitigation(name="none"), help="no mitigation")


def parse_mitigations(text: str) -> list[Mitigation]:
    """``"none"`` -> []; ``"a,b:x=1"`` -> [a, b] (validated; each at most once).  Each distinct string
    is parsed once; the frozen mitigations are shared, the list is the caller's."""
    return list(_parsed_mitigations(text))


@functools.lru_cache(maxsize=512)
def _parsed_mitigations(text: str) -> tuple[Mitigation, ...]:
    out = []
    for spec in split_specs(text or "none"):
        entry = MITIGATIONS.entry(spec.name)
        if entry.name == "none":
            continue
        out.append(build(type(entry.obj), Spec(entry.name, spec.params), base=entry.obj))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--mitigation {text!r}: a mitigation is given twice; give each once")
    return tuple(out)


def canonical_mitigation(text: str) -> str:
    """The canonical spelling of a mitigation list (``"none"`` when empty), for run identity."""
    return ",".join(m.spec() for m in parse_mitigations(text)) or "none"


@dataclass
class MitigationStack:
    """The mitigations of one run, applied in order, each with its own ``Env`` notes."""

    mitigations: list[Mitigation]
    envs: list[Env]
    calibration: Callable[[], Any] | None = None  # calibration windows, every transform_windows applied
    scheme_hooks: dict[str, Any] = field(default_factory=dict)  # the built candidate's QuantContext.hooks

    @classmethod
    def of(cls, mitigations: list[Mitigation], *, reference: Any, tokenizer: Any, scheme: Any,
           calibration: Callable[[], Any] | None) -> "MitigationStack":
        """The stack for one run (``Mitigation.check`` against the scheme is the caller's, before any load)."""
        stack = cls(list(mitigations), [])
        if calibration is not None:
            stack.calibration = lambda: stack.windows(calibration())
        stack.envs = [Env(reference, tokenizer, stack.calibration, scheme) for _ in mitigations]
        return stack

    def __len__(self) -> int:
        return len(self.mitigations)

    def __iter__(self) -> Iterator[tuple[Mitigation, Env]]:
        return iter(zip(self.mitigations, self.envs))

    def windows(self, windows: Any) -> Any:
        for mitigation, env in self:
            windows = mitigation.transform_windows(windows, env)
        for env in self.envs:
            env.sink_positions = tuple(windows.sink_positions)
        return windows

    def prepare(self, model: Any, ctx: Any) -> tuple[Any, Any]:
        for mitigation, env in self:
            model = mitigation.prepare(model, env)
        for mitigation, env in self:
            ctx = mitigation.quant_context(ctx, env)
        return model, ctx

    @contextmanager
    def attach(self, model: Any) -> Iterator[None]:
        """Everything that touches the candidate while it runs: the scheme's hooks, then each mitigation's."""
        with ExitStack() as stack:
            stack.enter_context(attach(model, self.scheme_hooks))
            for mitigation, env in self:
                stack.enter_context(mitigation.attach(model, env))
            yield

    def record(self) -> list[dict[str, Any]]:
        return [{**m.record(), "applied": env.notes} for m, env in self]


def register(default: Mitigation, help: str = "") -> Mitigation:
    return MITIGATIONS.register(default.name, default, help=help)


from . import clip, cushion, intact_kv, rotate, sink_fp, sink_token, smooth, smooth_k  # noqa: E402,F401  (register them)
