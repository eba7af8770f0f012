"""Telemetry: event encoding, the event file, /proc readers, page-cache and heap probes, the sampler.

No DeepSpeed, no torch: the sampler is driven with a stub attribution callback.
"""
import ctypes
import json
import mmap
import os
import threading
import time

import pytest
from helpers import wait_for

import memlab.telemetry as T
from memlab.telemetry import (KINDS, Budgeted, PAGE, EventWriter, Sampler, decode_lines, encode, heap_free_bytes,
                              page_cache_bytes, page_round, read_io, read_status)


def read_events(path):
    with open(path) as f:
        return decode_lines(f)


# ------------------------------------------------------------------ encode

def test_kinds_are_the_design_contract():
    assert KINDS == ("run_start", "sample", "alloc", "free", "pool", "phase", "step", "log", "error", "run_end")
    assert T.SCHEMA == 1
    assert T.STATUSES == ("ok", "failed", "stopped", "over_budget")
    assert T.BACKENDS == ("aio-mlock", "native-mlock", "torch-pinned", "pageable")
    assert T.PINNED_BACKENDS == {"aio-mlock", "native-mlock", "torch-pinned"}


@pytest.mark.parametrize("kind", KINDS)
def test_encode_every_kind_is_one_compact_line(kind):
    line = encode({"t": 1.5, "kind": kind, "message": "two\nlines", "nested": {"a": [1, 2]}})
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert line == '{"t":1.5,"kind":"%s","message":"two\\nlines","nested":{"a":[1,2]}}\n' % kind
    assert json.loads(line) == {"t": 1.5, "kind": kind, "message": "two\nlines", "nested": {"a": [1, 2]}}


@pytest.mark.parametrize("event, message", [
    ({"kind": "bogus"}, "unknown event kind 'bogus'"),
    ({"t": 0}, "unknown event kind None"),
    ({"kind": "Sample"}, "unknown event kind 'Sample'"),
])
def test_encode_rejects_unknown_kinds(event, message):
    with pytest.raises(ValueError) as info:
        encode(event)
    assert str(info.value) == message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_rejects_non_finite_numbers(value):
    with pytest.raises(ValueError):
        encode({"kind": "step", "loss": value})
    with pytest.raises(ValueError):
        encode({"kind": "sample", "components": {"other": value}})


# ------------------------------------------------------------------ decode_lines

def test_decode_round_trip():
    events = [{"t": i / 10, "kind": KINDS[i % len(KINDS)], "i": i} for i in range(30)]
    assert decode_lines([encode(e) for e in events]) == (events, 0)


def test_decode_drops_a_torn_last_line_and_counts_it():
    lines = [encode({"kind": "log", "message": "a"}), encode({"kind": "log", "message": "b"}),
             encode({"kind": "step", "index": 0})[:9]]
    assert not lines[-1].endswith("\n")
    assert decode_lines(lines) == ([{"kind": "log", "message": "a"}, {"kind": "log", "message": "b"}], 1)


def test_decode_drops_a_complete_looking_object_without_newline():
    # a valid JSON object that lacks its newline was still cut before the writer finished
    assert decode_lines(['{"kind":"log"}\n', '{"kind":"log"}']) == ([{"kind": "log"}], 1)


def test_decode_skips_blank_lines_without_counting():
    lines = ["\n", '{"kind":"log","n":1}\n', "   \n", "\t\n", '{"kind":"log","n":2}\n', "\n"]
    assert decode_lines(lines) == ([{"kind": "log", "n": 1}, {"kind": "log", "n": 2}], 0)


def test_decode_counts_garbage_lines():
    lines = ["not json\n", '{"kind":"log","n":1}\n', "{broken\n", '{"kind":"log","n":2}\n', "}{\n"]
    assert decode_lines(lines) == ([{"kind": "log", "n": 1}, {"kind": "log", "n": 2}], 3)


def test_decode_strips_surrounding_whitespace():
    assert decode_lines(['  {"kind":"log"}  \n', '{"kind":"log"}\r\n']) == ([{"kind": "log"}, {"kind": "log"}], 0)


def test_decode_empty():
    assert decode_lines([]) == ([], 0)


def test_decode_counts_non_object_json_as_garbage():
    assert decode_lines(["42\n", "null\n", "[1]\n", '"x"\n', '{"kind":"log"}\n']) == ([{"kind": "log"}], 4)


