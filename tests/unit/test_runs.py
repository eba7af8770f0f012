"""Runs: the summary (pure accounting over hand-built events), Timeline, and the run store on disk."""
import json
import os
import warnings

import pytest

import memlab.runs as R
from memlab import components as C
from memlab.runs import EVENTS_FILE, SUMMARY_FILE, Run, RunStoreError, Timeline, load_run, summarize, write_summary
from memlab.telemetry import encode

MiB = 1 << 20


def sample(t, rss, vm_hwm=None, vm_lck=0, reserved=0, used=0, components=None, **extra):
    event = {"t": t, "kind": "sample", "rss": rss, "vm_lck": vm_lck, "vm_hwm": rss if vm_hwm is None else vm_hwm,
             "page_cache": 0, "io_read": 0, "io_write": 0, "pinned_reserved": reserved, "pinned_used": used,
             "components": components or {}}
    event.update(extra)
    return event


def step(index, seconds, loss, swap_in=0, swap_out=0, used_peak=0, reserved=0, t=None):
    return {"t": float(index) if t is None else t, "kind": "step", "index": index, "seconds": seconds, "loss": loss,
            "swap_in_bytes": swap_in, "swap_out_bytes": swap_out, "pinned_used_peak": used_peak,
            "pinned_reserved": reserved, "rss_peak": 0}


def alloc(kind, reserved, backend="aio-mlock", requested=None, component=C.PARAM_POOL, id_=0):
    return {"t": 0.0, "kind": kind, "id": id_, "component": component,
            "requested": reserved if requested is None else requested, "reserved": reserved, "backend": backend}


RUN_START = {"t": 0.0, "kind": "run_start", "schema": 1, "run_id": "r-001",
             "knobs": {"engine": "deepspeed", "run": {"steps": 3}}, "model": {"name": "tiny-llama"},
             "from_auto": {"run.dtype": "memlab: the model's torch_dtype float32"},
             "versions": {}, "host": {}}


def run_end(status="ok", error=None):
    return {"t": 99.0, "kind": "run_end", "status": status, "error": error, "summary": {}}


# ------------------------------------------------------------------ summarize: a whole run

def full_run():
    return [
        RUN_START,
        alloc("alloc", 4 * MiB, id_=1),
        sample(0.1, rss=100 * MiB, vm_hwm=100 * MiB, vm_lck=4 * MiB, reserved=4 * MiB, used=1 * MiB,
               components={C.FRAMEWORK: 80 * MiB, C.PARAM_POOL: 4 * MiB, C.OTHER: 16 * MiB}),
        step(0, 2.0, 10.5, swap_in=1000, swap_out=500, used_peak=3 * MiB, reserved=4 * MiB),
        dict(sample(1.1, rss=300 * MiB, vm_hwm=310 * MiB, vm_lck=6 * MiB, reserved=4 * MiB, used=2 * MiB,
                    components={C.FRAMEWORK: 80 * MiB, C.PARAM_POOL: 4 * MiB, C.ACTIVATIONS: 150 * MiB,
                                C.OTHER: 66 * MiB}), phase="backward", step=2),
        step(1, 4.0, 9.25, swap_in=1001, swap_out=501, used_peak=2 * MiB, reserved=4 * MiB),
        step(2, 3.0, 8.0, swap_in=1003, swap_out=502, used_peak=1 * MiB, reserved=4 * MiB),
        {"t": 3.5, "kind": "log", "message": "hello"},
        run_end("ok"),
    ]


