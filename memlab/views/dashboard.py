"""The notebook lab: one ipywidgets widget to set knobs, start and stop runs,
watch them live, and compare them (`Lab.dashboard()`).

How it stays responsive (JUPYTER.md): a run lives in its own child process
(`Lab.run`), the Lab's follower thread hands new events to this dashboard,
and a ticker thread redraws the live chart at most `refresh_hz` times a
second with ONE `batch_update` of ONE FigureWidget (every series is
downsampled first, because a refresh resends whole arrays). Button handlers
only start or signal things and return at once; Stop runs in a thread.

The charts are built from the trace functions of `views/figures.py`, so the
dashboard, `run.plot()`, `lab.compare()` and the HTML report draw the same
series with the same names, colours and units.
"""
import copy
import html
import json
import os
import threading
import time
import warnings

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import knobs as K
from ..models import ModelSpec, ModelSpecError
from ..runs import EVENTS_FILE, SUMMARY_FILE, Run, RunStoreError, Timeline, load_run
from . import figures as F

REFRESH_HZ = 2.0
MAX_POINTS = 400  # per series and refresh: ~15 series x 400 points stays well under IOPub's limits
HISTORY_ROWS = 30
# Charts get a fixed width: a FigureWidget inside a widget box is otherwise drawn
# at plotly.js's 700 px default, which crowds the subplots' labels.
WIDTH = 1100
DEFAULT_STEPS = 30  # long enough to watch (about 0.2 s a step here), short enough for Binder

# The DeepSpeed knobs that matter for host memory, and the run shape, by section.
SECTIONS = (
    ("Parameter offload", (
        "zero_optimization.offload_param.device",
        "zero_optimization.offload_param.buffer_count",
        "zero_optimization.offload_param.buffer_size",
        "zero_optimization.offload_param.max_in_cpu",
        "zero_optimization.offload_param.pin_memory",
    )),
    ("Optimizer offload", (
        "zero_optimization.offload_optimizer.device",
        "zero_optimization.offload_optimizer.buffer_count",
        "zero_optimization.offload_optimizer.pin_memory",
        "zero_optimization.offload_optimizer.pipeline_read",
        "zero_optimization.offload_optimizer.pipeline_write",
    )),
    ("ZeRO-3", (
        "zero_optimization.sub_group_size",
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.stage3_max_live_parameters",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.reduce_bucket_size",
    )),
    ("Async I/O (aio)", (
        "aio.block_size",
        "aio.queue_depth",
        "aio.intra_op_parallelism",
    )),
    ("Allocator", (
        "allocator.DS_PIN_MEMORY_BACKEND",
        "allocator.MALLOC_ARENA_MAX",
        "allocator.malloc_trim",
    )),
    ("Run shape", (
        "run.steps",
        "run.micro_batch",
        "run.seq_len",
        "run.dtype",
        "run.gradient_checkpointing",
    )),
)
PANEL_KNOBS = tuple(name for _, names in SECTIONS for name in names)
# Not worth a row in the history's "differs" column.
HISTORY_IGNORED = frozenset({"run.swap_dir", "run.telemetry", "run.sample_hz"})
BYTE_KNOBS = frozenset({"aio.block_size", "allocator.MALLOC_TRIM_THRESHOLD_"})

STATUS_COLORS = {"ok": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e", "over_budget": "#d62728",
                 "running": "#1f77b4"}

CSS = """
<style>
.memlab-dashboard { font-size: 13px; }
.memlab-dashboard .memlab-section { border: 1px solid #e3e3e3; border-radius: 4px; padding: 4px 8px; }
.memlab-dashboard .memlab-section-title { font-weight: 600; margin: 2px 0 4px 0; }
.memlab-dashboard .memlab-msg { color: #c0392b; font-size: 12px; line-height: 1.25; margin: 0 0 4px 0; }
.memlab-dashboard .memlab-hint { color: #777; font-size: 12px; line-height: 1.25; margin: 0 0 4px 0; }
.memlab-dashboard table.memlab-history { border-collapse: collapse; font-size: 12px; }
.memlab-dashboard table.memlab-history th { text-align: left; border-bottom: 1px solid #bbb; padding: 2px 8px; }
.memlab-dashboard table.memlab-history td { border-bottom: 1px solid #eee; padding: 2px 8px; vertical-align: top; }
.memlab-dashboard table.memlab-history td.num { text-align: right; white-space: nowrap; }
</style>
"""


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


# ---------------------------------------------------------------- live chart

