"""Runs on an engine other than transformers (``--engine llama.cpp``): the same windows, the same evaluator.

Protocol of a llama.cpp run (recorded under ``scheme.applied.engine``):

* Windows: the transformers run's windows (``data/windows.py``) of the base model, their token ids decoded by
  llama.cpp as given (``measure.passes.window_ids``; no BOS added by the engine).
* Reference: the engine's float run, the source GGUF de-quantized to F32 (``engines.gguf_files.float_reference``),
  float16 KV cache (llama.cpp's default), flash attention on, 2 threads. Scored in lockstep with the candidate,
  window by window, so the KL is exact over the full vocabulary (``measure.passes.LogitScorer``); the engine's
  reference logits are not cached (they are vocabulary-times larger than a transformers reference summary), the
  F32 file is.
* Candidate: weight schemes -> the file llama.cpp's quantizer makes from the F32 file; ``kv-*`` -> the F32 file
  with that KV-cache type and rotation; ``--model shipped.gguf --reference base.gguf`` -> the shipped file as is
  against the base's F32 file. ``sink-token`` prepends its token to the candidate's windows.
* Noise margin: the candidate re-run with 1 thread instead of 2 (another reduction order) and, where the KV
  cache is float, flash attention off; ``paired.noise_margin`` of the mean NLL (KL) shifts.
* Agreement: the engine's float run against quantsink's float32 transformers reference (KL, ppl) beside it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import time
from pathlib import Path
from typing import Any, Callable

from quantsink.config import RunConfig
from quantsink.errors import QuantsinkError, UsageError
from quantsink.measure.passes import LogitScorer, PassResult, ReferenceHead, window_ids
from quantsink.records.schema import RunRecord, StatsRecord

ENGINE_MITIGATIONS = ("none", "sink-token")  # what runs inside llama.cpp; the rest on the checked twin
FLOAT_SCHEME = "fp32"
BASE_SETTINGS = {"kv_type": "f16", "rotate": True, "flash_attn": True, "threads": 2}
# the reference's float no-op: float32 KV cache, flash attention off (measured on smollm2, 1x256 tokens: logits
# move up to 0.016; threads 1 vs 2 and micro-batches of 64 leave a q4_0 cache's logits bit-identical)
FLOAT_NOOP = {**BASE_SETTINGS, "kv_type": "f32", "flash_attn": False}


def engine_plan(config: RunConfig) -> dict[str, Any]:
    """(reference settings, candidate settings, which file each runs) of ``config``, before anything loads."""
    from quantsink.schemes import parse_scheme
    from quantsink.schemes.gguf import GgufKV, GgufWeights

    scheme = parse_scheme(config.scheme)
    names = [m.strip().split(":")[0] for m in config.mitigation.split(",")]
    if any(n not in ENGINE_MITIGATIONS for n in names):
        raise UsageError(f"--mitigation {config.mitigation}: llama.cpp runs only {', '.join(ENGINE_MITIGATIONS)}; "
                         f"measure the others on the checked twin (--engine transformers)")
    if isinstance(scheme, GgufKV):
        return {"weights": "f32", "candidate": {**BASE_SETTINGS, "kv_type": scheme.fmt, "rotate": scheme.rot}}
    if isinstance(scheme, GgufWeights):
        return {"weights": scheme.fmt, "candidate": dict(BASE_SETTINGS)}
    if scheme.name == FLOAT_SCHEME or config.reference:
        return {"weights": "shipped" if config.reference else "f32", "candidate": dict(BASE_SETTINGS)}
    raise UsageError(f"--scheme {config.scheme} is not a llama.cpp scheme; use q8_0, q6_k, q5_k_m, q4_k_m, "
                     f"q4_0, iq4_xs, kv-q8_0, kv-q5_0, kv-q4_0 (rot=on|off) or fp32 with --engine llama.cpp")


def files(config: RunConfig, weights: str) -> tuple[Path, Path]:
    """(reference GGUF, candidate GGUF): the engine's F32 file of the base, and the file the candidate runs."""
    from quantsink.data.models import gguf_path
    from quantsink.engines.gguf_files import cached_variant, float_reference

    model = gguf_path(config.model)
    base = gguf_path(config.reference) if config.reference else model
    if model is None or base is None:
        raise UsageError(f"--engine llama.cpp needs a GGUF model (an embedded alias or a .gguf path); "
                         f"{config.reference or config.model} is not one")
    candidate = model if weights == "shipped" else cached_variant(model, weights)
    return float_reference(base), candidate


