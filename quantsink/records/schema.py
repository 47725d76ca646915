"""Run records: one typed, versioned schema, validated on every read.

The record is one typed, versioned schema (:class:`RunRecord` and the frozen
dataclasses below): ``run`` builds it, the store writes it as JSON, every reader
gets it back validated (``load_record``), and the report reads nothing else.
``SCHEMA_VERSION`` changes when a field is added, removed or changes meaning.
Readers skip (with a warning) files that are not valid records or carry
another schema version, so one bad file never loses the others.  Derived
numbers (deltas, ``mitigation_effect``, ``d_sink``) are not stored: they are
computed from stored records (``quantsink.analysis.effects``, ``quantsink.report.rows``).

The store that writes and finds them is :mod:`quantsink.records.store`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from quantsink.config import RunConfig
from quantsink.errors import QuantsinkError

SCHEMA_VERSION = 3  # 3: documents protocol, noise-margin draws, calibration draws, KL percentiles



@dataclass(frozen=True)
class ModelRecord:
    """The reference model: registered alias or path, where its weights came from, their sha256."""

    name: str
    source: str
    sha256: str
    arch: str = ""
    n_params: int = 0
    dequantized_from: str | None = None  # GGUF quant type when the reference was de-quantized


@dataclass(frozen=True)
class CorpusRecord:
    name: str
    sha256: str
    n_documents: int
    n_tokens: int


@dataclass(frozen=True)
class ProtocolRecord:
    """How the windows were cut and scored (``scoring`` and ``kl`` say it in words)."""

    kind: str
    window: int
    stride: int
    bos: str
    bos_token_id: int | None
    tokens: int
    scoring: str
    n_windows: int
    scored_tokens: int
    dtype: str
    kl: str
    evaluator_version: str
    n_documents: int | None = None  # lm-eval protocol: whole documents scored
    documents: int | None = None  # documents protocol: how many documents the evaluation windows come from
    window_documents: list[int] | None = None  # documents protocol: each window's document (corpus index)
    calibration_documents: int | None = None  # documents protocol: documents kept for calibration
    seed: int | None = None  # documents protocol: the seed of the document order


@dataclass(frozen=True)
class SchemeRecord:
    name: str
    spec: str
    params: dict[str, Any]
    simulated: bool
    backend: str
    backend_version: str
    bits: float | None  # nominal weight bits
    bit_widths: dict[str, Any]  # weights / activations / kv: bits, null where that part stays float
    applied: dict[str, Any]  # what the scheme actually did (modules quantized, kernels, kept positions)
    details: dict[str, Any] = field(default_factory=dict)  # family-specific description (e.g. ``parts``)

    @classmethod
    def of(cls, record: dict[str, Any], applied: dict[str, Any]) -> "SchemeRecord":
        """From ``Scheme.record()``: the common keys, the rest as ``details``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"applied", "details"}
        return cls(**{k: v for k, v in record.items() if k in names}, applied=applied,
                   details={k: v for k, v in record.items() if k not in names})


@dataclass(frozen=True)
class MitigationRecord:
    name: str
    spec: str
    kind: str
    params: dict[str, Any]
    applied: dict[str, Any]  # what the mitigation actually did


@dataclass(frozen=True)
class PassRecord:
    """One side's pass over the windows (per-window sums, so runs can be paired)."""

    ppl: float | None
    nll_per_token: float | None
    bits_per_byte: float | None
    nll_per_window: list[float | None]
    scored_per_window: list[int]
    kl: float | None = None  # candidate only: KL(reference || candidate) per scored token
    top1_agreement: float | None = None  # candidate only
    kl_per_window: list[float | None] | None = None  # candidate only
    top1_per_window: list[int] | None = None  # candidate only: positions whose argmax is the reference's
    kl_percentiles: dict[str, float] | None = None  # candidate only: per-token KL p90, p99, p99.9, max
    cached: bool | None = None  # reference only: read from the reference cache
    lm_eval: dict[str, Any] | None = None  # with --lm-eval: per task lm-eval's metrics
    lm_eval_cached: bool | None = None  # reference only


@dataclass(frozen=True)
class StatsRecord:
    """Extreme-token statistics (``quantsink.stats.summarize`` of each side; ``changes`` between them)."""

    reference: dict[str, Any]
    candidate: dict[str, Any] | None
    changes: dict[str, Any] | None
    note: str | None = None  # why the candidate side is missing

    def __post_init__(self) -> None:
        for side in (self.reference, self.candidate):
            if side is not None and not (isinstance(side.get("layers"), list) and isinstance(side.get("heads"), dict)):
                raise ValueError("a stats side needs 'layers' (a list) and 'heads' (an object)")


ENV_NOT_COMPARED = ("os",)  # recorded, but a kernel's patch level is no fact about the numbers


