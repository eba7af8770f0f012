"""Run: one fine-tuning run, live or loaded from disk, and its summary.

A run on disk is a folder `<store>/<run_id>/` holding `events.jsonl` (what
the worker wrote, one event a line) and `summary.json`. A live Run and the
Run that `load_run` rebuilds come from the same events through the same
`summarize`, so they are equal.
"""
import json
import os
import re
import statistics
import threading
import warnings

from . import components as C
from .telemetry import PINNED_BACKENDS, decode_lines

EVENTS_FILE = "events.jsonl"  # rank 0 (and single-rank runs); rank r > 0 writes events.rank<r>.jsonl
SUMMARY_FILE = "summary.json"
SWAP_MARKER = ".memlab-swap"  # in each run's swap folder: memlab removes only folders that carry it


class RunStoreError(ValueError):
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

    def stop(self, timeout=30):
        """End a live run: the worker is asked to stop (SIGTERM), then killed."""
        if self._process is not None and not self.done:
            self._process.stop(timeout=timeout)
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
            return sorted(_ranks(self.events))

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
        """A plotly figure of this run from memlab.views.figures: `kind` is one of
        memory (host memory stacked by component), pinned, fragmentation, steps, pools."""
        from .views import figures

        builders = {
            "memory": figures.memory_by_component,
            "pinned": figures.pinned_reserved_vs_used,
            "fragmentation": figures.fragmentation,
            "steps": figures.step_times_and_loss,
            "pools": figures.pool_occupancy,
        }
        if kind not in builders:
            raise ValueError(f"kind={kind!r}: must be one of {', '.join(builders)}")
        return builders[kind](self, **options)

    def report(self, path=None):
        """Write the self-contained HTML report; returns its path."""
        from .views.report import write_report

        return write_report(self, path or os.path.join(self.path, "report.html"))


# ------------------------------------------------------------------- summary

def _peak_live_pinned(events):
    """Walk alloc/free events: (peak reserved, used at that moment) of pinned and
    locked buffers. Here `used` counts exactly-sized buffers by their request and
    pools as empty: their occupancy comes from samples and steps."""
    live_reserved = live_used = 0
    peak = used_at_peak = 0
    for event in events:
        if event["kind"] not in ("alloc", "free") or event["backend"] not in PINNED_BACKENDS:
            continue
        sign = 1 if event["kind"] == "alloc" else -1
        live_reserved += sign * event["reserved"]
        if event["component"] not in (C.PARAM_POOL, C.OPTIMIZER_POOL):
            live_used += sign * event["requested"]
        if live_reserved > peak:
            peak, used_at_peak = live_reserved, live_used
    return peak, used_at_peak


def summarize(events, status=None, error=None):
    """The summary of DESIGN.md from a run's events. `status`/`error` override
    what the events say (a worker that died wrote no run_end). A run of several
    ranks is summarized per rank and for the node (see summarize_ranks)."""
    ranks = sorted(_ranks(events))
    if len(ranks) > 1:
        return summarize_ranks(events, ranks, status, error)
    return summarize_one(events, status, error)


NODE_PEAKS = ("rss", "vm_lck", "pinned_reserved", "pinned_used")


def node_samples(events):
    """The node's timeline: at each sample of any rank, every rank's latest
    sample summed (so a peak is the peak of the sum, not the sum of peaks)."""
    latest, out = {}, []
    for event in events:
        if event["kind"] != "sample":
            continue
        latest[event.get("rank", 0)] = event
        combined = {"t": event["t"], "kind": "sample", "ranks": len(latest)}
        for field in NODE_PEAKS + ("vm_hwm", "page_cache", "io_read", "io_write"):
            combined[field] = sum(s.get(field, 0) for s in latest.values())
        components = {}
        for s in latest.values():
            for name, value in s.get("components", {}).items():
                components[name] = components.get(name, 0) + value
        combined["components"] = components
        out.append(combined)
    return out


def rank_hosts(events):
    """rank -> host name, from each rank's run_start."""
    return {e.get("rank", 0): e.get("host", {}).get("hostname", "") for e in events if e["kind"] == "run_start"}


