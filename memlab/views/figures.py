"""Pure plotly builders: a Run (or plain data from it) in, a go.Figure out.

No widgets, no I/O, no deepspeed or torch. Which of them make a run's charts
(Run.plot, the report, the dashboard's live chart) is said once, in the
registry of `charts.py`. The live chart reuses the `*_traces` functions: one
trace per series with a stable `name`, so a refresh can copy x/y into a
FigureWidget trace by name. Every text that comes from a
run (pool names, run labels) is HTML-escaped, because plotly renders a subset
of HTML in titles, legends and hover labels.
"""
import html
import textwrap
import zlib

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import components as C
from ..units import bytes_unit, format_bytes  # also F.format_bytes for the other views and the notebooks

MAX_POINTS = 2000
TEMPLATE = "plotly_white"

# One fixed colour per component so every figure (and the dashboard) agrees.
# Blues: parameter buffers; greens: optimizer; orange: transients;
# purples: activations; red: heap fragmentation; greys: not the engine's.
COMPONENT_COLORS = {
    C.FRAMEWORK: "#7f7f7f",
    C.RUNTIME: "#a5a5a5",
    C.PARAM_POOL: "#1f77b4",
    C.PARAM_PARTITION_BUFFER: "#aec7e8",
    C.PARAM_CPU_FLAT: "#17becf",
    C.SMALL_PARTITIONS: "#bcbd22",
    C.OPTIMIZER_POOL: "#2ca02c",
    C.GRAD_FLAT: "#98df8a",
    C.OPTIMIZER_STATE: "#006d2c",
    C.OPTIMIZER_TRANSIENTS: "#ff7f0e",
    C.ACTIVATIONS: "#9467bd",
    C.OFFLOADED_CHECKPOINTS: "#c5b0d5",
    C.PAGE_CACHE: "#8c564b",
    C.HEAP_FREE: "#d62728",
    C.OTHER: "#c7c7c7",
}
# Components added later still get a colour of their own, the same in every figure.
SPARE_COLORS = ("#e377c2", "#f7b6d2", "#ffbb78", "#393b79", "#8c6d31", "#843c39", "#7b4173", "#5254a3")
RSS_COLOR = "#222222"
STEP_COLOR = "rgba(0, 0, 0, 0.15)"

# Stable trace names besides the component names.
RSS = "rss"
STEPS = "step boundaries"
RESERVED = "pinned reserved"
USED = "pinned used"
FRAGMENTATION = "fragmentation"
STEP_TIME = "step time"
LOSS = "loss"

# Summary fields compared across runs, with their legend labels.
PEAK_FIELDS = (
    ("peak_rss_bytes", "peak RSS"),
    ("peak_engine_host_bytes", "peak engine host"),
    ("peak_pinned_reserved_bytes", "peak pinned reserved"),
    ("peak_pinned_used_bytes", "peak pinned used"),
)
# Slate shades: a family of their own, never mistaken for a component's colour.
PEAK_COLORS = ("#2f3640", "#4b6584", "#8195b3", "#c1cbdc")

TIME_AXIS = "time since start (s)"


# ------------------------------------------------------------------ helpers

def downsample_indices(keys, max_points=MAX_POINTS):
    """Sorted indices to keep so every series in `keys` (equal-length lists)
    keeps its minimum and maximum in each bucket: peaks survive, at most
    `max_points` indices. The first and last index are always kept so the
    time range does not shrink. None values are ignored."""
    n = len(keys[0]) if keys else 0
    if n <= max_points:
        return list(range(n))
    per_bucket = 2 * len(keys)  # a min and a max of every key
    if max_points < 2 + per_bucket:
        raise ValueError(f"max_points={max_points} is too small for {len(keys)} series")
    buckets = (max_points - 2) // per_bucket
    interior = n - 2
    keep = {0, n - 1}
    for b in range(buckets):
        lo = 1 + b * interior // buckets
        hi = 1 + (b + 1) * interior // buckets
        for key in keys:
            found = [(key[i], i) for i in range(lo, hi) if key[i] is not None]
            if found:
                keep.add(min(found)[1])
                keep.add(max(found)[1])
    return sorted(keep)


def _take(values, indices):
    return [values[i] for i in indices]


def _scaled(values, divisor):
    return [None if v is None else v / divisor for v in values]


