"""The self-contained HTML report of one run, and the plain-text summary table.

The report embeds plotly.js once, inline, so it opens with no network. Every
text that comes from the run is HTML-escaped.
"""
import html
import json
import os

import plotly.offline

from .. import components as C
from ..knobs import flatten
from ..summary import summarize
from . import charts
from . import figures as F

# Summary fields in the order people read them, each with a one-line meaning
# (shared by the HTML report and the CLI table).
FIELDS = (
    ("run_id", "identifier of the run (its folder name)"),
    ("status", "ok, failed, stopped or over_budget"),
    ("engine", "deepspeed (stock behaviour), memascend (all optimizations on) or custom"),
    ("model", "model that was fine-tuned"),
    ("knobs", "the full resolved set of knobs"),
    ("from_auto", "knobs whose value was \"auto\", each with the rule that resolved it"),
    ("steps", "training steps completed"),
    ("peak_rss_bytes", "highest resident memory of the worker process"),
    ("peak_vm_lck_bytes", "highest memory locked in RAM (mlock)"),
    ("peak_pinned_reserved_bytes", "highest bytes reserved in pinned and locked buffers"),
    ("peak_pinned_used_bytes", "highest bytes in use inside those buffers"),
    ("fragmentation_at_peak", "share of pinned bytes reserved but unused when the reservation peaked"),
    ("peak_engine_host_bytes",
     "peak host memory of the offload engine itself (all but framework, runtime, activations, other)"),
    ("components_at_peak", "host memory per component at the moment of peak RSS"),
    ("peak_phase", "the phase of the step in which RSS peaked"),
    ("peak_step", "the step in which RSS peaked"),
    ("step_time_median_s", "median wall time of one training step"),
    ("losses", "training loss of each step"),
    ("swap_read_bytes_per_step", "bytes read from the NVMe swap files per step (mean)"),
    ("swap_write_bytes_per_step", "bytes written to the NVMe swap files per step (mean)"),
    ("error", "why the run did not finish (empty when it did)"),
    ("ranks", "each rank's own peaks (multi-rank runs; the fields above are the node's: peak of the sum)"),
    ("peak_rss_rank", "the rank with the highest peak RSS"),
    ("nodes", "each node's peak RSS, summed over its ranks (multi-rank runs)"),
)
MEANINGS = dict(FIELDS)
# fields a summary may lack: multi-rank ones, and those runs recorded before them lack
OPTIONAL_FIELDS = ("from_auto", "ranks", "peak_rss_rank", "nodes", "peak_phase", "peak_step")


# ------------------------------------------------------------------ values

def _component_lines(at_peak):
    """(component, formatted bytes) in chart order, unknown names last, zeros left out."""
    names = list(C.ALL) + sorted(set(at_peak) - set(C.ALL))
    return [(name, F.format_bytes(at_peak[name]) + (" (outside RSS)" if name in C.OUTSIDE_RSS else ""))
            for name in names if at_peak.get(name)]


def _losses_text(losses):
    values = [f"{x:.4f}" if isinstance(x, (int, float)) else str(x) for x in losses]
    if not values:
        return "–"
    if len(values) <= 4:
        return ", ".join(values)
    return f"{values[0]}, {values[1]} … {values[-1]} ({len(values)} steps)"


def format_value(field, value):
    """One summary value in human units, as plain text (one line; components
    and knobs are summarised here and listed in full elsewhere)."""
    if value is None:
        return "–"
    if field.endswith("_bytes") or field.endswith("_bytes_per_step"):
        return F.format_bytes(value)
    if field == "fragmentation_at_peak":
        return f"{value:.1%}"
    if field.endswith("_s"):
        return f"{value:.2f} s"
    if field == "losses":
        return _losses_text(value)
    if field == "knobs":
        return f"{len(flatten(value))} settings" if isinstance(value, dict) else str(value)
    if field == "from_auto" and isinstance(value, dict):
        return "; ".join(f"{name}: {rule}" for name, rule in sorted(value.items())) or "–"
    if field == "components_at_peak":
        lines = _component_lines(value) if isinstance(value, dict) else []
        return f"{len(lines)} components" if lines else "–"
    if field == "ranks" and isinstance(value, dict):
        return "; ".join(f"rank {rank}: {F.format_bytes(r.get('peak_rss_bytes', 0))} peak RSS, "
                         f"{F.format_bytes(r.get('peak_engine_host_bytes', 0))} engine, {r.get('status')}"
                         for rank, r in value.items())
    if field == "nodes" and isinstance(value, dict):
        return "; ".join(f"{host or 'this node'}: {F.format_bytes(peak)}" for host, peak in value.items())
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _ordered_fields(summary):
    """The known fields in reading order, then any field this code does not know yet."""
    known = [f for f, _ in FIELDS if f in summary or f not in OPTIONAL_FIELDS]
    return known + [f for f in summary if f not in MEANINGS]


