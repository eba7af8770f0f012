"""The dashboard's live chart: one FigureWidget holding every chart of the
registry (`views/charts.py`) that has a `panel`, redrawn with ONE
`batch_update` per refresh (one message to the browser, however many series).

Every series is downsampled to `max_points` first, because a refresh resends
whole arrays; a RunSnapshot reads the run once per refresh and thins a long
run's samples, so a refresh costs about the same after an hour as after a
minute. When to refresh (at most `refresh_hz` a second) is the dashboard's.
"""
import copy

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..runs import Run, Timeline
from . import charts
from . import figures as F

MAX_POINTS = 400  # per series and refresh: ~15 series x 400 points stays well under IOPub's limits
# Charts get a fixed width: a FigureWidget inside a widget box is otherwise drawn
# at plotly.js's 700 px default, which crowds the subplots' labels.
WIDTH = 1100
MAX_RANK_LINES = 8  # per-rank lines the live chart can show (more ranks: the node's total only)
RANK_LINE = "rss rank"


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


def _live_traces(traces):
    """The traces the live chart keeps, matched by name at every refresh: the
    node's RSS line is always `rss`; per-rank lines are their own group."""
    out = []
    for trace in traces:
        if trace.name and trace.name.startswith(RANK_LINE):
            continue
        if trace.name == "rss (node)":
            trace.name = F.RSS
        out.append(trace)
    return out


def _data_keys(trace):
    """What a refresh copies into a trace: its data (step boundaries carry their step index in text)."""
    if trace.type == "heatmap":
        return ("x", "y", "text", "z", "customdata", "texttemplate")
    return ("x", "y", "text") if trace.name == F.STEPS else ("x", "y")


def _grid(live):
    """make_subplots' specs and row heights for the charts' panels."""
    rows = max(c.panel.row for c in live)
    cols = max(c.panel.col + c.panel.colspan - 1 for c in live)
    specs = [[None] * cols for _ in range(rows)]
    heights = [0.0] * rows
    for c in live:
        p = c.panel
        specs[p.row - 1][p.col - 1] = dict({"colspan": p.colspan} if p.colspan > 1 else {},
                                           **({"secondary_y": True} if p.y2 is not None else {}))
        heights[p.row - 1] = max(heights[p.row - 1], p.height)
    return specs, heights