def summarize_ranks(events, ranks, status=None, error=None):
    """Node figures (the busiest node's, ranks grouped by host), each node's peak
    RSS under `nodes`, and each rank's own summary under `ranks`.
    Losses and step times are rank 0's (each rank trains on its own batches);
    swap bytes are the node's (summed)."""
    per_rank = {r: summarize_one([e for e in events if e.get("rank", 0) == r]) for r in ranks}
    if status is None:
        failing = [(r, s) for r, s in per_rank.items() if s["status"] != "ok"]
        status = failing[0][1]["status"] if failing else "ok"
        if failing and error is None:
            error = f"rank {failing[0][0]}: {failing[0][1]['error']}"
    hosts = rank_hosts(events)
    by_node = {host: node_samples([e for e in events if hosts.get(e.get("rank", 0)) == host])
               for host in sorted(set(hosts.values()))}
    busiest = max(by_node, key=lambda h: max([s["rss"] for s in by_node[h]] + [0]))
    samples = by_node[busiest]  # the node whose summed RSS peaks highest sets the node figures
    node = summarize_one([e for e in events if e.get("rank", 0) == 0 and e["kind"] != "sample"] + samples,
                         status, error)
    # the kernel's high-water mark is per process: the node's peak is the peak of the summed RSS
    node["peak_rss_bytes"] = max([s["rss"] for s in samples] + [0])
    node["nodes"] = {host: max([s["rss"] for s in node_samples_] + [0]) for host, node_samples_ in by_node.items()}
    node["swap_read_bytes_per_step"] = sum(s["swap_read_bytes_per_step"] for s in per_rank.values())
    node["swap_write_bytes_per_step"] = sum(s["swap_write_bytes_per_step"] for s in per_rank.values())
    node["ranks"] = {str(r): {k: s[k] for k in ("status", "peak_rss_bytes", "peak_vm_lck_bytes",
                                                "peak_engine_host_bytes", "peak_pinned_reserved_bytes",
                                                "step_time_median_s", "losses", "error")}
                     for r, s in per_rank.items()}
    node["peak_rss_rank"] = max(per_rank, key=lambda r: per_rank[r]["peak_rss_bytes"])
    return node


def summarize_one(events, status=None, error=None):
    """The summary of one process's events."""
    start = next((e for e in events if e["kind"] == "run_start"), {})
    end = next((e for e in reversed(events) if e["kind"] == "run_end"), None)
    samples = [e for e in events if e["kind"] == "sample"]
    steps = [e for e in events if e["kind"] == "step"]
    errors = [e for e in events if e["kind"] == "error"]
    if status is None:
        status = end["status"] if end else "failed"
    if error is None and status != "ok":
        if end and end.get("error"):
            error = end["error"]
        elif errors:
            error = errors[-1]["message"]
        elif status == "failed":
            error = "worker ended without reporting why"
    if status == "ok":
        error = None

    peak_rss = max([s["vm_hwm"] for s in samples] + [s["rss"] for s in samples] + [0])
    peak_sample = max(samples, key=lambda s: s["rss"]) if samples else None
    alloc_peak, alloc_used = _peak_live_pinned(events)
    peak_reserved = max([s.get("pinned_reserved", 0) for s in samples] + [alloc_peak])
    # Fragmentation at the moment of peak reservation: the best fill the
    # buffers reached while the reservation stood at its peak.
    used_at_peak = [
        s.get("pinned_used", 0) for s in samples if s.get("pinned_reserved", 0) == peak_reserved and peak_reserved
    ]
    used_at_peak += [
        st.get("pinned_used_peak", 0) for st in steps if st.get("pinned_reserved", 0) == peak_reserved and peak_reserved
    ]
    if alloc_peak == peak_reserved and peak_reserved:
        used_at_peak.append(alloc_used)
    peak_used = max([s.get("pinned_used", 0) for s in samples] + [st.get("pinned_used_peak", 0) for st in steps] + [0])
    fragmentation = (1.0 - max(used_at_peak) / peak_reserved) if used_at_peak else 0.0
    engine_peak = max(
        [sum(v for k, v in s.get("components", {}).items() if k not in C.NOT_ENGINE) for s in samples] + [0]
    )
    step_times = [st["seconds"] for st in steps]
    n = len(steps)
    knobs = start.get("knobs", {})
    return {
        "run_id": start.get("run_id"),
        "status": status,
        "engine": knobs.get("engine", "deepspeed"),
        "model": start.get("model", {}).get("name"),
        "knobs": knobs,
        "steps": n,
        "peak_rss_bytes": peak_rss,
        "peak_vm_lck_bytes": max([s["vm_lck"] for s in samples] + [0]),
        "peak_pinned_reserved_bytes": peak_reserved,
        "peak_pinned_used_bytes": peak_used,
        "fragmentation_at_peak": round(fragmentation, 6),
        "peak_engine_host_bytes": engine_peak,
        "components_at_peak": dict(peak_sample.get("components", {})) if peak_sample else {},
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "losses": [st["loss"] for st in steps],
        "swap_read_bytes_per_step": (sum(st["swap_in_bytes"] for st in steps) // n) if n else 0,
        "swap_write_bytes_per_step": (sum(st["swap_out_bytes"] for st in steps) // n) if n else 0,
        "error": error,
    }


# ------------------------------------------------------------------- store

def events_file(rank):
    return EVENTS_FILE if rank == 0 else f"events.rank{rank}.jsonl"


def rank_files(path):
    """rank -> events file of every rank present in a run folder."""
    found = {}
    for name in os.listdir(path):
        match = re.fullmatch(r"events(?:\.rank(\d+))?\.jsonl", name)
        if match:
            found[int(match.group(1) or 0)] = os.path.join(path, name)
    return dict(sorted(found.items()))


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
    return sorted(events, key=lambda e: (e.get("t", 0), e.get("rank", 0))) if _ranks(events) != {0} else events


def _ranks(events):
    return {e.get("rank", 0) for e in events}


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
