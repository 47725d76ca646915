"""Synthetic run records, built through the record schema (``quantsink.records.schema.RunRecord``) and the
library's own functions (``plan.canonical``/``run_id_for``, ``Scheme.record``, ``stats.summarize``,
``stats.changes``), for report tests and the html check.  Variant runs (``none``, ``sink-fp``) carry
the run_ids the planner gives them, so effects pair them as they pair real runs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from quantsink.measure import stats as S
from quantsink.config import RunConfig, stable_hash
from quantsink.errors import UsageError
from quantsink.pipeline.plan import canonical, run_id_for
from quantsink.records.schema import (SCHEMA_VERSION, CorpusRecord, EnvRecord, MitigationRecord, ModelRecord,
    PassRecord, ProtocolRecord, RunRecord, SchemeRecord, StatsRecord)
from quantsink.records.store import write_record

LAYERS, HEADS, KV_HEADS, WINDOWS, WINDOW = 6, 4, 2, 8, 128


def stats_side(rng: random.Random, peak: float, sink: float, dormant: set[tuple[int, int]]) -> dict[str, Any]:
    """``stats.summarize`` of synthetic per-window reductions: a residual peak growing with depth
    (largest ``peak``), sink scores around ``sink``, the ``dormant`` heads parked on key 0."""
    shape = (WINDOWS, LAYERS)
    heads = torch.tensor([[[0.95 if (l, h) in dormant else sink * rng.uniform(0.8, 1.0) for h in range(HEADS)]
                           for l in range(LAYERS)]] * WINDOWS)  # (W, L, H)
    ratio = torch.tensor([peak * (1 + layer) / LAYERS for layer in range(LAYERS)])
    massive = {"value": 100.0 * ratio.expand(shape).clone(), "position": torch.zeros(shape, dtype=torch.long),
               "channel": torch.full(shape, 7), "median_abs": torch.ones(shape)}
    ws = S.WindowStats(norm_sink=ratio.expand(shape).clone(), norm_median=torch.ones(shape), massive=massive,
                       extreme=[[0]] * WINDOWS, massive_positions=[[0]] * WINDOWS, sink=heads, extreme_attn=heads,
                       dormant_queries=(heads >= 0.95).float(),
                       drain=torch.tensor([[[rng.uniform(0.1, 0.4) for _ in range(KV_HEADS)]
                                            for _ in range(LAYERS)]] * WINDOWS))
    return S.summarize(ws, sink_positions=(0,))


def _pass(rng: random.Random, ppl: float, noise: float, candidate: bool, kl: float = 0.05) -> PassRecord:
    """Per-window NLL sums whose total gives exactly ``ppl``; ``noise`` spreads them across windows."""
    n = [WINDOW - 1] * WINDOWS
    jitter = [rng.gauss(0, noise) for _ in n]
    nll = [math.log(ppl) * k + j - sum(jitter) / len(n) for k, j in zip(n, jitter)]
    extra = dict(kl=kl, top1_agreement=0.9, kl_per_window=[kl * k for k in n]) if candidate else dict(cached=False)
    return PassRecord(ppl=ppl, nll_per_token=math.log(ppl), bits_per_byte=math.log(ppl) / math.log(2) / 4,
                      nll_per_window=nll, scored_per_window=n, **extra)


def _config(model: str, corpus: str, scheme: str, mitigation: str,
            settings: dict[str, Any] | None = None) -> RunConfig:
    config = RunConfig(model=model, corpus=corpus, scheme=scheme, mitigation=mitigation, window=WINDOW,
                       max_tokens=WINDOW * WINDOWS, offline=True, **(settings or {}))
    try:
        return canonical(config)
    except UsageError:  # a name no registry knows (escaping tests): recorded as given
        return config


def _scheme(config: RunConfig) -> SchemeRecord:
    from quantsink.schemes import parse_scheme

    try:
        return SchemeRecord.of(parse_scheme(config.scheme).record(), {})
    except UsageError:
        return SchemeRecord(config.scheme, config.scheme, {}, True, "torch", "", 8.0,
                            {"weights": 8, "activations": 8, "kv": None}, {})


def _mitigations(config: RunConfig) -> tuple[MitigationRecord, ...]:
    from quantsink.mitigations import parse_mitigations

    try:
        return tuple(MitigationRecord(**m.record(), applied={}) for m in parse_mitigations(config.mitigation))
    except UsageError:
        return (MitigationRecord(config.mitigation, config.mitigation, "post-hoc", {}, {}),)


def make_record(model: str = "tiny-llama", corpus: str = "python-docs", scheme: str = "w8a8",
                mitigation: str = "none", ppl_ref: float = 10.0, ppl: float = 12.0, stats: bool = True,
                woken: tuple[tuple[int, int], ...] = ((2, 1),), created_at: str = "2026-11-28T16:00:00+00:00",
                seed: int = 0, noise: float = 0.0, kl: float = 0.05,
                noise_floor: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                env: EnvRecord | None = None) -> RunRecord:
    """``settings``: other RunConfig fields (e.g. ``calib_windows``), part of the run id."""
    rng = random.Random(seed)
    config = _config(model, corpus, scheme, mitigation, settings)
    model_sha, corpus_sha = stable_hash(model, length=64), stable_hash(corpus, length=64)
    try:
        run_id = run_id_for(config, model_sha, corpus_sha)
    except UsageError:
        run_id = stable_hash(config.identity(), model_sha, corpus_sha)
    side = None
    if stats:
        ref, cand = stats_side(rng, 300.0, 0.6, set(woken)), stats_side(rng, 200.0, 0.4, set())
        side = StatsRecord(ref, cand, S.changes(ref, cand))
    return RunRecord(
        schema_version=SCHEMA_VERSION, run_id=run_id, created_at=created_at, quantsink_version="0.1.0",
        config=config, model=ModelRecord(model, "synthetic", model_sha, "LlamaForCausalLM", 1),
        corpus=CorpusRecord(corpus, corpus_sha, 1, WINDOW * WINDOWS),
        protocol=ProtocolRecord("windows", WINDOW, WINDOW, "auto", None, WINDOW * WINDOWS, "synthetic",
                                WINDOWS, (WINDOW - 1) * WINDOWS, "float32", "synthetic", "1"),
        scheme=_scheme(config), mitigation=_mitigations(config), reference=_pass(rng, ppl_ref, 0.0, False),
        candidate=_pass(rng, ppl, noise, True, kl), stats=side, noise_floor=noise_floor, timing={}, env=env or EnvRecord())


def grid_records() -> list[RunRecord]:
    """Two models x two corpora x three schemes, plus w8a8 with sink-fp (helps: ppl -12) and smooth
    (same ppl as the unmitigated run, windows spread: inconclusive).  Every w8a8 row has d_sink."""
    records = []
    for m, model in enumerate(("tiny-llama", "tiny-gemma")):
        for c, corpus in enumerate(("python-docs", "python-code")):
            ref = 10.0 * (1 + m)
            for s, (scheme, ratio) in enumerate((("int8", 1.02), ("nf4", 1.3), ("w8a8", 2.5))):
                records.append(make_record(model, corpus, scheme, ppl=ref * ratio, ppl_ref=ref, seed=m * 10 + c * 3 + s))
            for mitigation, delta, noise, kl in (("sink-fp", -12.0, 0.0, 0.02), ("smooth", 0.0, 30.0, 0.05)):
                records.append(make_record(model, corpus, "w8a8", mitigation, ppl=ref * 2.5 + delta, ppl_ref=ref,
                                           seed=m + c, noise=noise, kl=kl))  # smooth: the unmitigated KL too
    return records


def write_grid(root: Path) -> list[RunRecord]:
    records = grid_records()
    for record in records:
        write_record(record, root)
    return records


if __name__ == "__main__":  # python tests/synthetic_records.py DIR: write the grid there
    import sys

    target = Path(sys.argv[1])
    print(json.dumps([r.run_id for r in write_grid(target)]))
