#!/usr/bin/env python3
"""Measured vs predicted, as a markdown table: the GPU check's report (docs/GPU.md).

    python3 scripts/gpu_compare.py --manifest WORK/manifest.json [--env env.json]
                                   [--pin-check pin-check.json] [--smi gpu-smi.csv]
                                   [--md gpu-compare.md] [--json gpu-compare.json]
    python3 scripts/gpu_compare.py --config NAME RUN_DIR ESTIMATE_JSON [--config ...] ...

Reads each run's folder (summary.json, events.jsonl: what memlab's probes
measured) and the `memlab estimate --json` of the same configuration (what
sizing predicts), and writes, per configuration: peaks, host bytes per
component at the peak, the host buffers per component (alloc events against
the estimate's buffers), the pinned-rounding waste (reserved minus requested
bytes of pinned buffers; stock against MemAscend), GPU bytes (the estimate's
terms against PyTorch's allocator peaks, per step and phase, and nvidia-smi),
and the pinned-backend measurements of scripts/gpu_pin_check.py. Figures a
run does not carry (GPU fields on DeepSpeed's CPU accelerator) show as "–".
Imports memlab (not torch): it runs anywhere the runs can be read.
"""
import argparse
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from memlab import components as C  # noqa: E402
from memlab.runs import load_run  # noqa: E402
from memlab.telemetry import PINNED_BACKENDS  # noqa: E402

DASH = "–"
GPU_TERMS = ("persistent_params", "params_gathered", "activations", "reduce_bucket", "boundary_gradients",
             "param_pool", "total")
# measured phase (step 1's optimizer step is sizing's optimizer_step_first) -> sizing's phase
PHASES = ("model_init", "engine_init", "forward", "backward", "optimizer_step_first", "optimizer_step")


# ------------------------------------------------------------------------------ formatting