def test_summary_of_a_whole_run():
    assert summarize(full_run()) == {
        "run_id": "r-001",
        "status": "ok",
        "engine": "deepspeed",
        "model": "tiny-llama",
        "knobs": {"engine": "deepspeed", "run": {"steps": 3}},
        "from_auto": {"run.dtype": "memlab: the model's torch_dtype float32"},
        "steps": 3,
        "peak_rss_bytes": 310 * MiB,
        "peak_vm_lck_bytes": 6 * MiB,
        "peak_pinned_reserved_bytes": 4 * MiB,
        "peak_pinned_used_bytes": 3 * MiB,
        "fragmentation_at_peak": 0.25,
        "peak_engine_host_bytes": 4 * MiB,
        "components_at_peak": {C.FRAMEWORK: 80 * MiB, C.PARAM_POOL: 4 * MiB, C.ACTIVATIONS: 150 * MiB,
                               C.OTHER: 66 * MiB},
        "peak_phase": "backward", "peak_step": 2,  # the peak sample's
        "step_time_median_s": 3.0,
        "losses": [10.5, 9.25, 8.0],
        "swap_read_bytes_per_step": 1001,  # 3004 // 3
        "swap_write_bytes_per_step": 501,  # 1503 // 3
        "error": None,
    }


def test_summary_has_every_design_field_and_is_json():
    s = summarize(full_run())
    for field in ("run_id", "status", "engine", "model", "knobs", "steps", "peak_rss_bytes", "peak_vm_lck_bytes",
                  "peak_pinned_reserved_bytes", "peak_pinned_used_bytes", "fragmentation_at_peak",
                  "peak_engine_host_bytes", "components_at_peak", "step_time_median_s", "losses",
                  "swap_read_bytes_per_step", "swap_write_bytes_per_step", "error"):
        assert field in s
    assert json.loads(json.dumps(s, allow_nan=False)) == s


def test_summary_of_no_events():
    assert summarize([]) == {
        "run_id": None, "status": "failed", "engine": "deepspeed", "model": None, "knobs": {}, "from_auto": {}, "steps": 0,
        "peak_rss_bytes": 0, "peak_vm_lck_bytes": 0, "peak_pinned_reserved_bytes": 0, "peak_pinned_used_bytes": 0,
        "fragmentation_at_peak": 0.0, "peak_engine_host_bytes": 0, "components_at_peak": {},
        "peak_phase": None, "peak_step": None,
        "step_time_median_s": None, "losses": [], "swap_read_bytes_per_step": 0, "swap_write_bytes_per_step": 0,
        "error": "worker ended without reporting why",
    }


# ------------------------------------------------------------------ peaks

def test_peak_rss_is_the_high_water_mark():
    # VmHWM catches a peak between two samples that RSS never showed
    events = [sample(0, rss=100, vm_hwm=100), sample(1, rss=200, vm_hwm=950), sample(2, rss=150, vm_hwm=950)]
    assert summarize(events)["peak_rss_bytes"] == 950


def test_peak_rss_never_below_a_sampled_rss():
    assert summarize([sample(0, rss=500, vm_hwm=400)])["peak_rss_bytes"] == 500


def test_components_at_peak_is_the_sample_with_max_rss():
    events = [
        sample(0, rss=100, vm_hwm=1000, components={C.PARAM_POOL: 1}),
        sample(1, rss=300, vm_hwm=1000, components={C.PARAM_POOL: 2, C.GRAD_FLAT: 9}),
        sample(2, rss=300, vm_hwm=1000, components={C.PARAM_POOL: 3}),  # tie: the first one wins
        sample(3, rss=200, vm_hwm=1000, components={C.PARAM_POOL: 4}),
    ]
    s = summarize(events)
    assert s["components_at_peak"] == {C.PARAM_POOL: 2, C.GRAD_FLAT: 9}
    assert s["peak_rss_bytes"] == 1000


def test_components_at_peak_is_a_copy():
    events = [sample(0, rss=1, components={C.PARAM_POOL: 1})]
    summarize(events)["components_at_peak"][C.PARAM_POOL] = 99
    assert events[0]["components"] == {C.PARAM_POOL: 1}


