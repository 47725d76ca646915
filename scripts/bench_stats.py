"""Wall-time cost of the extreme-token stats over plain evaluation, on the same windows.

    python scripts/bench_stats.py [--model smollm2-135m] [--max-tokens 8192] [--window 512]
                                  [--stats-windows 8] [--repeats 2] [--warmup 1]

Runs the evaluator's pass on the same windows alternately without stats and
with the stats probes riding on it (eager attention on the first
``--stats-windows`` windows, SDPA for the rest), ``--repeats`` times each, and
keeps the fastest of each (the machine may be shared).  The last line printed
is a JSON object: ``plain_s, stats_s, overhead`` (= stats_s / plain_s - 1),
also ``eager_only_s`` (eager attention on the stats windows, no probes) to
split the cost between eager attention and the probes.
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
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stats-windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed plain passes first")
    args = parser.parse_args()

    import torch

    from quantsink.cli import quiet_libraries
    from quantsink.config import RunConfig
    from quantsink.evaluate import run_pass
    from quantsink.hooks import StatsCollector, attention_implementation
    from quantsink.run import Session, prepare

    quiet_libraries()
    config = RunConfig(model=args.model, corpus=args.corpus, max_tokens=args.max_tokens, window=args.window,
                       scheme="fp32", stats_windows=args.stats_windows)
    prep = prepare(config, Session())
    model, windows, n = prep.loaded.model, prep.windows, args.stats_windows

    def plain() -> None:
        run_pass(model, windows, batch_tokens=config.batch_tokens, boundaries=(n,))

    def eager_only() -> None:
        def context(rows, part):
            return attention_implementation(model, "eager" if rows.start < n else "sdpa")
        run_pass(model, windows, batch_tokens=config.batch_tokens, batch_context=context, boundaries=(n,))

    def with_stats() -> None:
        with StatsCollector(model, stats_windows=n) as collector:
            run_pass(model, windows, batch_tokens=config.batch_tokens, batch_context=collector.batch_context,
                     boundaries=collector.boundaries)
            collector.summary()

    times: dict[str, list[float]] = {"plain": [], "eager_only": [], "stats": []}
    for _ in range(args.warmup):  # allocator, thread pool
        plain()
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("eager_only", eager_only), ("stats", with_stats)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name:10s} {times[name][-1]:7.2f} s", flush=True)
    best = {name: min(ts) for name, ts in times.items()}
    result = {
        "model": args.model, "windows": len(windows), "window": args.window, "stats_windows": n,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "plain_s": round(best["plain"], 3), "eager_only_s": round(best["eager_only"], 3),
        "stats_s": round(best["stats"], 3), "overhead": round(best["stats"] / best["plain"] - 1, 4),
        "eager_overhead": round(best["eager_only"] / best["plain"] - 1, 4), "all_times": times,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
