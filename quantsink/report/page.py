"""The leaderboard's self-contained HTML page: tables, matrices, ranking, figures inlined.  Everything shown is
escaped."""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Iterable

from quantsink.report.matrix import Matrix, cell_text, matrices, ranking
from quantsink.report.rows import COLUMNS, VERDICT_COLORS, as_number, failure_label, fmt


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff;max-width:1500px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}h3{font-size:14px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0;position:sticky;top:0;user-select:none}table.sortable th{cursor:pointer}
td.t,th.t{text-align:left}td{white-space:nowrap}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
table.sortable tr:nth-child(even){background:#fafafa}.helps{color:#2e7d32;font-weight:600}.hurts{color:#c62828;font-weight:600}
.wrap{overflow-x:auto;max-height:720px}.note{color:#555;font-size:12px;max-width:1100px}figure{margin:12px 0}
img{max-width:100%;border:1px solid #ddd}.fail td{background:#fff3f3;white-space:normal}
table.matrix td{min-width:56px;max-width:120px;white-space:normal}table.matrix td a{color:inherit;text-decoration:none;display:block}
table.matrix th{white-space:normal;max-width:96px;overflow-wrap:anywhere}tr.split td{background:#f6f6f6;font-style:italic}
td.v-helps{background:#c8e6c9}td.v-hurts{background:#ffcdd2}td.v-inconclusive{background:#eeeeee}
td.v-within-noise{background:#efebe9}td.v-lowers-kl{background:#e8f5e9}td.v-raises-kl{background:#ffebee}
td.v-insufficient-data{background:#fff9c4}td.v-not-applicable{background:#fafafa;color:#999}
td.best{outline:2px solid #1b5e20;outline-offset:-2px;font-weight:700}
.key span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #ccc;font-size:12px}
.hide{display:none}details.columns{margin:6px 0 8px;font-size:12px}details.columns label{margin-right:10px;white-space:nowrap}
"""


JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = !th.classList.contains('asc');
    table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
      var nx = parseFloat(x), ny = parseFloat(y);
      if (x === '' && y !== '') return 1; if (y === '' && x !== '') return -1;
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
document.querySelectorAll('details.columns input').forEach(function(box){
  box.addEventListener('change', function(){
    document.querySelectorAll('#leaderboard [data-c="' + box.value + '"]').forEach(function(cell){
      cell.classList.toggle('hide', !box.checked);
    });
  });
});
(function(){  // the 1400 px check (scripts/check_html.py): elements past the viewport's right edge, outside
  var w = document.documentElement.clientWidth, n = 0, first = '';  // the scrolling .wrap (which is itself counted)
  document.querySelectorAll('body *').forEach(function(e){
    if (e.parentElement && e.parentElement.closest('.wrap')) return;
    if (e.getBoundingClientRect().right > w + 0.5) { n++; first = first || e.tagName + '.' + e.className; }
  });
  document.body.setAttribute('data-overflow', n); document.body.setAttribute('data-overflow-first', first);
})();
var sortBy = location.hash.match(/sort=(-?)(\d+)/);  // e.g. leaderboard.html#sort=6, #sort=-6 descending
if (sortBy) {
  var th = document.querySelectorAll('#leaderboard th')[+sortBy[2]];
  if (th) { th.click(); if (sortBy[1]) th.click(); }
}
"""


VISIBLE = ("model", "corpus", "scheme", "engine", "mitigation", "bits", "ppl", "ppl_ratio", "kl", "verdict", "effect",
           "d_sink", "run_id")  # the full table's columns shown by default (the chooser shows the rest)


def _hidden(column: str) -> str:
    return "" if column in VISIBLE else " hide"


def _cell(column: str, value: Any, link: str | None = None) -> str:
    digits = COLUMNS[column][1]
    text = fmt(value, digits)
    sort = value[0] if isinstance(value, tuple) else value
    sort_key = "" if sort is None or (isinstance(sort, float) and math.isnan(sort)) else str(sort)
    cls = ("t" if digits is None else "") + _hidden(column)
    if column == "verdict" and text in VERDICT_COLORS:
        cls += f" {text}"
    body = html.escape(text)
    if link:
        body = f'<a href="{html.escape(link, quote=True)}">{body}</a>'
    return f'<td class="{cls.strip()}" data-c="{column}" data-v="{html.escape(sort_key)}">{body}</td>'


def _anchor(run_id: str) -> str:
    return "run-" + "".join(ch for ch in str(run_id) if ch.isalnum())


def matrix_html(ms: list[Matrix]) -> str:
    """Per model and corpus: scheme x mitigation cells coloured by verdict, ★ on the best that helps;
    each cell links to its run's row in the full table."""
    parts = []
    for m in ms:
        head = "".join(f"<th>{html.escape(x)}</th>" for x in m.mitigations)
        rows = []
        for scheme in m.schemes:
            base = m.baseline.get(scheme) or {}
            cells = "".join(_matrix_cell(m.cells.get((scheme, mit))) for mit in m.mitigations)
            rows.append(f'<tr><td class="t">{html.escape(scheme)}</td>'
                        f'<td>{html.escape(fmt(as_number(base.get("ppl_ratio")), 4))}</td>{cells}</tr>')
        parts.append(f"<h3>{html.escape(m.title)}</h3><table class=\"matrix\"><thead><tr><th class=\"t\">scheme</th>"
                     f"<th>ppl ×ref</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts)


def _matrix_cell(cell: Any) -> str:
    if cell is None:
        return '<td class="none"></td>'
    ci = f" [{fmt(cell.ci[0], 3)}, {fmt(cell.ci[1], 3)}]" if cell.ci and cell.verdict != "not-applicable" else ""
    title = f"{cell.verdict}; Δppl {fmt(cell.delta_ppl, 4)}{ci}"
    cls = f"v-{cell.verdict}" + (" best" if cell.best else "")
    return (f'<td class="{cls}" title="{html.escape(title, quote=True)}"><a href="#{_anchor(cell.run_id)}">'
            f"{html.escape(cell_text(cell))}</a></td>")


def ranking_html(rank: list[dict[str, Any]]) -> str:
    """Ranked per model and corpus, real kernels and simulated ones apart (a split row before each part)."""
    head = ("model", "corpus", "rank", "scheme", "bits", "kernels", "ppl", "ppl ×ref", "KL", "best mitigation")
    rows = []
    for r in rank:
        if r["rank"] == 1:
            label = f"{r['model']} · {r['corpus']}: {r['kernels']} kernels"
            rows.append(f'<tr class="split"><td class="t" colspan="{len(head)}">{html.escape(label)}</td></tr>')
        best = f"{r['best_mitigation']} ({fmt(r['best_delta_ppl'], 3)})" if r["best_mitigation"] else ""
        cells = [(r["model"], "t"), (r["corpus"], "t"), (str(r["rank"]), ""), (r["scheme"], "t"), (r["bits"], "t"),
                 (r["kernels"], "t"), (fmt(r["ppl"], 4), ""), (fmt(r["ppl_ratio"], 4), ""), (fmt(r["kl"], 3), ""),
                 (best, "t")]
        tds = "".join(f'<td class="{c}">{html.escape(v)}</td>' for v, c in cells)
        rows.append(f'<tr>{tds}</tr>')
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table id="ranking"><thead><tr>{heads}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def chooser_html() -> str:
    boxes = "".join(f'<label><input type="checkbox" value="{c}"{" checked" if c in VISIBLE else ""}> '
                    f"{html.escape(COLUMNS[c][0])}</label>" for c in COLUMNS)
    return f'<details class="columns"><summary>Columns ({len(VISIBLE)} of {len(COLUMNS)} shown)</summary>{boxes}</details>'


def _key_html() -> str:
    spans = "".join(f'<span class="v-{v}" style="background:{BG[v]}">{v}</span>' for v in BG)
    return f'<p class="key note">Cell colour = verdict: {spans} ★ = the best mitigation that helps.</p>'


BG = {"helps": "#c8e6c9", "hurts": "#ffcdd2", "inconclusive": "#eeeeee", "insufficient-data": "#fff9c4",
      "not-applicable": "#fafafa"}


def full_table_html(frame: Any, links: dict[str, str]) -> str:
    head = "".join(f'<th class="{("t" if COLUMNS[c][1] is None else "") + _hidden(c)}" data-c="{c}">'
                   f"{html.escape(COLUMNS[c][0])}</th>" for c in COLUMNS)
    body = "\n".join(f'<tr id="{_anchor(r["run_id"])}">' + "".join(
        _cell(c, r[c], links.get(r["run_id"]) if c == "run_id" else None) for c in COLUMNS) + "</tr>"
        for r in frame.to_dict(orient="records"))
    return (chooser_html() + f'<div class="wrap"><table class="sortable" id="leaderboard"><thead><tr>{head}</tr>'
            f"</thead><tbody>\n{body}\n</tbody></table></div>")


def to_html(frame: Any, images: dict[str, bytes | None], failures: list[dict[str, Any]],
            skipped: list[str], superseded: int, links: dict[str, str] | None = None,
            notes: Iterable[str] = ()) -> str:
    rows = frame.to_dict(orient="records") if len(frame) else []
    ms, rank = matrices(rows), ranking(rows)
    protocols = "; ".join(sorted(set(frame["protocol"]))) if len(frame) else "no records"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
        "<title>quantsink leaderboard</title>", f"<style>{CSS}</style></head><body>",
        "<h1>quantsink leaderboard</h1>",
        f'<p class="note">{len(frame)} runs. Protocol: {html.escape(protocols)}.</p>',
        "<h2>Which mitigation helps which scheme</h2>",
        '<p class="note">Each cell: Δppl of the scheme with that mitigation minus the unmitigated scheme, on the '
        "same windows, and (in brackets) the share of the scheme's damage it recovered, -Δppl / (unmitigated ppl - "
        "reference ppl): 100% = back to the reference, comparable across models. Columns are in one order on every "
        "panel. (Paired 95% interval over windows: hover a cell.) helps / hurts only when the "
        "interval clears the measured noise floor; insufficient-data below the minimum number of windows; n/a when "
        "the mitigation changed nothing. ppl ×ref = unmitigated perplexity / reference perplexity.</p>",
        _key_html(), matrix_html(ms) or '<p class="note">No mitigated runs with a verdict in these records.</p>',
        "<h2>Schemes ranked by perplexity ratio</h2>",
        '<p class="note">Unmitigated schemes; bits = weight / activation / KV-cache bits (float parts at the run\'s '
        "dtype); kernels: simulated (fake quantization) or real (a quantization library's kernels), ranked apart.</p>",
        ranking_html(rank),
        "<h2>All runs</h2>",
        '<p class="note">Click a column header to sort; choose columns below; each run id links to its record. '
        "sink = mean attention on key 0 over layers and heads; drain = mean value-state drain; peak = largest "
        "residual-state peak ratio over layers; d_sink = NLL/token with the sink quantized minus kept in full "
        "precision.</p>",
        full_table_html(frame, links or {}),
        _failures_html(failures), _notes_html(skipped, superseded, notes), "<h2>Plots</h2>",
    ]
    for title, png in images.items():
        if png is None:
            parts.append(f'<h3>{html.escape(title)}</h3><p class="note">No data for this plot in these records.</p>')
        else:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f'<figure><h3>{html.escape(title)}</h3><img alt="{html.escape(title, quote=True)}" '
                         f'src="data:image/png;base64,{data}"></figure>')
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def _failures_html(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return ""
    rows = "".join(f'<tr class="fail"><td class="t">{html.escape(failure_label(f))}</td>'
                   f'<td class="t">{html.escape(str(f.get("error_type", "")))}</td>'
                   f'<td class="t">{html.escape(str(f.get("error", "")))}</td></tr>' for f in failures)
    return (f"<h2>Failed runs ({len(failures)})</h2><p class=\"note\">Recorded as &lt;run_id&gt;.failed; "
            f"the next sweep retries them.</p><table id=\"failed\"><thead><tr><th>run</th><th>error type</th>"
            f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>")


def _notes_html(skipped: list[str], superseded: int, environments: Iterable[str] = ()) -> str:
    notes = [f"environment: {e}" for e in environments] + [f"skipped: {s}" for s in skipped]
    if superseded:
        notes.append(f"{superseded} older record(s) superseded by newer runs of the same row")
    return "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
