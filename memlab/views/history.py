"""The dashboard's run history: the runs of the store as a table (the knobs
that differ from the first, peaks, fragmentation, step time, status), the
picker of the run the charts show, and the comparison of the runs selected.

It is read from the run store, so it survives a kernel restart; finished runs
are read from their summary.json only, their events when they are shown.
"""
import html
import json
import os
import warnings

import ipywidgets as W
import plotly.graph_objects as go

from ..runs import EVENTS_FILE, SUMMARY_FILE, Run, RunStoreError, load_run
from . import figures as F
from .live_chart import WIDTH

HISTORY_ROWS = 30
# Not worth a row in the history's "differs" column.
HISTORY_IGNORED = frozenset({"run.swap_dir", "run.telemetry", "run.sample_hz"})
BYTE_KNOBS = frozenset({"aio.block_size", "allocator.MALLOC_TRIM_THRESHOLD_", "allocator.MALLOC_MMAP_THRESHOLD_"})

STATUS_COLORS = {"ok": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e", "over_budget": "#d62728",
                 "running": "#1f77b4"}
COMPARABLE = ("ok", "stopped")  # the statuses whose runs the comparison selects by itself


def short_knob(name):
    """Knob names as people say them: without the `zero_optimization.` and `run.` prefixes."""
    for prefix in ("zero_optimization.", "run."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def flat_knobs(nested, prefix=""):
    """Nested knobs (as in a summary) to dotted names; `engine` stays as it is."""
    out = {}
    for key, value in (nested or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_knobs(value, name + "."))
        else:
            out[name] = value
    return out


def _show_value(name, value):
    if name in BYTE_KNOBS and isinstance(value, int) and not isinstance(value, bool):
        return F.format_bytes(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def knob_differences(summary, baseline):
    """'name=value' for each knob (and the model) where `summary` differs from `baseline`."""
    mine, base = flat_knobs(summary.get("knobs")), flat_knobs(baseline.get("knobs"))
    out = []
    if summary.get("model") != baseline.get("model"):
        out.append(f"model={summary.get('model')}")
    for name in mine:
        if name in HISTORY_IGNORED or mine[name] == base.get(name):
            continue
        out.append(f"{short_knob(name)}={_show_value(name, mine[name])}")
    return out


def stored_runs(store):
    """Every run of the store, oldest first, as light Runs holding only their
    summary (what the history and the comparison need); a run without a summary
    (its parent died) is rebuilt from its events."""
    found = []
    for name in sorted(os.listdir(store)) if os.path.isdir(store) else []:
        path = os.path.join(store, name)
        if not os.path.isfile(os.path.join(path, EVENTS_FILE)):
            continue
        try:
            with open(os.path.join(path, SUMMARY_FILE)) as f:
                found.append(Run(path, summary=json.load(f)))
            continue
        except (OSError, ValueError):
            pass
        try:
            found.append(load_run(path))
        except (RunStoreError, OSError, ValueError) as exc:
            warnings.warn(f"memlab: skipping {path}: {exc}")
    return found


def history_rows(runs, limit=HISTORY_ROWS):
    """The run history as plain rows (newest last): the knobs that differ from the
    first run listed, peak RSS, peak engine host bytes, fragmentation, step time, status."""
    runs = list(runs)[-limit:] if limit else list(runs)
    rows = []
    baseline = None
    for number, run in enumerate(runs, start=1):
        summary = run.summary or {}
        knobs_view = {"knobs": run.knobs or summary.get("knobs") or {}, "model": run.model.get("name")
                      or summary.get("model")}
        if baseline is None:
            baseline = knobs_view
        rows.append({
            "number": number,
            "run_id": run.run_id,
            "status": run.status if run.summary is None else summary.get("status"),
            "model": knobs_view["model"],
            "engine": (run.knobs or {}).get("engine") or summary.get("engine"),
            "differs": knob_differences(knobs_view, baseline) if number > 1 else [],
            "steps": summary.get("steps", len(run.steps)),
            "peak_rss_bytes": summary.get("peak_rss_bytes"),
            "peak_engine_host_bytes": summary.get("peak_engine_host_bytes"),
            "fragmentation_at_peak": summary.get("fragmentation_at_peak"),
            "step_time_median_s": summary.get("step_time_median_s"),
            "error": summary.get("error"),
        })
    return rows


def history_html(rows, total=None):
    e = html.escape
    head = ("<tr><th>#</th><th>run</th><th>status</th><th>model</th><th>engine</th>"
            "<th>knobs that differ from #1</th><th>steps</th><th>peak RSS</th><th>peak engine host</th>"
            "<th>fragmentation</th><th>step time</th></tr>")
    body = []
    for r in rows:
        status = r["status"] or "–"
        color = STATUS_COLORS.get(status, "#555")
        title = f" title='{e(r['error'])}'" if r.get("error") else ""
        frag = r["fragmentation_at_peak"]
        step = r["step_time_median_s"]
        body.append(
            f"<tr><td>{r['number']}</td><td><code>{e(r['run_id'])}</code></td>"
            f"<td style='color:{color};font-weight:600'{title}>{e(status)}</td><td>{e(str(r['model']))}</td>"
            f"<td>{e(str(r['engine']))}</td><td>{e(', '.join(r['differs'])) or '–'}</td>"
            f"<td class='num'>{r['steps']}</td>"
            f"<td class='num'>{e(F.format_bytes(r['peak_rss_bytes']))}</td>"
            f"<td class='num'>{e(F.format_bytes(r['peak_engine_host_bytes']))}</td>"
            f"<td class='num'>{'–' if frag is None else f'{frag:.1%}'}</td>"
            f"<td class='num'>{'–' if step is None else f'{step:.2f} s'}</td></tr>")
    more = ""
    if total is not None and total > len(rows):
        more = f"<div class='memlab-hint'>showing the {len(rows)} latest of {total} runs in the store</div>"
    if not rows:
        return "<div class='memlab-hint'>No runs in the store yet: press Run.</div>"
    return f"<table class='memlab-history'>{head}{''.join(body)}</table>{more}"


class History:
    """The history's widgets and the runs they list. `table` is the history
    table, `show_select` the run the charts show (picking one calls
    `on_pick(run)`), `compare_select` the runs compared in `compare_box`
    (`compare_chart` is its FigureWidget)."""

    def __init__(self, limit=HISTORY_ROWS, on_pick=lambda run: None):
        self.limit = limit
        self.on_pick = on_pick
        self.runs = []  # the runs of the store, oldest first
        self._labels = {}
        self._syncing_show = False
        self.compare_chart = None
        self.table = W.HTML("")
        self.table.add_class("memlab-history-box")
        self.compare_select = W.SelectMultiple(options=[], rows=5, layout=W.Layout(width="430px"),
                                               description="compare", style={"description_width": "60px"})
        self.compare_select.add_class("memlab-compare-select")
        self.show_select = W.Dropdown(options=[], layout=W.Layout(width="430px"), description="charts show",
                                      style={"description_width": "80px"})
        self.show_select.add_class("memlab-show-select")
        self.compare_box = W.Box([])
        self.compare_select.observe(lambda _: self.draw_comparison(), names="value")
        self.show_select.observe(self._on_show_select, names="value")

    def reload(self, store, live=(), shown=None):
        """Read the run store again; `live` runs (not done) stand in for their stored copies."""
        live = {r.run_id: r for r in list(self.runs) + list(live) if not r.done}
        self.runs = [live.get(r.run_id, r) for r in stored_runs(store)]
        self.runs += [r for r in live.values() if r not in self.runs]
        self.draw(shown)
        finished = [r.run_id for r in self.runs if r.done and (r.summary or {}).get("status") in COMPARABLE]
        self.compare_select.value = tuple(v for v in self.compare_select.value if v in finished) or \
            tuple(finished[-3:])

    def rows(self):
        return history_rows(self.runs, self.limit)

    def draw(self, shown=None):
        """Redraw the table and both pickers; `shown` is the run the charts show."""
        rows = self.rows()
        self.table.value = history_html(rows, total=len(self.runs))
        labels = {r["run_id"]: f"#{r['number']} {r['run_id']} ({r['status']})" for r in rows}
        options = [(labels[r.run_id], r.run_id) for r in self.runs if r.run_id in labels]
        finished = [o for o in options if (next(r for r in self.runs if r.run_id == o[1]).summary or {})]
        keep = tuple(v for v in self.compare_select.value if v in dict((v, k) for k, v in finished))
        if self.compare_select.options != tuple(finished):
            self.compare_select.options = finished
            self.compare_select.value = keep
        self._syncing_show = True
        try:
            if tuple(self.show_select.options) != tuple(options):
                self.show_select.options = options
            if shown is not None and shown.run_id in labels:
                self.show_select.value = shown.run_id
        finally:
            self._syncing_show = False
        self._labels = labels

    def mark_shown(self, run):
        """Point the "charts show" picker at `run` (without picking it again)."""
        if run.run_id in [v for _, v in self.show_select.options] and self.show_select.value != run.run_id:
            self._syncing_show = True
            try:
                self.show_select.value = run.run_id
            finally:
                self._syncing_show = False

    def _on_show_select(self, change):
        if self._syncing_show or change["new"] is None:
            return
        run = next((r for r in self.runs if r.run_id == change["new"]), None)
        if run is not None:
            self.on_pick(run)

    def select_finished(self, run):
        """A run that just finished well joins the comparison (with the three latest selected)."""
        options = [v for _, v in self.compare_select.options]
        if run.summary and run.summary.get("status") in COMPARABLE and run.run_id in options:
            selected = list(self.compare_select.value)
            if run.run_id not in selected:
                self.compare_select.value = tuple(selected[-3:] + [run.run_id])

    def compare_figure(self):
        """The comparison figure of the selected runs (from figures.compare_runs)."""
        chosen = [r for r in self.runs if r.run_id in self.compare_select.value]
        labels = [self._labels.get(r.run_id, r.run_id).split(" ")[0] for r in chosen]
        fig = F.compare_runs(chosen, labels=labels)
        fig.update_layout(title_text="Selected runs compared (# as in the history)", width=WIDTH)
        return fig

    def draw_comparison(self):
        old = list(self.compare_box.children)
        widget = go.FigureWidget(self.compare_figure())
        self.compare_box.children = [widget]
        for w in old:
            w.close()
        self.compare_chart = widget
