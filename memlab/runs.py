"""Run: one fine-tuning run, live or loaded from disk, and its summary.

A run on disk is a folder `<store>/<run_id>/` holding `events.jsonl` (what
the worker wrote, one event a line) and `summary.json` (memlab.protocol names
every file of it). A live Run and the Run that `load_run` rebuilds come from
the same events through the same `memlab.summary.summarize`, so they are equal.
"""
import json
import os
import threading
import warnings

from . import components as C
from .errors import InputError
from .protocol import EVENTS_FILE, SUMMARY_FILE, rank_files
from .summary import event_ranks, node_samples, summarize
from .telemetry import decode_lines


class RunStoreError(InputError):
    """A run folder that cannot be read."""


class Timeline:
    """Columns built from `sample` events: t, rss, vm_lck, vm_hwm, page_cache,
    io_read, io_write, pinned_reserved, pinned_used, and
    `components[name]` for every component name (0 where a sample lacks it)."""

    COLUMNS = ("t", "rss", "vm_lck", "vm_hwm", "page_cache", "io_read", "io_write", "pinned_reserved", "pinned_used")

    def __init__(self, samples):
        self.samples = samples
        for col in self.COLUMNS:
            setattr(self, col, [s.get(col, 0) for s in samples])
        self.components = {name: [s.get("components", {}).get(name, 0) for s in samples] for name in C.ALL}
        self.fragmentation = [
            (1.0 - used / reserved) if reserved else 0.0 for used, reserved in zip(self.pinned_used, self.pinned_reserved)
        ]

    def __len__(self):
        return len(self.samples)


class Run:
    """A run's events and everything derived from them.

    Built live by `Lab.run` (events arrive while the worker trains) or from
    disk by `load_run`. `summary` is None until the run has ended.
    """

    def __init__(self, path, events=(), summary=None):
        self.path = os.fspath(path)
        self.run_id = os.path.basename(self.path.rstrip("/"))
        self.events = list(events)
        self.summary = summary
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._listeners = []
        self._process = None  # set by Lab for a live run
        if summary is not None:
            self._done.set()

    # -- live side ---------------------------------------------------------
    def add_listener(self, callback):
        """callback(run, new_events) is called from the follower thread."""
        self._listeners.append(callback)

    def _ingest(self, new_events):
        with self._lock:
            self.events.extend(new_events)
        for callback in list(self._listeners):
            try:
                callback(self, new_events)
            except Exception as exc:  # a broken view must not stop the follower
                warnings.warn(f"memlab: run listener failed: {exc!r}")

    def _settle_order(self):
        """Once every event is in: batches were sorted as they came, and one
        rank's batch can trail another's, so the ended run takes the order
        load_run gives the same files."""
        with self._lock:
            self.events = sort_events(self.events)

    def _finish(self, summary):
        with self._lock:
            self.summary = summary
        self._done.set()
        for callback in list(self._listeners):
            try:
                callback(self, [])
            except Exception as exc:
                warnings.warn(f"memlab: run listener failed: {exc!r}")

    @property
    def done(self):
        return self._done.is_set()

    def wait(self, timeout=None):
        """Block until the run has ended; returns the summary (None on timeout)."""
        self._done.wait(timeout)
        return self.summary

    def stop(self, grace=None, timeout=60):
        """End a live run: the worker is asked to stop (SIGTERM) and killed if it
        has not ended within `grace` seconds (the lab's default: a few); then
        wait up to `timeout` seconds for the summary."""
        if self._process is not None and not self.done:
            if grace is None:
                self._process.stop()
            else:
                self._process.stop(timeout=grace)
        return self.wait(timeout)

    # -- derived views -------------------------------------------------------
    def _of_kind(self, kind):
        with self._lock:
            return [e for e in self.events if e.get("kind") == kind]

    @property
    def status(self):
        if self.summary is not None:
            return self.summary["status"]
        return "running" if self._process is not None else "unknown"

    @property
    def start(self):
        starts = self._of_kind("run_start")
        return starts[0] if starts else {}

    @property
    def knobs(self):
        return self.start.get("knobs", {})

    @property
    def model(self):
        return self.start.get("model", {})

    @property
    def ranks(self):
        """Ranks that reported events (one for a single-rank run)."""
        with self._lock:
            return sorted(event_ranks(self.events))

    @property
    def timeline(self):
        """The node's timeline: every rank's samples summed (one rank: its own)."""
        if len(self.ranks) > 1:
            with self._lock:
                return Timeline(node_samples(self.events))
        return Timeline(self._of_kind("sample"))

    def rank_timelines(self):
        """rank -> that rank's own Timeline."""
        samples = self._of_kind("sample")
        return {r: Timeline([s for s in samples if s.get("rank", 0) == r]) for r in self.ranks}

    @property
    def steps(self):
        """Step events (rank 0's in a multi-rank run: each rank steps together)."""
        return [e for e in self._of_kind("step") if e.get("rank", 0) == 0]

    @property
    def allocations(self):
        return self._of_kind("alloc")

    @property
    def pools(self):
        """Latest occupancy of each pool: name -> pool event."""
        latest = {}
        for event in self._of_kind("pool"):
            latest[event["name"]] = event
        return latest

    @property
    def logs(self):
        return [e["message"] for e in self._of_kind("log")]

    def __repr__(self):
        return f"<Run {self.run_id} {self.status} steps={len(self.steps)}>"

    def __eq__(self, other):
        return isinstance(other, Run) and self.events == other.events and self.summary == other.summary

    def plot(self, kind="memory", **options):
        """A plotly figure of this run: `kind` names a chart of the registry
        memlab.views.charts: memory (host memory stacked by component), pinned,
        fragmentation, steps, pools."""
        from .views.charts import chart

        return chart(kind).figure(self, **options)

    def report(self, path=None):
        """Write the self-contained HTML report; returns its path."""
        from .views.report import write_report

        return write_report(self, path or os.path.join(self.path, "report.html"))


# ------------------------------------------------------------------- store

def read_events(path):
    """Events of a run folder, every rank's, in time order; a torn tail (crashed
    writer) is dropped with a warning."""
    if not os.path.isfile(os.path.join(path, EVENTS_FILE)):
        raise RunStoreError(f"{path}: not a memlab run (no {EVENTS_FILE})")
    merged = []
    for rank, events_path in rank_files(path).items():
        with open(events_path) as f:
            events, dropped = decode_lines(f)
        if dropped:
            warnings.warn(f"memlab: {events_path}: {dropped} incomplete line(s) ignored (the run was cut off)")
        merged += events
    return sort_events(merged)


def sort_events(events):
    """Events of several ranks interleaved by time; a rank's own order is kept."""
    if event_ranks(events) == {0}:
        return events
    return sorted(events, key=lambda e: (e.get("t", 0), e.get("rank", 0)))


def write_summary(path, summary):
    text = json.dumps(summary, indent=1)  # fails before any file is touched
    tmp = os.path.join(path, SUMMARY_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, SUMMARY_FILE))  # atomic: never a half-written summary


def load_run(path):
    """The Run stored in a run folder, as it was watched live."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise RunStoreError(f"{path}: no such run folder")
    events = read_events(path)
    summary_path = os.path.join(path, SUMMARY_FILE)
    summary = None
    if os.path.isfile(summary_path):
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"memlab: {summary_path} is unreadable ({exc}); rebuilt from the events")
    if summary is None:  # the parent died before writing it: rebuild from what the worker wrote
        summary = summarize(events)
    return Run(path, events, summary)