class LiveChart:
    """One FigureWidget holding every live view of a run, redrawn with one
    `batch_update`: the registry's charts with a panel, each in its cell (host
    memory stacked by component on top; pinned reserved vs used and
    fragmentation; step time + loss and the pool strip)."""

    CHARTS = tuple(charts.live_charts())
    TITLES = tuple(c.title for c in CHARTS)

    def __init__(self, max_points=MAX_POINTS, height=860, width=WIDTH):
        self.max_points = max_points
        empty = Run("no-run")
        specs, heights = _grid(self.CHARTS)
        fig = make_subplots(rows=len(specs), cols=len(specs[0]), specs=specs, row_heights=heights,
                            vertical_spacing=0.1, horizontal_spacing=0.2, subplot_titles=self.TITLES)
        self.groups, self.units, self.axes = {}, {}, {}
        for c in self.CHARTS:
            drawn = c.live(empty, max_points, False)
            self._add(fig, c, drawn.traces)
            self.units[c.name] = drawn.unit
            self._style_axes(fig, c, drawn.unit)
        for annotation in fig.layout.annotations:  # subplot titles
            annotation.update(font=dict(size=14))
        self.n_titles = len(fig.layout.annotations)
        fig.add_annotation(text="Press Run to start a run; the charts fill while it trains.",
                           **self._over(self.CHARTS[0]), font=dict(size=15, color="#888"))
        # What an empty panel waits for, instead of bare placeholder axes.
        self.waiting_index = {}
        for c in self.CHARTS:
            if c.panel.waiting:
                self.waiting_index[c.name] = len(fig.layout.annotations)
                fig.add_annotation(text=c.panel.waiting, **self._over(c), font=dict(size=13, color="#999"))
        # the second legend starts at the top of the first panel that uses it
        legend2_top = next(fig.layout[self.axes[c.name][1]].domain[1] for c in self.CHARTS if c.panel.legend == "legend2")
        fig.update_layout(
            template=F.TEMPLATE, height=height, width=width, margin=dict(l=70, r=200, t=40, b=40), hovermode="closest", bargap=0.15,
            legend=dict(title_text="host memory", x=1.02, xanchor="left", y=1, yanchor="top",
                        traceorder="reversed", font=dict(size=12)),
            legend2=dict(x=1.02, xanchor="left", y=legend2_top, yanchor="top", font=dict(size=12)),
        )
        self.widget = go.FigureWidget(fig)
        self.widget.add_class("memlab-live-chart")
        self.refreshes = 0  # batched updates sent to the browser

    def _add(self, fig, chart, traces):
        p = chart.panel
        start = len(fig.data)
        shown_steps = any(t.name == F.STEPS for t in fig.data)
        for trace in _live_traces(traces):
            if p.legend is not None:
                trace.update(legend=p.legend)
            if trace.name == F.STEPS and shown_steps:
                trace.update(showlegend=False)  # the first chart's entry stands for all of them
            trace.update(legendgroup=trace.name)
            secondary = p.y2 is not None and trace.yaxis == "y2"
            fig.add_trace(trace, row=p.row, col=p.col, **({"secondary_y": True} if secondary else {}))
        self.groups[chart.name] = list(range(start, len(fig.data)))
        if p.rank_lines:
            # A multi-rank run's per-rank lines: made up front (the widget keeps
            # its traces), shown when a run has that many ranks.
            start = len(fig.data)
            for rank in range(MAX_RANK_LINES):
                fig.add_trace(go.Scatter(x=[], y=[], name=f"{RANK_LINE} {rank}", mode="lines", visible=False,
                                         line=dict(width=1.5, dash="dot"), legend=p.legend), row=p.row, col=p.col)
            self.groups["ranks"] = list(range(start, len(fig.data)))

    def _style_axes(self, fig, chart, unit):
        """A panel's axes, once; records their layout names (x, y and any secondary y) for the refreshes."""
        p = chart.panel
        sub = fig.get_subplot(p.row, p.col)
        sub.xaxis.update(title_standoff=4, **p.x)
        sub.yaxis.update(**p.y)
        if p.y_title:
            sub.yaxis.title.text = p.y_title.format(unit=unit)
        self.axes[chart.name] = [sub.xaxis.plotly_name, sub.yaxis.plotly_name]
        if p.y2 is not None:
            second = fig.get_subplot(p.row, p.col, secondary_y=True).yaxis
            second.update(**p.y2)
            self.axes[chart.name].append(second.plotly_name)

    def _over(self, chart):
        """Where a note over the middle of a chart's panel goes."""
        x, y = (name.replace("axis", "") for name in self.axes[chart.name][:2])  # xaxis2 -> x2
        return dict(xref=f"{x} domain", yref=f"{y} domain", x=0.5, y=0.5, showarrow=False)

    def traces(self, run, fullest_pools=False):
        """chart name -> its Drawn for `run` (a fresh set of traces, in the figure's order)."""
        return {c.name: c.live(run, self.max_points, fullest_pools) for c in self.CHARTS}

    def update(self, run, final=False):
        """Redraw from `run` (a Run or a RunSnapshot) with one batched update."""
        if not isinstance(run, RunSnapshot):
            run = RunSnapshot(run)
        fresh = self.traces(run, fullest_pools=final)
        fig = self.widget
        empty = not self.CHARTS[0].has_data(run)
        with fig.batch_update():
            for c in self.CHARTS:
                if c.panel.rank_lines:
                    self._draw_rank_lines(fresh[c.name].traces)
                self._draw(c, fresh[c.name])
            fig.layout.annotations[self.n_titles].visible = empty
            for i, c in enumerate(self.CHARTS):  # annotation i: the subplot title of chart i
                drawn = fresh[c.name]
                if c.name in self.waiting_index:
                    waiting = not c.has_data(run)
                    fig.layout.annotations[self.waiting_index[c.name]].visible = waiting and not empty
                    for axis in self.axes[c.name]:
                        fig.layout[axis].showticklabels = not waiting
                for key, value in (drawn.xaxis or {}).items():
                    setattr(fig.layout[self.axes[c.name][0]], key, value)
                if drawn.note is not None:
                    fig.layout.annotations[i].text = c.title + drawn.note
            # plotly records only the properties that changed and sends nothing
            # for an empty batch: a redraw that finds nothing new is not a refresh
            changed = bool(fig._batch_trace_edits or fig._batch_layout_edits)
        self.refreshes += changed
        if final:
            self.persist()

    def _draw_rank_lines(self, traces):
        fig = self.widget
        lines = {t.name: t for t in traces if t.name and t.name.startswith(RANK_LINE)}
        for index in self.groups["ranks"]:
            target = fig.data[index]
            line = lines.get(target.name)
            if line is not None:
                target.x, target.y, target.visible = line.x, line.y, True
            elif target.visible:
                target.visible = False

    def _draw(self, chart, drawn):
        """Copy a chart's fresh traces into the widget's, matched by name; a new unit
        also retitles its y axis and every hover label."""
        fig = self.widget
        relabel = drawn.unit != self.units[chart.name]
        by_name = {t.name: t for t in _live_traces(drawn.traces)}
        for index in self.groups[chart.name]:
            target = fig.data[index]
            trace = by_name.get(target.name)
            if trace is None:
                continue
            for key in _data_keys(trace):
                setattr(target, key, getattr(trace, key, None))
            if relabel:
                target.hovertemplate = trace.hovertemplate
        if relabel and chart.panel.y_title:
            fig.layout[self.axes[chart.name][1]].title.text = chart.panel.y_title.format(unit=drawn.unit)
        self.units[chart.name] = drawn.unit

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
