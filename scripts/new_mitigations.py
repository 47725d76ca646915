"""Run the new mitigations (rotate, cushion, sink-fp:k=detect) end to end on the embedded models, small budget.

    PYTHONPATH=. python scripts/new_mitigations.py [--models smollm2-135m,gemma3-270m] [--out /tmp/new-mitig]

Prints one line per run: model, scheme, mitigation, ppl, ppl(none), ppl(sink-fp), verdict, seconds, and for
rotate the float logit check and the peak ratios (residual norm, massive activation) of reference vs candidate.
"""

from __future__ import annotations

import argparse
import json
import time

from quantsink.config import RunConfig
from quantsink.pipeline.run import Session
from quantsink.pipeline.execute import run_config as evaluate

# each mitigated run also evaluates (or reuses) `none` and `sink-fp` on the same windows (mitigation_effect, d_sink)
MITIGATIONS = ["rotate", "rotate,sink-fp", "cushion", "sink-fp:k=detect"]


def peaks(stats: dict | None) -> dict | None:
    if not stats:
        return None
    layers = stats["layers"]
    return {"residual_peak_ratio": max(r["residual_peak_ratio"] for r in layers),
            "massive_ratio": max(r["massive_ratio"] for r in layers),
            "massive_activation": max(r["massive_activation"] for r in layers),
            "linear_absmax": max(v[0] for v in stats["linear_inputs"]["sites"].values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--schemes", default="w8a8,w8a8-dyn,kv4")
    parser.add_argument("--mitigations", default=";".join(MITIGATIONS), help="';'-separated (a spec may hold ',')")
    parser.add_argument("--out", default="/tmp/new-mitig")
    parser.add_argument("--no-stats", action="store_true", help="skip the extreme-token statistics (faster)")
    args = parser.parse_args()
    session = Session()
    rows = []
    for model in args.models.split(","):
        for mitigation in args.mitigations.split(";"):
            for scheme in args.schemes.split(","):
                config = RunConfig(model=model, scheme=scheme, mitigation=mitigation, corpus="python-code",
                                   max_tokens=1024, window=256, calib_windows=4, stats_windows=4,
                                   stats=not args.no_stats,
                                   results=args.out)
                t0 = time.perf_counter()
                record, found = evaluate(config, session=session)  # the plan: none and sink-fp runs too
                rec = {**record.to_dict(), **found.to_dict()}
                eff, ds = rec.get("mitigation_effect") or {}, rec.get("d_sink") or {}
                stats = rec.get("stats") or {}
                row = {"model": model, "scheme": scheme, "mitigation": mitigation,
                       "ppl": rec["candidate"]["ppl"], "reference_ppl": rec["reference"]["ppl"],
                       "none_ppl": ds.get("full_ppl"), "sink_fp_ppl": ds.get("sink_fp_ppl"),
                       "verdict": eff.get("verdict"), "delta_ppl_ci95": eff.get("ci95"),
                       "seconds": round(time.perf_counter() - t0, 1), "applied": rec["mitigation"],
                       "peaks_reference": peaks(stats.get("reference")),
                       "peaks_candidate": peaks(stats.get("candidate"))}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "applied"}), flush=True)
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
