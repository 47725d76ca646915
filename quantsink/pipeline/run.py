"""One run: reference + candidate on the same windows -> one ``RunRecord``.

``run(RunConfig(...))`` evaluates exactly the run it is given (no other run:
the variant runs its effects pair with are planned by ``plan.plan`` and run by
``quantsink eval`` / ``sweep`` like any other).  A ``Session`` keeps models loaded
between runs (sweeps) and the reference pass is cached on disk per (model,
corpus, protocol).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from quantsink.measure import cache
from quantsink.measure.kernels import fast_linear
from quantsink.measure.pages import kept_pages
from quantsink.hooks.attention import DECLARED
from quantsink.config import EVALUATOR_VERSION, RunConfig, __version__, stable_hash
from quantsink.data.corpus import Corpus, load_corpus
from quantsink.data.windows import PROTOCOLS, Windows
from quantsink.errors import QuantsinkError, UsageError
from quantsink.measure.passes import PassResult, ReferenceHead, run_pass
from quantsink.measure.collector import StatsCollector, stats_settings
from quantsink.hooks.probes import attention_implementation
from quantsink.mitigations import MitigationStack, parse_mitigations
from quantsink.data.models import LoadedModel, check_window, load_model, resolve_device
from quantsink.pipeline.plan import canonical, run_id_for
from quantsink.records.schema import (SCHEMA_VERSION, CorpusRecord, EnvRecord, MitigationRecord, ModelRecord,
    PassRecord, ProtocolRecord, RunRecord, SchemeRecord, StatsRecord)
from quantsink.records.store import check_writable_dir, write_record
from quantsink.measure.stats import changes as stats_changes
from quantsink.schemes import QuantContext, Scheme, parse_scheme

Progress = Callable[[str, int | None], Callable[[int], None]]  # (stage, windows or None) -> advance


def _no_progress(stage: str, total: int | None) -> Callable[[int], None]:
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
                                          trust_remote_code=config.trust_remote_code, offline=config.offline)
        return self.models[key]

    def corpus(self, config: RunConfig) -> Corpus:
        if config.corpus not in self.corpora:
            self.corpora[config.corpus] = load_corpus(config.corpus, offline=config.offline)
        return self.corpora[config.corpus]


@dataclass
class Prepared:
    """Everything a run needs before the candidate is built."""

    config: RunConfig
    scheme: Scheme
    mitigations: MitigationStack
    loaded: LoadedModel
    corpus: Corpus
    windows: Windows
    protocol: dict[str, Any]
    timing: dict[str, float]
    calibration: Callable[..., Windows] | None = None  # the protocol's calibration draws (draw -> windows)


def prepare(config: RunConfig, session: Session) -> Prepared:
    scheme = parse_scheme(config.scheme)  # validate names before any slow step
    mitigations = parse_mitigations(config.mitigation)
    for mitigation in mitigations:
        mitigation.check(scheme)  # refuse what cannot apply, with a one-line reason
        mitigation.check_window(config.window)
    protocol_of = PROTOCOLS.get(config.protocol)
    resolve_device(config.device)  # no CUDA here: one line now, not after the corpus
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = session.corpus(config)
    loaded = session.model(config)
    timing["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scheme.check_model(loaded.model)
    made = protocol_of(config, corpus, loaded.tokenizer)
    check_calibration(config, scheme, made.calibration)  # before any pass
    timing["tokenize_s"] = time.perf_counter() - t0
    check_window(loaded.model, made.windows.fed_width, config.window, config.batch_tokens,
                 attention_probs=stats_settings(config) is not None)
    protocol = {
        "kind": config.protocol, **made.protocol, "n_windows": len(made.windows),
        "scored_tokens": made.windows.n_scored, "dtype": config.dtype,
        "kl": ("exact KL(reference || candidate) over the full vocabulary, mean per scored token (from the "
               "reference's sum p log p and expected output embedding where the heads are the same, else "
               "from rebuilt reference logits; evaluate.py)"),
        "evaluator_version": EVALUATOR_VERSION,
    }
    stack = MitigationStack.of(mitigations, reference=loaded.model, tokenizer=loaded.tokenizer, scheme=scheme,
                               calibration=made.calibration)
    return Prepared(config, scheme, stack, loaded, corpus, made.windows, protocol, timing, made.calibration)


def check_calibration(config: RunConfig, scheme: Any, calibration: Callable[..., Windows] | None) -> None:
    """A scheme with static ranges gets the ``--calib-windows`` it asks for in every calibration draw, or the
    run is refused before any pass (never calibrated silently on fewer)."""
    if calibration is None or not scheme.needs_calibration():
        return
    for draw in range(getattr(config, "calib_draws", 1)):
        got = len(calibration(draw) if draw else calibration())
        if got < config.calib_windows:
            raise UsageError(f"--calib-windows {config.calib_windows}: only {got} calibration windows of "
                             f"{config.window} tokens are left after the evaluation tokens"
                             + (f" for calibration draw {draw + 1}" if draw else "")
                             + "; lower --calib-windows or --max-tokens, or use a longer corpus")


def stats_pass(config: RunConfig, model: Any, windows: Windows, **kwargs: Any) -> PassResult:
    """``run_pass`` with the stats probes riding on it (same forward); stats land in ``result.extra["stats"]``."""
    if stats_settings(config) is None:
        return run_pass(model, windows, **kwargs)
    with StatsCollector(model, stats_windows=config.stats_windows, tau=config.dormant_attention,
                        share=config.dormant_queries) as collector:
        result = run_pass(model, windows, batch_context=collector.batch_context,
                          boundaries=collector.boundaries, **kwargs)
    result.extra["stats"] = collector.summary(tuple(windows.sink_positions))
    return result


def reference_key(prep: Prepared) -> str:
    """Model, corpus, protocol, device, stats settings, and the sha256 of the token windows
    actually scored (a changed tokenizer never serves a stale reference)."""
    return stable_hash(prep.loaded.info.sha256, prep.corpus.sha256, prep.protocol,
                       str(prep.loaded.device), stats_settings(prep.config), windows_sha256(prep.windows), length=24)


def windows_sha256(windows: Windows) -> str:
    """sha256 of the windows' token ids, masks, scored positions and byte counts (and, where the model is not fed
    each row's last token, that)."""
    fed = {} if windows.feeds_last else {"feeds_last": "False"}
    return cache.tensor_digest({"input_ids": windows.input_ids, "attention_mask": windows.attention_mask,
                                "scored": windows.scored, "nbytes": windows.nbytes},
                               {"sink_positions": str(windows.sink_positions), **fed})