def run_llamacpp(config: RunConfig, session: Any, progress: Callable[..., Any], pipeline: Any) -> RunRecord:
    """One llama.cpp run -> its record (the module docstring's protocol). ``pipeline`` is ``pipeline.run`` (its
    prepare, reference pass and record), handed in by its caller so that this module does not import it."""
    from quantsink.data.models import model_sha256
    from quantsink.pipeline.plan import run_id_for

    plan = engine_plan(config)
    base = config.replace(model=config.reference or config.model, reference="", engine="transformers",
                          scheme=FLOAT_SCHEME)
    prep = pipeline.prepare(base, session)  # the windows (and the sink-token mitigation) of the base model
    timing = dict(prep.timing)
    t0 = time.perf_counter()
    ref_files = files(config, plan["weights"])
    timing["engine_files_s"] = time.perf_counter() - t0
    hf_reference, ref_cached = pipeline.reference_pass(prep, progress)
    cand_windows = prep.mitigations.windows(prep.windows)
    t0 = time.perf_counter()
    scored = lockstep(ref_files, prep.windows, cand_windows, plan["candidate"], hf_reference, prep)
    timing["candidate_s"] = time.perf_counter() - t0
    reference, candidate, agreement, results = scored
    floor = noise(results, pipeline)
    t0 = time.perf_counter()
    stats = engine_stats_record(ref_files, prep.windows, cand_windows, plan["candidate"], config)
    timing["engine_stats_s"] = time.perf_counter() - t0
    applied = engine_applied(config, plan, ref_files, agreement, hf_reference)
    prep = dataclasses.replace(prep, config=config, scheme=OnEngine(_scheme(config)))
    passes = pipeline.Passes(reference, False, candidate, applied, timing, None, floor.to_dict(), None)
    record = pipeline.make_record(prep, passes)  # run id: the model run (a shipped file's own digest), as planned
    return dataclasses.replace(record, stats=stats, run_id=run_id_for(config, model_sha256(config.model, config.offline),
                                                                     prep.corpus.sha256))


class OnEngine:
    """A scheme as the engine ran it: its record says ``simulated: false``, backend llama.cpp."""

    def __init__(self, scheme: Any):
        self.scheme = scheme

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheme, name)

    def record(self) -> dict[str, Any]:
        return {**self.scheme.record(), "simulated": False, "backend": "llama.cpp",
                "backend_version": md.version("llama-cpp-python")}


def _scheme(config: RunConfig) -> Any:
    from quantsink.schemes import parse_scheme

    return parse_scheme(config.scheme)


def _iterators(ref_file: Path, cand_file: Path, ref_ids: list, cand_ids: list, cand: dict[str, Any]) -> dict:
    from quantsink.engines.llamacpp import iter_window_logits

    return {"reference": iter_window_logits(ref_file, ref_ids, **BASE_SETTINGS),
            "candidate": iter_window_logits(cand_file, cand_ids, **cand),
            "threads": iter_window_logits(cand_file, cand_ids, **{**cand, "threads": 1}),
            "float-kv": iter_window_logits(ref_file, ref_ids, **FLOAT_NOOP)}


def lockstep(ref_files: tuple[Path, Path], windows: Any, cand_windows: Any, cand: dict[str, Any],
             hf_reference: PassResult, prep: Any) -> tuple[PassResult, PassResult, PassResult, Any]:
    """Every engine pass of a run, window by window: (reference, candidate, engine float vs transformers
    float32, every pass's result by name). One window's logits of each pass are in memory at a time."""
    import torch

    with torch.inference_mode():
        return _lockstep(_iterators(*ref_files, window_ids(windows), window_ids(cand_windows), cand),
                         windows, cand_windows, hf_reference, prep)


def _lockstep(its: dict[str, Any], windows: Any, cand_windows: Any, hf_reference: PassResult, prep: Any) -> tuple:
    scorers = {"reference": LogitScorer(windows),
               "agreement": LogitScorer(windows, targets=hf_reference.targets,
                                        head=ReferenceHead.of(prep.loaded.model))}
    scorers.update({name: LogitScorer(cand_windows, reference_windows=windows) for name in ("candidate", "threads")})
    scorers["float-kv"] = LogitScorer(windows, reference_windows=windows)
    for i, logits in enumerate(zip(*its.values())):
        got = dict(zip(its, logits))
        scorers["reference"].add(i, got["reference"])
        scorers["agreement"].add(i, got["reference"])
        for name in scorers.keys() - {"reference", "agreement"}:
            scorers[name].add(i, got[name], got["reference"])
    results = {name: s.result() for name, s in scorers.items()}
    return results["reference"], results["candidate"], results["agreement"], results


