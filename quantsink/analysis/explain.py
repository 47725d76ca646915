"""``explain``: where a scheme's damage comes from, site by site, position by position, layer by layer.

Three views of one run (a stored record, or a RunConfig evaluated here):

* **Sites** (pure, from the reference statistics ``linear_inputs``): per quantized
  Linear input, the activation range ``absmax`` with and without the extreme tokens,
  and the step a symmetric ``b``-bit per-tensor quantizer takes for ordinary tokens
  with each range, ``step = absmax / (2^(b-1) - 1)``.  The sink *sets the scale* of a
  site when ``absmax / absmax_without_extreme >= SCALE_RATIO`` (ordinary tokens get a
  step at least that many times coarser than they need, i.e. lose >= 2 bits).
  Per-token activation scales are set by each token alone: there the sink sets no
  other token's scale, and the table says so.
* **Positions** (``measure``, runs passes): per scored target position, NLL of the
  reference, of the candidate (scheme everywhere) and of the candidate with the sink
  (position 0) kept in full precision at every quantizer (``sink-fp``); the increase
  over the reference is averaged in position buckets (``BUCKETS``: early positions vs
  the rest) and ``recovered`` = share of the candidate's NLL increase that keeping
  the sink in full precision removes.
* **Layers** (``measure``): ``d_sink`` split by layer: for each decoder block ``l``,
  the candidate with the sink kept in full precision at the quantizers of block
  ``l`` only, and ``d_sink_l = NLL/token(scheme everywhere) - NLL/token(sink kept at
  l)`` with its paired t interval over windows.  Static ranges come from a
  calibration where every quantizer observes float activations, so each quantizer's
  range depends only on whether it excludes the sink: the ranges of the two
  calibrations (sink in / sink out) are computed once and swapped per block, exactly
  what re-calibrating each hybrid would give.  The per-layer parts need not add up
  to the whole ``d_sink`` (errors of different layers interact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from quantsink.errors import UsageError

SCALE_RATIO = 4.0  # absmax / absmax without extreme tokens at which the sink sets a site's scale
BUCKETS = ((1, 4), (5, 32), (33, None))  # scored target positions (1-based from the sink at 0)
SINK = (0,)  # the sink position kept in full precision (sink-fp's k=1)
TOP_SITES = 12


# --------------------------------------------------------------------------- sites (pure)


def act_bits(scheme: Any) -> tuple[int | None, str]:
    """Activation bits of a scheme record and its granularity (``tensor``/``token``/``""``)."""
    bits = (scheme.bit_widths or {}).get("activations")
    gran = str(scheme.params.get("act_gran", "tensor")) if bits else ""
    return (int(bits) if bits else None), gran


def step(absmax: float | None, bits: int) -> float | None:
    """The symmetric ``bits``-bit quantizer step for the range ``[-absmax, absmax]``."""
    return None if absmax is None else absmax / (2 ** (bits - 1) - 1)


def site_rows(linear_inputs: dict[str, Any] | None, bits: int | None) -> list[dict[str, Any]]:
    """Per Linear input (stats ``linear_inputs``): ranges, implied steps, whether the sink sets the scale."""
    sites = (linear_inputs or {}).get("sites", {})
    return [_site(name, values, bits) for name, values in sites.items()]


def _site(name: str, values: list[float | None], bits: int | None) -> dict[str, Any]:
    absmax, without = values[0], values[1]
    ratio = absmax / without if absmax and without else None
    row = {"site": name, "layer": _layer(name), "absmax": absmax, "absmax_without_extreme": without,
           "ratio": ratio, "sink_sets_scale": bool(ratio and ratio >= SCALE_RATIO)}
    if bits:
        row.update(step=step(absmax, bits), step_without_extreme=step(without, bits),
                   bits_lost=math.log2(ratio) if ratio and ratio > 0 else None)
    return row


def _layer(site: str) -> int | None:
    parts = site.split(".")  # canonical site names: layers.{i}.<path>.in
    return int(parts[1]) if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() else None


def sites_view(linear_inputs: dict[str, Any] | None, scheme: Any) -> dict[str, Any]:
    bits, gran = act_bits(scheme)
    rows = site_rows(linear_inputs, bits)
    ranked = sorted(rows, key=lambda r: -(r["ratio"] or 0))
    set_by_sink = [r["site"] for r in ranked if r["sink_sets_scale"]]
    note = {"token": "per-token activation scales: each token sets only its own scale, so the sink sets no "
                     "other token's step (the ranges are shown for reference)",
            "": "the scheme quantizes no activations: no activation scale to set (KV or weights only)"}.get(gran)
    return {"bits": bits, "granularity": gran or None, "scale_ratio": SCALE_RATIO, "rows": ranked,
            "set_by_sink": set_by_sink if gran == "tensor" else [], "note": note,
            "definition": "step = absmax / (2^(bits-1) - 1) (symmetric); the sink sets a site's scale when "
                          f"absmax / absmax without extreme tokens >= {SCALE_RATIO:g}"}


# --------------------------------------------------------------------------- positions and layers (pure)


def bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi}" if hi else f"{lo}+"


def position_view(positions: list[int], ref: list[float], full: list[float], kept: list[float]) -> dict[str, Any]:
    """Mean NLL increase over the reference per bucket of target positions (flat, scored order)."""
    rows = []
    for lo, hi in BUCKETS:
        idx = [i for i, p in enumerate(positions) if p >= lo and (hi is None or p <= hi)]
        if idx:
            rows.append({"positions": bucket_label(lo, hi), "tokens": len(idx),
                         "increase": _mean(full[i] - ref[i] for i in idx),
                         "increase_sink_kept": _mean(kept[i] - ref[i] for i in idx)})
    total = _mean(f - r for f, r in zip(full, ref))
    kept_total = _mean(k - r for k, r in zip(kept, ref))
    recovered = (total - kept_total) / total if total and total > 0 else None
    return {"buckets": rows, "increase": total, "increase_sink_kept": kept_total, "recovered": recovered,
            "definition": "NLL (nats) of each scored target token, candidate minus reference, averaged over the "
                          "tokens at those positions; position 0 is the sink (never a target)"}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def layer_view(full: list[float], per_layer: dict[int, list[float]], n_scored: list[int],
               whole: float) -> list[dict[str, Any]]:
    """``d_sink`` split by layer: per block, NLL/token(full) - NLL/token(sink kept at that block only)."""
    from quantsink.measure.paired import paired_t

    rows = []
    for layer, nll in per_layer.items():
        res = paired_t(nll, full, n_scored)
        rows.append({"layer": layer, "d_sink": res["delta"], "ci95": res["ci"],
                     "share": res["delta"] / whole if whole and whole > 0 else None})
    return rows


# --------------------------------------------------------------------------- summary (pure)


def summary(view: dict[str, Any]) -> str:
    """A few plain sentences from an explain view."""
    lines = [_sites_sentence(view["sites"], view.get("d_sink"))]
    if view.get("positions"):
        lines.append(_positions_sentence(view["positions"], view.get("d_sink")))
    if view.get("layers"):
        lines.append(_layers_sentence(view["layers"]))
    return " ".join(line for line in lines if line)


def _sites_sentence(sites: dict[str, Any], d_sink: dict[str, Any] | None = None) -> str:
    if sites["set_by_sink"] and _sink_harmless(d_sink):
        lo, hi = d_sink["ci95"]
        return (f"The extreme tokens' range exceeds the ordinary tokens' at {len(sites['set_by_sink'])} of "
                f"{len(sites['rows'])} quantized sites, but keeping the sink in full precision changes the NLL by "
                f"{d_sink['nats_per_token']:.3g} [{lo:.3g}, {hi:.3g}] nats/token: the sink does not measurably "
                f"set this run's damage.")
    if sites["note"] and not sites["set_by_sink"]:
        return sites["note"][0].upper() + sites["note"][1:] + "."
    n, rows = len(sites["set_by_sink"]), sites["rows"]
    if not rows:
        return "The record has no per-site activation ranges (stats off)."
    if not n:
        return (f"No quantized site has its per-tensor scale set by the extreme tokens (largest range ratio "
                f"{rows[0]['ratio'] or 0:.3g}x at {rows[0]['site']}).")
    top = rows[0]
    return (f"The per-tensor scale of {n} of {len(rows)} quantized sites is set by the extreme tokens (range >= "
            f"{SCALE_RATIO:g}x the ordinary tokens'); worst {top['site']}: {top['absmax']:.4g} vs "
            f"{top['absmax_without_extreme']:.4g} without them, so ordinary tokens there get a "
            f"{top['ratio']:.3g}x coarser step ({top.get('bits_lost') or 0:.1f} bits lost).")


def _sink_harmless(d_sink: dict[str, Any] | None) -> bool:
    """d_sink measured and its interval holds 0: the sink's scale does not measurably cost anything."""
    ci = (d_sink or {}).get("ci95")
    return bool(ci) and ci[0] is not None and ci[1] is not None and ci[0] <= 0.0 <= ci[1]


