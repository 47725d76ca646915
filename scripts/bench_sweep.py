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
     stats_pass_s / reference_pass_s - 1).

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

    fns = {"float_pass": candidate("fp32"), "quant_pass": candidate(scheme),
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
        "pass_times_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "paired_median": {"quant_overhead": paired(times, "quant_pass", "float_pass"),
                          "bf16_speedup": paired(times, "nll_pass", "bf16_nll_pass"),
                          "stats_ratio": paired(times, "stats_pass", "reference_pass"),
                          "cpu_quant_overhead": paired(cpu_times, "quant_pass", "float_pass"),
                          "cpu_bf16_speedup": paired(cpu_times, "nll_pass", "bf16_nll_pass")},
        "cpu": {"quant_overhead": round(cpu["quant_pass"] / cpu["float_pass"], 3),
                "bf16_speedup": round(cpu["nll_pass"] / cpu["bf16_nll_pass"], 3),
                "stats_overhead": round(cpu["stats_pass"] / cpu["reference_pass"] - 1, 4),
                "pass_cpu_s": {name: [round(t, 3) for t in ts] for name, ts in cpu_times.items()}},
    }


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
    report.update(passes(args, simulated[0] if simulated else "w8a8"))
    report["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