def component_color(name):
    """The fixed colour of a component; unknown names pick a spare one by a stable hash."""
    if name in COMPONENT_COLORS:
        return COMPONENT_COLORS[name]
    return SPARE_COLORS[zlib.crc32(name.encode()) % len(SPARE_COLORS)]


def _max(*series):
    return max((v for values in series for v in values if v is not None), default=0)


def _digits(unit):
    return ".2f" if unit == "GiB" else ".1f"


def escape(text):
    """Run-provided text made safe for plotly's HTML-like labels."""
    return html.escape(str(text), quote=False)


def _description(name):
    return "<br>".join(textwrap.wrap(escape(C.DESCRIPTIONS.get(name, "")), 60))


def _layout(fig, title, height, legend="below", bottom=None):
    """The look every figure shares: white template, short left title, legend
    below (few series) or at right (many), hover on the nearest point."""
    if legend == "below":
        # Anchored to the figure's bottom edge, under the axis title, so the two never overlap.
        legend_layout = dict(orientation="h", yref="container", y=0.0, yanchor="bottom", x=0, xanchor="left")
        margin_bottom = 95 if bottom is None else bottom
    else:
        legend_layout = dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top")
        margin_bottom = 60 if bottom is None else bottom
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=16)),
        height=height,
        margin=dict(l=75, r=30, t=55, b=margin_bottom),
        legend=legend_layout,
        hovermode="closest",
    )
    return fig


def _note_if_empty(fig, empty, text):
    """An empty chart says why instead of showing bare axes."""
    if empty:
        fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                           font=dict(size=14, color="#888"))
    return fig


def step_marks_trace(steps, top):
    """One trace of thin vertical lines at each step's end (`t` of step
    events), from 0 to `top` in axis units: no text, so nothing overlaps."""
    x, y, text = [], [], []
    top = top or 1.0
    for step in steps:
        x += [step["t"], step["t"], None]
        y += [0, top, None]
        text += [step.get("index"), step.get("index"), None]
    return go.Scatter(
        x=x, y=y, text=text, name=STEPS, mode="lines", line=dict(color=STEP_COLOR, width=1),
        hovertemplate="end of step %{text}<br>t = %{x:.1f} s<extra></extra>",
    )


# ------------------------------------------------------- memory by component

def stacked_components():
    """Components stacked to make up RSS, in chart order (page_cache is outside RSS)."""
    return [name for name in C.ALL if name not in C.OUTSIDE_RSS]


def memory_traces(run, max_points=MAX_POINTS):
    """(traces, unit): one stacked area per component inside RSS, the RSS
    line, the dashed page_cache line, and the step boundaries."""
    tl = run.timeline
    stacked = stacked_components()
    total = [sum(values) for values in zip(*(tl.components[name] for name in stacked))]
    idx = downsample_indices([tl.rss, total, tl.page_cache], max_points)
    divisor, unit = bytes_unit(_max(tl.rss, total, tl.page_cache))
    x = _take(tl.t, idx)
    digits = _digits(unit)
    traces = []
    for name in stacked:
        traces.append(go.Scatter(
            x=x, y=_scaled(_take(tl.components[name], idx), divisor), name=name, mode="lines",
            stackgroup="rss", line=dict(width=0.5, color=component_color(name)),
            fillcolor=component_color(name),
            hovertemplate=f"<b>{name}</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<br>"
                          f"<i>{_description(name)}</i><extra></extra>",
        ))
    ranks = (run.ranks if hasattr(run, "ranks") else []) or [0]  # no events yet: one worker
    traces.append(go.Scatter(
        x=x, y=_scaled(_take(tl.rss, idx), divisor), name=RSS if len(ranks) == 1 else "rss (node)",
        mode="lines", line=dict(color=RSS_COLOR, width=2),
        hovertemplate=f"<b>rss</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<br>"
                      + ("<i>resident set size of the worker</i>" if len(ranks) == 1 else
                         "<i>sum over the ranks: the node's peak is the peak of this line</i>")
                      + "<extra></extra>",
    ))
    if len(ranks) > 1:  # one line per rank beside the node's total
        for rank, rank_tl in run.rank_timelines().items():
            keep = downsample_indices([rank_tl.rss], max_points)
            traces.append(go.Scatter(
                x=_take(rank_tl.t, keep), y=_scaled(_take(rank_tl.rss, keep), divisor), name=f"rss rank {rank}",
                mode="lines", line=dict(width=1.5, dash="dot"),
                hovertemplate=f"<b>rank {rank}</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<extra></extra>",
            ))
    traces.append(go.Scatter(
        x=x, y=_scaled(_take(tl.page_cache, idx), divisor), name=C.PAGE_CACHE, mode="lines",
        line=dict(color=COMPONENT_COLORS[C.PAGE_CACHE], width=2, dash="dash"),
        hovertemplate=f"<b>{C.PAGE_CACHE}</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<br>"
                      f"<i>{_description(C.PAGE_CACHE)}</i><extra></extra>",
    ))
    traces.append(step_marks_trace(run.steps, _max(tl.rss, total, tl.page_cache) / divisor))
    return traces, unit