def _positions_sentence(pos: dict[str, Any], d_sink: dict[str, Any] | None) -> str:
    parts = [f"NLL +{b['increase']:.3g} nats at positions {b['positions']}" for b in pos["buckets"]]
    text = f"The candidate raises the per-token NLL by {pos['increase']:.3g} nats on average ({'; '.join(parts)})."
    if pos["recovered"] is not None:
        text += (f" Keeping the sink (position 0) in full precision at every quantizer recovers "
                 f"{100 * pos['recovered']:.0f}% of that increase")
        text += f" (d_sink {d_sink['nats_per_token']:.3g} nats/token)." if d_sink else "."
    return text


def _layers_sentence(layers: list[dict[str, Any]]) -> str:
    ranked = sorted(layers, key=lambda r: -r["d_sink"])[:3]
    items = ", ".join(f"layer {r['layer']} ({r['d_sink']:.3g}" + (f", {100 * r['share']:.0f}%" if r["share"] is not None
                                                                  else "") + ")" for r in ranked)
    return f"Keeping the sink in full precision in one layer at a time, the layers that matter most: {items}."


# --------------------------------------------------------------------------- measuring (runs passes)


@dataclass
class Scope:
    """Which blocks' quantizers keep the sink in full precision (``None`` = every block)."""

    layers: set[int] | None = None

    def keeps(self, layer: int | None) -> bool:
        return self.layers is None or layer in self.layers


