"""The notebook lab: one ipywidgets widget to set knobs, start and stop runs,
watch them live, and compare them (`Lab.dashboard()`).

It composes three parts, each in its own module: the knob panel
(`knob_panel.py`), the live chart (`live_chart.py`) and the run history with
the comparison (`history.py`); this module adds Run/Stop, the status line,
and the follower that keeps the live chart current.

How it stays responsive (a notebook kernel runs one cell at a time, and every
widget update is a message to the browser): a run lives in its own child process
(`Lab.run`), the Lab's follower thread hands new events to this dashboard,
and a ticker thread redraws the live chart at most `refresh_hz` times a
second with ONE `batch_update` of ONE FigureWidget (every series is
downsampled first, because a refresh resends whole arrays). Button handlers
only start or signal things and return at once; Stop runs in a thread.

The charts come from the chart registry (`views/charts.py`), so the
dashboard, `run.plot()`, `lab.compare()` and the HTML report draw the same
series with the same names, colours and units.
"""
import html
import os
import threading
import time

import ipywidgets as W

from .. import knobs as K
from ..models import ModelSpecError
from ..runs import RunStoreError, load_run
from . import figures as F
from .figures import pool_strip_trace  # defined here before the split
from .history import (BYTE_KNOBS, HISTORY_IGNORED, HISTORY_ROWS, STATUS_COLORS, History, flat_knobs, history_html,
                      history_rows, knob_differences, short_knob, stored_runs)
from .knob_panel import PANEL_KNOBS, SECTIONS, KnobField, KnobPanel, preset_choices
from .live_chart import MAX_POINTS, MAX_RANK_LINES, WIDTH, LiveChart, RunSnapshot

# The parts' names stay importable from here, as before the dashboard was split.
__all__ = ["Dashboard", "REFRESH_HZ", "DEFAULT_STEPS", "CSS",
           "BYTE_KNOBS", "HISTORY_IGNORED", "HISTORY_ROWS", "STATUS_COLORS", "History", "flat_knobs", "history_html",
           "history_rows", "knob_differences", "short_knob", "stored_runs",
           "PANEL_KNOBS", "SECTIONS", "KnobField", "KnobPanel", "preset_choices",
           "MAX_POINTS", "MAX_RANK_LINES", "WIDTH", "LiveChart", "RunSnapshot", "pool_strip_trace"]

REFRESH_HZ = 2.0
DEFAULT_STEPS = 30  # long enough to watch (about 0.2 s a step here), short enough for Binder

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
        self._refresh_lock = threading.RLock()
        self._dirty = threading.Event()

        # -- knob panel
        self.knob_panel = KnobPanel(steps=steps, model=model, on_change=self.validate)
        kp = self.knob_panel
        self.switches, self.fields, self.panel = kp.switches, kp.fields, kp.widget
        self.model, self.config_path, self.engine = kp.model, kp.config_path, kp.engine

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
        self.history_panel = History(limit=history_rows, on_pick=self._on_pick)
        hp = self.history_panel
        self.history, self.compare_select, self.show_select, self.compare_box = \
            hp.table, hp.compare_select, hp.show_select, hp.compare_box

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

    @property
    def runs(self):
        """The history: runs of the store, oldest first."""
        return self.history_panel.runs

    @property
    def compare_chart(self):
        """The comparison's FigureWidget (a new one at each redraw)."""
        return self.history_panel.compare_chart

    # -- knobs -------------------------------------------------------------
    def set(self, values=None, **short):
        """Set knobs in the panel as a user would: dotted names, `model=`, `engine=`,
        `config_path=`, or run-shape keywords (`steps=40`). Returns self."""
        self.knob_panel.set(values, **short)
        return self

    def request(self):
        """(knob values, model, engine) as the panel says, for `Lab.plan`/`Lab.run`."""
        return self.knob_panel.request()

    def validate(self):
        """Check the panel as it is; put each problem next to its knob. Returns the
        plan (Knobs, ModelSpec, ResolvedKnobs) or None. Nothing is started."""
        plan, problem = self.knob_panel.check(self.lab)
        self.problem.value = f"<div class='memlab-msg'>Cannot run yet: {html.escape(problem)}</div>" if problem else ""
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
        self.history_panel.select_finished(run)

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
        self.history_panel.mark_shown(run)

    def _on_pick(self, run):
        """A run picked in "charts show": shown unless a run is going."""
        if run is not self.run and not self.running:
            self.show(run)

    # -- history --------------------------------------------------------------
    def reload(self):
        """Read the run store again (the history survives kernel restarts).
        Finished runs are read from their summary.json only; a run's events are
        loaded when it is shown, so a long history costs little memory."""
        self.history_panel.reload(self.lab.store, self.lab.live, shown=self.run)

    def history_rows(self):
        return self.history_panel.rows()

    def _draw_history(self):
        self.history_panel.draw(shown=self.run)

    def compare_figure(self):
        """The comparison figure of the selected runs (from figures.compare_runs)."""
        return self.history_panel.compare_figure()

    def _draw_comparison(self):
        self.history_panel.draw_comparison()