def memory_by_component(run, max_points=MAX_POINTS):
    """Host memory over time, stacked by component, with RSS and page cache beside it."""
    traces, unit = memory_traces(run, max_points)
    fig = go.Figure(traces)
    _layout(fig, "Host memory by component", height=500, legend="right")
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text=f"host memory ({unit})", rangemode="tozero")
    return _note_if_empty(fig, not len(run.timeline), "no samples yet")


# ------------------------------------------------------ pinned reserved/used

def pinned_traces(run, max_points=MAX_POINTS):
    """(traces, unit): pinned/locked bytes reserved and used over time, and step boundaries."""
    tl = run.timeline
    idx = downsample_indices([tl.pinned_reserved, tl.pinned_used], max_points)
    divisor, unit = bytes_unit(_max(tl.pinned_reserved, tl.pinned_used))
    x = _take(tl.t, idx)
    digits = _digits(unit)
    traces = [
        go.Scatter(
            x=x, y=_scaled(_take(tl.pinned_reserved, idx), divisor), name=RESERVED, mode="lines",
            fill="tozeroy", line=dict(color="#ff7f0e", width=1.5), fillcolor="rgba(255, 127, 14, 0.15)",
            hovertemplate=f"<b>reserved</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<extra></extra>",
        ),
        go.Scatter(
            x=x, y=_scaled(_take(tl.pinned_used, idx), divisor), name=USED, mode="lines",
            fill="tozeroy", line=dict(color="#2ca02c", width=1.5), fillcolor="rgba(44, 160, 44, 0.35)",
            hovertemplate=f"<b>used</b>: %{{y:{digits}}} {unit}<br>t = %{{x:.1f}} s<extra></extra>",
        ),
        step_marks_trace(run.steps, _max(tl.pinned_reserved, tl.pinned_used) / divisor),
    ]
    return traces, unit


def pinned_reserved_vs_used(run, max_points=MAX_POINTS):
    """Pinned and locked buffers: bytes reserved against bytes in use."""
    traces, unit = pinned_traces(run, max_points)
    fig = go.Figure(traces)
    _layout(fig, "Pinned/locked buffers: reserved vs used", height=380)
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text=f"pinned memory ({unit})", rangemode="tozero")
    return _note_if_empty(fig, not len(run.timeline), "no samples yet")


# ------------------------------------------------------------ fragmentation

def fragmentation_traces(run, max_points=MAX_POINTS):
    """1 - used/reserved of pinned buffers over time, only where something is
    reserved (with nothing reserved the ratio means nothing)."""
    tl = run.timeline
    pairs = [(t, 1.0 - used / reserved)
             for t, used, reserved in zip(tl.t, tl.pinned_used, tl.pinned_reserved) if reserved]
    t = [p[0] for p in pairs]
    frac = [p[1] for p in pairs]
    idx = downsample_indices([frac], max_points)
    return [
        go.Scatter(
            x=_take(t, idx), y=_take(frac, idx), name=FRAGMENTATION, mode="lines", fill="tozeroy",
            line=dict(color="#d62728", width=1.5), fillcolor="rgba(214, 39, 40, 0.15)",
            hovertemplate="<b>reserved but unused</b>: %{y:.1%}<br>t = %{x:.1f} s<extra></extra>",
        ),
        step_marks_trace(run.steps, 1.0),
    ]


def fragmentation(run, max_points=MAX_POINTS):
    """Share of pinned/locked bytes reserved but not in use, over time."""
    fig = go.Figure(fragmentation_traces(run, max_points))
    _layout(fig, "Pinned fragmentation (1 − used/reserved)", height=340)
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text="reserved but unused", tickformat=".0%", range=[0, 1.02])
    return _note_if_empty(fig, not fig.data[0].x, "no pinned buffers reserved")