def reference_pass(prep: Prepared, progress: Progress) -> tuple[PassResult, bool]:
    """The reference side, from the disk cache when present (-> result, cached?)."""
    path = cache.reference_path(reference_key(prep))
    cached = cache.load_pass(path, len(prep.windows))
    if cached is not None:
        return cached, True
    result = stats_pass(prep.config, prep.loaded.model, prep.windows, keep_targets=True,
                        batch_tokens=prep.config.batch_tokens, progress=progress("reference", len(prep.windows)))
    if not torch.isfinite(result.nll).all():
        raise QuantsinkError("the reference model produced NaN/inf log-likelihoods; try --dtype float32")
    cache.save_pass(path, result)
    return result, False


def quantized_copy(prep: Prepared, ctx: QuantContext) -> tuple[Any, QuantContext]:
    """Copy the reference, apply mitigations' model transforms, then the scheme (not yet calibrated)."""
    model = copy.deepcopy(prep.loaded.model)
    model, ctx = prep.mitigations.prepare(model, ctx)
    model = prep.scheme.apply(model, ctx)
    model.eval()
    prep.mitigations.scheme_hooks = ctx.hooks
    return model, ctx


def build_candidate(prep: Prepared) -> tuple[Any, dict[str, Any]]:
    """``quantized_copy``, then static ranges calibrated with every hook of the run attached (the model as
    it is evaluated)."""
    model, ctx = quantized_copy(prep, QuantContext(calibration=prep.mitigations.calibration))
    with prep.mitigations.attach(model):
        prep.scheme.calibrate(model, ctx)
    return model, ctx.notes