def test_peak_engine_host_bytes_excludes_framework_runtime_activations_other():
    # runtime (what building the engine holds beyond its buffers) was part of `other` before it had a
    # name: the engine figure excludes exactly the bytes it excluded before
    every = {name: 1 << i for i, name in enumerate(C.ALL)}
    expected = sum(v for k, v in every.items() if k not in (C.FRAMEWORK, C.RUNTIME, C.ACTIVATIONS, C.OTHER))
    assert C.NOT_ENGINE == {C.FRAMEWORK, C.RUNTIME, C.ACTIVATIONS, C.OTHER}
    assert summarize([sample(0, rss=10, components=every)])["peak_engine_host_bytes"] == expected


def test_peak_engine_host_bytes_is_a_peak_over_time_not_at_peak_rss():
    events = [
        sample(0, rss=100, components={C.OPTIMIZER_POOL: 70, C.GRAD_FLAT: 20, C.OTHER: 10}),  # engine 90
        sample(1, rss=500, components={C.OPTIMIZER_POOL: 40, C.ACTIVATIONS: 400, C.FRAMEWORK: 60}),  # engine 40
    ]
    s = summarize(events)
    assert s["peak_engine_host_bytes"] == 90
    assert s["components_at_peak"] == {C.OPTIMIZER_POOL: 40, C.ACTIVATIONS: 400, C.FRAMEWORK: 60}


def test_peak_vm_lck():
    assert summarize([sample(0, 1, vm_lck=10), sample(1, 1, vm_lck=30), sample(2, 1, vm_lck=20)])[
        "peak_vm_lck_bytes"] == 30


def test_peak_pinned_reserved_from_alloc_and_free_events():
    events = [
        alloc("alloc", 4096, backend="native-mlock", id_=1),
        alloc("alloc", 8192, backend="aio-mlock", id_=2),
        alloc("alloc", 10 ** 9, backend="pageable", id_=3),  # not pinned: ignored
        alloc("free", 4096, backend="native-mlock", id_=1),
        alloc("alloc", 2048, backend="torch-pinned", id_=4),
        sample(0, rss=1, reserved=10_000, used=9_000),
    ]
    s = summarize(events)
    assert s["peak_pinned_reserved_bytes"] == 4096 + 8192
    assert s["peak_pinned_used_bytes"] == 9_000


def test_peak_pinned_reserved_from_samples_when_higher():
    events = [alloc("alloc", 4096), sample(0, rss=1, reserved=50_000, used=40_000)]
    s = summarize(events)
    assert s["peak_pinned_reserved_bytes"] == 50_000
    assert s["fragmentation_at_peak"] == 0.2


def test_peak_pinned_used_over_samples_and_steps():
    events = [sample(0, 1, reserved=100, used=30), step(0, 1.0, 1.0, used_peak=70, reserved=100),
              sample(1, 1, reserved=100, used=50)]
    assert summarize(events)["peak_pinned_used_bytes"] == 70


# ------------------------------------------------------------------ fragmentation

def test_fragmentation_uses_the_best_fill_at_peak_reservation():
    events = [
        sample(0, 1, reserved=1000, used=990),  # below the peak reservation: ignored
        sample(1, 1, reserved=2000, used=500),
        step(0, 1.0, 1.0, used_peak=1500, reserved=2000),
        sample(2, 1, reserved=2000, used=1200),
        step(1, 1.0, 1.0, used_peak=1999, reserved=1000),  # other reservation level: ignored
    ]
    s = summarize(events)
    assert s["peak_pinned_reserved_bytes"] == 2000
    assert s["fragmentation_at_peak"] == 0.25  # 1 - 1500 / 2000
    assert s["peak_pinned_used_bytes"] == 1999


def test_fragmentation_from_samples_only():
    events = [sample(0, 1, reserved=3000, used=1000), sample(1, 1, reserved=3000, used=2000)]
    assert summarize(events)["fragmentation_at_peak"] == pytest.approx(1 - 2000 / 3000, abs=1e-6)
    assert summarize(events)["fragmentation_at_peak"] == 0.333333  # rounded to 6 places


def test_fragmentation_full_and_empty_buffers():
    assert summarize([sample(0, 1, reserved=4096, used=4096)])["fragmentation_at_peak"] == 0.0
    assert summarize([sample(0, 1, reserved=4096, used=0)])["fragmentation_at_peak"] == 1.0


