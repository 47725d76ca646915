"""Run identity: canonical configs and run ids, computed before anything runs.

``canonical(config)`` spells the scheme and mitigations one way (aliases
resolved, case folded, parameters equal to a preset's default dropped, keys in
field order) and resolves ``offline`` from the environment, so ``int8``,
``INT8``, ``llm.int8`` and ``int8:threshold=6.0`` are one run.  ``run_id`` hashes
the numbers-determining fields with every scheme and mitigation parameter
filled in, the model and corpus hashes, and the code version.
"""

from __future__ import annotations

from typing import Any

from .config import EVALUATOR_VERSION, RunConfig, __version__, stable_hash
from .env import offline_from_env
from .mitigations import canonical_mitigation, parse_mitigations
from .schemes import parse_scheme
from .spec import params_of


def canonical(config: RunConfig) -> RunConfig:
    """``config`` with canonical scheme and mitigation specs and the effective offline mode."""
    return config.replace(scheme=parse_scheme(config.scheme).spec(), mitigation=canonical_mitigation(config.mitigation),
                          offline=config.offline or offline_from_env())


def identity(config: RunConfig) -> dict[str, Any]:
    """The fields that determine the numbers, scheme and mitigations with every parameter filled in."""
    scheme = parse_scheme(config.scheme)
    mitigations = [{"name": m.name, "params": params_of(m)} for m in parse_mitigations(config.mitigation)]
    return {**config.identity(), "scheme": {"name": scheme.name, "params": params_of(scheme)},
            "mitigation": mitigations}


def run_id_for(config: RunConfig, model_sha: str, corpus_sha: str) -> str:
    """The run's identity: its canonical identity + model and corpus hashes + code version."""
    return stable_hash(identity(config), model_sha, corpus_sha, __version__, EVALUATOR_VERSION)