# --------------------------------------------------------------- text table

def summary_table_text(summary):
    """The summary as an aligned plain-text table: field, value, meaning.
    Components at peak are listed one per line under their field."""
    rows = []
    for field in _ordered_fields(summary):
        value = summary.get(field)
        rows.append((field, format_value(field, value), MEANINGS.get(field, "")))
        if field == "components_at_peak" and isinstance(value, dict):
            rows += [(f"  {name}", text, "") for name, text in _component_lines(value)]
    width_field = max(len(r[0]) for r in rows)
    # A long value (an error message) pushes only its own meaning right, not every row's.
    width_value = max([len(r[1]) for r in rows if len(r[1]) <= 40] + [len("value")])
    lines = [f"{'field':<{width_field}}  {'value':<{width_value}}  meaning",
             f"{'-' * width_field}  {'-' * width_value}  {'-' * 7}"]
    lines += [f"{f:<{width_field}}  {v:<{width_value}}  {m}".rstrip() for f, v, m in rows]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------- HTML parts

def _e(value):
    return html.escape(str(value))


def _summary_of(run):
    """The run's summary; for a run that has not ended, one made from its events so far."""
    if run.summary is not None:
        return run.summary
    return summarize(run.events, status="running" if run.status == "running" else None)


def _header_html(run, summary):
    model = summary.get("model") or run.model.get("name") or "–"
    status = summary.get("status") or run.status
    items = [("run", summary.get("run_id") or run.run_id), ("status", status),
             ("engine", summary.get("engine") or "–"), ("model", model)]
    facts = "".join(f"<span class='fact'><b>{_e(k)}</b> {_e(v)}</span>" for k, v in items)
    error = summary.get("error")
    error_html = f"<p class='error'><b>error:</b> {_e(error)}</p>" if error else ""
    return (f"<h1>memlab run {_e(summary.get('run_id') or run.run_id)}</h1>"
            f"<p class='facts status-{_e(status)}'>{facts}</p>{error_html}")


def _summary_html(summary):
    rows = []
    for field in _ordered_fields(summary):
        value = summary.get(field)
        if field == "components_at_peak" and isinstance(value, dict) and value:
            lines = _component_lines(value)
            cell = "<br>".join(f"{_e(n)}: {_e(t)}" for n, t in lines) or "–"
        else:
            cell = _e(format_value(field, value))
        css = "value wrap" if field == "error" else "value"  # a long error wraps, numbers never do
        rows.append(f"<tr><td class='field'>{_e(field)}</td><td class='{css}'>{cell}</td>"
                    f"<td class='meaning'>{_e(MEANINGS.get(field, ''))}</td></tr>")
    return ("<h2>Summary</h2><table class='summary'><thead><tr><th>field</th><th>value</th>"
            f"<th>meaning</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def allocation_rows(allocations, frees=()):
    """Allocations grouped by (component, backend): count, freed, requested,
    reserved; components in chart order, unknown ones last."""
    groups = {}
    for event in allocations:
        key = (event.get("component", "?"), event.get("backend", "?"))
        group = groups.setdefault(key, {"count": 0, "freed": 0, "requested": 0, "reserved": 0})
        group["count"] += 1
        group["requested"] += event.get("requested", 0)
        group["reserved"] += event.get("reserved", 0)
    for event in frees:
        key = (event.get("component", "?"), event.get("backend", "?"))
        if key in groups:
            groups[key]["freed"] += 1
    order = {name: i for i, name in enumerate(C.ALL)}
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][0], kv[0][1]))


