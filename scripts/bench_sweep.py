"""Benchmark: what a grid cell costs, stage by stage, measured in one process.

    python scripts/bench_sweep.py [--model smollm2-135m] [--windows 8] [--window 256]
                                  [--schemes w8a8,w8a8-tok] [--mitigations none,sink-fp]
                                  [--repeats 3] [--no-sweep]

Two parts, on the same windows (``--windows`` x ``--window`` tokens of python-docs):

1. Passes, each timed ``--repeats`` times, alternating, the fastest kept (the
   machine may be shared; ``*_times_s`` lists every repeat):

   * ``float_pass_s``: the candidate pass of the float scheme ``fp32`` (KL against
     the reference, as every candidate pass) -- the float cost of a cell;
   * ``quant_pass_s``: the same pass with the first simulated scheme of
     ``--schemes`` (``quant_overhead`` = quant_pass_s / float_pass_s);
   * ``nll_pass_s`` / ``bf16_nll_pass_s``: a plain pass (forward and NLL) of the float32 and
     the bfloat16 model (``bf16_speedup`` = their ratio, ``bf16_ppl_rel_diff`` = ppl(bf16) /
     ppl(fp32) - 1); ``bf16_float_pass_s``: the float candidate pass in bfloat16 against the
     bfloat16 reference (``bf16_candidate_speedup`` = float_pass_s / bf16_float_pass_s: a
     bfloat16 head rebuilds the reference logits for the KL, a float32 head does not);
   * ``reference_pass_s``: the float32 reference pass (it also keeps the KL summary);
   * ``stats_pass_s``: the float32 reference pass with the extreme-token stats
     riding on it (default ``--stats-windows``; ``stats_overhead`` =
     stats_pass_s / reference_pass_s - 1);
   * the passes a run adds beyond its candidate pass, each as a ratio under ``added_passes``:
     ``noise_draw_s``, one noise-floor perturbation (``run.noise_draw``, ``jitter:1``) of the
     quantized candidate (a run makes ``noise_draws`` of them; ``per_candidate`` = noise_draw_s /
     quant_pass_s); ``calibration_draw_s``, one more calibration draw of the static scheme
     (``run.calibration_draw``: re-calibrate, score again; a run makes ``calib_draws - 1``);
     ``engine_reference_s``, llama.cpp's float reference pass (the model's F32 GGUF through
     ``engines.llamacpp.iter_window_logits`` into ``passes.LogitScorer``, the engine's settings;
     ``per_reference`` = engine_reference_s / reference_pass_s), where the model is a GGUF and
     llama-cpp-python is installed (else ``engine_reference`` says why not); ``run_cost`` = the
     candidate pass plus the noise and calibration draws of one run, in candidate passes (the
     same from CPU time under ``cpu``; llama.cpp's own threads count there too).

   The same ratios from process CPU time are under ``cpu`` (with ``--threads 1``
   they move less than wall times when other processes compete for the cores),
   and ``paired_median`` gives the median over repeats of each ratio timed back
   to back.

2. Sweep (skipped with ``--no-sweep``): ``quantsink sweep`` of the grid
   (model x python-docs x schemes x mitigations, jobs 1) in a fresh results
   directory with a fresh reference cache, in this process: ``wall_s`` (planning
   and model loading included), ``candidate_pass_s_sum`` (the records'
   ``timing.candidate_s``, variant runs the sweep stored included),
   ``overhead_ratio`` = wall_s / candidate_pass_s_sum; ``overhead_ratio_all_passes``
   also counts the reference passes and the noise-floor re-runs of unmitigated
   candidates as passes (``stage_s_sum`` has every stage summed over the records).

The last line printed is a JSON object.  Not a timed test: on a shared machine
the figures vary run to run (``load_average`` says how busy it was).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's quantsink
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each function ``repeats`` times, alternating; -> (wall times, CPU times) per name."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  {name:24s} {wall[name][-1]:7.2f} s wall {cpu[name][-1]:7.2f} s cpu", file=sys.stderr, flush=True)
    return wall, cpu


def passes(args: argparse.Namespace, scheme: str) -> dict[str, Any]:
    """Part 1: float / quantized / bf16 / stats passes on the same windows."""
    from quantsink.config import RunConfig
    from quantsink.measure.passes import ReferenceHead, run_pass
    from quantsink.pipeline.run import Session, build_candidate, prepare, stats_pass

    base = RunConfig(model=args.model, window=args.window, max_tokens=args.windows * args.window,
                     calib_windows=4, device="cpu", stats=False)
    session = Session()
    prep = {name: prepare(base.replace(scheme=name), session) for name in ("fp32", scheme)}
    bf16 = prepare(base.replace(scheme="fp32", dtype="bfloat16"), session)
    reference = prep["fp32"]
    model, windows = reference.loaded.model, reference.windows
    ref = run_pass(model, windows, keep_targets=True)
    ref16 = run_pass(bf16.loaded.model, bf16.windows, keep_targets=True)
    head = ReferenceHead.of(model)
    candidates = {name: build_candidate(p)[0] for name, p in prep.items()}
    candidate16 = build_candidate(bf16)[0]
    stats_config = base.replace(stats=True)

    def candidate(name: str) -> Callable[[], Any]:
        return lambda: run_pass(candidates[name], windows, reference=ref.targets, reference_head=head)

    quant_result = run_pass(candidates[scheme], windows, reference=ref.targets, reference_head=head)
    added, engine_note = added_passes(prep[scheme], candidates[scheme], quant_result, ref)
    fns = {"float_pass": candidate("fp32"), "quant_pass": candidate(scheme), **added,
           "reference_pass": lambda: run_pass(model, windows, keep_targets=True),
           "nll_pass": lambda: run_pass(model, windows),
           "bf16_nll_pass": lambda: run_pass(bf16.loaded.model, bf16.windows),
           "bf16_float_pass": lambda: run_pass(candidate16, bf16.windows, reference=ref16.targets,
                                               reference_head=ReferenceHead.of(bf16.loaded.model)),
           "stats_pass": lambda: stats_pass(stats_config, model, windows, keep_targets=True)}
    run_pass(model, windows, keep_targets=True)  # warm-up (allocator, thread pool)
    times, cpu_times = alternate(fns, args.repeats)
    best = {name: min(ts) for name, ts in times.items()}
    cpu = {name: min(ts) for name, ts in cpu_times.items()}

    def paired(times: dict[str, list[float]], a: str, b: str) -> float:
        """Median over repeats of a/b timed back to back (steadier than min/min under changing load)."""
        return round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)
    ppl32 = ref.summary()["ppl"]
    ppl16 = ref16.summary()["ppl"]
    return {
        "quant_scheme": scheme, "windows": len(windows), "tokens": windows.n_tokens,
        **{f"{name}_s": round(t, 3) for name, t in best.items()},
        "quant_overhead": round(best["quant_pass"] / best["float_pass"], 3),
        "quant_vs_reference": round(best["quant_pass"] / best["reference_pass"], 3),
        "bf16_speedup": round(best["nll_pass"] / best["bf16_nll_pass"], 3),
        "bf16_candidate_speedup": round(best["float_pass"] / best["bf16_float_pass"], 3),
        "fp32_ppl": ppl32, "bf16_ppl": ppl16, "bf16_ppl_rel_diff": ppl16 / ppl32 - 1,
        "stats_overhead": round(best["stats_pass"] / best["reference_pass"] - 1, 4),
        "stats_windows": stats_config.stats_windows,
        "added_passes": added_costs(best, prep[scheme], engine_note),
        "pass_times_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "paired_median": {"quant_overhead": paired(times, "quant_pass", "float_pass"),
                          "bf16_speedup": paired(times, "nll_pass", "bf16_nll_pass"),
                          "stats_ratio": paired(times, "stats_pass", "reference_pass"),
                          "cpu_quant_overhead": paired(cpu_times, "quant_pass", "float_pass"),
                          "cpu_bf16_speedup": paired(cpu_times, "nll_pass", "bf16_nll_pass")},
        "cpu": {"quant_overhead": round(cpu["quant_pass"] / cpu["float_pass"], 3),
                "bf16_speedup": round(cpu["nll_pass"] / cpu["bf16_nll_pass"], 3),
                "stats_overhead": round(cpu["stats_pass"] / cpu["reference_pass"] - 1, 4),
                "added_passes": added_costs(cpu, prep[scheme], engine_note),
                "pass_cpu_s": {name: [round(t, 3) for t in ts] for name, ts in cpu_times.items()}},
    }


def added_passes(prep: Any, model: Any, candidate: Any, reference: Any) -> tuple[dict[str, Callable[[], Any]], str]:
    """The timed passes a run adds beyond its candidate pass, and a note on the engine reference."""
    from quantsink.pipeline.run import calibration_draw, noise_draw

    fns: dict[str, Callable[[], Any]] = {
        "noise_draw": lambda: noise_draw(prep, model, candidate, reference, "jitter:1")}
    if prep.scheme.needs_calibration():
        fns["calibration_draw"] = lambda: calibration_draw(prep, model, reference, 1)
    try:
        fns["engine_reference"] = engine_reference(prep)
        return fns, "llama.cpp float reference (F32 GGUF), the engine's settings"
    except Exception as exc:  # a missing engine or a model with no GGUF: stated, not timed
        return fns, f"not timed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def engine_reference(prep: Any) -> Callable[[], Any]:
    """llama.cpp's float reference pass over the run's windows (raises where it cannot run here)."""
    import llama_cpp  # noqa: F401  (the engine must be installed)

    from quantsink.data.models import gguf_path
    from quantsink.engines.gguf_files import float_reference
    from quantsink.engines.llamacpp import iter_window_logits
    from quantsink.measure.passes import LogitScorer, window_ids
    from quantsink.pipeline.engine import BASE_SETTINGS

    source = gguf_path(prep.config.model)
    if source is None:
        raise ValueError(f"{prep.config.model} is not a GGUF model")
    ref_file, ids = float_reference(source), window_ids(prep.windows)

    def run() -> Any:
        scorer = LogitScorer(prep.windows)
        for i, logits in enumerate(iter_window_logits(ref_file, ids, **BASE_SETTINGS)):
            scorer.add(i, logits)
        return scorer.result()
    return run


def added_costs(best: dict[str, float], prep: Any, engine_note: str) -> dict[str, Any]:
    """Each added pass's cost in candidate (or reference) passes, and one run's total."""
    config, quant = prep.config, best["quant_pass"]
    out: dict[str, Any] = {"noise_draws": config.noise_draws, "calib_draws": config.calib_draws,
                           "noise_draw_per_candidate": round(best["noise_draw"] / quant, 3),
                           "engine_reference": engine_note}
    run = 1 + config.noise_draws * best["noise_draw"] / quant
    if "calibration_draw" in best:
        out["calibration_draw_per_candidate"] = round(best["calibration_draw"] / quant, 3)
        run += (config.calib_draws - 1) * best["calibration_draw"] / quant
    if "engine_reference" in best:
        out["engine_reference_per_reference"] = round(best["engine_reference"] / best["reference_pass"], 3)
    out["run_cost_in_candidate_passes"] = round(run, 3)
    return out


def sweep_grid(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: the grid through the sweep machinery, in a fresh store and reference cache."""
    from quantsink.sweep import local as sweeps
    from quantsink.sweep.grid import Grid

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        os.environ["QUANTSINK_REFERENCE_CACHE"] = str(Path(tmp) / "reference")
        grid = Grid.from_mapping({
            "models": [args.model], "corpora": ["python-docs"], "schemes": args.schemes,
            "mitigations": args.mitigations, "window": args.window, "max_tokens": args.windows * args.window,
            "calib_windows": 4, "device": "cpu"})
        t0 = time.perf_counter()
        planned = sweeps.plan(grid.configs())
        summary = sweeps.sweep(planned, Path(tmp) / "grid", jobs=1)
        wall = time.perf_counter() - t0
    stages = {key: round(value, 3) for key, value in summary.stages.items()}
    pass_sum, passes = summary.pass_s, summary.all_pass_s
    return {"cells": len(planned), "records": len(summary.done), "failed": len(summary.failed),
            "wall_s": round(wall, 3), "sweep_wall_s": round(summary.wall_s, 3),
            "candidate_pass_s_sum": round(pass_sum, 3), "overhead_ratio": round(wall / pass_sum, 3),
            "all_passes_s_sum": round(passes, 3), "overhead_ratio_all_passes": round(wall / passes, 3),
            "stage_s_sum": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--schemes", default="w8a8,w8a8-tok")
    parser.add_argument("--mitigations", default="none,sink-fp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-sweep", action="store_true", help="time the passes only")
    args = parser.parse_args()

    import torch

    from quantsink.env import quiet_libraries
    from quantsink.measure.kernels import fast_linear
    from quantsink.measure.pages import kept_pages
    from quantsink.schemes import parse_scheme
    from quantsink.sweep.grid import split_axis

    args.schemes = list(split_axis("schemes", args.schemes))
    args.mitigations = list(split_axis("mitigations", args.mitigations))

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    simulated = [s for s in args.schemes if parse_scheme(s).simulated]
    load_before = os.getloadavg()[0]
    report: dict[str, Any] = {"model": args.model, "window": args.window, "threads": torch.get_num_threads(),
                              "repeats": args.repeats}
    if not args.no_sweep:
        report.update(sweep_grid(args))
    with fast_linear(), kept_pages():  # as compare_passes runs every forward: its kernel, its memory pages kept
        report.update(passes(args, simulated[0] if simulated else "w8a8"))
    report["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
