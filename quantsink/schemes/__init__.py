"""Quantization schemes: a registry of frozen, validated configs.

A scheme is parsed from a spec string ``name[:key=value,...]`` and turns a
private copy of the reference model into the candidate with
``scheme.apply(model, ctx)``.  Real kernels where a library has them
(bitsandbytes); simulated (fake) quantization elsewhere, labelled
``simulated: true`` in every record.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..registry import Registry
from ..spec import Spec, build, params_of, parse_spec

FilterFn = Callable[[Any, str], bool]


def default_filter(module: Any, fqn: str) -> bool:
    """Quantize every ``nn.Linear`` except the output head (torchao's ``filter_fn`` idea)."""
    import torch

    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


@dataclass
class QuantContext:
    """What a scheme may need beyond the model.

    ``calibration`` returns calibration windows (drawn lazily, disjoint from the
    evaluation windows); ``keep_fp_positions`` are sequence positions that
    mitigations ask to keep in full precision, and ``keep_fp`` a more general
    hook: input ids ``(B, T)`` -> bool mask ``(B, T)`` of positions to keep (e.g.
    detected extreme tokens); kept positions are neither quantized nor counted in
    any activation/KV range.  ``filter_fn`` picks the modules.  ``hooks`` are what the
    scheme needs attached while the candidate runs (``{site: [Hook]}``, see
    :func:`quantsink.hooks.attach`): the run attaches them with the mitigations', for
    calibration and evaluation alike, and removes them afterwards.
    """

    calibration: Callable[[], Any] | None = None
    keep_fp_positions: tuple[int, ...] = ()
    keep_fp: Callable[[Any], Any] | None = None
    filter_fn: FilterFn = default_filter
    notes: dict[str, Any] = field(default_factory=dict)  # what was actually done, for the record
    hooks: dict[str, list[Any]] = field(default_factory=dict)  # site -> [hooks.Hook], attached while running

    def keep_fp_mask(self, input_ids: Any, offset: int = 0) -> Any:
        """``(B, T)`` bool: positions kept in full precision (None when there are none).
        ``offset``: absolute position of ``input_ids[:, 0]`` (tokens already in a KV cache)."""
        if not self.keep_fp_positions and self.keep_fp is None:
            return None
        import torch

        mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)  # (B, T)
        positions = [p - offset for p in self.keep_fp_positions if 0 <= p - offset < mask.shape[1]]
        mask[:, positions] = True
        if self.keep_fp is not None:
            mask |= self.keep_fp(input_ids).to(device=mask.device, dtype=torch.bool)
        return mask


@dataclass(frozen=True)
class Scheme:
    """Base of every scheme config.  Subclasses add validated fields."""

    name: str = field(default="", metadata={"spec": False})
    simulated: ClassVar[bool] = False
    backend: ClassVar[str] = "torch"
    # Linear inputs quantized per position (honouring QuantContext.keep_fp_positions)
    quantizes_activations: ClassVar[bool] = False
    # activations or the KV cache quantized per position, honouring keep_fp_positions (sink-fp applies)
    quantizes_tokens: ClassVar[bool] = False

    @property
    def bits(self) -> float:
        """Nominal weight bits (for the leaderboard's bits axis)."""
        return 32.0

    @property
    def bit_widths(self) -> dict[str, int | None]:
        """Bits of weights, activations and the KV cache; None = left in the run's float dtype."""
        return {"weights": None, "activations": None, "kv": None}

    def apply(self, model: Any, ctx: QuantContext) -> Any:
        """Quantize ``model`` (a private copy); hooks it needs while running go into ``ctx.hooks``."""
        raise NotImplementedError

    def check_model(self, model: Any) -> None:
        """Refuse (one line, before any pass) parameters this model cannot take; default: none."""

    def calibrate(self, model: Any, ctx: QuantContext) -> None:
        """Observe static ranges on ``ctx.calibration()``; the caller has attached ``ctx.hooks``
        and every mitigation, so ranges come from the model as it is evaluated."""

    def needs_calibration(self) -> bool:
        """Whether ``calibrate`` sets static ranges (a run then measures several calibration draws)."""
        return False

    def reset_ranges(self, model: Any) -> None:
        """Forget the static ranges ``calibrate`` set, so that it can calibrate again on another draw
        (everything else of the quantized model is kept); default: nothing to forget."""

    def spec_key(self, key: str) -> str:
        """The field a spec-string key names (a preset may accept a short alias)."""
        return key

    def backend_version(self) -> str:
        import importlib.metadata as md

        try:
            return md.version(self.backend)
        except md.PackageNotFoundError:
            return ""

    def spec(self) -> str:
        defaults = SCHEMES.get(self.name)
        changed = [(k, v) for k, v in params_of(self).items() if getattr(defaults, k) != v]
        return str(Spec(self.name, tuple((k, str(v)) for k, v in changed)))

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec(), "params": params_of(self),
                "simulated": self.simulated, "backend": self.backend,
                "backend_version": self.backend_version(), "bits": self.bits,
                "bit_widths": self.bit_widths}


SCHEMES: Registry[Scheme] = Registry("scheme")


def register(default: Scheme, help: str = "", aliases: tuple[str, ...] = ()) -> Scheme:
    """Register a preset: a named default config of some Scheme class."""
    return SCHEMES.register(default.name, default, help=help, aliases=aliases)


@functools.lru_cache(maxsize=512)
def parse_scheme(text: str) -> Scheme:
    """A scheme spec string -> its frozen, validated config; parsed once per distinct string (the
    same object travels with every stage of a run; errors are not cached and raise every time)."""
    spec = parse_spec(text)
    entry = SCHEMES.entry(spec.name)
    base = entry.obj
    params = tuple((base.spec_key(k), v) for k, v in spec.params)
    return build(type(base), Spec(entry.name, params), base=base)


def replace_linears(model: Any, ctx: QuantContext, make: Callable[[Any], Any]) -> list[str]:
    """Swap each module that ``ctx.filter_fn`` selects for ``make(module)``; returns their names."""
    targets = [(fqn, mod) for fqn, mod in model.named_modules() if fqn and ctx.filter_fn(mod, fqn)]
    for fqn, mod in targets:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return [fqn for fqn, _ in targets]


def quantize(scheme: Scheme, model: Any, ctx: QuantContext) -> Any:
    """``scheme.apply`` then ``scheme.calibrate`` with the scheme's own hooks attached (no mitigations:
    a run goes through ``run.build_candidate``, which attaches them too)."""
    from quantsink.hooks.sites import attach

    model = scheme.apply(model, ctx)
    with attach(model, ctx.hooks):
        scheme.calibrate(model, ctx)
    return model


from . import bnb, floating, fp_formats, gguf, simulated  # noqa: E402,F401  (register the presets)