def candidate_pass(prep: Prepared, model: Any, reference: PassResult, progress: Progress) -> PassResult:
    windows = prep.mitigations.windows(prep.windows)
    if not torch.equal(windows.scored[:, 1:].sum(1), prep.windows.scored[:, 1:].sum(1)):
        raise QuantsinkError("a mitigation changed which tokens are scored; the candidate cannot be "
                             "paired with the reference (a bug in that mitigation)")
    hidden = [m.name for m in prep.mitigations.mitigations if m.hides_prefix]
    config = prep.config.replace(stats=False) if hidden else prep.config
    with prep.mitigations.attach(model):
        result = stats_pass(config, model, windows, reference=reference.targets,
                            reference_head=ReferenceHead.of(prep.loaded.model),
                            batch_tokens=prep.config.batch_tokens, progress=progress("candidate", len(windows)))
    if hidden and prep.config.stats:
        result.extra["stats_skipped"] = (f"candidate stats not collected: {', '.join(hidden)} feeds the sink "
                                         f"prefix from the reference, so the candidate never processes it")
    if not torch.isfinite(result.nll).all() or not math.isfinite(float(result.kl.sum())):
        raise QuantsinkError(f"scheme {prep.scheme.spec()} produced NaN/inf log-likelihoods; "
                             f"use more bits or another granularity (nothing was written)")
    return result


NOOP_KERNEL = {"sdpa": "eager", "eager": "sdpa"}  # attention kernel -> the float-level no-op swap
# quantsink's own attentions (e.g. ReLU) have no second kernel: their kernel draw is the same kernel


def other_kernel(model: Any) -> str:
    before = model.config._attn_implementation
    return NOOP_KERNEL.get(before, before if before in DECLARED.values() else "eager")  # ReLU has no twin


@contextmanager
def one_thread(model: Any) -> Iterator[None]:
    """torch's intra-op threads set to 1 (2 when already 1) and back: another reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernel(model: Any) -> Any:
    return attention_implementation(model, other_kernel(model))


JITTER = 2.0 ** -24  # float32's relative rounding step: a weight moved by it is the same number to float32 precision


@contextmanager
def jitter(model: Any, seed: int) -> Iterator[None]:
    """Every floating-point parameter multiplied by ``1 +- JITTER`` (a seeded random sign per element), and
    restored bit for bit afterwards: a float-rounding-sized perturbation whose seed gives independent draws."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for p in params:
                sign = torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1
                p.mul_(1 + JITTER * sign)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# name -> (what it changes, context on the model, one window per forward?); the first noise_draws are run.
# Measured on smollm2 w8a8-dyn (this CPU): one window per forward and one thread leave every NLL bit-identical,
# so they are offered but not the default.
PERTURBATIONS: dict[str, tuple[str, Callable[[Any], Any], bool]] = {
    "kernel": ("attention kernel swapped (sdpa <-> eager)", _kernel, False),
    "jitter:1": ("every weight x (1 +- 2^-24), random signs, seed 1", lambda m: jitter(m, 1), False),
    "jitter:2": ("every weight x (1 +- 2^-24), random signs, seed 2", lambda m: jitter(m, 2), False),
    "batch": ("one window per forward instead of batches of batch_tokens", lambda m: nullcontext(), True),
    "threads": ("torch intra-op threads 1 (2 when already 1)", one_thread, False),
}


@dataclass(frozen=True)
class NoiseDraw:
    """One float-level perturbation of the candidate: its signed mean shifts over the same windows."""

    perturbation: str
    changes: str
    shift_nats: float  # mean NLL/token, perturbed minus candidate
    shift_kl: float | None  # mean KL/token, perturbed minus candidate
    nll_per_window: list[float]
    kl_per_window: list[float] | None
    seconds: float