def test_fragmentation_without_pinned_memory_is_zero():
    assert summarize([sample(0, 1), step(0, 1.0, 1.0)])["fragmentation_at_peak"] == 0.0


def test_fragmentation_when_only_allocations_saw_the_peak():
    events = [
        alloc("alloc", 4096, backend="native-mlock", requested=3000, component=C.GRAD_FLAT, id_=1),
        alloc("free", 4096, backend="native-mlock", requested=3000, component=C.GRAD_FLAT, id_=1),
        sample(0, 1, reserved=0, used=0),
    ]
    s = summarize(events)
    assert s["peak_pinned_reserved_bytes"] == 4096
    assert s["fragmentation_at_peak"] == round(1 - 3000 / 4096, 6)


# ------------------------------------------------------------------ steps

def test_swap_bytes_per_step_are_integer_means():
    events = [step(0, 1.0, 1.0, swap_in=10, swap_out=7), step(1, 1.0, 1.0, swap_in=11, swap_out=8)]
    s = summarize(events)
    assert s["swap_read_bytes_per_step"] == 10  # 21 // 2
    assert s["swap_write_bytes_per_step"] == 7  # 15 // 2
    assert type(s["swap_read_bytes_per_step"]) is int and type(s["swap_write_bytes_per_step"]) is int


def test_step_time_median_and_losses():
    events = [step(i, secs, loss) for i, (secs, loss) in enumerate([(1.0, 4.0), (10.0, 3.0), (2.0, 2.5),
                                                                    (3.0, 2.0)])]
    s = summarize(events)
    assert s["steps"] == 4
    assert s["step_time_median_s"] == 2.5
    assert s["losses"] == [4.0, 3.0, 2.5, 2.0]


def test_no_steps():
    s = summarize([RUN_START, sample(0, 1), run_end("ok")])
    assert (s["steps"], s["step_time_median_s"], s["losses"]) == (0, None, [])
    assert (s["swap_read_bytes_per_step"], s["swap_write_bytes_per_step"]) == (0, 0)


# ------------------------------------------------------------------ identity fields

def test_identity_fields_come_from_run_start():
    start = dict(RUN_START, knobs={"engine": "memascend"}, model={"name": "small-llama", "source": "preset"})
    s = summarize([start, run_end()])
    assert (s["run_id"], s["engine"], s["model"], s["knobs"]) == ("r-001", "memascend", "small-llama",
                                                                   {"engine": "memascend"})


def test_first_run_start_and_last_run_end_count():
    second_start = dict(RUN_START, run_id="other")
    events = [RUN_START, second_start, run_end("failed", "first"), run_end("stopped", "second")]
    s = summarize(events)
    assert (s["run_id"], s["status"], s["error"]) == ("r-001", "stopped", "second")


# ------------------------------------------------------------------ status and error

def error_event(message):
    return {"t": 5.0, "kind": "error", "message": message, "traceback": ["..."]}