def fmt_bytes(n):
    if n is None:
        return DASH
    n = int(n)
    sign = "-" if n < 0 else ""
    a = abs(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if a >= size:
            return f"{sign}{a / size:.2f} {unit}"
    return f"{n} B"


def fmt_exact(n):
    return DASH if n is None else f"{int(n):,}"


def ratio(measured, predicted):
    if measured is None or predicted in (None, 0):
        return DASH
    return f"{measured / predicted:.2f}"


def pct(part, whole):
    if part is None or not whole:
        return DASH
    return f"{100.0 * part / whole:.1f}%"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ measured

def pinned_walk(events):
    """Walk alloc/free events of pinned backends: at the peak of live reserved
    bytes, the reserved and requested bytes (all, and per backend)."""
    live = {}
    peak = {"reserved": 0, "requested": 0, "by_backend": {}}
    reserved = requested = 0
    for event in events:
        if event["kind"] not in ("alloc", "free") or event.get("backend") not in PINNED_BACKENDS:
            continue
        key = (event.get("rank"), event["id"])
        if event["kind"] == "alloc":
            live[key] = event
            reserved += event["reserved"]
            requested += event["requested"]
        elif key in live:
            gone = live.pop(key)
            reserved -= gone["reserved"]
            requested -= gone["requested"]
        if reserved > peak["reserved"]:
            by_backend = {}
            for e in live.values():
                b = by_backend.setdefault(e["backend"], {"reserved": 0, "requested": 0, "buffers": 0})
                b["reserved"] += e["reserved"]
                b["requested"] += e["requested"]
                b["buffers"] += 1
            peak = {"reserved": reserved, "requested": requested, "by_backend": by_backend}
    return peak


def live_buffers(events):
    """Allocations not freed by the end of the run, per component: buffers,
    requested and reserved bytes, backends."""
    freed = {(e.get("rank"), e["id"]) for e in events if e["kind"] == "free"}
    out = {}
    for e in events:
        if e["kind"] != "alloc" or (e.get("rank"), e["id"]) in freed:
            continue
        c = out.setdefault(e["component"], {"buffers": 0, "requested": 0, "reserved": 0, "backends": set()})
        c["buffers"] += 1
        c["requested"] += e["requested"]
        c["reserved"] += e["reserved"]
        c["backends"].add(e["backend"])
    return {k: {**v, "backends": sorted(v["backends"])} for k, v in out.items()}


def _max(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def measured_of(run_dir):
    run = load_run(run_dir)
    s = run.summary or {}
    events = run.events
    samples = [e for e in events if e["kind"] == "sample"]
    steps = [e for e in events if e["kind"] == "step"]
    by_phase = {}
    for e in samples:
        name = e.get("phase")
        if name == "optimizer_step" and e.get("step") == 1:
            name = "optimizer_step_first"
        if name in PHASES:
            p = by_phase.setdefault(name, {"rss": [], "gpu_allocated": []})
            p["rss"].append(e.get("rss"))
            p["gpu_allocated"].append(e.get("gpu_allocated"))
    return {
        "run_dir": os.path.abspath(run_dir),
        "status": s.get("status"), "error": s.get("error"), "steps": s.get("steps"),
        "step_time_median_s": s.get("step_time_median_s"), "losses": s.get("losses", []),
        "peak_rss_bytes": s.get("peak_rss_bytes"), "peak_engine_host_bytes": s.get("peak_engine_host_bytes"),
        "peak_vm_lck_bytes": s.get("peak_vm_lck_bytes"),
        "peak_pinned_reserved_bytes": s.get("peak_pinned_reserved_bytes"),
        "peak_pinned_used_bytes": s.get("peak_pinned_used_bytes"),
        "swap_read_bytes_per_step": s.get("swap_read_bytes_per_step"),
        "swap_write_bytes_per_step": s.get("swap_write_bytes_per_step"),
        "components_at_peak": s.get("components_at_peak", {}),
        "pinned_at_peak": pinned_walk(events),
        "buffers": live_buffers(events),
        "gpu": {
            "peak_allocated": _max([e.get("gpu_allocated") for e in samples] +
                                   [e.get("gpu_peak_allocated") for e in steps]),
            "peak_reserved": _max([e.get("gpu_reserved") for e in samples] + [e.get("gpu_peak_reserved") for e in steps]),
            "step_peak_allocated": [e.get("gpu_peak_allocated") for e in steps],
            "phase_peak_allocated": {p: _max(v["gpu_allocated"]) for p, v in by_phase.items()},
        },
        "torch_pinned": {"peak_reserved": _max([e.get("torch_pinned_reserved") for e in samples]),
                         "peak_active": _max([e.get("torch_pinned_active") for e in samples])},
        "phase_peak_rss": {p: _max(v["rss"]) for p, v in by_phase.items()},
    }


# ------------------------------------------------------------------------------ predicted

def predicted_of(estimate_path):
    with open(estimate_path) as f:
        est = json.load(f)
    buffers = {}
    for b in est.get("buffers", []):
        c = buffers.setdefault(b["component"], {"buffers": 0, "requested": 0, "reserved": 0, "backends": set()})
        c["buffers"] += 1
        c["requested"] += b["requested"]
        c["reserved"] += b["reserved"]
        c["backends"].add(b["backend"])
    pinned_by_backend = {}
    for b in est.get("buffers", []):
        if b["backend"] in PINNED_BACKENDS:
            p = pinned_by_backend.setdefault(b["backend"], {"reserved": 0, "requested": 0, "buffers": 0})
            p["reserved"] += b["reserved"]
            p["requested"] += b["requested"]
            p["buffers"] += 1
    phases = est.get("phases", {})
    return {
        "path": os.path.abspath(estimate_path),
        "hardware": est.get("hardware"), "peak_phase": est.get("peak_phase"),
        "peak_host_bytes": est.get("peak_host_bytes"), "peak_engine_host_bytes": est.get("peak_engine_host_bytes"),
        "pinned_reserved_bytes": est.get("pinned_reserved_bytes"),
        "pinned_requested_bytes": est.get("pinned_requested_bytes"),
        "pinned_by_backend": pinned_by_backend,
        "locked_bytes": est.get("locked_bytes"),
        "swap_read_bytes_per_step": est.get("swap_read_bytes_per_step"),
        "swap_write_bytes_per_step": est.get("swap_write_bytes_per_step"),
        "swap_first_read_bytes": sum(v for k, v in (est.get("swap_first_step") or {}).items() if k.startswith("in.")),
        "swap_first_write_bytes": sum(v for k, v in (est.get("swap_first_step") or {}).items() if k.startswith("out.")),
        "components": est.get("components", {}),
        "phase_rss": {p: sum(v for k, v in parts.items() if k not in C.OUTSIDE_RSS) for p, parts in phases.items()},
        "buffers": {k: {**v, "backends": sorted(v["backends"])} for k, v in buffers.items()},
        "gpu": est.get("gpu"),
        "notes": est.get("notes", []),
    }


# ------------------------------------------------------------------------------ the report

def load_configs(args):
    configs = []
    if args.manifest:
        with open(args.manifest) as f:
            manifest = json.load(f)
        for name, entry in manifest["configs"].items():
            configs.append((name, entry.get("run_dir"), entry.get("estimate"), entry))
    for name, run_dir, estimate_path in args.config or []:
        configs.append((name, run_dir, estimate_path, {}))
    if not configs:
        raise SystemExit("gpu_compare: no configuration (give --manifest or --config NAME RUN_DIR ESTIMATE_JSON)")
    return configs, (manifest if args.manifest else None)


def read_smi(path):
    """Peak memory.used (MiB -> bytes) of nvidia-smi's csv, noheader, nounits
    (timestamp, memory.used, memory.total, utilization.gpu)."""
    if not path or not os.path.isfile(path):
        return None
    used = []
    with open(path) as f:
        for row in csv.reader(f):
            try:
                used.append(float(row[1]) * (1 << 20))
            except (IndexError, ValueError):
                continue
    return {"samples": len(used), "peak_used_bytes": int(max(used)) if used else None}


def compare(args):
    configs, manifest = load_configs(args)
    env = json.load(open(args.env)) if args.env and os.path.isfile(args.env) else {}
    pin = json.load(open(args.pin_check)) if args.pin_check and os.path.isfile(args.pin_check) else None
    smi = read_smi(args.smi)
    data = {"env": env, "manifest": manifest, "configs": {}, "pin_check": pin, "nvidia_smi": smi}
    for name, run_dir, estimate_path, entry in configs:
        item = {"entry": entry}
        if run_dir and os.path.isdir(run_dir):
            try:
                item["measured"] = measured_of(run_dir)
            except Exception as exc:  # a run folder that cannot be read: say so in the table
                item["measured_error"] = f"{type(exc).__name__}: {exc}"
        if estimate_path and os.path.isfile(estimate_path):
            item["predicted"] = predicted_of(estimate_path)
        data["configs"][name] = item
    return data


def _m(item, key, default=None):
    return (item.get("measured") or {}).get(key, default)


def _p(item, key, default=None):
    return (item.get("predicted") or {}).get(key, default)


def render(data):
    env, configs = data["env"], data["configs"]
    names = list(configs)
    out = ["# memlab on CUDA: measured vs predicted", ""]
    gpu = env.get("gpu") or {}
    versions = env.get("versions") or {}
    where = (f"{gpu.get('name')} ({fmt_bytes(gpu.get('total_bytes'))}, capability {gpu.get('capability')}; "
             f"nvidia-smi: {env.get('nvidia_smi')})") if gpu else "no GPU (DeepSpeed's CPU accelerator)"
    manifest = data.get("manifest") or {}
    out += [f"- ran on: {where}, {env.get('cpus', DASH)} CPUs, {fmt_bytes(env.get('mem_total_bytes'))} RAM, "
            f"kernel {env.get('kernel', DASH)}; {env.get('date_utc', 'date not recorded')}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "- versions: –",
            f"- model {manifest.get('model', DASH)}, {manifest.get('steps', DASH)} steps, knobs "
            f"{json.dumps(manifest.get('base', {}))}, swap folder {manifest.get('swap_dir', DASH)}, torch.distributed "
            f"backend {manifest.get('dist_backend', DASH)}",
            "- measured: memlab's probes in the run (summary.json, events.jsonl); predicted: `memlab estimate --json` "
            "of the same knobs", ""]

    # -- runs
    rows = []
    for name in names:
        item = configs[name]
        losses = _m(item, "losses", [])
        rows.append([name, (item.get("entry") or {}).get("engine", DASH), _m(item, "status", item.get("measured_error",
                     (item.get("entry") or {}).get("status", "no run"))), _m(item, "steps", DASH),
                     f"{_m(item, 'step_time_median_s'):.2f} s" if _m(item, "step_time_median_s") else DASH,
                     " ".join(f"{x:.4f}" for x in losses) or DASH, _m(item, "error") or ""])
    out += ["## Runs", "", table(["config", "engine", "status", "steps", "step median", "losses", "error"], rows), ""]

    # -- peaks
    fields = [("peak RSS", "peak_rss_bytes", "peak_host_bytes"),
              ("peak engine host", "peak_engine_host_bytes", "peak_engine_host_bytes"),
              ("peak pinned reserved", "peak_pinned_reserved_bytes", "pinned_reserved_bytes"),
              ("peak VmLck / locked", "peak_vm_lck_bytes", "locked_bytes"),
              ("swap read per step (mean)", "swap_read_bytes_per_step", "swap_read_bytes_per_step"),
              ("swap write per step (mean)", "swap_write_bytes_per_step", "swap_write_bytes_per_step")]
    header = ["figure"] + [f"{n} {w}" for n in names for w in ("measured", "predicted", "m/p")]
    rows = []
    for label, mk, pk in fields:
        row = [label]
        for n in names:
            m, p = _m(configs[n], mk), _p(configs[n], pk)
            steps = _m(configs[n], "steps")
            first = _p(configs[n], {"swap_read_bytes_per_step": "swap_first_read_bytes",
                                    "swap_write_bytes_per_step": "swap_first_write_bytes"}.get(pk, ""))
            if first is not None and p is not None and steps:  # the run's mean: step 1 reads no Adam state yet
                p = (first + (steps - 1) * p) // steps
            row += [fmt_bytes(m), fmt_bytes(p), ratio(m, p)]
        rows.append(row)
    row = ["GPU peak (allocated)"]
    for n in names:
        m = (_m(configs[n], "gpu") or {}).get("peak_allocated")
        p = (_p(configs[n], "gpu") or {}).get("total")
        row += [fmt_bytes(m), fmt_bytes(p), ratio(m, p)]
    rows.append(row)
    out += ["## Peaks", "", table(header, rows), ""]

    # -- host bytes per component at the peak
    header = ["component"] + [f"{n} {w}" for n in names for w in ("measured", "predicted", "m/p")]
    rows = []
    for component in C.ALL:
        row = [component]
        for n in names:
            m = _m(configs[n], "components_at_peak", {}).get(component)
            p = _p(configs[n], "components", {}).get(component)
            row += [fmt_bytes(m), fmt_bytes(p), ratio(m, p)]
        rows.append(row)
    out += ["## Host bytes per component at the peak",
            "",
            "Measured: the sample of peak RSS (summary `components_at_peak`); predicted: the estimate's peak phase. "
            "The probes cannot see the optimizer transients (first-step Adam state, fp64 norm copy): a run shows "
            "them in `other`.", "", table(header, rows), ""]

    # -- peak RSS by phase
    header = ["phase"] + [f"{n} {w}" for n in names for w in ("measured", "predicted", "m/p")]
    rows = []
    for phase in PHASES:
        row = [phase]
        for n in names:
            m = (_m(configs[n], "phase_peak_rss") or {}).get(phase)
            p = (_p(configs[n], "phase_rss") or {}).get(phase)
            row += [fmt_bytes(m), fmt_bytes(p), ratio(m, p)]
        rows.append(row)
    out += ["## Peak RSS by phase", "", table(header, rows), ""]

    # -- host buffers per component
    rows = []
    for n in names:
        mb, pb = _m(configs[n], "buffers") or {}, _p(configs[n], "buffers") or {}
        for component in C.ALL:
            m, p = mb.get(component), pb.get(component)
            if not m and not p:
                continue
            m = m or {"buffers": 0, "requested": 0, "reserved": 0, "backends": []}
            p = p or {"buffers": 0, "requested": 0, "reserved": 0, "backends": []}
            rows.append([n, component, ", ".join(m["backends"]) or DASH, m["buffers"], fmt_bytes(m["requested"]),
                         fmt_bytes(m["reserved"]), ", ".join(p["backends"]) or DASH, p["buffers"],
                         fmt_bytes(p["requested"]), fmt_bytes(p["reserved"]),
                         "yes" if (m["reserved"], m["buffers"]) == (p["reserved"], p["buffers"]) else "no"])
    out += ["## Host buffers per component", "",
            "Measured: `alloc` events not freed by the end of the run (reserved = what the probes attribute: the page "
            "for locked buffers, a power of two for PyTorch-pinned ones); predicted: the estimate's buffers.", "",
            table(["config", "component", "backend", "buffers", "requested", "reserved", "predicted backend",
                   "buffers", "requested", "reserved", "same"], rows), ""]

    # -- pinned-rounding waste
    rows = []
    for n in names:
        item = configs[n]
        peak = _m(item, "pinned_at_peak") or {}
        torch_pinned = _m(item, "torch_pinned") or {}
        m_waste = peak["reserved"] - peak["requested"] if peak else None
        p_res, p_req = _p(item, "pinned_reserved_bytes"), _p(item, "pinned_requested_bytes")
        p_waste = p_res - p_req if p_res is not None and p_req is not None else None
        backends = ", ".join(sorted(peak.get("by_backend", {}))) or DASH
        rows.append([n, backends, fmt_bytes(peak.get("requested")), fmt_bytes(peak.get("reserved")), fmt_bytes(m_waste),
                     pct(m_waste, peak.get("requested")), fmt_bytes(p_req), fmt_bytes(p_res), fmt_bytes(p_waste),
                     pct(p_waste, p_req), fmt_bytes(torch_pinned.get("peak_reserved")),
                     fmt_bytes(torch_pinned.get("peak_active"))])
    out += ["## Pinned-rounding waste, stock vs MemAscend", "",
            "Reserved minus requested bytes of every pinned or locked buffer at the peak of live pinned reservations "
            "(probes) and in the estimate; beside them what PyTorch's CachingHostAllocator itself reports (CUDA "
            "only: `torch.cuda.host_memory_stats`, its blocks including cached ones, and those handed out), which "
            "also holds pinned buffers the engine did not ask for (gloo's CUDA staging, for one).", "",
            table(["config", "backends", "requested", "reserved", "waste", "waste %", "predicted requested",
                   "predicted reserved", "predicted waste", "waste %", "torch allocator reserved (peak)",
                   "torch allocator handed out (peak)"], rows), ""]
    rows = []
    for n in names:
        measured = (_m(configs[n], "pinned_at_peak") or {}).get("by_backend") or {}
        predicted = _p(configs[n], "pinned_by_backend") or {}
        for backend in sorted(set(measured) | set(predicted)):
            b, pb = measured.get(backend), predicted.get(backend)
            rows.append([n, backend, b["buffers"] if b else 0, fmt_bytes(b and b["requested"]),
                         fmt_bytes(b and b["reserved"]), fmt_bytes(b and b["reserved"] - b["requested"]),
                         pb["buffers"] if pb else 0, fmt_bytes(pb and pb["requested"]),
                         fmt_bytes(pb and pb["reserved"]), fmt_bytes(pb and pb["reserved"] - pb["requested"])])
    out += ["By backend:", "", table(["config", "backend", "buffers", "requested", "reserved", "waste",
                                      "predicted buffers", "requested", "reserved", "waste"], rows), ""]

    # -- GPU
    header = ["GPU bytes per device"] + [f"{n} {w}" for n in names for w in ("measured", "predicted")]
    rows = []
    for term in GPU_TERMS:
        row = [f"predicted: {term}"]
        for n in names:
            row += [DASH, fmt_bytes((_p(configs[n], "gpu") or {}).get(term))]
        rows.append(row)
    measured_rows = [("peak allocated (torch, max over samples and steps)", lambda g: g.get("peak_allocated")),
                     ("peak reserved (torch caching allocator)", lambda g: g.get("peak_reserved"))]
    measured_rows += [(f"peak allocated in {phase}", lambda g, phase=phase: (g.get("phase_peak_allocated") or {}).get(
        phase)) for phase in ("forward", "backward", "optimizer_step_first", "optimizer_step")]
    for label, get in measured_rows:
        row = [f"measured: {label}"]
        for n in names:
            row += [fmt_bytes(get(_m(configs[n], "gpu") or {})), DASH]
        rows.append(row)
    steps_row = ["measured: peak allocated per step"]
    for n in names:
        per_step = [fmt_bytes(v) for v in (_m(configs[n], "gpu") or {}).get("step_peak_allocated", [])]
        steps_row += [", ".join(per_step) if any(v != DASH for v in per_step) else DASH, DASH]
    rows.append(steps_row)
    smi = data.get("nvidia_smi") or {}
    out += ["## GPU", "",
            "Predicted per term (`estimate.gpu`; no CUDA context, no allocator cache); measured: PyTorch's caching "
            "allocator in the worker (sample and step events; CUDA only). The probes measure the GPU as a whole, "
            "not per term." + (f" nvidia-smi's peak memory.used over the whole check: "
                               f"{fmt_bytes(smi.get('peak_used_bytes'))} ({smi.get('samples')} samples)." if smi else ""),
            "", table(header, rows), ""]

    # -- pinned backends, measured
    pin = data.get("pin_check")
    if pin:
        rows, after = [], []
        for backend, b in pin.get("backends", {}).items():
            if "error" in b:
                rows.append([backend, DASH, DASH, DASH, DASH, DASH, DASH, DASH, b["error"]])
                continue
            for r in b.get("rows", []):
                measured = r.get("measured", {})
                got = measured.get("vm_lck") if r.get("probe_backend") == "native-mlock" else \
                    measured.get("torch_reserved")
                agrees = DASH if got is None or r.get("probe_backend") == "pageable" else (
                    "yes" if got == r["probe_reserved"] else "no")
                rows.append([backend, fmt_exact(r["requested"]), r.get("probe_backend"), fmt_exact(r["probe_reserved"]),
                             fmt_exact(r["sizing_reserved"]), fmt_exact(measured.get("torch_reserved")),
                             fmt_exact(measured.get("vm_lck")), fmt_exact(measured.get("rss")), agrees])
            for label in ("all_pinned", "after_free", "after_host_empty_cache"):
                if label in b:
                    d = b[label]
                    after.append([backend, label, fmt_exact(d.get("torch_reserved")), fmt_exact(d.get("vm_lck")),
                                  fmt_exact(d.get("rss"))])
        out += ["## Pinned memory through both backends (scripts/gpu_pin_check.py)", "",
                "Each buffer pinned with `get_accelerator().pin_memory`, in a process per backend; measured around "
                "the call: PyTorch's host allocator (reserved), VmLck, RSS; bytes. `agrees`: the measured reservation "
                "(torch's for torch-pinned, VmLck's for native) equals what the probes attribute.", "",
                table(["backend", "requested", "probe backend", "probe reserved", "sizing reserved",
                       "measured torch reserved", "measured VmLck", "measured RSS", "agrees"], rows), "",
                table(["backend", "when (vs. before any buffer)", "torch reserved", "VmLck", "RSS"], after), ""]

    # -- notes
    notes = []
    gloo = env.get("gloo_on_cuda")
    if gloo:
        notes.append("gloo collectives on CUDA tensors (memlab's worker uses gloo): "
                     + ", ".join(f"{k} {v}" for k, v in gloo.items()))
    if "proc_driver_nvidia_version" in env:
        notes.append(f"/proc/driver/nvidia/version present (memlab's CUDA detection for fp16/GDS validation): "
                     f"{env['proc_driver_nvidia_version']}")
    for n in names:
        for note in _p(configs[n], "notes", []):
            notes.append(f"{n} estimate: {note}")
    if notes:
        out += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_compare.py", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="scripts/gpu_runs.py's manifest.json")
    parser.add_argument("--config", nargs=3, action="append", metavar=("NAME", "RUN_DIR", "ESTIMATE_JSON"))
    parser.add_argument("--env", help="scripts/gpu_runs.py env's JSON")
    parser.add_argument("--pin-check", help="scripts/gpu_pin_check.py's JSON")
    parser.add_argument("--smi", help="nvidia-smi csv (timestamp, memory.used, memory.total, utilization.gpu)")
    parser.add_argument("--md", help="markdown output (default: stdout)")
    parser.add_argument("--json", help="every figure, as JSON")
    args = parser.parse_args(argv)
    data = compare(args)
    text = render(data)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