@dataclass(frozen=True)
class EnvRecord:
    """The machine and the libraries behind a run's numbers: ``quantsink.env.facts()`` (CPU model, the
    instruction sets its kernels pick from, torch's threads and build, the version of every library on the
    scoring path, the variables that change threads or kernels) plus the device and the OS.

    Every field has a default, so a record written before a fact was kept still loads: schema 2 kept only
    ``cpu`` (the machine type, e.g. ``x86_64``), ``cuda`` and three versions at the top level (``torch``,
    ``transformers``, ``bitsandbytes``); newer records keep the versions under ``libraries``.
    """

    python: str | None = None
    os: str | None = None
    device: str | None = None
    machine: str | None = None
    cpu_model: str | None = None
    cpu_flags: list[str] | None = None
    threads: int | None = None
    torch_build: str | None = None
    torch_cpu_capability: str | None = None
    linear_kernel: str | None = None  # the float32 CPU matmul of every forward: onednn | aten (evaluator 5)
    libraries: dict[str, Any] = field(default_factory=dict)  # name -> version, None when not installed
    variables: dict[str, Any] = field(default_factory=dict)  # OMP_NUM_THREADS and the like, where set
    cpu: str | None = None  # schema 2: platform.processor() or the machine type
    cuda: str | None = None  # schema 2
    torch: str | None = None  # schema 2
    transformers: str | None = None  # schema 2
    bitsandbytes: str | None = None  # schema 2

    def facts(self) -> dict[str, Any]:
        """The facts this record kept (fields it never filled left out, the OS too), as
        ``quantsink.env.differences`` compares them."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and v != {} and k not in ENV_NOT_COMPARED}

    def differences(self, other: "EnvRecord") -> list[str]:
        """Where two records' environments disagree, one line per fact (``quantsink.env.differences``)."""
        from quantsink.env import differences

        return differences(self.facts(), other.facts())


@dataclass(frozen=True)
class RunRecord:
    """One run: identity, what was evaluated and how, both passes, statistics, timing, environment."""

    schema_version: int
    run_id: str
    created_at: str
    quantsink_version: str
    config: RunConfig
    model: ModelRecord
    corpus: CorpusRecord
    protocol: ProtocolRecord
    scheme: SchemeRecord
    mitigation: tuple[MitigationRecord, ...]
    reference: PassRecord
    candidate: PassRecord
    stats: StatsRecord | None
    noise_floor: dict[str, Any] | None  # unmitigated runs: the candidate's float-level noise (``run.noise_floor_pass``)
    timing: dict[str, float]
    env: EnvRecord
    calibration: dict[str, Any] | None = None  # static schemes: the calibration draws (``run.calibration_draws``)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (NaN/inf as null)."""
        return _finite(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> "RunRecord":
        """Validate ``data`` against the schema; a ``QuantsinkError`` names the first bad field."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise NewerSchema(f"{where}: schema version {version} is newer than this quantsink "
                              f"({SCHEMA_VERSION}); upgrade quantsink to read it")
        if version != SCHEMA_VERSION:
            raise QuantsinkError(_version_message(where, version))
        return _load(cls, data, where)


def _version_message(where: str, version: Any) -> str:
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return (f"{where}: schema version {version} is older than this quantsink's ({SCHEMA_VERSION}); "
                f"re-run it (a sweep re-runs what has no current record)")
    return f"{where}: not a quantsink record (no schema_version); move it out of the results directory"


# --------------------------------------------------------------------------- validation (JSON -> schema)


def _load(cls: type, data: Any, where: str) -> Any:
    """``data`` (a JSON object) -> ``cls``, every field checked against its annotation."""
    if not isinstance(data, dict):
        raise QuantsinkError(f"{where}: not a JSON object; not a valid record")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise QuantsinkError(f"{where}: unknown field {unknown[0]!r}; not a valid record")
    hints = typing.get_type_hints(cls)
    values = {name: _value(hints[name], data[name], f"{where}.{name}") for name in fields if name in data}
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise QuantsinkError(f"{where}: missing field {missing[0]!r}; not a valid record")
    try:
        return cls(**values)
    except (ValueError, TypeError, QuantsinkError) as err:
        raise QuantsinkError(f"{where}: {str(err).splitlines()[0]}; not a valid record") from None


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(typing.get_args(hint), value, where)
    if dataclasses.is_dataclass(hint):
        return _load(hint, value, where)
    if origin in (list, tuple):
        return _sequence(origin, typing.get_args(hint), value, where)
    if origin is dict or hint is dict:
        return _checked(value, dict, where)
    if origin is typing.Literal:
        return _choice(typing.get_args(hint), value, where)
    if hint is Any:
        return value
    return _scalar(hint, value, where)


def _union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _value(arg, value, where)
        except QuantsinkError as err:
            errors.append(err)
    raise errors[0]


def _sequence(origin: type, args: tuple[Any, ...], value: Any, where: str) -> Any:
    items = _checked(value, list, where)
    item = args[0] if args else Any
    return origin(_value(item, v, f"{where}[{i}]") for i, v in enumerate(items))


def _scalar(hint: type, value: Any, where: str) -> Any:
    ok = (isinstance(value, (int, float)) if hint is float else isinstance(value, hint)) and not (
        isinstance(value, bool) and hint is not bool)
    if not ok:
        raise QuantsinkError(f"{where}: expected {hint.__name__}, got {type(value).__name__}; not a valid record")
    return float(value) if hint is float else value


def _choice(choices: tuple[Any, ...], value: Any, where: str) -> Any:
    if value not in choices:
        raise QuantsinkError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}; not a valid record")
    return value


def _checked(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise QuantsinkError(f"{where}: expected a JSON {'object' if kind is dict else 'array'}; not a valid record")
    return value


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null (and never silently as numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class NewerSchema(QuantsinkError):
    """A record written by a newer quantsink: valid, unreadable here, never replaced."""