class ScopedKeep:
    """A quantizer's ``KeepFp`` seen through a ``Scope``: the keep mask only in the scope's blocks."""

    def __init__(self, keep: Any, layer: int | None, scope: Scope):
        self.keep, self.layer, self.scope = keep, layer, scope

    def tokens(self, x: Any) -> Any:
        return self.keep.tokens(x)

    def rows(self, x: Any) -> Any:
        return self.keep.rows(x) if self.scope.keeps(self.layer) else None


def scope_quantizers(model: Any) -> Scope:
    """Put every activation / KV quantizer of a simulated candidate behind one ``Scope`` (layer by layer)."""
    from quantsink.hooks.sites import find_blocks
    from quantsink.schemes.simulated import ActQuantizer, KVQuantizer

    scope = Scope()
    for i, block in enumerate(find_blocks(model)):
        for module in block.modules():
            if isinstance(module, (ActQuantizer, KVQuantizer)):
                module.keep = ScopedKeep(module.keep, i, scope)
    return scope


def token_nll(model: Any, windows: Any, batch_tokens: int) -> tuple[list[float], list[int], list[int]]:
    """Per scored target token, in window order: (NLL, its position, its window), from the common scorer
    (``measure.passes.run_pass``): the same numbers ``eval`` sums per window."""
    from quantsink.measure.passes import run_pass

    result = run_pass(model, windows, batch_tokens=batch_tokens)
    return token_views(result, windows)


def token_views(result: Any, windows: Any) -> tuple[list[float], list[int], list[int]]:
    win, pos = result.token_positions(windows)
    return result.token_nll.tolist(), pos.tolist(), win.tolist()


def window_sums(values: list[float], windows: list[int], n: int) -> list[float]:
    sums = [0.0] * n
    for v, w in zip(values, windows):
        sums[w] += v
    return sums