# ------------------------------------------------------------------ EventWriter

def test_writer_emit_returns_and_appends_the_event(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path)
    event = w.emit("phase", name="init", step=0)
    assert set(event) == {"t", "kind", "name", "step"}
    assert event["kind"] == "phase" and event["name"] == "init" and event["step"] == 0
    assert 0 <= event["t"] < 5
    assert event["t"] == round(event["t"], 4)
    second = w.emit("log", message="hello")
    assert second["t"] >= event["t"]
    # line buffered: visible before close
    assert read_events(path) == ([event, second], 0)
    w.close()
    assert path.read_text().count("\n") == 2


def test_writer_clock_start(tmp_path):
    w = EventWriter(tmp_path / "e.jsonl", clock_start=time.monotonic() - 100.0)
    assert 100.0 <= w.now() < 105.0
    assert 100.0 <= w.emit("log", message="x")["t"] < 105.0
    w.close()


def test_writer_rejects_unknown_kinds_and_writes_nothing(tmp_path):
    path = tmp_path / "e.jsonl"
    w = EventWriter(path)
    with pytest.raises(ValueError):
        w.emit("bogus", x=1)
    with pytest.raises(ValueError):
        w.emit("step", loss=float("nan"))
    w.close()
    assert path.read_text() == ""


def test_writer_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(encode({"kind": "log", "message": "before"}))
    w = EventWriter(path)
    w.emit("log", message="after")
    w.close()
    events, dropped = read_events(path)
    assert dropped == 0
    assert [e["message"] for e in events] == ["before", "after"]


def test_writer_emit_after_close_is_dropped(tmp_path):
    path = tmp_path / "e.jsonl"
    w = EventWriter(path)
    w.emit("log", message="kept")
    w.close()
    event = w.emit("log", message="late")  # a sampler tick racing the end of the run must not raise
    assert event["message"] == "late"
    assert [e["message"] for e in read_events(path)[0]] == ["kept"]


