"""The summary of a run: one dict of figures from its events.

The worker summarizes itself in its `run_end` event, the lab writes the same
summary to `summary.json` when a run ends, and the run store rebuilds it from
the events when that file is missing: all three through `summarize`, so a live
run and a loaded one agree. Standard library only.
"""
import statistics

from . import components as C
from .telemetry import PINNED_BACKENDS


def event_ranks(events):
    """The ranks that wrote these events (a single-rank run's events carry none: rank 0)."""
    return {e.get("rank", 0) for e in events}


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
    """The summary of a run from its events (its fields and their meaning:
    memlab.views.report.FIELDS). `status`/`error` override what the events say
    (a worker that died wrote no run_end). A run of several ranks is
    summarized per rank and for the node (see summarize_ranks)."""
    ranks = sorted(event_ranks(events))
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
        first = latest[min(latest)]  # the lowest rank's phase names the node's moment (ranks step together)
        combined["phase"], combined["step"] = first.get("phase"), first.get("step")
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
        "from_auto": start.get("from_auto", {}),
        "steps": n,
        "peak_rss_bytes": peak_rss,
        "peak_vm_lck_bytes": max([s["vm_lck"] for s in samples] + [0]),
        "peak_pinned_reserved_bytes": peak_reserved,
        "peak_pinned_used_bytes": peak_used,
        "fragmentation_at_peak": round(fragmentation, 6),
        "peak_engine_host_bytes": engine_peak,
        "components_at_peak": dict(peak_sample.get("components", {})) if peak_sample else {},
        "peak_phase": peak_sample.get("phase") if peak_sample else None,  # where the peak sample was taken
        "peak_step": peak_sample.get("step") if peak_sample else None,
        "step_time_median_s": statistics.median(step_times) if step_times else None,
        "losses": [st["loss"] for st in steps],
        "swap_read_bytes_per_step": (sum(st["swap_in_bytes"] for st in steps) // n) if n else 0,
        "swap_write_bytes_per_step": (sum(st["swap_out_bytes"] for st in steps) // n) if n else 0,
        "error": error,
    }
