"""Views are pure functions of events, so synthetic event lists test them fully."""
import math
import re

import plotly.graph_objects as go
import plotly.io as pio
import pytest

from memlab import components as C
from memlab.runs import Run, summarize
from memlab.views import figures as F
from memlab.views import report as R

MiB = 1 << 20
GiB = 1 << 30


def make_events(n_samples=300, n_steps=5, scale=MiB, status="ok", error=None, dt=0.075):
    """A plausible ZeRO-3 NVMe-offload run: framework first, then the pools,
    a first-step transient spike, page cache growing with swap traffic.
    `scale` is the size of one unit of memory (MiB-ish or GiB-ish runs)."""
    events = [{
        "t": 0.0, "kind": "run_start", "schema": 1, "run_id": "r-test",
        "knobs": {"engine": "memascend", "zero_optimization": {"offload_param": {"buffer_count": 4}},
                  "aio": {"block_size": 1048576}},
        "model": {"name": "tiny-llama"}, "versions": {}, "host": {},
    }]
    events.append({"t": 0.1, "kind": "alloc", "id": 1, "component": C.PARAM_POOL, "requested": 4 * scale,
                   "reserved": 4 * scale, "backend": "aio-mlock"})
    events.append({"t": 0.1, "kind": "alloc", "id": 2, "component": C.OPTIMIZER_POOL, "requested": 3 * scale,
                   "reserved": 3 * scale + 4096, "backend": "native-mlock"})
    events.append({"t": 0.2, "kind": "alloc", "id": 3, "component": C.GRAD_FLAT, "requested": scale,
                   "reserved": scale, "backend": "pageable"})
    step_every = max(1, n_samples // (n_steps + 1))
    step = 0
    for i in range(n_samples):
        t = round(0.3 + i * dt, 4)
        ramp = min(1.0, i / 20)
        comps = {
            C.FRAMEWORK: 2 * scale,
            C.PARAM_POOL: int(4 * scale * ramp),
            C.OPTIMIZER_POOL: int(3 * scale * ramp),
            C.GRAD_FLAT: int(scale * ramp),
            C.OPTIMIZER_TRANSIENTS: 2 * scale if 60 <= i < 70 else 0,
            C.ACTIVATIONS: scale // 2 + (i % 7) * scale // 32,
            C.HEAP_FREE: scale // 4,
            C.PAGE_CACHE: min(i, 100) * scale // 50,
        }
        inside = sum(v for k, v in comps.items() if k not in C.OUTSIDE_RSS)
        comps[C.OTHER] = scale // 8
        rss = inside + comps[C.OTHER]
        reserved = int(7 * scale * ramp)
        events.append({
            "t": t, "kind": "sample", "rss": rss, "vm_lck": reserved, "vm_hwm": rss,
            "page_cache": comps[C.PAGE_CACHE], "io_read": i * scale, "io_write": i * scale // 2,
            "pinned_reserved": reserved, "pinned_used": int(reserved * (0.55 + 0.4 * math.sin(i / 9) ** 2)),
            "components": comps,
        })
        if i and i % step_every == 0 and step < n_steps:
            events.append({"t": t, "kind": "step", "index": step, "seconds": 1.5 + 0.1 * step,
                           "loss": 9.0 - 0.3 * step, "swap_in_bytes": 3 * scale, "swap_out_bytes": 2 * scale,
                           "pinned_used_peak": reserved, "rss_peak": rss})
            events.append({"t": t, "kind": "pool", "name": C.PARAM_POOL, "capacity": 4 * scale,
                           "buffers": [[scale, scale], [scale, scale // 2], [scale, scale // 4], [scale, 0]]})
            step += 1
    events.append({"t": 0.3 + n_samples * dt, "kind": "pool", "name": C.OPTIMIZER_POOL, "capacity": 3 * scale,
                   "buffers": [[scale, 3 * scale // 4], [scale, scale], [scale, scale // 3]]})
    events.append({"t": 0.3 + n_samples * dt, "kind": "free", "id": 3, "component": C.GRAD_FLAT,
                   "requested": scale, "reserved": scale, "backend": "pageable"})
    if error:
        events.append({"t": 0.3 + n_samples * dt, "kind": "error", "message": error,
                       "traceback": "Traceback (most recent call last):\n  ...\nRuntimeError: " + error})
    end_summary = summarize(events, status=status, error=error)
    events.append({"t": 0.4 + n_samples * dt, "kind": "run_end", "status": status, "summary": end_summary})
    return events


def make_run(**kwargs):
    events = make_events(**kwargs)
    status = kwargs.get("status", "ok")
    return Run("/tmp/runs/r-test", events, summarize(events, status=status, error=kwargs.get("error")))


def empty_run():
    events = [{"t": 0.0, "kind": "run_start", "schema": 1, "run_id": "r-empty", "knobs": {}, "model": {}}]
    return Run("/tmp/runs/r-empty", events, None)


def by_name(fig):
    return {trace.name: trace for trace in fig.data}


# ------------------------------------------------------------------ helpers

def test_bytes_unit():
    assert F.bytes_unit(0) == (MiB, "MiB")
    assert F.bytes_unit(GiB - 1) == (MiB, "MiB")
    assert F.bytes_unit(GiB) == (GiB, "GiB")
    assert F.bytes_unit(5 * GiB) == (GiB, "GiB")


def test_downsample_keeps_peaks_and_caps_points():
    n = 100_000
    values = [(i * 7919) % 1000 for i in range(n)]  # noisy, bounded by 999
    values[54_321] = 50_000  # one sharp spike
    values[77_777] = -50_000  # and a dip
    idx = F.downsample_indices([values], max_points=500)
    assert len(idx) <= 500
    assert idx == sorted(set(idx))
    assert idx[0] == 0 and idx[-1] == n - 1
    kept = [values[i] for i in idx]
    assert max(kept) == 50_000 and min(kept) == -50_000


def test_downsample_several_keys_and_short_input():
    a = [0] * 10_000
    b = [0] * 10_000
    a[1234], b[8765] = 5, 7
    idx = F.downsample_indices([a, b], max_points=300)
    assert len(idx) <= 300 and 1234 in idx and 8765 in idx
    assert F.downsample_indices([[1, 2, 3]], max_points=300) == [0, 1, 2]
    assert F.downsample_indices([[]]) == []
    with pytest.raises(ValueError):
        F.downsample_indices([a, b], max_points=4)


# ------------------------------------------------------------------ figures

def test_memory_by_component_traces_and_names():
    run = make_run()
    fig = F.memory_by_component(run)
    assert isinstance(fig, go.Figure)
    traces = by_name(fig)
    stacked = [t for t in fig.data if t.stackgroup]
    assert [t.name for t in stacked] == [c for c in C.ALL if c not in C.OUTSIDE_RSS]
    assert C.PAGE_CACHE in traces and not traces[C.PAGE_CACHE].stackgroup
    assert traces[C.PAGE_CACHE].line.dash == "dash"
    assert traces[F.RSS].mode == "lines" and not traces[F.RSS].stackgroup
    for name in C.ALL:  # hover explains the component
        assert C.DESCRIPTIONS[name].split()[0] in traces[name].hovertemplate
    assert fig.layout.xaxis.title.text == "time since start (s)"
    assert fig.layout.template == pio.templates["plotly_white"]
    # the step boundaries: one vertical segment per step, no text labels
    steps = traces[F.STEPS]
    assert sum(1 for x in steps.x if x is not None) == 2 * len(run.steps)
    assert steps.mode == "lines"


def test_memory_units_mib_and_values_divided():
    run = make_run(scale=MiB)  # peak RSS about 12 MiB
    fig = F.memory_by_component(run)
    assert fig.layout.yaxis.title.text == "host memory (MiB)"
    tl = run.timeline
    assert by_name(fig)[F.RSS].y[-1] == pytest.approx(tl.rss[-1] / MiB)
    assert by_name(fig)[C.FRAMEWORK].y[0] == pytest.approx(2.0)


def test_memory_units_gib_and_values_divided():
    run = make_run(scale=GiB // 4)  # peak RSS about 3 GiB
    fig = F.memory_by_component(run)
    assert fig.layout.yaxis.title.text == "host memory (GiB)"
    rss = by_name(fig)[F.RSS].y
    assert max(rss) == pytest.approx(max(run.timeline.rss) / GiB)
    assert by_name(fig)[C.FRAMEWORK].y[0] == pytest.approx(0.5)


def test_memory_downsampled_keeps_peak():
    run = make_run(n_samples=6000, n_steps=20)
    fig = F.memory_by_component(run, max_points=600)
    rss = by_name(fig)[F.RSS]
    assert len(rss.x) <= 600
    assert max(rss.y) == pytest.approx(max(run.timeline.rss) / MiB)
    # every series shares the same x, so the stack lines up
    assert all(t.x == rss.x for t in fig.data if t.name != F.STEPS)


def test_pinned_fragmentation_steps_pools():
    run = make_run()
    pinned = F.pinned_reserved_vs_used(run)
    assert set(by_name(pinned)) == {F.RESERVED, F.USED, F.STEPS}
    assert pinned.layout.yaxis.title.text == "pinned memory (MiB)"
    assert max(by_name(pinned)[F.RESERVED].y) == pytest.approx(7.0)

    frag = F.fragmentation(run)
    y = by_name(frag)[F.FRAGMENTATION].y
    assert all(0.0 <= v <= 1.0 for v in y) and len(y) > 0
    assert frag.layout.yaxis.tickformat == ".0%"

    steps = F.step_times_and_loss(run)
    names = by_name(steps)
    assert isinstance(names[F.STEP_TIME], go.Bar)
    assert names[F.LOSS].yaxis == "y2"
    assert list(names[F.LOSS].y) == [st["loss"] for st in run.steps]

    pools = F.pool_occupancy(run)
    heatmaps = [t for t in pools.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 2
    param = next(h for h in heatmaps if h.name == C.PARAM_POOL)
    assert list(param.z[0]) == [1.0, 0.5, 0.25, 0.0]
    titles = " ".join(a.text for a in pools.layout.annotations)
    assert "param_pool" in titles and "reserved 4.0 MiB" in titles and "used 1.8 MiB" in titles


def test_compare_runs():
    a, b = make_run(scale=MiB), make_run(scale=2 * MiB)
    fig = F.compare_runs([a, b], labels=["deepspeed", "memascend <b>"])
    peaks = [t for t in fig.data if t.legend in (None, "legend")]
    assert [t.name for t in peaks] == [label for _, label in F.PEAK_FIELDS]
    assert len({t.offsetgroup for t in peaks}) == 4  # grouped side by side
    comps = [t for t in fig.data if t.legend == "legend2"]
    assert C.PARAM_POOL in [t.name for t in comps] and all(t.offsetgroup is None for t in comps)
    assert fig.layout.barmode == "stack"
    assert list(peaks[0].x) == ["deepspeed", "memascend &lt;b&gt;"]
    assert peaks[0].y[1] == pytest.approx(b.summary["peak_rss_bytes"] / MiB)
    assert F.compare_runs([a, a]).data[0].x == ("r-test", "r-test #2")


def test_figures_on_empty_run():
    run = empty_run()
    for build in (F.memory_by_component, F.pinned_reserved_vs_used, F.fragmentation,
                  F.step_times_and_loss, F.pool_occupancy):
        fig = build(run)
        assert isinstance(fig, go.Figure)
        fig.to_json()  # valid, serializable
        assert any("no " in a.text for a in fig.layout.annotations)
    assert F.memory_by_component(run).layout.yaxis.title.text == "host memory (MiB)"
    F.compare_runs([]).to_json()
    F.compare_runs([run]).to_json()


# ------------------------------------------------------------------- report

def test_report_self_contained_and_escaped(tmp_path):
    run = make_run(status="failed", error="boom <script>alert(1)</script> & more")
    path = R.write_report(run, tmp_path / "sub" / "report.html")
    text = open(path, encoding="utf-8").read()
    assert path == str(tmp_path / "sub" / "report.html")
    assert "plotly.js v" in text and text.count("plotly.js v") == 1  # embedded once
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing fetched from the network
    assert '<script src="http' not in text
    assert "<script>alert(1)" not in text
    assert "boom &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text
    for field in run.summary:
        assert field in text
    for label in ("r-test", "failed", "memascend", "tiny-llama"):
        assert label in text
    assert text.count("Plotly.newPlot") == 5
    assert "aio-mlock" in text and "native-mlock" in text  # the allocations table


def test_report_of_empty_and_live_runs(tmp_path):
    text = open(R.write_report(empty_run(), tmp_path / "r.html"), encoding="utf-8").read()
    assert "no allocation events" in text and "r-empty" in text


def test_allocation_rows_grouped():
    run = make_run()
    frees = [e for e in run.events if e["kind"] == "free"]
    rows = dict(R.allocation_rows(run.allocations, frees))
    assert rows[(C.OPTIMIZER_POOL, "native-mlock")] == {
        "count": 1, "freed": 0, "requested": 3 * MiB, "reserved": 3 * MiB + 4096}
    assert rows[(C.GRAD_FLAT, "pageable")]["freed"] == 1
    assert [k[0] for k in rows] == [C.PARAM_POOL, C.OPTIMIZER_POOL, C.GRAD_FLAT]  # chart order


def test_summary_table_text():
    run = make_run(scale=GiB // 4)
    text = R.summary_table_text(run.summary)
    for field in run.summary:
        assert re.search(rf"^{field}\s", text, re.M), field
    assert "GiB" in text and "%" in text and " s " in text
    assert re.search(r"^  param_pool\s+1\.00 GiB", text, re.M)
    # an unknown extra field is still listed
    assert "new_field" in R.summary_table_text({**run.summary, "new_field": 3})
