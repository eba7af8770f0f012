"""The dashboard's logic without a browser: ipywidgets' DummyComm records every
comm message, so knob validation, history rows and the refresh throttling
(messages per refresh, refreshes per second) are checked in plain pytest. The
state after a real run: tests/engine/test_dashboard_runs.py; the real browser
test: tests/browser/."""
import html
import json
import os
import time

import plotly.graph_objects as go
import pytest
from helpers import wait_for
from ipywidgets.widgets.tests.utils import setup_test_comm, teardown_test_comm

from memlab import Lab
from memlab import components as C
from memlab import knobs as K
from memlab.runs import Run, summarize
from memlab.views import dashboard as D
from memlab.views import figures as F
from test_views import make_events

MiB = 1 << 20
FIGURE_MESSAGES_PER_REFRESH = 4  # two edit ids, the one batched update, its reset


@pytest.fixture(autouse=True)
def dummy_comm():
    setup_test_comm()
    yield
    teardown_test_comm()


def store_run(store, run_id, events, status="ok"):
    """A run folder as Lab writes it: events.jsonl + summary.json."""
    path = os.path.join(store, run_id)
    os.makedirs(path)
    events = [dict(e, run_id=run_id) if e["kind"] == "run_start" else e for e in events]
    with open(os.path.join(path, "events.jsonl"), "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summarize(events, status=status), f)
    return path


def with_knobs(events, **changes):
    """Events whose run_start knobs carry some changed (dotted) knob values."""
    events = [dict(e) for e in events]
    knobs = json.loads(json.dumps(events[0]["knobs"]))
    for name, value in changes.items():
        node = knobs
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    events[0]["knobs"] = knobs
    return events


def sent(widget):
    return len(widget.comm.messages)


# ------------------------------------------------------------- knob panel

def test_panel_has_the_knobs_that_matter_and_every_memascend_switch(lab, monkeypatch):
    switches = {"memascend.pool": ("fixed", "adaptive"), "memascend.pinning": ("torch", "exact"),
                "memascend.new_thing": (False, True)}  # switches are read when the dashboard is made
    monkeypatch.setattr(K, "MEMASCEND_SWITCHES", switches)
    dash = lab.dashboard()
    for name in switches:
        assert name in dash.fields
        assert [v for _, v in dash.fields[name].control.options] == list(switches[name])
    for name in ("zero_optimization.offload_param.buffer_count", "zero_optimization.offload_param.buffer_size",
                 "zero_optimization.sub_group_size", "zero_optimization.stage3_max_reuse_distance",
                 "zero_optimization.offload_param.pin_memory", "aio.block_size", "aio.queue_depth",
                 "zero_optimization.offload_optimizer.device", "run.micro_batch", "run.seq_len", "run.steps"):
        assert name in dash.fields, name
    # engine=memascend turns every switch on; one switch back makes it custom
    dash.set(engine="memascend")
    assert all(dash.fields[n].value == opt for n, (_, opt) in switches.items())
    dash.fields["memascend.pool"].control.value = "fixed"
    assert dash.engine.value == "custom"
    dash.engine.control.value = "deepspeed"
    assert all(dash.fields[n].value == stock for n, (stock, _) in switches.items())


def test_without_switches_memascend_is_refused_next_to_the_engine(lab, monkeypatch):
    monkeypatch.setattr(K, "MEMASCEND_SWITCHES", {})
    dash = lab.dashboard()
    assert not any(n.startswith("memascend.") for n in dash.fields)
    dash.engine.control.value = "memascend"
    assert "no MemAscend optimization" in dash.engine.message.value
    assert dash.run_button.disabled
    dash.engine.control.value = "deepspeed"
    assert dash.engine.message.value == "" and not dash.run_button.disabled


def test_bad_values_are_shown_next_to_their_knob_before_anything_starts(lab):
    dash = lab.dashboard()
    assert not dash.run_button.disabled and dash.problem.value == ""
    count = dash.fields["zero_optimization.offload_param.buffer_count"]
    block = dash.fields["aio.block_size"]
    count.control.value = "two"
    block.control.value = "100"
    assert "whole number" in count.message.value
    assert "at least 4096" in block.message.value  # every bad field at once
    assert dash.run_button.disabled and "Cannot run yet" in dash.problem.value
    assert dash.start() is None and os.listdir(lab.store) == []  # nothing started
    count.control.value = "5"
    block.control.value = "1048576"
    assert count.message.value == "" and block.message.value == "" and not dash.run_button.disabled


def test_combination_traps_land_on_the_knob_named_by_the_plan(lab):
    dash = lab.dashboard()
    # whatever trap the plan names, its message lands next to that knob
    optimizer = dash.fields["zero_optimization.offload_optimizer.buffer_count"]
    optimizer.control.value = "2"
    with pytest.raises(K.KnobError) as refused:
        lab.plan(dash.request()[0])
    assert refused.value.knob == optimizer.name
    assert html.escape(refused.value.reason) in optimizer.message.value and dash.run_button.disabled
    optimizer.control.value = "4"
    assert optimizer.message.value == "" and not dash.run_button.disabled
    dash.set({"zero_optimization.offload_param.buffer_size": 1000})
    assert "largest parameter partition" in dash.fields["zero_optimization.offload_param.buffer_size"].message.value
    dash.set({"zero_optimization.offload_param.buffer_size": "auto"})
    hint = dash.fields["zero_optimization.offload_param.buffer_size"].message.value
    assert "auto = " in hint and "elements" in hint
    dash.set(config_path="/nonexistent/config.json")
    assert dash.config_path.message.value and dash.run_button.disabled
    dash.set(config_path="")
    assert not dash.run_button.disabled


def test_set_rejects_knobs_not_in_the_panel(lab):
    with pytest.raises(K.KnobError):
        lab.dashboard().set({"no.such.knob": 1})


# --------------------------------------------------------------- history

def test_history_rows_from_the_store_survive_a_restart(lab):
    base = make_events(scale=MiB)
    store_run(lab.store, "20260101-000000-aaaaaa", base)
    store_run(lab.store, "20260101-000100-bbbbbb",
              with_knobs(base, **{"aio.block_size": 2 * MiB, "zero_optimization.offload_param.buffer_count": 8}))
    store_run(lab.store, "20260101-000200-cccccc", base, status="stopped")
    dash = lab.dashboard()
    rows = dash.history_rows()
    assert [r["run_id"] for r in rows] == ["20260101-000000-aaaaaa", "20260101-000100-bbbbbb",
                                           "20260101-000200-cccccc"]
    assert [r["status"] for r in rows] == ["ok", "ok", "stopped"]
    assert rows[0]["differs"] == [] and rows[2]["differs"] == []
    assert rows[1]["differs"] == ["offload_param.buffer_count=8", "aio.block_size=2.0 MiB"]
    summary = summarize(base)
    assert rows[0]["peak_rss_bytes"] == summary["peak_rss_bytes"]
    assert rows[0]["peak_engine_host_bytes"] == summary["peak_engine_host_bytes"]
    assert rows[0]["fragmentation_at_peak"] == summary["fragmentation_at_peak"]
    assert rows[0]["step_time_median_s"] == summary["step_time_median_s"]
    table = dash.history.value
    assert table.count("<tr>") == 4 and "aio.block_size=2.0 MiB" in table and "MiB" in table
    # the charts open on the latest stored run, with its points; the comparison has the finished runs
    assert dash.run.run_id == "20260101-000200-cccccc" and dash.chart.points() > 0
    assert set(dash.compare_select.value) == {r["run_id"] for r in rows}
    assert len(dash.compare_chart.data) > 0
    # a new kernel, the same store: the same history
    again = Lab(lab.store).dashboard()
    assert again.history_rows() == rows


def test_history_is_capped_and_says_so(lab):
    base = make_events(n_samples=40, n_steps=2)
    for i in range(5):
        store_run(lab.store, f"20260101-00000{i}-abcdef", base)
    dash = lab.dashboard(history_rows=3)
    assert len(dash.history_rows()) == 3
    assert "showing the 3 latest of 5 runs" in dash.history.value


def test_selecting_runs_redraws_the_comparison(lab):
    base = make_events(n_samples=60, n_steps=3)
    for i in range(3):
        store_run(lab.store, f"20260101-00000{i}-abcdef", base)
    dash = lab.dashboard()
    dash.compare_select.value = ("20260101-000000-abcdef",)
    bars = [t for t in dash.compare_chart.data if t.name == "peak RSS"]
    assert list(bars[0].x) == ["#1"]
    dash.compare_select.value = ("20260101-000000-abcdef", "20260101-000002-abcdef")
    bars = [t for t in dash.compare_chart.data if t.name == "peak RSS"]
    assert list(bars[0].x) == ["#1", "#3"]


# ------------------------------------------------------------- throttling

class FakeProcess:
    """Stands in for the worker: the dashboard only asks whether it runs."""


def test_live_refreshes_are_throttled_and_batched(lab):
    """Events arrive 20 times a second for 2.5 s: the chart redraws at most
    refresh_hz times a second, each redraw one batched update (4 comm messages)."""
    dash = lab.dashboard(refresh_hz=2)
    fig = dash.chart.widget
    events = make_events(n_samples=600, n_steps=20)
    run = Run(os.path.join(lab.store, "20260101-000000-live00"))
    run._process = FakeProcess()
    before_msgs, before_refreshes = sent(fig), dash.chart.refreshes
    run._ingest(events[:4])
    dash.watch(run)
    assert dash.running and dash.run_button.disabled and not dash.stop_button.disabled
    started = time.monotonic()
    for i in range(4, 54):  # 50 batches over 2.5 s
        run._ingest(events[i * 10:(i + 1) * 10])
        time.sleep(0.05)
    # the last batch is drawn eventually, however busy the machine
    assert wait_for(lambda: dash.chart.points() and not dash._dirty.is_set() and
                    dash.chart.refreshes > before_refreshes)
    elapsed = time.monotonic() - started
    with dash._refresh_lock:  # no redraw half-sent while counting
        refreshes = dash.chart.refreshes - before_refreshes
        messages = sent(fig) - before_msgs
    # throttled: never more than refresh_hz redraws a second (a bound a busy machine cannot break)
    assert 1 <= refreshes <= elapsed * 2 + 1
    assert messages == refreshes * FIGURE_MESSAGES_PER_REFRESH
    assert 0 < dash.chart.points() <= D.MAX_POINTS
    # the end of the run: one final redraw, plus the state stored for saved notebooks
    run._finish(summarize(run.events, status="ok"))
    assert wait_for(lambda: not dash.running and "ok" in dash.status.value)
    assert not dash.run_button.disabled and dash.stop_button.disabled


def test_one_refresh_is_one_batched_update(lab):
    store_run(lab.store, "20260101-000000-aaaaaa", make_events())
    dash = lab.dashboard()
    fig = dash.chart.widget
    before = sent(fig)
    dash.refresh()
    messages = [args[0] if args else kw.get("data") for args, kw in fig.comm.messages[before:]]
    assert len(messages) == FIGURE_MESSAGES_PER_REFRESH
    updates = [m for m in messages if m["state"].get("_py2js_update")]
    assert len(updates) == 1


def test_a_long_run_redraws_small_and_keeps_its_peak(lab):
    """An hour-long run (40,000 samples): each refresh sends at most MAX_POINTS
    points per series, in one message well under a megabyte, and the RSS peak
    survives the thinning."""
    events = make_events(n_samples=40_000, n_steps=2000)
    spike = next(i for i, e in enumerate(events) if e["kind"] == "sample" and e["t"] > 1500)
    events[spike] = dict(events[spike], rss=events[spike]["rss"] * 3)
    run = Run(os.path.join(lab.store, "r-long"), events)
    dash = lab.dashboard()
    fig = dash.chart.widget
    before = sent(fig)
    dash.show(run)
    messages = [args[0] if args else kw.get("data") for args, kw in fig.comm.messages[before:]]
    update = next(m for m in messages if m["state"].get("_py2js_update"))
    assert len(json.dumps(update)) < 1_000_000
    assert all(len(t.x or ()) <= D.MAX_POINTS for t in fig.data if t.type == "scatter" and t.name != F.STEPS)
    rss = next(t for t in fig.data if t.name == F.RSS)
    assert max(rss.y) == pytest.approx(events[spike]["rss"] / MiB)


def test_refresh_rate_is_bounded(lab):
    with pytest.raises(ValueError):
        lab.dashboard(refresh_hz=10)


# ------------------------------------------------------- views from code

def test_run_plot_and_lab_compare(lab):
    a = store_run(lab.store, "20260101-000000-aaaaaa", make_events())
    store_run(lab.store, "20260101-000100-bbbbbb", make_events(scale=2 * MiB))
    run = lab.runs()[0]
    fig = run.plot()
    assert isinstance(fig, go.Figure) and "MiB" in fig.layout.yaxis.title.text
    assert {t.name for t in fig.data} >= set(C.ALL)
    for kind in ("pinned", "fragmentation", "steps", "pools"):
        assert isinstance(run.plot(kind), go.Figure)
    with pytest.raises(ValueError):
        run.plot("nope")
    fig = lab.compare()
    assert list(next(t for t in fig.data if t.name == "peak RSS").x) == [
        "20260101-000000-aaaaaa", "20260101-000100-bbbbbb"]
    fig = lab.compare(["20260101-000100-bbbbbb", a], labels=["big", "small"])
    assert list(next(t for t in fig.data if t.name == "peak RSS").x) == ["big", "small"]


def test_live_chart_draws_a_line_per_rank_beside_the_node_total():
    from memlab.runs import Run
    from memlab.views.dashboard import LiveChart

    events = []
    for tick in range(20):
        for rank in (0, 1):
            events.append({"t": tick / 10 + rank / 100, "kind": "sample", "rank": rank,
                           "rss": (100 + tick + 50 * rank) * 2**20, "vm_lck": 0, "vm_hwm": 0, "page_cache": 0,
                           "io_read": 0, "io_write": 0, "components": {"framework": 100 * 2**20},
                           "pinned_reserved": 0, "pinned_used": 0})
    chart = LiveChart()
    chart.update(Run("two-ranks", events))
    lines = {t.name: t for t in chart.widget.data if t.name and t.name.startswith("rss")}
    assert lines["rss rank 0"].visible and lines["rss rank 1"].visible
    assert not lines["rss rank 2"].visible
    assert len(lines["rss rank 1"].y) == 20 and len(lines["rss"].y) == 40  # the node's sum at every sample
    assert max(lines["rss"].y) == max(a + b for a, b in zip(lines["rss rank 0"].y, lines["rss rank 1"].y))
    chart.update(Run("one-rank", [e for e in events if e["rank"] == 0]))
    assert not any(t.visible for t in chart.widget.data if t.name and t.name.startswith("rss rank"))