def pool_strip_trace(run, fullest=False):
    """One heatmap: a row per pool, a cell per buffer, coloured by how full it is.
    Live runs show each pool's latest occupancy; `fullest` shows the moment each
    pool was fullest (a finished run's pools end empty)."""
    chosen = {}
    for event in list(run.events):
        if event.get("kind") != "pool":
            continue
        name = event["name"]
        if not fullest or name not in chosen or \
                sum(b[1] for b in event.get("buffers", [])) > sum(b[1] for b in chosen[name].get("buffers", [])):
            chosen[name] = event
    pools = list(chosen.values())
    width = max([len(p.get("buffers", [])) for p in pools] + [0])
    z, custom, y = [], [], []
    largest = max([cap for p in pools for cap, _ in p.get("buffers", [])] + [0])
    divisor, unit = F.bytes_unit(largest)
    for pool in pools:
        buffers = pool.get("buffers", [])
        reserved = sum(b[0] for b in buffers)
        used = sum(b[1] for b in buffers)
        y.append(f"{pool['name']} {used / reserved:.0%}" if reserved else pool["name"])
        pad = [None] * (width - len(buffers))
        z.append([(u / c) if c else 0.0 for c, u in buffers] + pad)
        custom.append([[u / divisor, c / divisor] for c, u in buffers] + [[None, None]] * len(pad))
    digits = F._digits(unit)
    return go.Heatmap(
        z=z, x=list(range(width)), y=[F.escape(v) for v in y], customdata=custom, name="pool fill",
        zmin=0, zmax=1, colorscale="Blues", showscale=False, xgap=3, ygap=3,
        texttemplate="%{z:.0%}" if width <= 12 else None, textfont=dict(size=11),
        hovertemplate=f"%{{y}} buffer %{{x}}: %{{customdata[0]:{digits}}} of %{{customdata[1]:{digits}}} {unit}"
                      " used (%{z:.0%})<extra></extra>",
        hoverongaps=False,
    )


class RunSnapshot:
    """What one refresh draws, read from the run once. A long run's samples are
    first thinned to at most `max_samples`, keeping each bucket's lowest and
    highest RSS and pinned bytes, so a refresh costs about the same after an
    hour as after a minute (the figures then downsample to what is sent)."""

    def __init__(self, run, max_samples=4 * MAX_POINTS):
        events = list(run.events)
        self.run_id, self.knobs, self.summary = run.run_id, run.knobs, run.summary
        self.events = events
        if len({e.get("rank", 0) for e in events}) > 1:
            samples = run.timeline.samples  # the node's sum over ranks
        else:
            samples = [e for e in events if e.get("kind") == "sample"]
        if len(samples) > max_samples:
            keys = [[s.get(k, 0) for s in samples] for k in ("rss", "pinned_reserved", "pinned_used")]
            samples = [samples[i] for i in F.downsample_indices(keys, max_samples)]
        self.timeline = Timeline(samples)
        self.steps = [e for e in events if e.get("kind") == "step" and e.get("rank", 0) == 0]
        self.ranks = sorted({e.get("rank", 0) for e in events}) or [0]
        self._rank_samples = {}
        if len(self.ranks) > 1:  # each rank's own line beside the node's total, thinned like it
            for rank in self.ranks:
                mine = [e for e in events if e.get("kind") == "sample" and e.get("rank", 0) == rank]
                if len(mine) > max_samples:
                    mine = [mine[i] for i in F.downsample_indices([[e["rss"] for e in mine]], max_samples)]
                self._rank_samples[rank] = mine

    def rank_timelines(self):
        return {rank: Timeline(samples) for rank, samples in self._rank_samples.items()}

    @property
    def pools(self):
        latest = {}
        for event in self.events:
            if event.get("kind") == "pool":
                latest[event["name"]] = event
        return latest


MAX_RANK_LINES = 8  # per-rank lines the live chart can show (more ranks: the node's total only)


def _live_traces(traces):
    """The traces the live chart keeps, matched by name at every refresh: the
    node's RSS line is always `rss`; per-rank lines are their own group."""
    out = []
    for trace in traces:
        if trace.name and trace.name.startswith("rss rank"):
            continue
        if trace.name == "rss (node)":
            trace.name = F.RSS
        out.append(trace)
    return out