def noise(results: dict[str, PassResult], pipeline: Any) -> Any:
    """The candidate's noise floor from the perturbed engine passes (``run.NoiseFloor``, same definition)."""
    from quantsink.measure.paired import noise_margin, ppl_delta

    NoiseDraw, NoiseFloor = pipeline.NoiseDraw, pipeline.NoiseFloor
    cand = results["candidate"]
    total = float(cand.n_scored.sum())
    changes = {"threads": "candidate with llama.cpp threads 1 instead of 2 (shift vs the candidate)",
               "float-kv": "the reference with a float32 KV cache and flash attention off (shift vs the reference)"}
    base = {"threads": cand, "float-kv": results["reference"]}
    draws = tuple(NoiseDraw(name, changes[name], float((r.nll - base[name].nll).sum()) / total,
                            float(r.kl.sum() - (base[name].kl.sum() if base[name].kl is not None else 0)) / total,
                            [round(float(x), 6) for x in r.nll], [round(float(x), 6) for x in r.kl], r.seconds)
                  for name, r in results.items() if name in changes)
    margin = noise_margin([d.shift_nats for d in draws])
    return NoiseFloor(margin, ppl_delta(cand.nll.tolist(), cand.n_scored.tolist(), margin),
                      noise_margin([d.shift_kl for d in draws]), draws)


def engine_applied(config: RunConfig, plan: dict[str, Any], ref_files: tuple[Path, Path],
                   agreement: PassResult, hf_reference: PassResult) -> dict[str, Any]:
    """The record's ``scheme.applied``: what ran for real on the engine."""
    from quantsink.engines.gguf_files import tensor_types

    summary, hf = agreement.summary(), hf_reference.summary()
    return {"simulated": False, "engine": {
        "name": "llama.cpp", "llama_cpp_python": md.version("llama-cpp-python"),
        "reference_file": str(ref_files[0]), "candidate_file": str(ref_files[1]),
        "candidate_tensor_types": tensor_types(ref_files[1]), "weights": plan["weights"],
        "reference_settings": BASE_SETTINGS, "candidate_settings": plan["candidate"],
        "float_vs_transformers": {"kl": summary["kl"], "top1_agreement": summary["top1_agreement"],
                                  "engine_ppl": summary["ppl"], "transformers_ppl": hf["ppl"],
                                  "definition": "KL(transformers float32 || engine float run), same windows"}}}


def engine_stats_record(ref_files: tuple[Path, Path], windows: Any, cand_windows: Any, cand: dict[str, Any],
                        config: RunConfig) -> StatsRecord | None:
    """Extreme-token statistics read inside llama.cpp (``engines.llamacpp.engine_stats``) on the first window
    of each side; the quantsink per-layer tables stay empty (those come from transformers hooks)."""
    if not config.stats:
        return None
    from quantsink.engines.llamacpp import engine_stats

    ref = engine_stats(ref_files[0], window_ids(windows)[0], threads=2)
    cand_stats = engine_stats(ref_files[1], window_ids(cand_windows)[0], kv_type=cand["kv_type"],
                              rotate=cand["rotate"], threads=2)
    note = ("llama.cpp cb_eval statistics under 'engine' (first window); sink attention needs flash attention "
            "off and a float V cache" + ("" if cand_stats["attention_readable"] else
                                          ": not readable on the candidate's quantized V cache"))
    return StatsRecord({"layers": [], "heads": {}, "engine": ref}, {"layers": [], "heads": {}, "engine": cand_stats},
                       None, note)


ENGINES: dict[str, Callable[..., RunRecord]] = {"llama.cpp": run_llamacpp}


def run_on_engine(config: RunConfig, session: Any, progress: Callable[..., Any], pipeline: Any) -> RunRecord:
    """The run of ``config`` on its engine (``ENGINES``); ``pipeline`` is the ``pipeline.run`` module."""
    if config.engine not in ENGINES:
        raise QuantsinkError(f"no engine {config.engine!r}")
    return ENGINES[config.engine](config, session, progress, pipeline)
