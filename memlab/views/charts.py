"""The chart registry: every chart of one run, in one table (`CHARTS`).

The three places that draw a run's charts all read it: `Run.plot(name)` draws
one chart's `figure`, the HTML report draws every chart's `figure` in table
order, and the dashboard's live chart (`views/live_chart.py`) draws each chart
that has a `panel` in one FigureWidget, from its `live` builder. The builders
are the pure functions of `figures.py`, so every view shows the same series
with the same names, colours and units.

Adding a chart: a builder in `figures.py` (run -> go.Figure) and one `Chart`
line here; it is then in `Run.plot` and the report. To draw it live too, give the line a `live` builder (run, max_points,
final -> Drawn) and a `panel` (its cell in the live chart's grid).

A builder takes a Run or the live chart's RunSnapshot (the same attributes:
timeline, steps, events, pools, ranks, rank_timelines).
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import figures as F


@dataclass(frozen=True)
class Drawn:
    """What a chart's `live` builder hands the live chart at each refresh."""

    traces: list
    unit: Optional[str] = None  # the y unit: when it changes, the axis title and the hover labels follow
    note: Optional[str] = None  # shown after the panel's title ("(latest)"), set at each refresh
    xaxis: Optional[dict] = None  # x-axis properties set at each refresh


@dataclass(frozen=True)
class Panel:
    """Where and how the live chart draws a chart: its cell (1-based row and
    column of the grid), once-only axis properties, and the note shown over it
    while the chart's `has_data` is false."""

    row: int
    col: int
    colspan: int = 1
    height: float = 0.27  # the row's share of the live chart's height (the largest in the row counts)
    legend: Optional[str] = "legend2"  # the legend its traces join; None: none
    x: dict = field(default_factory=dict)
    y: dict = field(default_factory=dict)
    y_title: Optional[str] = None  # "host memory ({unit})": retitled when the unit changes
    y2: Optional[dict] = None  # a secondary y axis for the traces drawn on "y2"
    waiting: Optional[str] = None
    rank_lines: bool = False  # one line per rank (traces "rss rank N") beside the node's total


def _always(run):
    return True


@dataclass(frozen=True)
class Chart:
    name: str  # Run.plot(name)
    title: str  # its heading in the live chart
    figure: Callable  # figure(run, **options) -> go.Figure: Run.plot and the report
    has_data: Callable = _always  # has_data(run): whether the run has anything for it yet
    live: Optional[Callable] = None  # live(run, max_points, final) -> Drawn
    panel: Optional[Panel] = None  # its place in the live chart (None: not drawn live)


def _has_pinned(run):
    return any(run.timeline.pinned_reserved)


def _steps_live(run, max_points, final):
    return Drawn(F.step_traces(run, max_points), xaxis={"dtick": 1 if len(run.steps) <= 12 else None})


def _pools_live(run, max_points, final):
    traces, unit = F.pool_strip_traces(run, fullest=final)  # a finished run's pools end empty
    return Drawn(traces, unit, note=" (each pool at its fullest)" if final else " (latest)")


CHARTS = (
    Chart("memory", "Host memory by component", F.memory_by_component,
          has_data=lambda run: len(run.timeline) > 0,
          live=lambda run, max_points, final: Drawn(*F.memory_traces(run, max_points)),
          panel=Panel(1, 1, colspan=2, height=0.46, legend="legend", x=dict(title_text=F.TIME_AXIS),
                      y=dict(rangemode="tozero"), y_title="host memory ({unit})", rank_lines=True)),
    Chart("pinned", "Pinned buffers: reserved vs used", F.pinned_reserved_vs_used, has_data=_has_pinned,
          live=lambda run, max_points, final: Drawn(*F.pinned_traces(run, max_points)),
          panel=Panel(2, 1, x=dict(title_text=F.TIME_AXIS), y=dict(rangemode="tozero"), y_title="pinned ({unit})",
                      waiting="no pinned buffer yet")),
    Chart("fragmentation", "Pinned fragmentation (1 − used/reserved)", F.fragmentation, has_data=_has_pinned,
          live=lambda run, max_points, final: Drawn(F.fragmentation_traces(run, max_points)),
          panel=Panel(2, 2, x=dict(title_text=F.TIME_AXIS), y=dict(tickformat=".0%", range=[0, 1.02]),
                      waiting="nothing reserved yet")),
    Chart("steps", "Step time and loss", F.step_times_and_loss, has_data=lambda run: bool(run.steps),
          live=_steps_live,
          panel=Panel(3, 1, x=dict(title_text="step"), y=dict(title_text="step time (s)", rangemode="tozero"),
                      y2=dict(title_text="loss", showgrid=False), waiting="no step yet")),
    Chart("pools", "Pool buffers and fill", F.pool_occupancy,
          has_data=lambda run: any(e.get("kind") == "pool" for e in run.events),
          live=_pools_live,
          panel=Panel(3, 2, legend=None, x=dict(title_text="buffer", dtick=1, showgrid=False),
                      y=dict(showgrid=False, autorange="reversed"), waiting="no pool yet")),
)
BY_NAME = {chart.name: chart for chart in CHARTS}


def chart(name):
    """The registered chart `name`; a ValueError names the others."""
    if name not in BY_NAME:
        raise ValueError(f"kind={name!r}: must be one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def figures(run):
    """Every chart's figure of `run`, in table order (the report)."""
    return [c.figure(run) for c in CHARTS]


def live_charts():
    """The charts the live chart draws, in the order of its grid (row by row)."""
    return sorted((c for c in CHARTS if c.panel is not None), key=lambda c: (c.panel.row, c.panel.col))