def test_writer_is_thread_safe(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path)
    threads_n, per_thread = 4, 500
    payload = "x" * 300  # long lines make interleaving visible if the lock were missing
    barrier = threading.Barrier(threads_n)

    def work(tid):
        barrier.wait()
        for i in range(per_thread):
            w.emit("log", thread=tid, i=i, message=payload)

    threads = [threading.Thread(target=work, args=(tid,)) for tid in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    text = path.read_text()
    assert text.count("\n") == threads_n * per_thread
    events, dropped = decode_lines(text.splitlines(keepends=True))
    assert dropped == 0
    assert len(events) == threads_n * per_thread
    for tid in range(threads_n):
        mine = [e["i"] for e in events if e["thread"] == tid]
        assert mine == list(range(per_thread))  # each thread's events whole and in order
    assert all(e["message"] == payload and e["kind"] == "log" for e in events)


# ------------------------------------------------------------------ /proc readers

def test_read_status_fields():
    status = read_status()
    assert set(status) == {"VmRSS", "VmHWM", "VmLck"}
    for value in status.values():
        assert isinstance(value, int) and value >= 0 and value % 1024 == 0
    assert status["VmRSS"] > 0
    assert status["VmHWM"] >= status["VmRSS"]


def test_read_status_by_pid_and_rss_follows_memory():
    before = read_status(os.getpid())
    block = b"\x01" * (64 << 20)  # 64 MiB, every page touched
    after = read_status("self")
    assert after["VmRSS"] - before["VmRSS"] >= 60 << 20
    assert after["VmHWM"] >= after["VmRSS"]
    del block


def test_read_status_of_a_missing_process_raises():
    with pytest.raises(FileNotFoundError):
        read_status(_missing_pid())


def _missing_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


def test_read_io_of_a_missing_process_is_zero():
    assert read_io(_missing_pid()) == {"read_bytes": 0, "write_bytes": 0}


@pytest.mark.skipif(not os.access("/proc/self/io", os.R_OK), reason="/proc/self/io is not readable here")
def test_read_io_counts_writes(tmp_path):
    before = read_io()
    assert set(before) == {"read_bytes", "write_bytes"}
    assert all(isinstance(v, int) and v >= 0 for v in before.values())
    with open(tmp_path / "f", "wb") as f:
        f.write(b"y" * (4 << 20))
        f.flush()
        os.fsync(f.fileno())
    after = read_io()
    assert after["write_bytes"] - before["write_bytes"] >= 4 << 20
    assert after["read_bytes"] >= before["read_bytes"]


# ------------------------------------------------------------------ heap_free_bytes

def test_heap_free_bytes_is_a_non_negative_int():
    value = heap_free_bytes()
    assert isinstance(value, int) and value >= 0


@pytest.mark.skipif(T._mallinfo2 is None, reason="glibc without mallinfo2")
def test_heap_free_bytes_rises_when_holes_are_left_in_the_heap():
    # 20,000 blocks of 2000 B come from malloc (not pymalloc, which stops at 512 B);
    # freeing every other one leaves holes the allocator cannot trim.
    blocks = [bytes(2000) for _ in range(20_000)]
    full = heap_free_bytes()
    del blocks[::2]
    holed = heap_free_bytes()
    assert holed - full >= 15_000_000
    del blocks


def test_heap_free_bytes_without_mallinfo2_is_zero(monkeypatch):
    monkeypatch.setattr(T, "_mallinfo2", None)
    assert heap_free_bytes() == 0


@pytest.mark.skipif(T._mallinfo2 is None, reason="glibc without mallinfo2")
def test_the_heaps_live_bytes_count_a_block_as_its_pages_are_written():
    # 64 MiB is far above glibc's mmap threshold: a mapping of its own, in RAM page by page as it is written
    import torch

    before = T.heap_reading().live
    block = torch.empty(16 << 20)  # 64 MiB, never written
    unwritten = T.heap_reading().live - before
    block[: 4 << 20] = 1.0  # the first 16 MiB
    written = T.heap_reading().live - before
    assert unwritten < 1 << 20
    assert 16 << 20 <= written < 17 << 20
    assert T.unwritten_mmapped_bytes() >= 48 << 20
    del block


def test_the_heap_without_mallinfo2_is_unknown(monkeypatch):
    monkeypatch.setattr(T, "_mallinfo2", None)
    assert T.heap_reading() == T.Heap(known=False) and not T.heap_reading().known


def test_a_mapping_that_is_no_malloc_block_is_not_read_as_one():
    # an anonymous mapping of our own, written, with no chunk header: walked over, counted 0
    region = mmap.mmap(-1, 8 * PAGE)
    region.write(b"\xff" * (8 * PAGE))
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        assert T._unwritten_in_mapping(mem, address, address + 8 * PAGE) == 0
    finally:
        os.close(mem)


def test_probes_split_the_heap_into_runtime_and_tensors_in_flight(tmp_path, monkeypatch):
    """Until the engine is ready, what the build holds beyond its buffers is runtime; after,
    heap growth no component owns is activations. What the build frees later lowers that
    floor at a step's end, and the runtime by what RSS lost with it: a freed block that was
    in RAM leaves the runtime, one that never was (written by nobody) does not."""
    from memlab import components as C
    import memlab.engine.probes as P

    MiB = 1 << 20

    def ready_probes():
        probes = P.Probes(EventWriter(tmp_path / "events.jsonl"))
        probes.framework_bytes = 400 * MiB
        probes.record_alloc(C.OPTIMIZER_POOL, 100 * MiB, 100 * MiB, "aio-mlock")
        building = probes.attribute(600 * MiB, 0, T.Heap(free=5 * MiB, live=300 * MiB))["components"]
        assert building[C.RUNTIME] == 95 * MiB and building[C.OTHER] == 0 and building[C.ACTIVATIONS] == 0
        probes.engine_ready(560 * MiB, T.Heap(free=5 * MiB, live=260 * MiB))  # runtime 55 MiB, 160 MiB of it heap
        step = probes.attribute(640 * MiB, 0, T.Heap(free=5 * MiB, live=340 * MiB))["components"]
        assert (step[C.RUNTIME], step[C.ACTIVATIONS], step[C.OTHER]) == (55 * MiB, 80 * MiB, 0)
        return probes

    def step_ends(probes, rss):
        monkeypatch.setattr(P, "heap_reading", lambda: T.Heap(free=5 * MiB, live=230 * MiB))  # 30 MiB freed
        monkeypatch.setattr(P, "read_status", lambda: {"VmRSS": rss})
        probes.step_ended()

    resident = ready_probes()
    step_ends(resident, rss=530 * MiB)  # the 30 MiB were in RAM
    later = resident.attribute(560 * MiB, 0, T.Heap(free=5 * MiB, live=260 * MiB))["components"]
    assert (later[C.RUNTIME], later[C.ACTIVATIONS], later[C.OTHER]) == (25 * MiB, 30 * MiB, 0)

    never_written = ready_probes()
    step_ends(never_written, rss=560 * MiB)  # RSS did not move: the 30 MiB were never in RAM
    later = never_written.attribute(560 * MiB, 0, T.Heap(free=5 * MiB, live=230 * MiB))["components"]
    assert (later[C.RUNTIME], later[C.ACTIVATIONS], later[C.OTHER]) == (55 * MiB, 0, 0)


# ------------------------------------------------------------------ page cache

def test_page_round():
    assert PAGE == os.sysconf("SC_PAGE_SIZE")
    assert page_round(0) == 0
    assert page_round(1) == PAGE
    assert page_round(PAGE) == PAGE
    assert page_round(PAGE + 1) == 2 * PAGE
    assert page_round(65_538_048) == -(-65_538_048 // PAGE) * PAGE
    assert page_round(4.0) == PAGE
    assert isinstance(page_round(4.0), int)


def _write(path, nbytes):
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())


def _drop_from_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_page_cache_of_a_written_file_and_after_dropping_it(tmp_path):
    path = tmp_path / "0_param.tensor.swp"
    size = 3 * PAGE + 100
    _write(path, size)
    cached = page_cache_bytes([str(path)])
    assert 0 < cached <= page_round(size)
    assert cached % PAGE == 0
    _drop_from_cache(path)
    assert page_cache_bytes([path]) == 0


def test_page_cache_sums_files_and_counts_missing_ones_as_zero(tmp_path):
    a, b = tmp_path / "a.swp", tmp_path / "b.swp"
    _write(a, 8 * PAGE)
    _write(b, 2 * PAGE)
    alone = page_cache_bytes([a]), page_cache_bytes([b])
    assert 0 < alone[0] <= 8 * PAGE and 0 < alone[1] <= 2 * PAGE
    both = page_cache_bytes([a, tmp_path / "vanished.swp", b])
    assert both == alone[0] + alone[1]
    _drop_from_cache(b)
    assert page_cache_bytes([a, b]) == alone[0]


def test_page_cache_edge_paths(tmp_path):
    empty = tmp_path / "empty.swp"
    empty.write_bytes(b"")
    assert page_cache_bytes([]) == 0
    assert page_cache_bytes([tmp_path / "missing"]) == 0
    assert page_cache_bytes([empty]) == 0
    assert page_cache_bytes([tmp_path]) == 0  # a directory cannot be mapped


# ------------------------------------------------------------------ Sampler

STUB_FIELDS = {"components": {"param_pool": 4096, "optimizer_pool": 8192, "other": 7},
               "pinned_reserved": 12288, "pinned_used": 5000}


class Stub:
    """Attribution callback standing in for the probes."""

    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def __call__(self, rss, page_cache, heap_free):
        self.calls.append((rss, page_cache))
        if self.fail:
            raise RuntimeError("boom")
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in STUB_FIELDS.items()}