class Measurement:
    """The passes behind the position and layer views: reference, candidate, candidate with the sink kept."""

    def __init__(self, config: Any, session: Any = None, progress: Callable[[str], None] = lambda s: None):
        from quantsink.pipeline.run import Session, prepare

        self.progress = progress
        progress("loading the model and the corpus")
        self.prep = prepare(config.replace(stats=True), session or Session())
        if not self.prep.scheme.quantizes_tokens:
            raise UsageError(f"scheme {self.prep.scheme.spec()} quantizes no activations or KV cache: the sink "
                             f"sets no scale and there is no d_sink to split; explain a token-quantizing scheme "
                             f"(e.g. w8a8, w8a8-dyn, kv4) or use --record-only")

    def reference(self) -> tuple[dict[str, Any] | None, list[float], list[int], list[int]]:
        from quantsink.pipeline.run import reference_pass

        self.progress("reference")
        result, _ = reference_pass(self.prep, lambda stage, total: (lambda n: None))
        if result.token_nll is None:  # a reference cached before per-token NLLs were kept
            self.progress("reference (per token)")
            nll, pos, win = token_nll(self.prep.loaded.model, self.prep.windows, self.prep.config.batch_tokens)
            return result.extra.get("stats"), nll, pos, win
        return (result.extra.get("stats"), *token_views(result, self.prep.windows))

    def candidate(self) -> tuple[Any, Scope, Any]:
        from quantsink.pipeline.run import quantized_copy
        from quantsink.schemes import QuantContext

        ctx = QuantContext(calibration=self.prep.mitigations.calibration, keep_fp_positions=SINK)
        model, ctx = quantized_copy(self.prep, ctx)
        return model, scope_quantizers(model), ctx

    def ranges(self, model: Any, scope: Scope, ctx: Any) -> dict[str, dict[Any, tuple[Any, Any]]]:
        """Static ranges with the sink in (``none``) and out (``all``) of every quantizer's calibration."""
        from quantsink.schemes.simulated import ActQuantizer, quantizers

        if not getattr(self.prep.scheme, "needs_calibration", lambda: False)():
            return {}
        acts, out = quantizers(model, ActQuantizer), {}
        for name, layers in (("none", set()), ("all", None)):
            scope.layers = layers
            for q in acts.values():
                q.lo, q.hi = q.lo.new_zeros(()), q.hi.new_zeros(())  # fresh ranges (0 included)
            with self.prep.mitigations.attach(model):
                self.prep.scheme.calibrate(model, ctx)
            out[name] = {q: (q.lo.clone(), q.hi.clone()) for q in acts.values()}
        return out

    def pass_with(self, model: Any, scope: Scope, ranges: dict[str, Any], layers: set[int] | None) -> list[float]:
        """Per-token NLL with the sink kept at the quantizers of ``layers`` (None: all; empty: none)."""
        scope.layers = layers
        for q, (lo, hi) in ranges.get("none", {}).items():
            q.lo, q.hi = ranges["all"][q] if scope.keeps(getattr(q.keep, "layer", None)) else (lo, hi)
        windows = self.prep.mitigations.windows(self.prep.windows)
        with self.prep.mitigations.attach(model):
            nll, _, _ = token_nll(model, windows, self.prep.config.batch_tokens)
        return nll


def n_layers(model: Any) -> int:
    from quantsink.hooks.sites import find_blocks

    return len(find_blocks(model))


def check_layers(layers: Iterable[int] | None, count: int) -> None:
    """Refuse, in one line, block indices the model does not have (None: every block)."""
    bad = sorted(set(layers or ()) - set(range(count)))
    if bad:
        raise UsageError(f"--layers: the model has {count} blocks (0-{count - 1}); {bad[0]} is not one of them"
                         + (f" (nor {len(bad) - 1} more)" if len(bad) > 1 else ""))


