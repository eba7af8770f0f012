"""MemAscend ablation: the same workload stock, with each optimization alone, and with all.

    .venv/bin/python benchmarks/ablation.py [--steps 4] [--model qwen-embed] [--seq-len 256]

Workload (issue #3): Qwen2.5-0.5B's embedding shape (vocab 151,936, hidden
896, tied) cut to 2 layers, fp32, sequence 256, parameters and optimizer state
on NVMe with real parameter swapping, the same DeepSpeed knobs for every
variant. One invocation runs every variant, so the ratios are side by side.
Step time is the median over steps after the first (warm-up, first Adam step).
Writes benchmarks/out/ablation.md and ablation.html (ablation-NAME.* for another --model, such as
benchmarks/models/untied-mistral.json: an untied Mistral-like shape, 99.5M parameters, whose buffers no
embedding dominates).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from memlab import Knobs, Lab  # noqa: E402
from memlab.knobs import MEMASCEND_SWITCHES  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MiB = 2 ** 20
# The DeepSpeed knobs every variant shares (DEEPSPEED_HOST_MEMORY.md, benchmark workload).
WORKLOAD = {
    "zero_optimization.offload_param.buffer_size": 140_000_000,
    "zero_optimization.sub_group_size": 100_000_000,
}
TARGETS = {"peak_engine_host_bytes": 0.30, "peak_rss_bytes": 0.55, "step_time": 1.0}


def variants():
    yield "stock", Knobs(WORKLOAD, engine="deepspeed")
    for name, (stock, optimized) in MEMASCEND_SWITCHES.items():
        yield f"{name.split('.', 1)[1]}={optimized}", Knobs({**WORKLOAD, name: optimized})
    yield "all (memascend)", Knobs(WORKLOAD, engine="memascend")


def step_time(run):
    times = sorted(s["seconds"] for s in run.steps[1:]) or [s["seconds"] for s in run.steps]
    return times[len(times) // 2]


def measure(lab, knobs, model, steps, seq_len):
    run = lab.run(knobs.set({"run.steps": steps, "run.seq_len": seq_len}), model=model, wait=True)
    s = run.summary
    if s["status"] != "ok":
        raise SystemExit(f"variant failed: {s['error']} ({run.path})")
    reserved, used = s["peak_pinned_reserved_bytes"], s["peak_pinned_used_bytes"]
    return {
        "peak_rss_bytes": s["peak_rss_bytes"], "peak_engine_host_bytes": s["peak_engine_host_bytes"],
        "peak_pinned_reserved_bytes": reserved, "peak_pinned_used_bytes": used,
        "reserved_over_used": 1 / (1 - s["fragmentation_at_peak"]) if s["fragmentation_at_peak"] < 1 else float("inf"),
        "fragmentation_at_peak": s["fragmentation_at_peak"], "step_time": step_time(run),
        "swap_bytes_per_step": s["swap_read_bytes_per_step"] + s["swap_write_bytes_per_step"],
        "swap_files": run.steps[-1].get("swap_files"), "losses": s["losses"],
        "components": s["components_at_peak"], "run": run.run_id,
    }


def table(rows):
    stock = rows["stock"]
    lines = ["| variant | peak RSS MiB | x stock | engine host MiB | x stock | pinned reserved / used MiB | "
             "reserved/used | step s | x stock | swap GiB/step | swap files | losses equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['peak_rss_bytes'] / MiB:.0f} | {r['peak_rss_bytes'] / stock['peak_rss_bytes']:.2f} | "
            f"{r['peak_engine_host_bytes'] / MiB:.0f} | "
            f"{r['peak_engine_host_bytes'] / stock['peak_engine_host_bytes']:.2f} | "
            f"{r['peak_pinned_reserved_bytes'] / MiB:.0f} / {r['peak_pinned_used_bytes'] / MiB:.0f} | "
            f"{r['reserved_over_used']:.2f} | {r['step_time']:.2f} | {r['step_time'] / stock['step_time']:.2f} | "
            f"{r['swap_bytes_per_step'] / 2**30:.2f} | {r['swap_files']} | "
            f"{'yes' if r['losses'] == stock['losses'] else 'NO'} |")
    return "\n".join(lines)


def verdict(rows):
    stock, best = rows["stock"], rows["all (memascend)"]
    checks = [
        ("peak engine host bytes", best["peak_engine_host_bytes"] / stock["peak_engine_host_bytes"], 0.40),
        ("peak RSS", best["peak_rss_bytes"] / stock["peak_rss_bytes"], 0.60),
        ("pinned reserved/used at peak", best["reserved_over_used"], 1.10),
        ("step time median", best["step_time"] / stock["step_time"], 1.0),
    ]
    return "\n".join(f"- {name}: {value:.2f} (target <= {target:.2f}) {'met' if value <= target else 'MISSED'}"
                     for name, value, target in checks)


def plot(rows, path):
    names = list(rows)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("host memory at peak RSS, by component (MiB)",
                                                        "step time (s)"), column_widths=[0.7, 0.3])
    components = [c for c in next(iter(rows.values()))["components"] if any(r["components"].get(c) for r in
                                                                             rows.values())]
    for c in components:
        fig.add_trace(go.Bar(name=c, x=names, y=[rows[n]["components"].get(c, 0) / MiB for n in names]), 1, 1)
    fig.add_trace(go.Bar(name="step time", x=names, y=[rows[n]["step_time"] for n in names], showlegend=False,
                         marker_color="#555"), 1, 2)
    fig.update_layout(barmode="stack", template="plotly_white", height=600, width=1500,
                      title="MemAscend ablation (qwen-embed, fp32, seq 256, params + optimizer on NVMe)")
    fig.write_html(path, include_plotlyjs="inline")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen-embed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    lab = Lab(os.path.join(OUT, "runs"))
    rows = {}
    for name, knobs in variants():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows[name] = measure(lab, knobs, args.model, args.steps, args.seq_len)
    text = table(rows)
    summary = verdict(rows)
    print(text)
    print(summary)
    # one pair of files per workload: the default's, and one named after any other model
    stem = "ablation" if args.model == "qwen-embed" else \
        "ablation-" + os.path.splitext(os.path.basename(args.model))[0]
    with open(os.path.join(OUT, f"{stem}.md"), "w") as f:
        f.write(f"# MemAscend ablation\n\n`{' '.join(['python'] + sys.argv)}`\n\n{text}\n\nAll on vs stock:\n{summary}\n")
    plot(rows, os.path.join(OUT, f"{stem}.html"))
    print(f"wrote {OUT}/{stem}.md and {stem}.html", file=sys.stderr)


if __name__ == "__main__":
    main()