def test_sample_once_emits_a_sample_event(tmp_path):
    swap = tmp_path / "1_param.tensor.swp"
    _write(swap, 5 * PAGE)
    writer = EventWriter(tmp_path / "events.jsonl")
    stub = Stub()
    sampler = Sampler(writer, stub, lambda: [str(swap)], interval=0.05)
    event = sampler.sample_once()
    writer.close()
    assert set(event) == {"t", "kind", "rss", "vm_lck", "vm_hwm", "page_cache", "io_read", "io_write",
                          "components", "pinned_reserved", "pinned_used"}
    assert event["kind"] == "sample"
    assert event["components"] == STUB_FIELDS["components"]
    assert (event["pinned_reserved"], event["pinned_used"]) == (12288, 5000)
    assert event["rss"] > 0 and event["vm_hwm"] >= event["rss"] and event["vm_lck"] >= 0
    assert event["io_read"] >= 0 and event["io_write"] >= 0
    assert 0 < event["page_cache"] <= 5 * PAGE
    assert stub.calls == [(event["rss"], event["page_cache"])]
    assert sampler.ticks == 1
    assert sampler.peak_rss == event["rss"]
    assert read_events(tmp_path / "events.jsonl") == ([event], 0)


def test_budgeted_reading_keeps_its_cpu_share(monkeypatch):
    clock = {"now": 100.0, "cpu": 0.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(time, "thread_time", lambda: clock["cpu"])
    reads = []

    def read():  # costs 10 ms of CPU each time
        reads.append(clock["now"])
        clock["cpu"] += 0.010
        return len(reads)

    reading = Budgeted(read, share=0.005)
    values = []
    for tick in range(50):  # 50 ticks, 0.1 s apart: 5 s
        clock["now"] = 100.0 + tick / 10
        values.append(reading.get())
    # 10 ms / 0.5% = one read every 2 s: at 0, 2 and 4 s
    assert reads == [100.0, 102.0, 104.0]
    assert values[0] == 1 and values[19] == 1 and values[20] == 2 and values[-1] == 3


def test_sampler_keeps_the_last_page_cache_between_reads(tmp_path):
    swap = tmp_path / "2_param.tensor.swp"
    _write(swap, 4 * PAGE)
    writer = EventWriter(tmp_path / "events.jsonl")
    sampler = Sampler(writer, Stub(), lambda: [swap])
    first = sampler.sample_once()["page_cache"]
    _drop_from_cache(swap)
    second = sampler.sample_once()["page_cache"]  # within its CPU budget: not read again yet
    sampler.page_cache.next_at = 0  # the budget allows the next read
    third = sampler.sample_once()["page_cache"]
    writer.close()
    assert first > 0
    assert second == first
    assert third == 0


def test_sampler_samples_at_most_every_interval_until_stopped(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    interval = 0.05
    sampler = Sampler(writer, Stub(), lambda: [], interval=interval)  # 20 Hz
    sampler.start()
    assert wait_for(lambda: sampler.ticks >= 5)
    sampler.stop()
    assert not sampler.is_alive()  # joined: no sample can follow
    assert sampler.daemon
    count = sampler.ticks
    writer.close()
    events, dropped = read_events(path)
    assert dropped == 0
    samples = [e for e in events if e["kind"] == "sample"]
    assert len(samples) == count >= 5
    times = [e["t"] for e in samples]
    assert times == sorted(times)
    # a busy machine can only stretch the gaps, never shorten them (t is rounded to 0.1 ms)
    assert min(b - a for a, b in zip(times, times[1:])) >= interval - 2e-4
    assert sampler.peak_rss == max(e["rss"] for e in samples)


def test_sampler_survives_a_failing_callback(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    stub = Stub(fail=True)
    sampler = Sampler(writer, stub, lambda: [], interval=0.02)
    with pytest.raises(RuntimeError):
        sampler.sample_once()  # called directly, the error surfaces
    sampler.start()
    assert wait_for(lambda: len(stub.calls) >= 3)
    sampler.stop()
    writer.close()
    assert not sampler.is_alive()
    events, _ = read_events(path)
    assert [e["kind"] for e in events] == ["log"] * len(events)
    assert len(events) >= 2  # kept ticking after the first failure
    assert all(e["message"] == "sampler: RuntimeError('boom')" for e in events)
    assert len(stub.calls) == len(events) + 1


def test_a_transient_freed_between_ticks_is_still_in_a_sample(tmp_path):
    """A sub-group's first-step optimizer state lives for a moment: the probes take
    a sample as it is recorded, so the peak does not depend on where a tick falls."""
    from memlab import components as C
    from memlab.engine.probes import Probes

    writer = EventWriter(tmp_path / "events.jsonl")
    probes = Probes(writer)
    sampler = Sampler(writer, lambda rss, cache, heap: probes.attribute(rss, cache, heap), lambda: [],
                      interval=3600)  # never ticks: every sample below is one the probes asked for
    probes.sample_now = sampler.sample_once
    probes.record_alloc(C.PARAM_POOL, 1 << 20, 1 << 20, "pinned")
    key = probes.record_alloc(C.OPTIMIZER_TRANSIENTS, 3 << 20, 3 << 20, "pageable")
    probes.record_free(key)
    writer.close()
    samples = [e for e in read_events(tmp_path / "events.jsonl")[0] if e["kind"] == "sample"]
    assert [s["components"][C.OPTIMIZER_TRANSIENTS] for s in samples] == [3 << 20]  # buffers ask for none
    assert samples[0]["components"][C.PARAM_POOL] == 1 << 20
