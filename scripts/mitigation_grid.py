"""The mitigation grid: {schemes} x {mitigations} on each corpus, one process, one model load.

Every cell is a normal ``quantsink.pipeline.run`` (record written under --results, with
``mitigation_effect`` and ``d_sink``); a cell whose record is already in the
store is reused, so the script can be stopped and re-run.  Prints (and writes
with --out) a markdown table per corpus: perplexity, delta_ppl with its 95% CI,
delta KL and the verdict, plus d_sink per scheme.

    python scripts/mitigation_grid.py --max-tokens 1024 --window 256 --out results/mitigation_grid.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback

SCHEMES = ("w8a8", "w8a8-dyn", "w8a8-tok", "kv4")
MITIGATIONS = ("none", "sink-fp", "clip-residual", "sink-token", "intact-kv", "smooth")
FLOAT_CHECKS = ("none", "clip-residual", "sink-token")  # on fp32: what the mitigation alone costs


def cells(schemes: list[str], mitigations: list[str], float_checks: list[str]) -> list[tuple[str, str]]:
    """Mitigation-major (a stopped grid still covers every scheme for the first mitigations)."""
    out = [(s, m) for m in mitigations for s in schemes]
    return out + [("fp32", m) for m in float_checks]


def run_cell(config, session, store_only=False):
    """-> (record, effects, reused?): the cell's plan run like `quantsink eval` (stored runs reused)."""
    from quantsink.pipeline.plan import plan
    from quantsink.records.store import find_record
    from quantsink.pipeline.execute import run_config

    reused = all(find_record(config.results, p.run_id) is not None for p in plan([config]))
    if store_only and not reused:
        raise LookupError("not in the results store (not run yet)")
    return (*run_config(config, session=session, fresh=False), reused)


def row(record, found) -> dict:
    cand, eff = record.candidate, found.mitigation_effect
    out = {"scheme": record.scheme.spec, "mitigation": record.config.mitigation,
           "ppl": cand.ppl, "kl": cand.kl, "top1": cand.top1_agreement}
    if eff:
        out.update(delta_ppl=eff["delta_ppl"], ci95=eff["ci95"], delta_kl=eff["delta_kl"], verdict=eff["verdict"])
    if found.d_sink:
        out["d_sink"] = found.d_sink["nats_per_token"]
        out["d_sink_ci95"] = found.d_sink["ci95"]
    return out


def markdown(corpus: str, rows: list[dict], reference_ppl: float, protocol: dict) -> str:
    lines = [f"### {corpus}: reference ppl {reference_ppl:.3f} ({protocol['n_windows']} windows x "
             f"{protocol['window']} tokens, {protocol['scored_tokens']} scored tokens)", "",
             "| scheme | mitigation | ppl | KL/token | top-1 | delta ppl [95% CI] | delta KL | verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scheme']} | {r['mitigation']} | error: {r['error']} | | | | | |")
            continue
        ci = f"{r['delta_ppl']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if "delta_ppl" in r else ""
        if r.get("verdict") == "not-applicable":
            ci = "not applicable (changed nothing)"
        dkl = f"{r['delta_kl']:+.4f}" if "delta_kl" in r else ""
        lines.append(f"| {r['scheme']} | {r['mitigation']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} "
                     f"| {ci} | {dkl} | {r.get('verdict', '')} |")
    dsink = {r["scheme"]: r for r in rows if "d_sink" in r and r["mitigation"] == "none"}
    if dsink:
        lines += ["", "| scheme | d_sink (nats/token) [95% CI] |", "| --- | ---: |"]
        lines += [f"| {s} | {r['d_sink']:+.4f} [{r['d_sink_ci95'][0]:+.4f}, {r['d_sink_ci95'][1]:+.4f}] |"
                  for s, r in dsink.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpora", default="python-code,python-docs")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--mitigations", default=";".join(MITIGATIONS), help="';'-separated mitigation specs")
    parser.add_argument("--float-checks", default=";".join(FLOAT_CHECKS), help="';'-separated, on fp32")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=2)
    parser.add_argument("--results", default="results/runs")
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--store-only", action="store_true", help="tabulate stored records only; run nothing")
    args = parser.parse_args()

    from quantsink.env import quiet_libraries
    from quantsink.config import RunConfig
    from quantsink.pipeline.run import Session

    quiet_libraries()
    session = Session()
    split = lambda text, sep: [x for x in text.split(sep) if x]  # noqa: E731
    text = []
    for corpus in split(args.corpora, ","):
        rows, ref, proto = [], None, None
        for scheme, mitigation in cells(split(args.schemes, ","), split(args.mitigations, ";"),
                                        split(args.float_checks, ";")):
            config = RunConfig(model=args.model, scheme=scheme, mitigation=mitigation, corpus=corpus,
                               max_tokens=args.max_tokens, window=args.window, calib_windows=args.calib_windows,
                               results=args.results)
            t0 = time.perf_counter()
            try:
                record, found, reused = run_cell(config, session, args.store_only)
            except Exception as err:  # noqa: BLE001 - one failing cell must not lose the grid
                if not args.store_only:
                    traceback.print_exc()
                rows.append({"scheme": scheme, "mitigation": mitigation, "error": f"{type(err).__name__}: {err}"})
                continue
            ref, proto = record.reference.ppl, dataclasses.asdict(record.protocol)
            rows.append(row(record, found))
            print(json.dumps({"corpus": corpus, **rows[-1], "reused": reused,
                              "s": round(time.perf_counter() - t0, 1)}), flush=True)
        names = list(dict.fromkeys(["none", *split(args.mitigations, ";"), *split(args.float_checks, ";")]))
        order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in [*split(args.schemes, ","), "fp32"]
                                                      for m in names)}
        rows.sort(key=lambda r: order.get((r["scheme"], r["mitigation"]), len(order)))
        text.append(markdown(corpus, rows, ref or float("nan"), proto or {"n_windows": 0, "window": 0,
                                                                          "scored_tokens": 0}))
        if args.out:
            with open(args.out, "w") as handle:
                handle.write("\n".join(text))
    sys.stdout.write("\n".join(text))


if __name__ == "__main__":
    main()
