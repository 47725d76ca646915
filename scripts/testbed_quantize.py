"""Quantize trained Bigram-Backcopy models with quantsink's evaluator on their held-out sequences.

Usage: python scripts/testbed_quantize.py RESULTS_DIR ROWS.jsonl MODEL_DIR...
Each model: w8a8 (static per-tensor activations), w8a8-tok, kv4 and w4a4-nvfp4 (NVFP4 weights and
activations, static FP32 activation scale per tensor), each without and with sink-fp.  The first
``EVAL_ROWS`` held-out sequences are scored (each row ``<s>`` + seq_len - 1 characters,
``--protocol lm-eval --window seq_len - 1``); static ranges are calibrated on 8 windows cut from the
sequences after them.  One JSON row per run is appended to ROWS.jsonl (read by
scripts/testbed_results.py): perplexities, the per-window NLLs of reference and candidate (for the paired
intervals there), sink-fp's paired effect, and the per-head dormant fractions (per-query criterion:
a query is dormant when its weight on <s> is >= 0.89; a head when >= half its queries are) of the float
model and the quantized one, with the heads the scheme woke.  Full records go to RESULTS_DIR.
"""

import json
import sys
import time
from pathlib import Path

from quantsink import RunConfig, evaluate
from quantsink.pipeline.run import Session

SCHEMES = ["w8a8", "w8a8-tok", "kv4", "w4a4-nvfp4"]
MITIGATIONS = ["none", "sink-fp"]
EVAL_ROWS = 24


def heads(stats: dict) -> list:
    return (stats or {}).get("heads", {}).get("dormant_fraction") or []


def row(path: str, record: dict, seconds: float) -> dict:
    effect, stats = record.get("mitigation_effect") or {}, record.get("stats") or {}
    ref, cand = record["reference"], record["candidate"]
    return {"model": path, "scheme": record["config"]["scheme"], "mitigation": record["config"]["mitigation"],
            "ref_ppl": ref["ppl"], "ppl": cand["ppl"], "kl": cand.get("kl"), "top1": cand.get("top1_agreement"),
            "ref_nll": ref["nll_per_window"], "nll": cand["nll_per_window"], "scored": cand["scored_per_window"],
            "verdict": effect.get("verdict"), "effect_ci95": effect.get("ci95"),
            "dormant_ref": heads(stats.get("reference")), "dormant_cand": heads(stats.get("candidate")),
            "woken": (stats.get("changes") or {}).get("woken"), "seconds": round(seconds, 1)}


def main() -> None:
    results, rows, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    session = Session()
    for path in models:
        width = json.loads((Path(path) / "testbed.json").read_text())["config"]["seq_len"] - 1
        for scheme in SCHEMES:
            for mitigation in MITIGATIONS:
                t0 = time.time()
                config = RunConfig(model=path, corpus=f"file:{path}/heldout.jsonl", protocol="lm-eval", window=width,
                                   max_tokens=EVAL_ROWS * width, calib_windows=8, calib_draws=1, stats_windows=8, scheme=scheme,
                                   mitigation=mitigation, device="cpu", results=results, offline=True)
                record, found = evaluate(config, session=session)  # the plan: variant runs too
                line = json.dumps(row(path, {**record.to_dict(), **found.to_dict()}, time.time() - t0))
                with open(rows, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
                print(f"{Path(path).name} {scheme} {mitigation} {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
