"""The plan: every run a command performs, with its identity, computed before anything runs.

``canonical(config)`` spells the scheme and mitigations one way (aliases
resolved, case folded, parameters equal to a preset's default dropped, keys in
field order) and resolves ``offline`` from the environment, so ``int8``,
``INT8``, ``llm.int8`` and ``int8:threshold=6.0`` are one run.  ``run_id`` hashes
the numbers-determining fields with every scheme and mitigation parameter
filled in, the model and corpus hashes, and the code version.

``plan(configs)`` is used by ``eval`` and ``sweep`` alike: each config, preceded by
the variant runs (``none``, ``sink-fp``) its ``mitigation_effect`` and ``d_sink``
pair with, each an ordinary run (executed, locked and stored like any other).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from quantsink.config import EVALUATOR_VERSION, RunConfig, __version__, stable_hash
from quantsink.env import offline_from_env
from quantsink.errors import QuantsinkError
from quantsink.mitigations import canonical_mitigation, parse_mitigations
from quantsink.schemes import parse_scheme
from quantsink.spec import params_of


def canonical(config: RunConfig) -> RunConfig:
    """``config`` with canonical model alias, scheme and mitigation specs and the effective offline mode."""
    return config.replace(model=canonical_model(config.model), scheme=parse_scheme(config.scheme).spec(),
                          mitigation=canonical_mitigation(config.mitigation),
                          offline=config.offline or offline_from_env())


def canonical_model(spec: str) -> str:
    """A registered model's alias spelled one way (``smollm2`` -> ``smollm2-135m``); other specs as given."""
    from quantsink.data.models import MODELS

    return MODELS.entry(spec).name if spec in MODELS else spec


def identity(config: RunConfig) -> dict[str, Any]:
    """The fields that determine the numbers, scheme and mitigations with every parameter filled in."""
    scheme = parse_scheme(config.scheme)
    mitigations = [{"name": m.name, "params": params_of(m)} for m in parse_mitigations(config.mitigation)]
    fields = {k: v for k, v in config.identity().items() if (k, v) not in ENGINE_DEFAULTS}
    return {**fields, "scheme": {"name": scheme.name, "params": params_of(scheme)}, "mitigation": mitigations}


# a transformers run's identity is what it was before engines (and user lm-eval tasks): its run id does not change
ENGINE_DEFAULTS = {("engine", "transformers"), ("reference", ""), ("include_path", "")}


def run_id_for(config: RunConfig, model_sha: str, corpus_sha: str) -> str:
    """The run's identity: its canonical identity + model and corpus hashes + code version."""
    return stable_hash(identity(config), model_sha, corpus_sha, __version__, EVALUATOR_VERSION)


# --------------------------------------------------------------------------- the plan

SINK_FP = "sink-fp"


def variants(config: RunConfig) -> tuple[str, ...]:
    """Mitigations of the variant runs this run's effects pair with: ``none`` for its
    ``mitigation_effect``; ``none`` and ``sink-fp`` for ``d_sink`` (schemes that quantize tokens)."""
    needs = ["none"] if config.mitigation != "none" else []
    if parse_scheme(config.scheme).quantizes_tokens and config.engine == "transformers":
        needs += ["none", SINK_FP]  # sink-fp runs on the twin only (--engine transformers)
    return tuple(m for m in dict.fromkeys(needs) if m != config.mitigation)


def variant(config: RunConfig, mitigation: str) -> RunConfig:
    """The same run with another mitigation; the paired statistics need only its own passes (no lm-eval)."""
    if mitigation == config.mitigation:
        return config
    return config.replace(mitigation=mitigation, lm_eval="", lm_eval_limit=None)


def reference_group(config: RunConfig) -> str:
    """Runs sharing a reference pass (same model, corpus and protocol)."""
    identity = {k: v for k, v in config.identity().items() if k not in ("scheme", "mitigation")}
    return stable_hash(identity)


@dataclass(frozen=True)
class PlannedRun:
    index: int
    config: RunConfig  # canonical
    run_id: str
    group: str  # runs sharing a reference pass
    variant: bool = False  # planned only because another run's effects pair with it
    fresh: bool = False  # run even when the store holds its record (`eval` re-runs what it is asked)

    @property
    def label(self) -> str:
        c = self.config
        return f"{c.model} · {c.corpus} · {c.scheme} · {c.mitigation}"


class Identities:
    """``run_id`` before running: the model file and corpus are hashed (once each), no model is loaded."""

    def __init__(self) -> None:
        self.corpora: dict[tuple[str, bool], str] = {}
        self.models: dict[tuple[str, bool], str] = {}

    def corpus_sha(self, config: RunConfig) -> str:
        from quantsink.data.corpus import load_corpus

        key = (config.corpus, config.offline)
        if key not in self.corpora:
            self.corpora[key] = load_corpus(config.corpus, offline=config.offline).sha256
        return self.corpora[key]

    def run_id(self, config: RunConfig) -> str:
        from quantsink.data.models import model_sha256

        key = (config.model, config.offline)
        if key not in self.models:  # a hub id resolves its revision once per plan
            self.models[key] = model_sha256(config.model, offline=config.offline)
        return run_id_for(config, self.models[key], self.corpus_sha(config))


@dataclass(frozen=True)
class Planner:
    """How configs become planned runs (tests swap in fakes for ``run_id``)."""

    run_id: Callable[[RunConfig], str] = field(default_factory=lambda: Identities().run_id)
    canonical: Callable[[RunConfig], RunConfig] = canonical
    variants: Callable[[RunConfig], tuple[str, ...]] = variants


def plan(configs: Iterable[RunConfig], planner: Planner | None = None, *, fresh: bool = False) -> list[PlannedRun]:
    """Every run the configs need, in order: each config's variant runs, then the config itself.

    Deduplicated by ``run_id`` (a grid run that is also a variant is one run); runs
    sharing a reference pass adjacent.  ``fresh`` marks the configs themselves (not
    their variants) to be run even when recorded.
    """
    planner = planner or Planner()
    runs: dict[str, PlannedRun] = {}
    for config in map(planner.canonical, configs):
        for mitigation in planner.variants(config):
            _add(runs, variant(config, mitigation), planner, is_variant=True, fresh=False)
        _add(runs, config, planner, is_variant=False, fresh=fresh)
    rank = {g: i for i, g in enumerate(dict.fromkeys(p.group for p in runs.values()))}
    ordered = sorted(runs.values(), key=lambda p: rank[p.group])  # stable: plan order within a group
    return [dataclasses.replace(p, index=i) for i, p in enumerate(ordered)]


def _add(runs: dict[str, PlannedRun], config: RunConfig, planner: Planner, *, is_variant: bool, fresh: bool) -> None:
    run_id = planner.run_id(config)
    old = runs.get(run_id)
    if old is None:
        runs[run_id] = PlannedRun(len(runs), config, run_id, reference_group(config), is_variant, fresh)
    elif not is_variant:
        runs[run_id] = dataclasses.replace(old, variant=False, fresh=old.fresh or fresh)


def check_run_id(record: Any, planned: str) -> None:
    """A run's record must carry the run_id it was planned under (else the store would file it elsewhere)."""
    if record.run_id != planned:
        raise QuantsinkError(f"record run_id {record.run_id} != planned {planned}: plan.Identities is out of "
                             f"sync with run.run_id (a bug)")