class LiveChart:
    """One FigureWidget holding every live view of a run, redrawn with one
    `batch_update`: host memory stacked by component (top), pinned reserved vs
    used and fragmentation (middle), step time + loss and the pool strip (bottom)."""

    TITLES = ("Host memory by component", "Pinned buffers: reserved vs used",
              "Pinned fragmentation (1 − used/reserved)", "Step time and loss", "Pool buffers and fill")

    def __init__(self, max_points=MAX_POINTS, height=860, width=WIDTH):
        self.max_points = max_points
        empty = Run("no-run")
        fig = make_subplots(
            rows=3, cols=2, specs=[[{"colspan": 2}, None], [{}, {}], [{"secondary_y": True}, {}]],
            row_heights=[0.46, 0.27, 0.27], vertical_spacing=0.1, horizontal_spacing=0.2,
            subplot_titles=self.TITLES,
        )
        self.groups = {}
        mem, unit = F.memory_traces(empty, max_points)
        self._add(fig, "memory", mem, 1, 1, legend="legend")
        # A multi-rank run's per-rank RSS lines: made up front (the widget keeps
        # its traces), shown when a run has that many ranks.
        start = len(fig.data)
        for rank in range(MAX_RANK_LINES):
            fig.add_trace(go.Scatter(x=[], y=[], name=f"rss rank {rank}", mode="lines", visible=False,
                                     line=dict(width=1.5, dash="dot"), legend="legend"), row=1, col=1)
        self.groups["ranks"] = list(range(start, len(fig.data)))
        pinned, _ = F.pinned_traces(empty, max_points)
        self._add(fig, "pinned", pinned, 2, 1, legend="legend2")
        self._add(fig, "fragmentation", F.fragmentation_traces(empty, max_points), 2, 2, legend="legend2")
        bars, loss = F.step_traces(empty, max_points)
        self._add(fig, "steps", [bars], 3, 1, legend="legend2")
        self._add(fig, "loss", [loss], 3, 1, legend="legend2", secondary_y=True)
        self._add(fig, "pools", [pool_strip_trace(empty)], 3, 2, legend=None)
        for annotation in fig.layout.annotations:  # subplot titles
            annotation.update(font=dict(size=14))
        self.n_titles = len(fig.layout.annotations)
        fig.add_annotation(text="Press Run to start a run; the charts fill while it trains.", xref="x domain",
                           yref="y domain", x=0.5, y=0.5, showarrow=False, font=dict(size=15, color="#888"))
        # What an empty panel waits for, instead of bare placeholder axes.
        self.waiting = {"pinned": ("x2", "no pinned buffer yet"), "fragmentation": ("x3", "nothing reserved yet"),
                        "steps": ("x4", "no step yet"), "pools": ("x5", "no pool yet")}
        self.waiting_index = {}
        for group, (axis, text) in self.waiting.items():
            self.waiting_index[group] = len(fig.layout.annotations)
            fig.add_annotation(text=text, xref=f"{axis} domain", yref=f"{axis.replace('x', 'y')} domain"
                               if group != "pools" else "y6 domain", x=0.5, y=0.5, showarrow=False,
                               font=dict(size=13, color="#999"))
        row2_top = fig.layout.yaxis2.domain[1]
        fig.update_layout(
            template=F.TEMPLATE, height=height, width=width, margin=dict(l=70, r=200, t=40, b=40), hovermode="closest", bargap=0.15,
            legend=dict(title_text="host memory", x=1.02, xanchor="left", y=1, yanchor="top",
                        traceorder="reversed", font=dict(size=12)),
            legend2=dict(x=1.02, xanchor="left", y=row2_top, yanchor="top", font=dict(size=12)),
        )
        self.units = {"memory": unit, "pinned": unit}
        fig.update_xaxes(title_text=F.TIME_AXIS, title_standoff=4, row=1, col=1)
        fig.update_yaxes(title_text=f"host memory ({unit})", rangemode="tozero", row=1, col=1)
        fig.update_xaxes(title_text=F.TIME_AXIS, title_standoff=4, row=2, col=1)
        fig.update_yaxes(title_text=f"pinned ({unit})", rangemode="tozero", row=2, col=1)
        fig.update_xaxes(title_text=F.TIME_AXIS, title_standoff=4, row=2, col=2)
        fig.update_yaxes(tickformat=".0%", range=[0, 1.02], row=2, col=2)
        fig.update_xaxes(title_text="step", title_standoff=4, row=3, col=1)
        fig.update_yaxes(title_text="step time (s)", rangemode="tozero", row=3, col=1, secondary_y=False)
        fig.update_yaxes(title_text="loss", showgrid=False, row=3, col=1, secondary_y=True)
        fig.update_xaxes(title_text="buffer", title_standoff=4, dtick=1, showgrid=False, row=3, col=2)
        fig.update_yaxes(showgrid=False, autorange="reversed", row=3, col=2)
        self.widget = go.FigureWidget(fig)
        self.widget.add_class("memlab-live-chart")
        self.refreshes = 0

    def _add(self, fig, group, traces, row, col, legend, secondary_y=False):
        start = len(fig.data)
        for trace in _live_traces(traces):
            if legend is not None:
                trace.update(legend=legend)
            if group in ("pinned", "fragmentation") and trace.name == F.STEPS:
                trace.update(showlegend=False)  # the memory chart's entry stands for all three
            trace.update(legendgroup=F.STEPS if trace.name == F.STEPS else trace.name)
            if secondary_y:
                fig.add_trace(trace, row=row, col=col, secondary_y=True)
            else:
                fig.add_trace(trace, row=row, col=col)
        self.groups[group] = list(range(start, len(fig.data)))

    def traces(self, run, fullest_pools=False):
        """group -> fresh traces for `run` (in the order of the figure's)."""
        mp = self.max_points
        mem, unit = F.memory_traces(run, mp)
        pinned, punit = F.pinned_traces(run, mp)
        bars, loss = F.step_traces(run, mp)
        return {
            "memory": mem, "pinned": pinned, "fragmentation": F.fragmentation_traces(run, mp),
            "steps": [bars], "loss": [loss], "pools": [pool_strip_trace(run, fullest=fullest_pools)],
        }, {"memory": unit, "pinned": punit}

    def update(self, run, final=False):
        """Redraw from `run` (a Run or a RunSnapshot) with one batched update."""
        if not isinstance(run, RunSnapshot):
            run = RunSnapshot(run)
        fresh, units = self.traces(run, fullest_pools=final)
        fig = self.widget
        empty = not len(run.timeline)
        with fig.batch_update():
            lines = {t.name: t for t in fresh["memory"] if t.name and t.name.startswith("rss rank")}
            for index in self.groups["ranks"]:
                target = fig.data[index]
                line = lines.get(target.name)
                if line is not None:
                    target.x, target.y, target.visible = line.x, line.y, True
                elif target.visible:
                    target.visible = False
            for group, traces in fresh.items():
                by_name = {t.name: t for t in _live_traces(traces)}
                for index in self.groups[group]:
                    target = fig.data[index]
                    trace = by_name.get(target.name)
                    if trace is None:
                        continue
                    keys = ("x", "y", "text", "z", "customdata") if group == "pools" else ("x", "y", "text")
                    if group == "pools" and target.hovertemplate != trace.hovertemplate:
                        keys += ("hovertemplate",)
                    for key in keys:
                        value = getattr(trace, key, None)
                        if key == "text" and group != "pools" and trace.name != F.STEPS:
                            continue
                        setattr(target, key, value)
                    if group in ("memory", "pinned") and units[group] != self.units[group]:
                        target.hovertemplate = trace.hovertemplate
            if units["memory"] != self.units["memory"]:
                fig.layout.yaxis.title.text = f"host memory ({units['memory']})"
            if units["pinned"] != self.units["pinned"]:
                fig.layout.yaxis2.title.text = f"pinned ({units['pinned']})"
            self.units.update(units)
            fig.layout.annotations[self.n_titles].visible = empty
            waiting = {"pinned": not any(run.timeline.pinned_reserved), "steps": not run.steps,
                       "pools": not any(e.get("kind") == "pool" for e in run.events)}
            waiting["fragmentation"] = waiting["pinned"]
            for group, axes in (("pinned", ("xaxis2", "yaxis2")), ("fragmentation", ("xaxis3", "yaxis3")),
                                ("steps", ("xaxis4", "yaxis4", "yaxis5")), ("pools", ("xaxis5", "yaxis6"))):
                fig.layout.annotations[self.waiting_index[group]].visible = waiting[group] and not empty
                for axis in axes:
                    fig.layout[axis].showticklabels = not waiting[group]
            steps = len(run.steps)
            fig.layout.xaxis4.dtick = 1 if steps <= 12 else None
            fig.data[self.groups["pools"][0]].texttemplate = "%{z:.0%}" if len(fig.data[
                self.groups["pools"][0]].x or ()) <= 12 else None
            fig.layout.annotations[4].text = "Pool buffers and fill" + (
                " (each pool at its fullest)" if final else " (latest)")
        self.refreshes += 1
        if final:
            self.persist()

    def persist(self):
        """Store the figure as it is now in the widget's synced state, so a saved
        notebook (nbclient, JupyterLab) keeps the data: FigureWidget syncs its full
        state only on display, later edits travel as update messages (plotly does
        the same in `_repr_mimebundle_`)."""
        fig = self.widget
        fig._widget_layout = copy.deepcopy(fig._layout_obj._props)
        fig._widget_data = copy.deepcopy(fig._data)

    def points(self):
        """Points in the memory chart's RSS line (what the browser test counts too)."""
        rss = next(t for t in self.widget.data if t.name == F.RSS)
        return len(rss.x or ())