def measure(config: Any, layers: Iterable[int] | None = None, *, session: Any = None,
            progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the passes: reference, candidate, candidate with the sink kept everywhere, and (``layers``,
    default every block) the candidate with the sink kept in one block at a time."""
    m = Measurement(config, session, progress)
    check_layers(layers, n_layers(m.prep.loaded.model))  # before any pass
    stats, ref, pos, win = m.reference()
    model, scope, ctx = m.candidate()
    ranges = m.ranges(model, scope, ctx)
    progress("candidate")
    full = m.pass_with(model, scope, ranges, set())
    progress("candidate, sink kept at every quantizer")
    kept = m.pass_with(model, scope, ranges, None)
    chosen = list(range(n_layers(model))) if layers is None else sorted(set(layers))
    per_layer = {}
    for layer in chosen:
        progress(f"candidate, sink kept in layer {layer}")
        per_layer[layer] = m.pass_with(model, scope, ranges, {layer})
    return {"stats": stats, "ref": ref, "positions": pos, "windows": win, "full": full, "kept": kept,
            "per_layer": per_layer, "n_windows": len(m.prep.windows), "protocol": m.prep.protocol,
            "n_layers": n_layers(model)}


def measured_views(data: dict[str, Any]) -> dict[str, Any]:
    """Position and layer views (and the whole d_sink) from ``measure``'s per-token NLLs."""
    from quantsink.measure.paired import paired_t

    n, win = data["n_windows"], data["windows"]
    sums = {k: window_sums(data[k], win, n) for k in ("ref", "full", "kept")}
    scored = [win.count(i) for i in range(n)]
    whole = paired_t(sums["kept"], sums["full"], scored)
    per_layer = {layer: window_sums(v, win, n) for layer, v in data["per_layer"].items()}
    return {"positions": position_view(data["positions"], data["ref"], data["full"], data["kept"]),
            "d_sink": {"nats_per_token": whole["delta"], "ci95": whole["ci"], "n_windows": whole["n_windows"],
                       "method": whole["method"], "measured": "here, on the windows below"},
            "layers": layer_view(sums["full"], per_layer, scored, whole["delta"])}


# --------------------------------------------------------------------------- the whole view


def explain_record(record: Any, *, d_sink: dict[str, Any] | None = None) -> dict[str, Any]:
    """The view of a stored record alone (sites; the stored d_sink when its variant runs are stored)."""
    stats = record.stats.reference if record.stats else None
    view = {"run": _run(record.config, record.model.name, record.run_id), "sites": sites_view(
        (stats or {}).get("linear_inputs"), record.scheme), "positions": None, "layers": None, "d_sink": d_sink}
    view["summary"] = summary(view)
    return view


def explain_measured(config: Any, scheme_record: Any, data: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """The full view from ``measure``'s data (sites from the reference statistics collected there)."""
    view = {"run": _run(config, config.model, run_id), "protocol": data["protocol"],
            "sites": sites_view((data["stats"] or {}).get("linear_inputs"), scheme_record), **measured_views(data)}
    view["summary"] = summary(view)
    return view


def _run(config: Any, model: str, run_id: str | None) -> dict[str, Any]:
    return {"model": model, "corpus": config.corpus, "scheme": config.scheme, "mitigation": config.mitigation,
            "run_id": run_id}


def scheme_record(config: Any) -> Any:
    """The ``SchemeRecord`` a run of ``config`` would store (for the sites view without a record)."""
    from quantsink.records.schema import SchemeRecord
    from quantsink.schemes import parse_scheme

    return SchemeRecord.of(parse_scheme(config.scheme).record(), {})


# --------------------------------------------------------------------------- plot


def plot(view: dict[str, Any]) -> bytes:
    """Per-layer site ranges with and without the extreme tokens, d_sink by layer, NLL increase by position."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (_plot_sites, _plot_layers, _plot_positions) if p(None, view)]
    if not panels:
        raise UsageError("--plot: nothing to plot (the record holds no site ranges, no per-layer d_sink and no "
                         "positions); run explain without --record-only, or on a run recorded with stats")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        panel(ax, view)
    run = view["run"]
    fig.suptitle(f"{run['model']} · {run['scheme']} · {run['mitigation']}: where the damage comes from", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _plot_sites(ax: Any, view: dict[str, Any]) -> bool:
    rows = [r for r in view["sites"]["rows"] if r["layer"] is not None and r["absmax"]]
    if ax is None or not rows:
        return bool(rows)
    layers = sorted({r["layer"] for r in rows})
    top = [max((r["absmax"] for r in rows if r["layer"] == l), default=math.nan) for l in layers]
    low = [max((r["absmax_without_extreme"] or math.nan for r in rows if r["layer"] == l), default=math.nan)
           for l in layers]
    ax.plot(layers, top, "o-", color="#c62828", ms=3, label="all tokens")
    ax.plot(layers, low, "o-", color="#1565c0", ms=3, label="without extreme tokens")
    ax.set(yscale="log", xlabel="layer", ylabel="largest |activation| at a quantized input",
           title="Linear-input range per layer")
    ax.legend(fontsize=7, loc="upper left", frameon=False, bbox_to_anchor=(0, -0.18), ncol=2)
    return True


def _plot_layers(ax: Any, view: dict[str, Any]) -> bool:
    rows = view.get("layers") or []
    if ax is None or not rows:
        return bool(rows)
    xs = [r["layer"] for r in rows]
    ys = [r["d_sink"] for r in rows]
    err = [[y - r["ci95"][0] for y, r in zip(ys, rows)], [r["ci95"][1] - y for y, r in zip(ys, rows)]]
    ax.bar(xs, ys, color="#6a1b9a", yerr=err, capsize=2, ecolor="#555")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="layer whose quantizers keep the sink in full precision", ylabel="d_sink part, nats/token",
           title="d_sink split by layer (95% CI)")
    return True


def _plot_positions(ax: Any, view: dict[str, Any]) -> bool:
    rows = (view.get("positions") or {}).get("buckets") or []
    if ax is None or not rows:
        return bool(rows)
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["increase"] for r in rows], 0.4, color="#c62828", label="scheme")
    ax.bar([i + 0.2 for i in x], [r["increase_sink_kept"] for r in rows], 0.4, color="#2e7d32",
           label="sink kept in full precision")
    ax.set_xticks(list(x), [r["positions"] for r in rows])
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="target position", ylabel="NLL increase over reference, nats", title="Damage by position")
    ax.legend(fontsize=7, loc="upper left", frameon=False, bbox_to_anchor=(0, -0.18), ncol=2)
    return True
