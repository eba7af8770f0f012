"""The what-if estimate against real runs of model shapes and knob sets drawn
at random: component by component at the peak, not only the totals.

    .venv/bin/python benchmarks/sizing_accuracy.py [--seed N] [--samples 8] [--steps 2]

Each draw (seeded; the seed is printed, so a run can be repeated) is a model
shape (three families, tied and untied embeddings, one to four layers, sizes
drawn) and a knob set (engine, where parameters and optimizer state live,
buffer counts, sub-group size, max_in_cpu, batch, sequence, gradient
checkpointing). Draws that memlab refuses or warns about are skipped (they
are benchmarks/envelope.py's subject). Every draw is estimated before it runs,
then run for real (DeepSpeed ZeRO-3 on this machine's accelerator, two runs at
a time). For every run and every component the estimate's value in the phase
where the run peaked is compared with the probes' at that peak (the estimate's
own peak phase is printed beside it); a component is within the
bound when it is within 5% or 16 MiB, whichever is larger. Prints the table,
the worst errors, and writes benchmarks/out/sizing_accuracy.md and .html.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plotly.graph_objects as go  # noqa: E402

from memlab import Knobs, KnobError, Lab, ModelSpec  # noqa: E402
from memlab import components as C  # noqa: E402
from memlab.knobs import ResolvedKnobs  # noqa: E402
from memlab.sizing import Hardware, estimate  # noqa: E402
from memlab.units import format_bytes  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
MiB = 1 << 20
FLOOR = 16 * MiB  # a component is right when within 5% or this, whichever is larger
SHARE = 0.05

FAMILIES = {
    "llama": lambda rng: {"model_type": "llama", "vocab_size": rng.choice([8192, 16384, 32000]),
                          "hidden_size": rng.choice([384, 512, 640]), "intermediate_size": rng.choice([1024, 1376, 1792]),
                          "num_attention_heads": 8, "num_key_value_heads": rng.choice([2, 8]),
                          "tie_word_embeddings": rng.random() < 0.5, "max_position_embeddings": 1024},
    "qwen2": lambda rng: {"model_type": "qwen2", "vocab_size": rng.choice([16384, 32768, 50000]),
                          "hidden_size": rng.choice([384, 512, 768]), "intermediate_size": rng.choice([1024, 2048]),
                          "num_attention_heads": 8, "num_key_value_heads": 2,
                          "tie_word_embeddings": rng.random() < 0.5, "max_position_embeddings": 1024},
    "gpt2": lambda rng: {"model_type": "gpt2", "vocab_size": rng.choice([16384, 32000]), "n_embd": rng.choice([384, 512, 768]),
                         "n_head": 8, "n_positions": 1024},
}
LAYERS = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "gpt2": "n_layer"}
P, O = "zero_optimization.offload_param.", "zero_optimization.offload_optimizer."
CHOICES = {
    P + "device": ["nvme", "nvme", "cpu", "none"],
    O + "device": ["nvme", "nvme", "cpu"],
    P + "buffer_count": [5, 6, 8],
    P + "max_in_cpu": [0, 0, 10**9],
    O + "buffer_count": [4, 6, 8],
    "zero_optimization.sub_group_size": ["auto", 2_000_000, 10**7],
    "run.micro_batch": [1, 2],
    "run.seq_len": [128, 256, 512],
    "run.gradient_checkpointing": [False, False, True],
}
# glibc's mmap threshold fixed as in the accuracy test (left dynamic, heap_free depends on the order of frees):
# by hand for stock, by memascend.heap for MemAscend
ALLOCATOR = {"deepspeed": {"allocator.MALLOC_MMAP_THRESHOLD_": 1 << 20}, "memascend": {}}


def draw(rng):
    family = rng.choice(sorted(FAMILIES))
    config = FAMILIES[family](rng)
    config[LAYERS[family]] = rng.choice([1, 2, 3, 4])
    knobs = {name: rng.choice(options) for name, options in CHOICES.items()}
    return config, knobs, rng.choice(["deepspeed", "memascend"])


def within(predicted, measured):
    return abs(predicted - measured) <= max(SHARE * measured, FLOOR)


def compared(run, est):
    """(component, predicted, measured) at the peak, for every component either side holds: the
    estimate's components in the phase where the run peaked (two phases whose totals are close may
    swap places; each phase's components are what the model claims)."""
    measured = run.summary["components_at_peak"]
    predicted = est.probed_at(run.summary["peak_phase"], run.summary["peak_step"])
    names = [c for c in C.ALL if c not in C.OUTSIDE_RSS and (predicted.get(c) or measured.get(c))]
    rows = [(c, predicted.get(c, 0), measured.get(c, 0)) for c in names]
    rows.append(("peak engine host", est.probed_peak_engine_host_bytes, run.summary["peak_engine_host_bytes"]))
    rows.append(("peak RSS", est.node_peak_host_bytes, run.summary["peak_rss_bytes"]))
    return rows


def measured_peak_phase(run):
    """The phase (and step) of the sample where RSS peaked."""
    samples = run.timeline.samples
    peak = max(samples, key=lambda s: s["rss"]) if samples else {}
    return f"{peak.get('phase', '?')} (step {peak.get('step', '?')})"


