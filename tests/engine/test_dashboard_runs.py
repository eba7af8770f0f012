"""The dashboard after a real run, without a browser (ipywidgets' DummyComm
records every comm message): Run pressed, the chart fills at <= 2 Hz in batched
updates, the history gains the row; Stop ends a long run."""
import time

import pytest
from helpers import wait_for
from ipywidgets.widgets.tests.utils import setup_test_comm, teardown_test_comm

from memlab import Lab
from memlab import components as C
from memlab.views import dashboard as D
from memlab.views import figures as F

FIGURE_MESSAGES_PER_REFRESH = 4  # as in tests/unit/test_dashboard.py: two edit ids, the one batched update, its reset


@pytest.fixture(autouse=True)
def dummy_comm():
    setup_test_comm()
    yield
    teardown_test_comm()


def sent(widget):
    return len(widget.comm.messages)


@pytest.mark.engine
def test_a_real_run_from_the_dashboard(tmp_path):
    """Run pressed in the dashboard: the call returns at once, the chart gains
    points while the worker trains, each refresh is one batched update at
    <= 2 Hz; at the end the widget state holds the data and the history has the
    row. Then a long run is stopped with Stop and adds a second row."""
    lab = Lab(tmp_path / "store")
    dash = lab.dashboard(refresh_hz=2)
    fig = dash.chart.widget
    msgs0, refresh0 = sent(fig), dash.chart.refreshes
    started = time.monotonic()
    run = dash.start(steps=20)
    assert run is not None and not run.done  # returns while the worker trains
    assert dash.run_button.disabled and not dash.stop_button.disabled
    seen = []
    while not run.done and time.monotonic() - started < 300:
        seen.append(dash.chart.points())
        time.sleep(0.25)
    run.wait(300)
    elapsed = time.monotonic() - started
    growing = [b for a, b in zip(seen, seen[1:]) if b > a]
    assert len(growing) >= 3, f"the chart should gain points while the run goes: {seen}"
    assert wait_for(lambda: not dash.running and dash.status.value.startswith("<b style='color:#2ca02c'>ok")), \
        dash.status.value
    assert run.summary["status"] == "ok", run.summary["error"]
    refreshes = dash.chart.refreshes - refresh0
    assert refreshes <= elapsed * 2 + 2
    # each refresh one batched update; the final one also stores the full state (2 messages)
    assert sent(fig) - msgs0 == refreshes * FIGURE_MESSAGES_PER_REFRESH + 2
    # the final state: real points, component legend, MiB units, the state synced for saving
    assert 0 < dash.chart.points() <= D.MAX_POINTS
    names = {t.name for t in fig.data}
    assert set(C.ALL) <= names
    assert fig.layout.yaxis.title.text in ("host memory (MiB)", "host memory (GiB)")
    stored = {t["name"]: t for t in fig._widget_data if t.get("name")}
    assert len(stored[F.RSS]["x"]) == dash.chart.points()
    framework = next(t for t in fig.data if t.name == C.FRAMEWORK)
    assert max(framework.y) > 50  # MiB: the interpreter and libraries
    rows = dash.history_rows()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["steps"] == 20
    assert rows[0]["peak_rss_bytes"] == run.summary["peak_rss_bytes"]
    assert run.run_id in dash.compare_select.value

    # a long run with other knobs, stopped with Stop
    long_run = dash.start(steps=2000)
    assert wait_for(lambda: len(long_run.steps) >= 3 or long_run.done)
    assert not long_run.done, long_run.summary
    thread = dash.stop()
    assert thread is not None and dash.stop_button.disabled
    thread.join()
    assert long_run.done and long_run.summary["status"] == "stopped"
    assert wait_for(lambda: "stopped</td>" in dash.history.value and not dash.running)
    rows = dash.history_rows()
    assert rows[1]["differs"] == ["steps=2000"] and "stopped" in dash.history.value
    assert not dash.run_button.disabled
