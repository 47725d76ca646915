"""The one run configuration that the CLI, the Python API and the record share.

Every field carries its CLI help; ``quantsink eval``'s options are generated
from this dataclass, ``quantsink.run(RunConfig(...))`` takes it, and the record
stores ``dataclasses.asdict`` of it.  Fields marked ``identity=False`` do not
change the numbers and stay out of the ``run_id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UsageError

__version__ = "0.1.0"
EVALUATOR_VERSION = "5"  # bump when a change alters any recorded number (5: float32 linears on oneDNN, measure/kernels.py)


def _opt(help: str, identity: bool = True, **extra: Any) -> Any:
    return {"help": help, "identity": identity, **extra}


@dataclass(frozen=True)
class RunConfig:
    model: str = field(default="smollm2-135m", metadata=_opt(
        "Model: a registered alias (smollm2-135m, gemma3-270m), a hub id or a local directory."))
    engine: Literal["transformers", "llama.cpp"] = field(default="transformers", metadata=_opt(
        "Inference engine that scores the windows: transformers (simulated schemes) or llama.cpp (its own "
        "schemes for real: q4_k_m, kv-q4_0, ...; the reference is the engine's float run of the same weights)."))
    reference: str = field(default="", metadata=_opt(
        "With --engine llama.cpp: the base GGUF a shipped --model file.gguf is scored against (default: the "
        "model's own float reference)."))
    scheme: str = field(default="int8", metadata=_opt(
        "Quantization scheme spec, name[:key=value,...]; see `quantsink list schemes`."))
    mitigation: str = field(default="none", metadata=_opt(
        "Mitigation spec(s), comma-separated; see `quantsink list mitigations`."))
    corpus: str = field(default="python-docs", metadata=_opt(
        "Corpus: python-docs, python-code, wikitext2 or file:PATH (.txt / .jsonl with 'text')."))
    window: int = field(default=256, metadata=_opt("Tokens per evaluation window (before any BOS)."))
    stride: int | None = field(default=None, metadata=_opt(
        "Tokens between window starts (default: = window, disjoint windows)."))
    max_tokens: int = field(default=4096, metadata=_opt(
        "Token budget of the evaluation windows (4096 of 256: 16 windows, minutes on a CPU; more windows, e.g. --max-tokens 16384, narrow the intervals)."))
    bos: Literal["auto", "always", "never"] = field(default="auto", metadata=_opt(
        "Prepend BOS to each window: auto = what the tokenizer does by default."))
    protocol: Literal["documents", "windows", "lm-eval"] = field(default="documents", metadata=_opt(
        "Windowing: windows drawn across the documents (seeded by --seed; calibration from other documents), "
        "fixed windows over the joined corpus (schema 2's default), or lm-eval's rolling per-document windows."))
    lm_eval: str = field(default="", metadata=_opt(
        "Also run lm-eval tasks (comma-separated, e.g. python-docs,python-code; see `quantsink list tasks`) "
        "on the candidate and the reference, with HFLM on the same model objects."))
    lm_eval_limit: int | None = field(default=None, metadata=_opt(
        "Documents per lm-eval task (default: all)."))
    include_path: str = field(default="", metadata=_opt(
        "A folder of your own lm-eval task YAMLs (lm-eval's TaskManager include_path): --lm-eval names them; "
        "a --lm-eval entry that is a .yaml path includes its folder by itself."))
    device: str = field(default="auto", metadata=_opt("auto (CUDA when present), cpu or cuda[:N]."))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_opt(
        "Dtype of the reference model."))
    calib_windows: int = field(default=4, metadata=_opt(
        "Calibration windows for static schemes (drawn after the evaluation windows)."))
    calib_draws: int = field(default=3, metadata=_opt(
        "Disjoint calibration draws for static schemes: draws after the first re-calibrate only the ranges and "
        "score the first --draw-windows windows; the effect's spread over draws widens its interval."))
    noise_draws: int = field(default=3, metadata=_opt(
        "Float-level perturbations of the unmitigated candidate (attention kernel swap, weights x (1 +- 2^-24) "
        "with seeds 1, 2, then one window per forward, one thread) whose mean NLL shifts set the noise margin "
        "(0: none)."))
    draw_windows: int = field(default=8, metadata=_opt(
        "Windows (from the first) that each noise and calibration draw scores (0: all); fewer is cheaper and "
        "widens the noise margin."))
    stats: bool = field(default=True, metadata=_opt("Collect extreme-token statistics in the same pass."))
    stats_windows: int = field(default=8, metadata=_opt(
        "Windows (from the first) on which attention probabilities are collected."))
    min_windows: int = field(default=8, metadata=_opt(
        "Fewest windows for a helps/hurts verdict; below it the verdict is insufficient-data."))
    noise_floor: bool = field(default=True, metadata=_opt(
        "Measure the noise floor of unmitigated runs: the candidate re-run with the other attention kernel "
        "(one extra pass); a verdict's interval must clear it."))
    dormant_attention: float = field(default=0.89, metadata=_opt(
        "A query is dormant when its attention on the sink (key 0) is at least this (Guo et al.: 0.89)."))
    dormant_queries: float = field(default=0.5, metadata=_opt(
        "A head is dormant when at least this fraction of its queries are dormant."))
    seed: int = field(default=0, metadata=_opt("Seed for bootstrap resampling and any sampling."))
    trust_remote_code: bool = field(default=False, metadata=_opt(
        "Allow a hub model's own Python code to run (off by default)."))
    offline: bool = field(default=False, metadata=_opt(
        "Never reach the Hugging Face hub: hub models and corpora must be in the local cache (also on when "
        "HF_HUB_OFFLINE=1). Embedded models and corpora never need the hub.", identity=False))
    batch_tokens: int = field(default=2048, metadata=_opt(
        "Tokens per forward batch (speed/memory only).", identity=False))
    results: str = field(default="results/runs", metadata=_opt(
        "Directory of run records.", identity=False))

    def __post_init__(self) -> None:
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        checks = [
            (self.window >= 2, "--window must be at least 2"),
            (self.stride is None or 1 <= self.stride <= self.window, "--stride must be in 1..window"),
            (self.max_tokens >= self.window, "--max-tokens must be at least --window"),
            (self.calib_windows >= 1, "--calib-windows must be at least 1"),
            (not self.reference or self.engine != "transformers",
             "--reference applies to --engine llama.cpp (a shipped GGUF scored against its base)"),
            (self.stats_windows >= 0, "--stats-windows must be >= 0"),
            (self.batch_tokens >= 1, "--batch-tokens must be >= 1"),
            (self.min_windows >= 2, "--min-windows must be at least 2"),
            (self.calib_draws >= 1, "--calib-draws must be at least 1"),
            (self.draw_windows == 0 or self.draw_windows >= 2, "--draw-windows must be 0 (all) or at least 2"),
            (0 <= self.noise_draws <= 5, "--noise-draws must be in 0..5 (the perturbations there are)"),
            (self.protocol != "documents" or self.stride is None,
             "--stride does not apply to --protocol documents: its windows are disjoint chunks of documents; "
             "use --protocol windows for strided windows"),
            (0 < self.dormant_attention <= 1, "--dormant-attention must be in (0, 1]"),
            (0 < self.dormant_queries <= 1, "--dormant-queries must be in (0, 1]"),
            (self.lm_eval_limit is None or self.lm_eval_limit >= 1, "--lm-eval-limit must be >= 1"),
            (self.protocol != "lm-eval" or self.stride is None,
             "--stride does not apply to --protocol lm-eval: its windows are disjoint by definition"),
            (self.protocol != "lm-eval" or self.bos == "auto",
             "--bos does not apply to --protocol lm-eval: it puts BOS (else EOS) before each document, as HFLM does"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"--device {self.device!r}: use auto, cpu or cuda[:N]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r}: "
                                 f"use one of {', '.join(choices)}")

    @property
    def effective_stride(self) -> int:
        return self.stride or self.window

    def identity(self) -> dict[str, Any]:
        """The fields that determine the numbers."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("identity", True)}

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def check_types(values: dict[str, Any]) -> None:
    """Each value has its RunConfig field's type, strictly: an integer field takes no bool, float
    or string (``window: 128.0``, ``max_tokens: 1e3``), a boolean field no string (``stats: "no"``)."""
    hints = typing.get_type_hints(RunConfig)
    for name, value in values.items():
        if name in hints and not _has_type(value, hints[name]):
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected {_type_name(hints[name])}")


def _has_type(value: Any, hint: Any) -> bool:
    """Strict: an int field takes no bool, float or numeric string; a float field takes an int."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return isinstance(value, str)  # the choices are checked with their own message
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short sha256 of JSON-serialised parts (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