def run_all(lab, jobs, at_once=2):
    """Each (knobs, model) run for real, `at_once` at a time (each its own worker): the Runs, in order."""
    runs, live = [None] * len(jobs), []
    for index, (knobs, model) in enumerate(jobs):
        if len(live) == at_once:
            runs[live.pop(0)].wait()
        runs[index] = lab.run(knobs, model=model)
        live.append(index)
        print(f"  [{index + 1}/{len(jobs)}] started", file=sys.stderr)
    for index in live:
        runs[index].wait()
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"seed {seed} (repeat with --seed {seed})", file=sys.stderr)
    rng = random.Random(seed)
    cases, skipped = [], 0
    while len(cases) < args.samples:
        config, values, engine = draw(rng)
        try:
            knobs = Knobs({**ALLOCATOR[engine], **values, "run.steps": args.steps}, engine=engine)
            resolved = ResolvedKnobs(knobs, ModelSpec.resolve(config), accelerator="cpu")
        except KnobError:
            skipped += 1
            continue
        if resolved.risks:
            skipped += 1
            continue
        cases.append((config, values, knobs, estimate(config, knobs, Hardware())))  # predicted before any run
    with tempfile.TemporaryDirectory(prefix="memlab-sizing-") as folder:
        lab = Lab(os.path.join(folder, "store"))
        jobs = [(knobs.set({"run.swap_dir": os.path.join(folder, "swap")}), config) for config, _, knobs, _ in cases]
        os.makedirs(os.path.join(folder, "swap"))
        runs = run_all(lab, jobs)
        results, phases = [], []
        for (config, values, knobs, est), run in zip(cases, runs):
            ok = run.summary["status"] == "ok"
            results.append((config, values, knobs, compared(run, est) if ok else None, None if ok else run.summary["error"]))
            phases.append((est.peak_phase, measured_peak_phase(run) if ok else "-"))

    lines = [f"seed {seed}: {len(cases)} draws ({skipped} refused or warned draws skipped), {args.steps} steps each; "
             f"a component is within the bound at 5% or 16 MiB, whichever is larger", "",
             "| draw | model | engine | component | predicted | measured | error | within |", "|---|---|---|---|---|---|---|---|"]
    worst, misses, failed = [], 0, []
    for index, ((config, values, knobs, rows, error), (*_, est)) in enumerate(zip(results, cases), 1):
        label = f"{config['model_type']} {est.num_params / 1e6:.0f}M"
        if rows is None:
            failed.append((index, error))
            lines.append(f"| {index} | {label} | {knobs.engine} | run failed: {error} | | | | |")
            continue
        for name, predicted, measured in rows:
            ok = within(predicted, measured)
            misses += not ok
            error_pct = f"{(predicted - measured) / measured:+.1%}" if measured else "-"
            lines.append(f"| {index} | {label} | {knobs.engine} | {name} | {format_bytes(predicted)} | "
                         f"{format_bytes(measured)} | {error_pct} | {'yes' if ok else 'NO'} |")
            worst.append((abs(predicted - measured), index, name, predicted, measured))
    worst.sort(reverse=True)
    lines += ["", f"components outside the bound: {misses}; failed runs: {len(failed)}", "", "worst absolute errors:"]
    lines += [f"- draw {i} {name}: predicted {format_bytes(p)}, measured {format_bytes(m)} ({format_bytes(p - m)})"
              for _, i, name, p, m in worst[:8]]
    lines += ["", "draws (the estimate's peak phase / the measured one):"]
    lines += [f"- {i}: {json.dumps(config)}; {knobs.engine}; {json.dumps(values)}; peak {phase[0]} / {phase[1]}"
              for i, ((config, values, knobs, *_rest), phase) in enumerate(zip(results, phases), 1)]
    text = "\n".join(lines)
    print(text)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "sizing_accuracy.md"), "w") as f:
        f.write(text + "\n")
    points = [(name, p / MiB, m / MiB, i) for i, (*_, rows, _) in enumerate(results, 1) for name, p, m in rows or ()]
    fig = go.Figure()
    for name in dict.fromkeys(n for n, *_ in points):
        mine = [pt for pt in points if pt[0] == name]
        fig.add_scatter(x=[pt[2] for pt in mine], y=[pt[1] for pt in mine], mode="markers", name=name,
                        text=[f"draw {pt[3]}" for pt in mine])
    top = max([max(pt[1], pt[2]) for pt in points] + [1])
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", name="exact", line={"dash": "dot", "color": "gray"})
    fig.update_layout(template="plotly_white", title=f"estimate vs measured at the peak (seed {seed})",
                      xaxis_title="measured MiB", yaxis_title="predicted MiB")
    fig.write_html(os.path.join(OUT, "sizing_accuracy.html"), include_plotlyjs="inline")
    print(f"wrote {OUT}/sizing_accuracy.md and sizing_accuracy.html", file=sys.stderr)
    return 1 if misses or failed else 0


if __name__ == "__main__":
    sys.exit(main())