# ---------------------------------------------------------------- knob panel

def preset_choices():
    """(label, name) of every preset, smallest first, labelled with its size so
    nobody starts a 70B run by accident."""
    out = []
    for name in ModelSpec.presets():
        try:
            n = ModelSpec.resolve(name).num_params
        except (ModelSpecError, OSError, ValueError):
            continue
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        out.append((n, f"{name} ({size} params)", name))
    out.sort()
    return [(label, name) for _, label, name in out]


class KnobField:
    """A knob's control, and the message line right under it."""

    def __init__(self, name, spec=None, choices=None, description=None, value=None):
        self.name = name
        self.spec = spec
        doc = description or (spec.doc if spec else "")
        # The section says where a knob lives; the label is its last name part, the tooltip its full name.
        label = W.HTML(f"<span title='{html.escape(name)}: {html.escape(doc)}'>{html.escape(name.split('.')[-1])}"
                       "</span>", layout=W.Layout(width="190px"))
        if choices is not None:
            wide = max(len(str(label)) for label, *_ in choices) > 16 if isinstance(choices[0], tuple) else False
            self.control = W.Dropdown(options=choices, value=value,
                                      layout=W.Layout(width="135px" if not wide else "170px"))
        elif spec.kind == "bool":
            self.control = W.Checkbox(value=bool(value), indent=False, layout=W.Layout(width="135px"))
        elif spec.kind == "choice":
            options = list(spec.choices) if not spec.optional else [("(default)", None)] + list(spec.choices)
            self.control = W.Dropdown(options=options, value=value, layout=W.Layout(width="135px"))
        else:
            self.control = W.Text(value="" if value is None else str(value), layout=W.Layout(width="135px"),
                                  continuous_update=False, placeholder="auto" if spec.auto else "")
        self.control.add_class("memlab-knob")
        self.control.add_class("memlab-knob-" + name.replace(".", "-").replace("_", "-"))
        self.message = W.HTML("", layout=W.Layout(margin="0 0 0 4px"))
        self.box = W.VBox([W.HBox([label, self.control]), self.message])

    @property
    def value(self):
        value = self.control.value
        if isinstance(self.control, W.Text):
            value = value.strip()
            if value == "":
                return None
        return value

    @value.setter
    def value(self, value):
        if isinstance(self.control, W.Text):
            self.control.value = "" if value is None else str(value)
        else:
            self.control.value = value

    def show(self, text, kind="msg"):
        new = f"<div class='memlab-{kind}'>{html.escape(text)}</div>" if text else ""
        if self.message.value != new:
            self.message.value = new