# ---------------------------------------------------------- step time + loss

def step_traces(run, max_points=MAX_POINTS):
    """Seconds per step (bars, left axis) and loss (line, right axis `y2`)."""
    steps = run.steps
    idx = downsample_indices([[s.get("seconds") for s in steps]], max_points)
    steps = _take(steps, idx)
    index = [s.get("index") for s in steps]
    return [
        go.Bar(
            x=index, y=[s.get("seconds") for s in steps], name=STEP_TIME, marker_color="#9ecae1",
            hovertemplate="step %{x}: %{y:.2f} s<extra></extra>",
        ),
        go.Scatter(
            x=index, y=[s.get("loss") for s in steps], name=LOSS, yaxis="y2", mode="lines+markers",
            line=dict(color="#d62728", width=2), marker=dict(size=5),
            hovertemplate="step %{x}: loss %{y:.4f}<extra></extra>",
        ),
    ]


def step_times_and_loss(run, max_points=MAX_POINTS):
    """Time of each step and its loss."""
    fig = go.Figure(step_traces(run, max_points))
    _layout(fig, "Step time and loss", height=360)
    fig.update_layout(
        xaxis=dict(title_text="step"),
        yaxis=dict(title_text="step time (s)", rangemode="tozero"),
        yaxis2=dict(title_text="loss", overlaying="y", side="right", showgrid=False),
        margin=dict(r=70),
    )
    if len(fig.data[0].x or ()) <= 30:
        fig.update_xaxes(dtick=1)  # few steps: label each, no fractional ticks
    return _note_if_empty(fig, not run.steps, "no steps yet")


# ---------------------------------------------------------- pool occupancy

def _pool_title(name, buffers, capacity):
    reserved = sum(b[0] for b in buffers) if buffers else (capacity or 0)
    used = sum(b[1] for b in buffers)
    full = f" ({used / reserved:.0%} full)" if reserved else ""
    return (f"<b>{escape(name)}</b>: {len(buffers)} buffers, reserved {format_bytes(reserved)}, "
            f"used {format_bytes(used)}{full}")


def pool_occupancy(run):
    """For each pool's latest occupancy, a strip of its buffers coloured by how full each is."""
    pools = list(run.pools.values())
    rows = max(1, len(pools))
    height = 110 + 105 * rows
    plot_height = height - 110
    titles = [_pool_title(p["name"], p.get("buffers", []), p.get("capacity")) for p in pools]
    spacing = min(0.9 / rows, 62 / plot_height) if rows > 1 else 0.0
    fig = make_subplots(rows=rows, cols=1, subplot_titles=titles or None, vertical_spacing=spacing)
    for row, pool in enumerate(pools, start=1):
        buffers = pool.get("buffers", [])
        fill = [(used / cap) if cap else 0.0 for cap, used in buffers]
        divisor, unit = bytes_unit(max((cap for cap, _ in buffers), default=0))
        digits = _digits(unit)
        fig.add_trace(go.Heatmap(
            z=[fill], x=list(range(len(buffers))), y=[""], name=escape(pool["name"]),
            customdata=[[[used / divisor, cap / divisor] for cap, used in buffers]],
            coloraxis="coloraxis", xgap=2,
            texttemplate="%{z:.0%}" if len(buffers) <= 24 else None,
            hovertemplate=f"buffer %{{x}}: %{{customdata[0]:{digits}}} of %{{customdata[1]:{digits}}} {unit}"
                          " used (%{z:.0%})<extra>%{fullData.name}</extra>",
        ), row=row, col=1)
        fig.update_xaxes(dtick=1 if len(buffers) <= 32 else None, showgrid=False, row=row, col=1)
    fig.update_layout(coloraxis=dict(
        cmin=0, cmax=1, colorscale="Blues",
        colorbar=dict(title=dict(text="fill"), tickformat=".0%", thickness=12, len=1, y=0.5, yanchor="middle"),
    ))
    fig.update_yaxes(showticklabels=False, showgrid=False)
    fig.update_xaxes(title_text="buffer", row=rows, col=1)
    for annotation in fig.layout.annotations:  # subplot titles: left-aligned, not centred over the strip
        annotation.update(x=0, xanchor="left", font=dict(size=13))
    _layout(fig, "Pool occupancy", height=height, bottom=50)
    return _note_if_empty(fig, not pools, "no pool events")