@dataclass(frozen=True)
class NoiseFloor:
    """The noise margin (``paired.noise_margin``) of the candidate from ``draws``; ``to_dict`` is the record's
    ``noise_floor``."""

    nats_per_token: float  # the margin on the mean NLL/token
    ppl: float  # the margin as a change in ppl from the candidate's
    kl_margin: float | None  # the same rule on the mean KL/token
    draws: tuple[NoiseDraw, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "draws": [dataclasses.asdict(d) for d in self.draws],
                "definition": NOISE_DEFINITION}


NOISE_DEFINITION = ("margin = t_K x sqrt(mean_k d_k^2) over the K perturbations' signed shifts d_k of the mean "
                    "NLL/token (kl_margin: of the mean KL/token), each measured on the first draw_windows evaluation "
                    "windows against the candidate's same windows: the 95% prediction bound of one more float-level "
                    "no-op (paired.noise_margin)")


def draw_rows(prep: Prepared) -> slice:
    """The windows every noise and calibration draw scores: the first ``draw_windows`` (0: all)."""
    return slice(0, prep.config.draw_windows or len(prep.windows))


def draw_pass(prep: Prepared, model: Any, reference: PassResult, batch_tokens: int) -> PassResult:
    """The candidate's pass over the draw windows (``draw_rows``), KL against the reference's same rows."""
    rows = draw_rows(prep)
    windows = prep.mitigations.windows(prep.windows).subset(rows)
    targets = reference.targets.rows(windows_offset(prep.windows, rows)) if reference.targets else None
    with prep.mitigations.attach(model):
        return run_pass(model, windows, reference=targets, reference_head=ReferenceHead.of(prep.loaded.model),
                        batch_tokens=batch_tokens)


def windows_offset(windows: Windows, rows: slice) -> slice:
    """The scored positions (``Targets`` rows, window order) of windows ``rows``."""
    counts = windows.scored[:, 1:].sum(1)
    return slice(int(counts[:rows.start].sum()), int(counts[:rows.stop].sum()))


def noise_draw(prep: Prepared, model: Any, candidate: PassResult, reference: PassResult, name: str) -> NoiseDraw:
    """The candidate pass again under one perturbation (``PERTURBATIONS``) on the draw windows, with its
    mean shifts against the candidate's same windows."""
    changes, context, single = PERTURBATIONS[name]
    batch = 1 if single else prep.config.batch_tokens  # batches of 1 token hold one window each
    t0 = time.perf_counter()
    with context(model):
        noop = draw_pass(prep, model, reference, batch)
    rows = draw_rows(prep)
    total = float(candidate.n_scored[rows].sum())
    kl = None if noop.kl is None or candidate.kl is None else float((noop.kl - candidate.kl[rows]).sum()) / total
    return NoiseDraw(name, changes, float((noop.nll - candidate.nll[rows]).sum()) / total, kl,
                     [round(float(x), 6) for x in noop.nll],
                     None if noop.kl is None else [round(float(x), 6) for x in noop.kl], time.perf_counter() - t0)


def noise_floor_pass(prep: Prepared, model: Any, candidate: PassResult, reference: PassResult) -> NoiseFloor:
    """The candidate's noise margin from its first ``noise_draws`` perturbations (``PERTURBATIONS``)."""
    from quantsink.measure.paired import noise_margin, ppl_delta

    draws = tuple(noise_draw(prep, model, candidate, reference, name)
                  for name in list(PERTURBATIONS)[:prep.config.noise_draws])
    margin = noise_margin([d.shift_nats for d in draws])
    kls = [d.shift_kl for d in draws if d.shift_kl is not None]
    return NoiseFloor(margin, ppl_delta(candidate.nll.tolist(), candidate.n_scored.tolist(), margin),
                      noise_margin(kls) if len(kls) == len(draws) else None, draws)


@dataclass(frozen=True)
class CalibrationDraw:
    """The candidate evaluated with static ranges from one calibration draw (draw 0 is the run's own)."""

    draw: int
    nll_per_token: float
    kl: float | None
    nll_per_window: list[float]
    kl_per_window: list[float] | None
    top1_per_window: list[int] | None
    calibration: dict[str, Any]  # what calibrate recorded: windows, tokens, ids_sha256
    seconds: float