def _section(title, fields):
    return W.VBox([W.HTML(f"<div class='memlab-section-title'>{html.escape(title)}</div>")]
                  + [f.box for f in fields], layout=W.Layout(width="auto")).add_class("memlab-section")


# ---------------------------------------------------------------- dashboard

class Dashboard(W.VBox):
    """`Lab.dashboard()`: knob panel, Run/Stop, live chart, run history, comparison.

    Everything a click does is available from code too: `set(...)`,
    `start(...)` (the Run button), `stop()` (the Stop button), `show(run)`.
    """

    def __init__(self, lab, refresh_hz=REFRESH_HZ, max_points=MAX_POINTS, history_rows=HISTORY_ROWS,
                 steps=DEFAULT_STEPS, model=None, show_latest=True):
        if not 0 < refresh_hz <= 4:
            raise ValueError("refresh_hz must be in (0, 4]: the live chart refreshes 1-4 times a second")
        self.lab = lab
        self.interval = 1.0 / refresh_hz
        self.history_limit = history_rows
        self.run = None  # the run the charts show
        self.runs = []  # the history: runs of the store, oldest first
        self._refresh_lock = threading.RLock()
        self._dirty = threading.Event()
        self._syncing = False
        self.switches = dict(K.MEMASCEND_SWITCHES)  # read now: switches register at import of memascend

        # -- knob panel
        presets = preset_choices()
        names = [value for _, value in presets]
        self.model = KnobField("model", choices=presets, value=model if model in names else names[0],
                               description="model preset (an architecture config with random weights)")
        self.config_path = KnobField("config path", K.Knob("config path", None, "path", "", optional=True),
                                     description="a config.json or a checkpoint folder; overrides the preset")
        self.config_path.control.placeholder = "config.json or folder"
        engines = ["deepspeed", "memascend"] + (["custom"] if self.switches else [])
        self.engine = KnobField("engine", choices=engines, value="deepspeed",
                                description="deepspeed: stock behaviour; memascend: every optimization on")
        self.fields = {}
        for name, (stock, optimized) in self.switches.items():
            spec = K.SPEC_BY_NAME.get(name)
            doc = getattr(K, "MEMASCEND_DOCS", {}).get(name) or (spec.doc if spec else "")
            doc = f"{doc} ({stock}: DeepSpeed's behaviour; {optimized}: MemAscend's)".strip()
            self.fields[name] = KnobField(name, spec, choices=[(f"{stock} (DeepSpeed)", stock),
                                                               (f"{optimized} (MemAscend)", optimized)],
                                          value=stock, description=doc)
        defaults = {s.name: s.default for s in K.SPECS}
        defaults["run.steps"] = steps
        for name in PANEL_KNOBS:
            spec = K.SPEC_BY_NAME.get(name)
            if spec is None:
                continue  # a knob this version does not have
            self.fields[name] = KnobField(name, spec, value=defaults[name])
        switch_fields = [self.fields[n] for n in self.switches]
        memascend_note = [] if self.switches else [W.HTML(
            "<div class='memlab-hint'>No MemAscend switch in this version yet: "
            "engine=memascend is refused until one lands.</div>")]
        model_section = W.VBox([W.HTML("<div class='memlab-section-title'>Model and engine</div>"),
                                self.model.box, self.config_path.box, self.engine.box,
                                W.HTML("<div class='memlab-section-title'>MemAscend switches</div>")]
                               + [f.box for f in switch_fields] + memascend_note).add_class("memlab-section")
        sections = [model_section] + [
            _section(title, [self.fields[n] for n in names if n in self.fields]) for title, names in SECTIONS]
        self.panel = W.GridBox(sections, layout=W.Layout(
            grid_template_columns="repeat(auto-fill, minmax(360px, 1fr))", grid_gap="6px 8px", width="100%"))
        self.panel.add_class("memlab-knob-panel")
        for field in self._all_fields():
            field.control.observe(self._on_knob_change, names="value")

        # -- run controls
        self.run_button = W.Button(description="Run", button_style="success", icon="play",
                                   tooltip="start a run with these knobs (in a child process)")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True,
                                    tooltip="stop the run (SIGTERM, then SIGKILL)")
        self.run_button.add_class("memlab-run")
        self.stop_button.add_class("memlab-stop")
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.status = W.HTML("", layout=W.Layout(margin="0 0 0 10px"))
        self.status.add_class("memlab-status")
        self.problem = W.HTML("")
        self.problem.add_class("memlab-problem")

        # -- live chart
        self.chart = LiveChart(max_points=max_points)

        # -- history and comparison
        self.history = W.HTML("")
        self.history.add_class("memlab-history-box")
        self.compare_select = W.SelectMultiple(options=[], rows=5, layout=W.Layout(width="430px"),
                                               description="compare", style={"description_width": "60px"})
        self.compare_select.add_class("memlab-compare-select")
        self.show_select = W.Dropdown(options=[], layout=W.Layout(width="430px"), description="charts show",
                                      style={"description_width": "80px"})
        self.show_select.add_class("memlab-show-select")
        self.compare_box = W.Box([])
        self.compare_select.observe(lambda _: self._draw_comparison(), names="value")
        self.show_select.observe(self._on_show_select, names="value")

        store = html.escape(self.lab.store)
        super().__init__([
            W.HTML(CSS + f"<b style='font-size:15px'>memlab lab</b> &nbsp;<span class='memlab-hint'>"
                         f"run store: <code>{store}</code></span>"),
            self.panel,
            W.HBox([self.run_button, self.stop_button, self.status], layout=W.Layout(align_items="center")),
            self.problem,
            self.chart.widget,
            W.HTML("<b>Run history</b> <span class='memlab-hint'>(from the run store: survives kernel "
                   "restarts)</span>"),
            self.history,
            W.HBox([self.compare_select, self.show_select]),
            self.compare_box,
        ])
        self.add_class("memlab-dashboard")

        self.reload()
        self.validate()
        if show_latest and self.runs:
            self.show(self.runs[-1])
        self._draw_comparison()

    # -- knobs -------------------------------------------------------------
    def _all_fields(self):
        return [self.model, self.config_path, self.engine] + list(self.fields.values())

    def _on_knob_change(self, change):
        if self._syncing:
            return
        self._syncing = True
        try:
            owner = change["owner"]
            if owner is self.engine.control and self.switches and change["new"] in ("deepspeed", "memascend"):
                on = change["new"] == "memascend"
                for name, (stock, optimized) in self.switches.items():
                    self.fields[name].value = optimized if on else stock
            elif self.switches and any(owner is self.fields[n].control for n in self.switches):
                on = [self.fields[n].value == opt for n, (_, opt) in self.switches.items()]
                self.engine.value = "memascend" if all(on) else "deepspeed" if not any(on) else "custom"
        finally:
            self._syncing = False
        self.validate()

    def set(self, values=None, **short):
        """Set knobs in the panel as a user would: dotted names, `model=`, `engine=`,
        `config_path=`, or run-shape keywords (`steps=40`). Returns self."""
        values = dict(values or {})
        for key in ("model", "engine", "config_path"):
            if key in short:
                values[key] = short.pop(key)
        values.update({f"run.{k}": v for k, v in short.items()})
        self._syncing = True
        try:
            for name, value in values.items():
                field = {"model": self.model, "engine": self.engine, "config_path": self.config_path}.get(name) \
                    or self.fields.get(name)
                if field is None:
                    raise K.KnobError(name, value, "not in the dashboard's knob panel")
                if name == "engine" and self.switches and value in ("deepspeed", "memascend"):
                    for sname, (stock, optimized) in self.switches.items():
                        self.fields[sname].value = optimized if value == "memascend" else stock
                field.value = value
        finally:
            self._syncing = False
        self.validate()
        return self

    def request(self):
        """(knob values, model, engine) as the panel says, for `Lab.plan`/`Lab.run`."""
        values = {}
        for name, field in self.fields.items():
            value = field.value
            if value is None and not (field.spec and field.spec.optional):
                value = K.AUTO if field.spec and field.spec.auto else value
            values[name] = value
        model = self.config_path.value or self.model.value
        engine = self.engine.value if self.engine.value != "custom" else None
        return values, model, engine

    def validate(self):
        """Check the panel as it is; put each problem next to its knob. Returns the
        plan (Knobs, ModelSpec, ResolvedKnobs) or None. Nothing is started."""
        values, model, engine = self.request()
        problems = {}
        for name, value in values.items():  # each field on its own: every bad field at once
            try:
                K.Knobs._check(name, value)
            except K.KnobError as exc:
                problems[name] = exc.reason
        plan = None
        general = ""
        if not problems:
            try:
                plan = self.lab.plan(values, model=model, engine=engine)
            except K.KnobError as exc:
                if exc.knob in self.fields or exc.knob == "engine":
                    problems[exc.knob] = f"{exc.reason}" if exc.knob != "engine" else exc.reason
                else:
                    general = str(exc)
            except ModelSpecError as exc:
                problems["config path" if self.config_path.value else "model"] = str(exc)
        for field in self._all_fields():
            if field.name in problems:
                field.show(problems[field.name])
            elif plan is not None and field.spec is not None and field.spec.auto and field.value in (None, K.AUTO):
                field.show(f"auto = {plan[2][field.name]:,} elements", kind="hint")
            else:
                field.show("")
        if problems or general:
            first = general or next(f"{n}: {m}" for n, m in problems.items())
            self.problem.value = (f"<div class='memlab-msg'>Cannot run yet: {html.escape(first)}"
                                  + (f" (and {len(problems) - 1} more, marked above)" if len(problems) > 1 else "")
                                  + "</div>")
        else:
            self.problem.value = ""
        self._plan_ok = plan is not None
        self._set_buttons()
        return plan

    # -- runs ----------------------------------------------------------------
    @property
    def running(self):
        return self.run is not None and self.run._process is not None and not self.run.done

    def _set_buttons(self):
        running = self.running
        self.run_button.disabled = running or not getattr(self, "_plan_ok", False)
        self.stop_button.disabled = not running

    def start(self, values=None, **short):
        """Press Run (after setting any knobs given, like `set`). Returns the live
        Run at once, or None when the panel has a problem (shown next to the knob)."""
        if values or short:
            self.set(values, **short)
        if self.running:
            self.problem.value = "<div class='memlab-msg'>A run is going: stop it first.</div>"
            return None
        plan = self.validate()
        if plan is None:
            return None
        values, model, engine = self.request()
        try:
            run = self.lab.run(values, model=model, engine=engine)
        except (K.KnobError, ModelSpecError, OSError) as exc:
            self.problem.value = f"<div class='memlab-msg'>Could not start: {html.escape(str(exc))}</div>"
            return None
        return self.watch(run)

    def watch(self, run):
        """Follow a live run started elsewhere (`lab.run(...)`) in the charts and history."""
        if run not in self.runs:
            self.runs.append(run)
        self._follow(run)
        self._draw_history()
        return run

    def stop(self):
        """Press Stop: the worker is asked to stop (SIGTERM, then SIGKILL), from a
        thread, so the kernel stays free. Returns the thread (join it to wait)."""
        run = self.run
        if run is None or run.done:
            return None
        self.stop_button.disabled = True
        self.status.value = f"stopping <code>{html.escape(run.run_id)}</code> …"
        thread = threading.Thread(target=run.stop, name=f"memlab-stop-{run.run_id}", daemon=True)
        thread.start()
        return thread

    def _follow(self, run):
        self.run = run
        self._dirty.set()
        run.add_listener(self._on_events)
        self._set_buttons()
        self.status.value = f"starting <code>{html.escape(run.run_id)}</code> …"
        threading.Thread(target=self._tick, args=(run,), name=f"memlab-dashboard-{run.run_id}",
                         daemon=True).start()

    def _on_events(self, run, new_events):
        """Run listener (the Lab's follower thread): mark the chart dirty; at the end, draw it all."""
        if not new_events:
            threading.Thread(target=self._finished, args=(run,), daemon=True).start()
            return
        if run is self.run:
            self._dirty.set()

    def _tick(self, run):
        """At most `refresh_hz` redraws a second, each one batched update, while the run goes."""
        while not run.done and run is self.run:
            time.sleep(self.interval)
            if self._dirty.is_set() and not run.done and run is self.run:
                self._dirty.clear()
                self.refresh()

    def refresh(self, final=False):
        """Redraw the live chart and the status line from the shown run."""
        run = self.run
        if run is None:
            return
        with self._refresh_lock:
            snapshot = RunSnapshot(run)
            self.chart.update(snapshot, final=final)
            self._draw_status(snapshot)

    def _draw_status(self, run):
        e = html.escape
        steps = run.steps
        total = (run.knobs.get("run") or {}).get("steps")
        tl_rss = run.timeline.rss
        rss = F.format_bytes(tl_rss[-1]) if tl_rss else "–"
        if run.summary is None:
            text = (f"<b style='color:{STATUS_COLORS['running']}'>running</b> <code>{e(run.run_id)}</code>: "
                    f"step {len(steps)}/{total or '?'}, RSS {e(rss)}")
        else:
            s = run.summary
            status = s["status"]
            text = (f"<b style='color:{STATUS_COLORS.get(status, '#555')}'>{e(status)}</b> "
                    f"<code>{e(run.run_id)}</code>: {s['steps']} steps, peak RSS "
                    f"{e(F.format_bytes(s['peak_rss_bytes']))}")
            if s.get("error"):
                text += f" — {e(s['error'])}"
        self.status.value = text

    def _finished(self, run):
        if run is self.run:
            self.refresh(final=True)
        self._set_buttons()
        self._draw_history()
        options = [v for _, v in self.compare_select.options]
        if run.summary and run.summary.get("status") in ("ok", "stopped") and run.run_id in options:
            selected = list(self.compare_select.value)
            if run.run_id not in selected:
                self.compare_select.value = tuple(selected[-3:] + [run.run_id])

    def show(self, run):
        """Show a run (live or from the store) in the charts."""
        if run.done and not run.events and os.path.isdir(run.path):  # a history entry: load its events now
            try:
                run = load_run(run.path)
            except (RunStoreError, OSError, ValueError) as exc:
                self.problem.value = f"<div class='memlab-msg'>{html.escape(str(exc))}</div>"
                return
        if run is not self.run:
            self.run = run
        self.refresh(final=run.done)
        if run.run_id in [v for _, v in self.show_select.options] and self.show_select.value != run.run_id:
            self._syncing_show = True
            try:
                self.show_select.value = run.run_id
            finally:
                self._syncing_show = False

    def _on_show_select(self, change):
        if getattr(self, "_syncing_show", False) or change["new"] is None:
            return
        run = next((r for r in self.runs if r.run_id == change["new"]), None)
        if run is not None and run is not self.run and not self.running:
            self.show(run)

    # -- history --------------------------------------------------------------
    def reload(self):
        """Read the run store again (the history survives kernel restarts).
        Finished runs are read from their summary.json only; a run's events are
        loaded when it is shown, so a long history costs little memory."""
        live = {r.run_id: r for r in list(self.runs) + list(self.lab.live) if not r.done}
        self.runs = [live.get(r.run_id, r) for r in stored_runs(self.lab.store)]
        self.runs += [r for r in live.values() if r not in self.runs]
        self._draw_history()
        finished = [r.run_id for r in self.runs if r.done and (r.summary or {}).get("status") in ("ok", "stopped")]
        self.compare_select.value = tuple(v for v in self.compare_select.value if v in finished) or \
            tuple(finished[-3:])

    def history_rows(self):
        return history_rows(self.runs, self.history_limit)

    def _draw_history(self):
        rows = self.history_rows()
        self.history.value = history_html(rows, total=len(self.runs))
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
            if self.run is not None and self.run.run_id in labels:
                self.show_select.value = self.run.run_id
        finally:
            self._syncing_show = False
        self._labels = labels

    def compare_figure(self):
        """The comparison figure of the selected runs (from figures.compare_runs)."""
        chosen = [r for r in self.runs if r.run_id in self.compare_select.value]
        labels = [self._labels.get(r.run_id, r.run_id).split(" ")[0] for r in chosen]
        fig = F.compare_runs(chosen, labels=labels)
        fig.update_layout(title_text="Selected runs compared (# as in the history)", width=WIDTH)
        return fig

    def _draw_comparison(self):
        old = list(self.compare_box.children)
        widget = go.FigureWidget(self.compare_figure())
        self.compare_box.children = [widget]
        for w in old:
            w.close()
        self.compare_chart = widget
