"""Wall-time cost of the extreme-token stats over plain evaluation, on the same windows.

    python scripts/bench_stats.py [--model smollm2-135m] [--max-tokens 16384] [--window 512]
                                  [--stats-windows 8] [--repeats 2] [--warmup 1] [--threads N]

Runs the evaluator's pass on the same windows alternately without stats and
with the stats probes riding on it (the first ``--stats-windows`` windows run
the same attention kernel, with the attention probabilities computed beside
it), ``--repeats`` times each, and keeps the fastest of each (the machine may
be shared).  The last line printed is a JSON object: ``plain_s, stats_s,
overhead`` (= stats_s / plain_s - 1), the same from the process's CPU time
(``cpu_overhead``: steadier than wall time on a shared, oversubscribed machine,
exact with ``--threads 1``) and ``identical`` (per-window NLL bitwise equal with
and without stats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="python-docs")
    parser.add_argument("--max-tokens", type=int, default=16384, help="default: eval's default budget")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stats-windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed plain passes first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from quantsink.env import quiet_libraries
    from quantsink.config import RunConfig
    from quantsink.measure.passes import run_pass
    from quantsink.measure.collector import StatsCollector
    from quantsink.pipeline.run import Session, prepare

    quiet_libraries()
    config = RunConfig(model=args.model, corpus=args.corpus, max_tokens=args.max_tokens, window=args.window,
                       scheme="fp32", stats_windows=args.stats_windows)
    prep = prepare(config, Session())
    model, windows, n = prep.loaded.model, prep.windows, args.stats_windows
    nll: dict[str, torch.Tensor] = {}

    def plain() -> None:
        nll["plain"] = run_pass(model, windows, batch_tokens=config.batch_tokens, boundaries=(n,)).nll

    def with_stats() -> None:
        with StatsCollector(model, stats_windows=n) as collector:
            nll["stats"] = run_pass(model, windows, batch_tokens=config.batch_tokens,
                                    batch_context=collector.batch_context, boundaries=collector.boundaries).nll
            collector.summary()

    times: dict[str, list[float]] = {"plain": [], "stats": []}
    cpu: dict[str, list[float]] = {"plain": [], "stats": []}
    for _ in range(args.warmup):  # allocator, thread pool
        plain()
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("stats", with_stats)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"{name:10s} {times[name][-1]:7.2f} s wall {cpu[name][-1]:7.2f} s cpu", flush=True)
    best = {name: min(ts) for name, ts in times.items()}
    best_cpu = {name: min(ts) for name, ts in cpu.items()}
    result = {
        "model": args.model, "windows": len(windows), "window": args.window, "stats_windows": n,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "plain_s": round(best["plain"], 3), "stats_s": round(best["stats"], 3),
        "overhead": round(best["stats"] / best["plain"] - 1, 4),
        "plain_cpu_s": round(best_cpu["plain"], 3), "stats_cpu_s": round(best_cpu["stats"], 3),
        "cpu_overhead": round(best_cpu["stats"] / best_cpu["plain"] - 1, 4),
        "identical": bool(torch.equal(nll["plain"], nll["stats"])), "all_times": times,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
