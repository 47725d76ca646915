"""Synthetic run records with the fields of issues 2, 3 and 5 (for report tests and the html check)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from quantsink.config import stable_hash
from quantsink.results import SCHEMA_VERSION, write_record

LAYERS, HEADS, KV_HEADS = 6, 4, 2


def _side(rng: random.Random, peak: float, sink: float, dormant: list[list[float]]) -> dict[str, Any]:
    return {
        "layers": [{"residual_peak_ratio": peak * (1 + layer) / LAYERS, "massive_activation": 100.0 * peak,
                    "massive_position": 0, "massive_channel": 7} for layer in range(LAYERS)],
        "heads": {"sink_score": [[round(sink * rng.uniform(0.8, 1.0), 4) for _ in range(HEADS)] for _ in range(LAYERS)],
                  "value_drain": [[round(rng.uniform(0.1, 0.4), 4) for _ in range(KV_HEADS)] for _ in range(LAYERS)],
                  "dormant_fraction": dormant},
        "extreme_tokens": [0],
        "linear_inputs": {},
    }


def make_record(model: str = "tiny-llama", corpus: str = "python-docs", scheme: str = "w8a8",
                mitigation: str = "none", ppl_ref: float = 10.0, ppl: float = 12.0, bits: float = 8.0,
                simulated: bool = True, effect: dict[str, Any] | None = None, d_sink: Any = None,
                stats: bool = True, woken: tuple[tuple[int, int], ...] = ((2, 1),),
                created_at: str = "2026-11-28T16:00:00+00:00", seed: int = 0, **extra: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    n = 4
    ref_nll = [math.log(ppl_ref) * 100] * n
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": stable_hash(model, corpus, scheme, mitigation, created_at, seed),
        "created_at": created_at, "quantsink_version": "0.1.0",
        "config": {"model": model, "corpus": corpus, "scheme": scheme, "mitigation": mitigation,
                   "window": 128, "max_tokens": 512},
        "model": {"name": model, "source": "synthetic", "sha256": "0" * 64, "arch": "LlamaForCausalLM", "n_params": 1},
        "corpus": {"name": corpus, "sha256": "1" * 64, "n_tokens": 512},
        "protocol": {"kind": "windows", "window": 128, "stride": 128, "bos": "auto", "n_windows": n,
                     "scored_tokens": 4 * 127, "dtype": "float32"},
        "scheme": {"name": scheme.split(":")[0], "spec": scheme, "params": {}, "simulated": simulated,
                   "backend": "torch", "backend_version": "2.13.0", "bits": bits},
        "mitigation": [] if mitigation == "none" else [{"name": mitigation, "kind": "post-hoc", "params": {}}],
        "reference": {"ppl": ppl_ref, "bits_per_byte": 1.0, "nll_per_window": ref_nll},
        "candidate": {"ppl": ppl, "bits_per_byte": 1.0 * math.log(ppl) / math.log(ppl_ref), "kl": 0.05,
                      "top1_agreement": 0.9, "nll_per_window": [math.log(ppl) * 100] * n},
        "timing": {}, "env": {},
    }
    if stats:
        before = [[0.95 if (layer, head) in woken else 0.2 for head in range(HEADS)] for layer in range(LAYERS)]
        after = [[0.1 if (layer, head) in woken else 0.2 for head in range(HEADS)] for layer in range(LAYERS)]
        record["stats"] = {"reference": _side(rng, 300.0, 0.6, before),
                           "candidate": _side(rng, 200.0, 0.4, after),
                           "changes": {}}
    if effect is not None:
        record["mitigation_effect"] = effect
    if d_sink is not None:
        record["d_sink"] = d_sink
    record.update(extra)
    return record


def grid_records() -> list[dict[str, Any]]:
    """A small grid: two models x two corpora x three schemes, plus mitigated w8a8 runs."""
    records = []
    for m, model in enumerate(("tiny-llama", "tiny-gemma")):
        for c, corpus in enumerate(("python-docs", "python-code")):
            for s, (scheme, bits, sim, ratio) in enumerate((("int8", 8, False, 1.02), ("nf4", 4, False, 1.3),
                                                             ("w8a8", 8, True, 2.5))):
                records.append(make_record(model, corpus, scheme, ppl=10.0 * ratio * (1 + m), ppl_ref=10.0 * (1 + m),
                                           bits=bits, simulated=sim, seed=m * 10 + c * 3 + s,
                                           d_sink={"value": 0.4, "ci95": [0.3, 0.5]} if sim else None))
            for mitigation, verdict, delta in (("sink-fp", "helps", -12.0), ("smooth", "inconclusive", -0.2)):
                effect = {"delta_ppl": delta, "delta_kl": -0.01, "ci95": [delta - 0.5, delta + 0.5], "verdict": verdict}
                records.append(make_record(model, corpus, "w8a8", mitigation, ppl=10.0 * (1 + m) * 2.5 + delta,
                                           ppl_ref=10.0 * (1 + m), effect=effect, seed=m + c))
    return records


def write_grid(root: Path) -> list[dict[str, Any]]:
    records = grid_records()
    for record in records:
        write_record(record, root)
    return records


if __name__ == "__main__":  # python tests/synthetic_records.py DIR: write the grid there
    import sys

    target = Path(sys.argv[1])
    print(json.dumps([r["run_id"] for r in write_grid(target)]))