@pytest.mark.parametrize("events, status, error, expected", [
    # run_end decides when nobody overrides
    ([RUN_START, run_end("ok")], None, None, ("ok", None)),
    ([RUN_START, run_end("stopped", "stopped by the user at step 1 (forward)")], None, None,
     ("stopped", "stopped by the user at step 1 (forward)")),
    ([RUN_START, run_end("over_budget", "rss above budget")], None, None, ("over_budget", "rss above budget")),
    # run_end's error is preferred to the error events
    ([RUN_START, error_event("early"), run_end("failed", "AssertionError: x (phase step, step 1)")], None, None,
     ("failed", "AssertionError: x (phase step, step 1)")),
    # run_end without an error: the last error event
    ([RUN_START, error_event("first"), error_event("last"), run_end("failed")], None, None, ("failed", "last")),
    # no run_end: failed, with the last error event or a default cause
    ([RUN_START, error_event("MemoryError")], None, None, ("failed", "MemoryError")),
    ([RUN_START, sample(0, 1)], None, None, ("failed", "worker ended without reporting why")),
    # explicit status overrides run_end
    ([RUN_START, run_end("ok")], "failed", "worker killed by SIGKILL (out of memory?)", None,),
    ([RUN_START, run_end("ok")], "stopped", None, ("stopped", None)),
    ([RUN_START], "failed", None, ("failed", "worker ended without reporting why")),
    # explicit error overrides everything the events say
    ([RUN_START, error_event("from events"), run_end("failed", "from run_end")], None, "explicit",
     ("failed", "explicit")),
    # ok never carries an error
    ([RUN_START, error_event("noise"), run_end("ok", "stale")], None, None, ("ok", None)),
    ([RUN_START, run_end("failed", "x")], "ok", "ignored", ("ok", None)),
    # a stopped run without any cause has none
    ([RUN_START], "stopped", None, ("stopped", None)),
])
def test_status_and_error_precedence(events, status, error, expected):
    if expected is None:
        expected = (status, error)
    s = summarize(events, status=status, error=error)
    assert (s["status"], s["error"]) == expected


# ------------------------------------------------------------------ Timeline

def test_timeline_columns():
    samples = [
        sample(0.5, rss=10, vm_hwm=11, vm_lck=3, reserved=100, used=25, components={C.PARAM_POOL: 7}),
        {"t": 1.0, "kind": "sample", "rss": 20, "vm_hwm": 21, "vm_lck": 4},  # probes' fields missing
        sample(1.5, rss=30, vm_hwm=31, vm_lck=5, reserved=200, used=200, io_read=9, io_write=8, page_cache=4096,
               components={C.PARAM_POOL: 8, C.HEAP_FREE: 2}),
    ]
    tl = Timeline(samples)
    assert len(tl) == 3
    assert Timeline.COLUMNS == ("t", "rss", "vm_lck", "vm_hwm", "page_cache", "io_read", "io_write",
                                "pinned_reserved", "pinned_used")
    assert tl.t == [0.5, 1.0, 1.5]
    assert tl.rss == [10, 20, 30]
    assert tl.vm_hwm == [11, 21, 31]
    assert tl.vm_lck == [3, 4, 5]
    assert tl.page_cache == [0, 0, 4096]
    assert tl.io_read == [0, 0, 9]
    assert tl.io_write == [0, 0, 8]
    assert tl.pinned_reserved == [100, 0, 200]
    assert tl.pinned_used == [25, 0, 200]
    assert set(tl.components) == set(C.ALL)
    assert tl.components[C.PARAM_POOL] == [7, 0, 8]
    assert tl.components[C.HEAP_FREE] == [0, 0, 2]
    assert tl.components[C.OTHER] == [0, 0, 0]
    assert tl.fragmentation == [0.75, 0.0, 0.0]


def test_empty_timeline():
    tl = Timeline([])
    assert len(tl) == 0
    assert tl.rss == [] and tl.fragmentation == []
    assert all(tl.components[name] == [] for name in C.ALL)


def test_run_timeline_uses_only_samples():
    run = Run("/nowhere/r-1", full_run())
    tl = run.timeline
    assert len(tl) == 2
    assert tl.rss == [100 * MiB, 300 * MiB]
    assert tl.fragmentation == [0.75, 0.5]
    assert [st["index"] for st in run.steps] == [0, 1, 2]
    assert run.logs == ["hello"]
    assert run.knobs == RUN_START["knobs"] and run.model == {"name": "tiny-llama"}
    assert run.run_id == "r-1"
    assert run.status == "unknown" and not run.done


# ------------------------------------------------------------------ run store

def write_run(folder, events, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, EVENTS_FILE), "w") as f:
        for event in events:
            f.write(encode(event))
        f.write(tail)


def test_load_run_missing_folder(tmp_path):
    with pytest.raises(RunStoreError) as info:
        load_run(tmp_path / "nope")
    assert str(info.value) == f"{tmp_path / 'nope'}: no such run folder"