def pool_strip_traces(run, fullest=False):
    """([heatmap], unit): one heatmap with a row per pool and a cell per buffer,
    coloured by how full it is (the live chart's pool panel). Live runs show each
    pool's latest occupancy; `fullest` shows the moment each pool was fullest (a
    finished run's pools end empty)."""
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
    divisor, unit = bytes_unit(largest)
    for pool in pools:
        buffers = pool.get("buffers", [])
        reserved = sum(b[0] for b in buffers)
        used = sum(b[1] for b in buffers)
        y.append(f"{pool['name']} {used / reserved:.0%}" if reserved else pool["name"])
        pad = [None] * (width - len(buffers))
        z.append([(u / c) if c else 0.0 for c, u in buffers] + pad)
        custom.append([[u / divisor, c / divisor] for c, u in buffers] + [[None, None]] * len(pad))
    digits = _digits(unit)
    return [go.Heatmap(
        z=z, x=list(range(width)), y=[escape(v) for v in y], customdata=custom, name="pool fill",
        zmin=0, zmax=1, colorscale="Blues", showscale=False, xgap=3, ygap=3,
        texttemplate="%{z:.0%}" if width <= 12 else None, textfont=dict(size=11),
        hovertemplate=f"%{{y}} buffer %{{x}}: %{{customdata[0]:{digits}}} of %{{customdata[1]:{digits}}} {unit}"
                      " used (%{z:.0%})<extra></extra>",
        hoverongaps=False,
    )], unit


def pool_strip_trace(run, fullest=False):
    """The heatmap of `pool_strip_traces` alone."""
    return pool_strip_traces(run, fullest)[0][0]


# --------------------------------------------------------------- comparison

def _unique_labels(runs, labels):
    """Escaped labels, made unique so two runs never share a bar position."""
    labels = list(labels) if labels is not None else [run.run_id for run in runs]
    seen, out = {}, []
    for label in labels:
        label = escape(label)
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def compare_runs(runs, labels=None):
    """Peaks of each run side by side (grouped), and each run's RSS at its
    peak split into components (stacked)."""
    labels = _unique_labels(runs, labels)
    summaries = [run.summary or {} for run in runs]
    at_peak = [s.get("components_at_peak") or {} for s in summaries]
    names = stacked_components() + sorted({k for c in at_peak for k in c} - set(C.ALL))
    names = [n for n in names if n not in C.OUTSIDE_RSS and any(c.get(n) for c in at_peak)]
    largest = max([s.get(f) or 0 for s in summaries for f, _ in PEAK_FIELDS]
                  + [sum(c.get(n, 0) for n in names) for c in at_peak] + [0])
    divisor, unit = bytes_unit(largest)
    digits = _digits(unit)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Peaks", "Components at peak RSS"),
                        horizontal_spacing=0.1)
    for (field, label), color in zip(PEAK_FIELDS, PEAK_COLORS):
        fig.add_trace(go.Bar(
            x=labels, y=[(s.get(field) or 0) / divisor for s in summaries], name=label,
            offsetgroup=field,  # distinct groups: side by side although barmode is "stack"
            marker_color=color, legend="legend", legendgroup="peaks",
            hovertemplate=f"%{{x}}<br>{field}: %{{y:{digits}}} {unit}<extra></extra>",
        ), row=1, col=1)
    for name in names:
        fig.add_trace(go.Bar(
            x=labels, y=[c.get(name, 0) / divisor for c in at_peak], name=escape(name),
            marker_color=component_color(name), legend="legend2", legendgroup="components",
            hovertemplate=f"%{{x}}<br><b>{escape(name)}</b>: %{{y:{digits}}} {unit}<extra></extra>",
        ), row=1, col=2)
    _layout(fig, "Runs compared", height=460, legend="right")
    # Two legends: peaks in reading order, components in stack order (top of the stack first).
    fig.update_layout(
        barmode="stack",
        legend=dict(title_text="peaks", traceorder="normal", y=1, yanchor="top"),
        legend2=dict(title_text="at peak RSS", traceorder="reversed", x=1.02, xanchor="left", y=0.62,
                     yanchor="top"),
    )
    fig.update_yaxes(title_text=f"host memory ({unit})", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    return _note_if_empty(fig, not runs, "no runs to compare")