CALIBRATION_DEFINITION = ("draw d calibrates the static ranges on windows d*calib_windows .. of the calibration "
                          "documents (disjoint draws); everything else (weights, mitigations' transforms) is the "
                          "run's own; each draw scores the evaluation windows scored_windows[0] .. scored_windows[1] "
                          "(draw 0, the candidate above, scored all)")


def calibration_draw(prep: Prepared, model: Any, reference: PassResult, draw: int) -> CalibrationDraw:
    """Forget the model's static ranges, calibrate them on draw ``draw``, score the windows again."""
    t0 = time.perf_counter()
    prep.scheme.reset_ranges(model)
    ctx = QuantContext(calibration=lambda: prep.mitigations.windows(prep.calibration(draw)))
    with prep.mitigations.attach(model):
        prep.scheme.calibrate(model, ctx)
    summary = draw_pass(prep, model, reference, prep.config.batch_tokens).summary()
    return CalibrationDraw(draw, summary["nll_per_token"], summary.get("kl"), summary["nll_per_window"],
                           summary.get("kl_per_window"), summary.get("top1_per_window"),
                           dict(ctx.notes.get("calibration", {})), time.perf_counter() - t0)


def calibration_draws(prep: Prepared, model: Any, reference: PassResult, notes: dict[str, Any]) -> dict[str, Any]:
    """The record's ``calibration``: the run's own draw and ``calib_draws - 1`` more (same model, new ranges)."""
    draws = [calibration_draw(prep, model, reference, d) for d in range(1, prep.config.calib_draws)]
    rows = draw_rows(prep)
    return {"windows": prep.config.calib_windows, "scored_windows": [rows.start, rows.stop],
            "draw_0": notes.get("calibration"),
            "draws": [dataclasses.asdict(d) for d in draws], "definition": CALIBRATION_DEFINITION}


def environment(device: Any) -> EnvRecord:
    """``env.facts()`` (CPU model and flags, threads, torch's build, every scoring-path library's version)
    with the device and the OS."""
    from quantsink.env import facts

    known = {f.name for f in dataclasses.fields(EnvRecord)}
    found = facts()
    unknown = sorted(set(found) - known)
    if unknown:
        raise QuantsinkError(f"env.facts() gave {unknown[0]!r}, which the record has no field for (a bug)")
    return EnvRecord(**found, device=str(device), os=platform.platform())


def run_id(prep: Prepared) -> str:
    return run_id_for(prep.config, prep.loaded.info.sha256, prep.corpus.sha256)


def stats_record(reference: PassResult, candidate: PassResult) -> StatsRecord | None:
    """``stats.reference``, ``stats.candidate`` and ``stats.changes`` (None with --no-stats)."""
    ref, cand = reference.extra.get("stats"), candidate.extra.get("stats")
    if ref is None:
        return None
    if cand is None:  # a mitigation hid positions from the candidate's probes
        return StatsRecord(ref, None, None, candidate.extra.get("stats_skipped", "candidate stats not collected"))
    return StatsRecord(ref, cand, stats_changes(ref, cand))


@dataclass(frozen=True)
class Passes:
    """What one run measured: both passes, what the scheme did, lm-eval on both sides, timing."""

    reference: PassResult
    ref_cached: bool
    candidate: PassResult
    notes: dict[str, Any]
    timing: dict[str, float]
    lm_eval: dict[str, Any] | None = None
    noise_floor: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None


def make_record(prep: Prepared, passes: Passes) -> RunRecord:
    timing = {**passes.timing, "candidate_tokens_per_s": prep.windows.n_tokens / max(passes.timing["candidate_s"], 1e-9)}
    return RunRecord(
        schema_version=SCHEMA_VERSION, run_id=run_id(prep),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), quantsink_version=__version__,
        config=prep.config, model=ModelRecord(**prep.loaded.info.to_record()),
        corpus=CorpusRecord(prep.corpus.name, prep.corpus.sha256, prep.corpus.n_documents, prep.protocol["tokens"]),
        protocol=ProtocolRecord(**prep.protocol), scheme=SchemeRecord.of(prep.scheme.record(), passes.notes),
        mitigation=tuple(MitigationRecord(**m) for m in prep.mitigations.record()),
        reference=reference_record(passes), candidate=candidate_record(passes),
        stats=stats_record(passes.reference, passes.candidate), noise_floor=passes.noise_floor,
        calibration=passes.calibration, timing=timing,
        env=environment(prep.loaded.device))