def test_load_run_without_events_file(tmp_path):
    (tmp_path / SUMMARY_FILE).write_text("{}")
    with pytest.raises(RunStoreError) as info:
        load_run(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a memlab run (no events.jsonl)"


def test_load_run_with_a_truncated_last_line_keeps_every_whole_event(tmp_path):
    folder = tmp_path / "r-002"
    events = full_run()[:-1]  # the worker died before run_end
    write_run(folder, events, tail='{"t":4.0,"kind":"sam')
    with pytest.warns(UserWarning, match=r"events\.jsonl: 1 incomplete line\(s\) ignored \(the run was cut off\)"):
        run = load_run(folder)
    assert run.events == events
    assert run.summary == summarize(events)
    assert run.summary["status"] == "failed"
    assert run.summary["error"] == "worker ended without reporting why"
    assert run.summary["steps"] == 3


def test_load_run_of_a_clean_file_does_not_warn(tmp_path):
    write_run(tmp_path / "r", full_run())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = load_run(tmp_path / "r")
    assert run.summary["status"] == "ok"


def test_load_run_rebuilds_a_missing_summary(tmp_path):
    folder = tmp_path / "r-003"
    write_run(folder, full_run())
    run = load_run(str(folder))
    assert run.summary == summarize(full_run())
    assert run.run_id == "r-003"
    assert run.path == str(folder)
    assert run.done and run.status == "ok"
    assert not (folder / SUMMARY_FILE).exists()  # loading does not write


def test_load_run_prefers_the_stored_summary(tmp_path):
    folder = tmp_path / "r-004"
    write_run(folder, full_run())
    stored = dict(summarize(full_run(), status="stopped", error="stopped by the user"), note="written by the lab")
    write_summary(folder, stored)
    run = load_run(folder)
    assert run.summary == stored
    assert run.status == "stopped"


def test_load_run_equals_the_live_run(tmp_path):
    folder = tmp_path / "r-005"
    events = full_run()
    write_run(folder, events)
    summary = summarize(events)
    write_summary(folder, summary)
    live = Run(folder, events, summary)
    assert load_run(folder) == live
    assert load_run(folder).timeline.rss == live.timeline.rss


def test_write_summary_is_atomic(tmp_path):
    write_summary(tmp_path, {"status": "ok", "steps": 1})
    assert os.listdir(tmp_path) == [SUMMARY_FILE]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"status": "ok", "steps": 1}
    write_summary(str(tmp_path), {"status": "failed", "steps": 2})
    assert os.listdir(tmp_path) == [SUMMARY_FILE]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"status": "failed", "steps": 2}


def test_write_summary_never_exposes_a_partial_file(tmp_path, monkeypatch):
    write_summary(tmp_path, {"status": "ok"})
    seen = []

    def replace(src, dst):
        # at the moment of the swap the old summary is still whole and the new one is complete
        seen.append((json.loads(open(dst).read()), json.loads(open(src).read())))
        raise OSError("disk gone")

    monkeypatch.setattr(R.os, "replace", replace)
    with pytest.raises(OSError):
        write_summary(tmp_path, {"status": "failed"})
    assert seen == [({"status": "ok"}, {"status": "failed"})]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"status": "ok"}


def test_write_summary_failure_leaves_no_tmp(tmp_path):
    write_summary(tmp_path, {"status": "ok"})
    with pytest.raises(TypeError):
        write_summary(tmp_path, {"status": "ok", "bad": object()})
    assert os.listdir(tmp_path) == [SUMMARY_FILE]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == {"status": "ok"}


def test_load_run_with_a_corrupt_summary(tmp_path):
    folder = tmp_path / "r-006"
    write_run(folder, full_run())
    (folder / SUMMARY_FILE).write_text('{"status": "o')
    try:
        run = load_run(folder)
    except RunStoreError as exc:
        assert SUMMARY_FILE in str(exc)
    else:
        assert run.summary == summarize(full_run())