def _allocations_html(run):
    rows = allocation_rows(run.allocations, [e for e in run.events if e.get("kind") == "free"])
    if not rows:
        return "<h2>Allocations</h2><p class='muted'>no allocation events</p>"
    body = "".join(
        f"<tr><td>{_e(comp)}</td><td>{_e(backend)}</td><td class='num'>{g['count']}</td>"
        f"<td class='num'>{g['freed']}</td><td class='num'>{_e(F.format_bytes(g['requested']))}</td>"
        f"<td class='num'>{_e(F.format_bytes(g['reserved']))}</td></tr>"
        for (comp, backend), g in rows
    )
    total = {k: sum(g[k] for _, g in rows) for k in ("count", "freed", "requested", "reserved")}
    foot = (f"<tr class='total'><td>total</td><td></td><td class='num'>{total['count']}</td>"
            f"<td class='num'>{total['freed']}</td><td class='num'>{_e(F.format_bytes(total['requested']))}</td>"
            f"<td class='num'>{_e(F.format_bytes(total['reserved']))}</td></tr>")
    return ("<h2>Allocations</h2><p class='muted'>every alloc event, grouped by component and backend; "
            "reserved is what the allocator actually took (page or block rounding).</p>"
            "<table class='allocs'><thead><tr><th>component</th><th>backend</th><th>count</th><th>freed</th>"
            f"<th>requested</th><th>reserved</th></tr></thead><tbody>{body}</tbody><tfoot>{foot}</tfoot></table>")


def _knobs_html(summary):
    knobs = summary.get("knobs")
    if not isinstance(knobs, dict) or not knobs:
        return ""
    from_auto = summary.get("from_auto") or {}
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(json.dumps(v))}</td><td class='muted'>{_e(from_auto.get(k, ''))}</td></tr>"
                   for k, v in sorted(flatten(knobs).items()))
    autos = f", {len(from_auto)} from \"auto\"" if from_auto else ""
    return (f"<details><summary>knobs ({len(flatten(knobs))} settings{autos})</summary>"
            f"<table class='knobs'><thead><tr><th>knob</th><th>value</th><th>from \"auto\"</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def _logs_html(run, limit=60):
    """The error's traceback tail and the last log lines, folded away."""
    parts = []
    errors = [e for e in run.events if e.get("kind") == "error"]
    if errors and errors[-1].get("traceback"):
        parts.append(f"<details open><summary>traceback</summary><pre>{_e(errors[-1]['traceback'])}</pre></details>")
    logs = run.logs
    if logs:
        shown = logs[-limit:]
        parts.append(f"<details><summary>log (last {len(shown)} of {len(logs)} lines)</summary>"
                     f"<pre>{_e(chr(10).join(shown))}</pre></details>")
    return "".join(parts)


def _figures_html(run):
    """Every chart of the registry (views/charts.py), in its order."""
    config = {"displaylogo": False, "responsive": True}
    return "".join(
        f"<div class='figure'>{fig.to_html(full_html=False, include_plotlyjs=False, config=config)}</div>"
        for fig in charts.figures(run)
    )


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 18px; margin: 28px 0 8px; }
.facts .fact { display: inline-block; margin-right: 22px; font-size: 15px; }
.facts .fact b { color: #666; font-weight: 600; margin-right: 4px; }
.status-ok .fact:nth-child(2) { color: #2a7d2a; }
.status-failed .fact:nth-child(2), .status-over_budget .fact:nth-child(2) { color: #b22; }
.error { background: #fdecea; border-left: 4px solid #d62728; padding: 8px 12px; white-space: pre-wrap;
         word-break: break-word; }
table { border-collapse: collapse; font-size: 14px; }
th, td { text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid #eee; vertical-align: top; }
th { border-bottom: 2px solid #ccc; }
td.field { font-family: ui-monospace, monospace; white-space: nowrap; }
td.value { white-space: nowrap; } td.value.wrap { white-space: normal; max-width: 420px; word-break: break-word; }
td.meaning { color: #555; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #ccc; }
.muted { color: #777; font-size: 13px; }
details { margin: 12px 0; } summary { cursor: pointer; color: #444; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.figure { margin: 18px 0; }
"""


def render_report(run):
    """The report as one HTML string."""
    summary = _summary_of(run)
    title = f"memlab run {summary.get('run_id') or run.run_id}"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style>"
        # plotly.js inline, once: the report must open with no network.
        f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
        "</head><body><main>"
        f"{_header_html(run, summary)}{_summary_html(summary)}{_knobs_html(summary)}"
        f"{_allocations_html(run)}<h2>Figures</h2>{_figures_html(run)}{_logs_html(run)}"
        "</main></body></html>"
    )


def write_report(run, path):
    """Write the self-contained HTML report of `run` to `path`; returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = render_report(run)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