def reference_record(passes: Passes) -> PassRecord:
    downstream = passes.lm_eval or {}
    return PassRecord(**passes.reference.summary(), cached=passes.ref_cached, lm_eval=downstream.get("reference"),
                      lm_eval_cached=downstream.get("reference_cached"))


def candidate_record(passes: Passes) -> PassRecord:
    return PassRecord(**passes.candidate.summary(), lm_eval=(passes.lm_eval or {}).get("candidate"))


def run(config: RunConfig, *, session: Session | None = None, progress: Progress = _no_progress,
        write: bool = True) -> RunRecord:
    """Evaluate ``config.scheme`` against the reference on the same windows; return (and with
    ``write``, store) the record.  Only this run: effects come from ``effects.effects`` over
    the stored variant runs ``plan.plan`` adds."""
    session = session or Session()
    config = canonical(config)
    if write:
        check_writable_dir(config.results, "--results")  # before any load, not after the passes
    record = compare_passes(config, session, progress)
    if write:
        write_record(record, config.results)
    return record


@fast_linear()  # every forward of the run (passes, calibration, mitigations' searches) on the one float32 kernel
@kept_pages()  # and their pages kept between batches (malloc); given back when the run ends
def compare_passes(config: RunConfig, session: Session, progress: Progress = _no_progress) -> RunRecord:
    """One reference-vs-candidate comparison -> its record (nothing written)."""
    if config.engine != "transformers":  # another engine scores the same windows (pipeline/engine.py)
        from quantsink.pipeline.engine import run_on_engine

        return run_on_engine(config, session, progress, sys.modules[__name__])
    if config.lm_eval:
        from quantsink.pipeline import lmeval

        lmeval.check_config(config, parse_mitigations(config.mitigation))  # before any load
    progress("loading the model and the corpus", None)
    prep = prepare(config, session)
    timing = dict(prep.timing)
    t0 = time.perf_counter()
    reference, ref_cached = reference_pass(prep, progress)
    timing["reference_s"] = 0.0 if ref_cached else time.perf_counter() - t0
    t0 = time.perf_counter()
    progress("quantizing" + (" and calibrating" if prep.scheme.needs_calibration() else ""), None)
    model, notes = build_candidate(prep)
    timing["quantize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidate = candidate_pass(prep, model, reference, progress)
    timing["candidate_s"] = time.perf_counter() - t0
    floor = None
    if config.noise_floor and config.noise_draws and config.mitigation == "none" and prep.scheme.quantizes_tokens:
        # weight-only schemes are deterministic per token: their runs are not re-run for a floor
        t0 = time.perf_counter()
        progress(f"noise floor ({config.noise_draws} perturbed passes)", None)
        floor = noise_floor_pass(prep, model, candidate, reference).to_dict()
        timing["noise_floor_s"] = time.perf_counter() - t0
    downstream = None
    if config.lm_eval:
        from quantsink.pipeline import lmeval

        t0 = time.perf_counter()
        progress(f"lm-eval {config.lm_eval}", None)
        downstream = lmeval.evaluate_run(prep, model)
        timing["lm_eval_s"] = time.perf_counter() - t0
    calibration = None
    if config.calib_draws > 1 and prep.scheme.needs_calibration() and prep.calibration is not None:
        t0 = time.perf_counter()  # last: the draws leave the model with the last draw's ranges
        progress(f"{config.calib_draws - 1} more calibration draws", None)
        calibration = calibration_draws(prep, model, reference, notes)
        timing["calibration_draws_s"] = time.perf_counter() - t0
    del model
    return make_record(prep, Passes(reference, ref_cached, candidate, notes, timing, downstream, floor, calibration))
