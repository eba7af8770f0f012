"""What memlab's probes and sampler cost: step time with telemetry on vs off.

    .venv/bin/python benchmarks/telemetry_overhead.py [--model small-llama] [--pairs 4] [--steps 6]

Two measures side by side. Direct: each step event carries the CPU time the
sampler thread used and the time spent inside the probes' hooks during that
step (`telemetry_seconds`), as a share of the step's wall time. A/B: on/off
pairs interleaved (so drift hits both sides alike), first step of each run
dropped, median step time, wall and CPU (all the worker's threads). Prints a
table, writes benchmarks/out/telemetry_overhead.md and an HTML plot beside it.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plotly.graph_objects as go  # noqa: E402

from memlab import Lab  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def measure(lab, model, steps, telemetry):
    run = lab.run({"run.steps": steps, "run.telemetry": telemetry}, model=model, wait=True)
    if run.summary["status"] != "ok":
        raise SystemExit(f"run failed: {run.summary['error']}")
    share = [s["telemetry_seconds"] / s["seconds"] for s in run.steps[1:]] if telemetry else []
    return [s["seconds"] for s in run.steps[1:]], [s["cpu_seconds"] for s in run.steps[1:]], share


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-llama")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    os.makedirs(OUT, exist_ok=True)
    lab = Lab(os.path.join(OUT, "runs"))
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    shares = []
    for pair in range(args.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        for telemetry in order:
            step_times, cpu_times, share = measure(lab, args.model, args.steps, telemetry)
            times[telemetry] += step_times
            cpu[telemetry] += cpu_times
            shares += share
            print(f"pair {pair + 1}/{args.pairs} telemetry={'on ' if telemetry else 'off'} "
                  f"median {statistics.median(step_times):.3f} s wall, {statistics.median(cpu_times):.3f} s CPU",
                  file=sys.stderr, flush=True)

    off, on = statistics.median(times[False]), statistics.median(times[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    ratio, cpu_ratio = on / off, cpu_on / cpu_off
    rows = [
        "| telemetry | steps measured | median step wall (s) | median step CPU (s) |",
        "|---|---|---|---|",
        f"| off | {len(times[False])} | {off:.3f} | {cpu_off:.3f} |",
        f"| on (probes + 13 Hz sampler) | {len(times[True])} | {on:.3f} | {cpu_on:.3f} |",
        "",
        f"telemetry's own time (sampler thread CPU + time in the hooks) per step, measured in the worker: "
        f"median {100 * statistics.median(shares):.2f}% of the step, max {100 * max(shares):.2f}%  "
        f"(target: under 3%)",
        f"A/B on vs off, medians: wall time {100 * (ratio - 1):+.1f}%, CPU time {100 * (cpu_ratio - 1):+.1f}% "
        f"(on a shared 2-core machine these move by more than the effect)",
        f"model {args.model}, {args.pairs} pairs x {args.steps} steps, first step of each run dropped",
    ]
    table = "\n".join(rows)
    print(table)
    with open(os.path.join(OUT, "telemetry_overhead.md"), "w") as f:
        f.write(f"# Telemetry overhead\n\n`{' '.join(['python'] + sys.argv)}`\n\n{table}\n")

    fig = go.Figure([go.Box(y=times[False], name="telemetry off", boxpoints="all"),
                     go.Box(y=times[True], name="telemetry on", boxpoints="all")])
    fig.update_layout(template="plotly_white",
                      title=f"Step time, {args.model}: overhead {100 * (ratio - 1):+.1f}% wall, "
                            f"{100 * (cpu_ratio - 1):+.1f}% CPU",
                      yaxis_title="seconds per step")
    fig.write_html(os.path.join(OUT, "telemetry_overhead.html"), include_plotlyjs="inline")
    print(f"wrote {OUT}/telemetry_overhead.md and .html", file=sys.stderr)


if __name__ == "__main__":
    main()
