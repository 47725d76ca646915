"""One run: reference + candidate on the same windows -> one record.

``run(RunConfig(...))`` is the Python API behind ``quantsink eval``; a
``Session`` keeps models loaded between runs (sweeps) and the reference pass
is cached on disk per (model, corpus, protocol).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import cache
from .config import EVALUATOR_VERSION, RunConfig, __version__, stable_hash
from .corpus import Corpus, Windows, load_corpus, sliding_windows, tokenize
from .errors import QuantsinkError
from .evaluate import PassResult, ReferenceHead, run_pass
from .mitigations import Mitigation, parse_mitigations
from .models import LoadedModel, load_model
from .results import SCHEMA_VERSION, write_record
from .schemes import QuantContext, Scheme, parse_scheme

Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(stage: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class Session:
    """Models and corpora loaded once per process, reused by every run."""

    models: dict[tuple[Any, ...], LoadedModel] = field(default_factory=dict)
    corpora: dict[str, Corpus] = field(default_factory=dict)

    def model(self, config: RunConfig) -> LoadedModel:
        key = (config.model, config.device, config.dtype, config.trust_remote_code)
        if key not in self.models:
            self.models[key] = load_model(config.model, device=config.device, dtype=config.dtype,
                                          trust_remote_code=config.trust_remote_code)
        return self.models[key]

    def corpus(self, spec: str) -> Corpus:
        if spec not in self.corpora:
            self.corpora[spec] = load_corpus(spec)
        return self.corpora[spec]


@dataclass
class Prepared:
    """Everything a run needs before the candidate is built."""

    config: RunConfig
    scheme: Scheme
    mitigations: list[Mitigation]
    loaded: LoadedModel
    corpus: Corpus
    windows: Windows
    calibration: Callable[[], Windows]
    protocol: dict[str, Any]
    timing: dict[str, float]


def bos_token(tokenizer: Any, policy: str) -> int | None:
    """The token id to prepend to each window, or None (``auto``: the tokenizer's default)."""
    bos = tokenizer.bos_token_id
    if policy == "never":
        return None
    if policy == "always":
        if bos is None:
            raise QuantsinkError("--bos always: this tokenizer has no BOS token; use --bos never")
        return bos
    first = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and first and first[0] == bos else None


def prepare(config: RunConfig, session: Session) -> Prepared:
    scheme = parse_scheme(config.scheme)  # validate names before any slow step
    mitigations = parse_mitigations(config.mitigation)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = session.corpus(config.corpus)
    loaded = session.model(config)
    timing["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefix = bos_token(loaded.tokenizer, config.bos)
    stride = config.effective_stride
    stream = tokenize(corpus, loaded.tokenizer, limit=config.max_tokens + config.calib_windows * config.window)
    windows, used = sliding_windows(stream, window=config.window, stride=stride, prefix=prefix,
                                    max_tokens=config.max_tokens)
    timing["tokenize_s"] = time.perf_counter() - t0

    def calibration() -> Windows:
        rest = type(stream)(stream.ids[used:], stream.nbytes[used:])
        if len(rest) < config.window:
            raise QuantsinkError(f"no tokens left for calibration after the {used} evaluation tokens: "
                                 f"lower --max-tokens or use a longer corpus")
        calib, _ = sliding_windows(rest, window=config.window, stride=config.window, prefix=prefix,
                                   max_tokens=config.calib_windows * config.window)
        return calib

    protocol = {
        "kind": config.protocol, "window": config.window, "stride": stride, "bos": config.bos,
        "bos_token_id": prefix, "n_windows": len(windows), "tokens": used,
        "scored_tokens": windows.n_scored, "dtype": config.dtype,
        "scoring": ("each token scored once, by the first window that reaches it; a window's "
                    "first token is scored only when a BOS precedes it; BOS never scored"),
        "kl": "exact KL(reference || candidate) over the full vocabulary, mean per scored token",
        "evaluator_version": EVALUATOR_VERSION,
    }
    return Prepared(config, scheme, mitigations, loaded, corpus, windows, calibration, protocol, timing)


def reference_key(prep: Prepared) -> str:
    return stable_hash(prep.loaded.info.sha256, prep.corpus.sha256, prep.protocol,
                       str(prep.loaded.device), length=24)


def reference_pass(prep: Prepared, progress: Progress) -> tuple[PassResult, bool]:
    """The reference side, from the disk cache when present (-> result, cached?)."""
    path = cache.reference_path(reference_key(prep))
    cached = cache.load_pass(path, len(prep.windows))
    if cached is not None:
        return cached, True
    result = run_pass(prep.loaded.model, prep.windows, keep_targets=True,
                      batch_tokens=prep.config.batch_tokens, progress=progress("reference", len(prep.windows)))
    if not torch.isfinite(result.nll).all():
        raise QuantsinkError("the reference model produced NaN/inf log-likelihoods; try --dtype float32")
    cache.save_pass(path, result)
    return result, False


def build_candidate(prep: Prepared) -> tuple[Any, dict[str, Any]]:
    """Copy the reference, apply mitigations' model transforms, then the scheme."""
    ctx = QuantContext(calibration=prep.calibration)
    model = copy.deepcopy(prep.loaded.model)
    for mitigation in prep.mitigations:
        model = mitigation.prepare(model, ctx)
        ctx = mitigation.quant_context(ctx)
    model = prep.scheme.apply(model, ctx)
    model.eval()
    return model, ctx.notes


def candidate_pass(prep: Prepared, model: Any, reference: PassResult, progress: Progress) -> PassResult:
    windows = prep.windows
    for mitigation in prep.mitigations:
        windows = mitigation.transform_windows(windows, prep.loaded.tokenizer)
    from contextlib import ExitStack

    with ExitStack() as stack:
        for mitigation in prep.mitigations:
            stack.enter_context(mitigation.attach(model))
        result = run_pass(model, windows, reference=reference.targets,
                          reference_head=ReferenceHead.of(prep.loaded.model),
                          batch_tokens=prep.config.batch_tokens, progress=progress("candidate", len(windows)))
    if not torch.isfinite(result.nll).all() or not math.isfinite(float(result.kl.sum())):
        raise QuantsinkError(f"scheme {prep.scheme.spec()} produced NaN/inf log-likelihoods; "
                             f"use more bits or another granularity (nothing was written)")
    return result


def environment(device: Any) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "bitsandbytes": version("bitsandbytes"),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": str(device), "cuda": torch.version.cuda, "os": platform.platform()}


def config_run_id(config: RunConfig, model_sha256: str, corpus_sha256: str) -> str:
    return stable_hash(config.identity(), model_sha256, corpus_sha256, __version__, EVALUATOR_VERSION)


def run_id(prep: Prepared) -> str:
    return config_run_id(prep.config, prep.loaded.info.sha256, prep.corpus.sha256)


def planned_run_id(config: RunConfig, session: Session | None = None) -> str:
    """``run_id`` computed before running: hashes the model file and corpus, loads no model.

    Must apply the same normalisation of ``config`` that ``run`` applies before
    it computes the record's ``run_id`` (a sweep relies on the two agreeing;
    ``tests/test_sweep_tiny.py`` checks it).
    """
    from .models import model_sha256

    corpus = (session or Session()).corpus(config.corpus)
    return config_run_id(config, model_sha256(config.model), corpus.sha256)


def make_record(prep: Prepared, reference: PassResult, ref_cached: bool, candidate: PassResult,
                notes: dict[str, Any], timing: dict[str, float]) -> dict[str, Any]:
    n_tok = prep.windows.n_tokens
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id(prep),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quantsink_version": __version__,
        "config": prep.config.to_record(),
        "model": prep.loaded.info.to_record(),
        "corpus": {"name": prep.corpus.name, "sha256": prep.corpus.sha256,
                   "n_documents": len(prep.corpus.documents), "n_tokens": prep.protocol["tokens"]},
        "protocol": prep.protocol,
        "scheme": {**prep.scheme.record(), "applied": notes},
        "mitigation": [m.record() for m in prep.mitigations],
        "reference": {**reference.summary(), "cached": ref_cached},
        "candidate": candidate.summary(),
        "timing": {**timing, "candidate_tokens_per_s": n_tok / max(timing.get("candidate_s", 0), 1e-9)},
        "env": environment(prep.loaded.device),
    }


def run(config: RunConfig, *, session: Session | None = None, progress: Progress = _no_progress,
        write: bool = True) -> dict[str, Any]:
    """Evaluate ``config.scheme`` against the reference; return (and write) the record."""
    session = session or Session()
    prep = prepare(config, session)
    timing = dict(prep.timing)
    t0 = time.perf_counter()
    reference, ref_cached = reference_pass(prep, progress)
    timing["reference_s"] = 0.0 if ref_cached else time.perf_counter() - t0
    t0 = time.perf_counter()
    model, notes = build_candidate(prep)
    timing["quantize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidate = candidate_pass(prep, model, reference, progress)
    timing["candidate_s"] = time.perf_counter() - t0
    del model
    record = make_record(prep, reference, ref_cached, candidate, notes, timing)
    if write:
        record["path"] = str(write_record(record, config.results))
    return record


def threads_note() -> str:
    return f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus"
