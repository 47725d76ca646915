"""Quantize trained Bigram-Backcopy models with quantsink's evaluator on their held-out sequences.

Usage: python scripts/testbed_quantize.py RESULTS_DIR ROWS.jsonl MODEL_DIR...
Each model: w8a8 (static per-tensor), w8a8-tok, kv4 and w8a8:act_bits=4 (static per-tensor int4
activations, the harshest on outliers), each without and with sink-fp; 48 held-out
sequences scored (each row <s> + 255 characters, --protocol lm-eval --window 255), static ranges
calibrated on 8 windows cut from the 16 sequences after them.  One JSON row per run is appended
to ROWS.jsonl (read by scripts/testbed_results.py); full records go to RESULTS_DIR.
"""

import json
import sys
import time

from quantsink import RunConfig, evaluate
from quantsink.pipeline.run import Session

SCHEMES = ["w8a8", "w8a8-tok", "kv4", "w8a8:act_bits=4"]
MITIGATIONS = ["none", "sink-fp"]


def row(path: str, record: dict, seconds: float) -> dict:
    effect = record.get("mitigation_effect") or {}
    return {"model": path, "scheme": record["config"]["scheme"], "mitigation": record["config"]["mitigation"],
            "ref_ppl": record["reference"]["ppl"], "ppl": record["candidate"]["ppl"],
            "kl": record["candidate"].get("kl"), "top1": record["candidate"].get("top1_agreement"),
            "n_windows": record["protocol"]["n_windows"], "scored": record["protocol"]["scored_tokens"],
            "verdict": effect.get("verdict"), "d_sink": (record.get("d_sink") or {}).get("nats_per_token"),
            "seconds": round(seconds, 1)}


def main() -> None:
    results, rows, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    session = Session()
    for path in models:
        for scheme in SCHEMES:
            for mitigation in MITIGATIONS:
                t0 = time.time()
                config = RunConfig(model=path, corpus=f"file:{path}/heldout.jsonl", protocol="lm-eval", window=255,
                                   max_tokens=48 * 255, calib_windows=8, stats_windows=8, scheme=scheme,
                                   mitigation=mitigation, device="cpu", results=results, offline=True)
                record, found = evaluate(config, session=session)  # the plan: variant runs too
                line = json.dumps(row(path, {**record.to_dict(), **found.to_dict()}, time.time() - t0))
                print(line, flush=True)
                with open(rows, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")


if __name__ == "__main__":
    main()
