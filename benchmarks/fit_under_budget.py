"""The paper's headline, measured here: under a host-RAM budget, the longest sequence and the largest
micro batch that train 3 steps, stock DeepSpeed vs MemAscend, found with real runs, and beside each what
`memlab fit` predicted before any of them ran.

    .venv/bin/python benchmarks/fit_under_budget.py [--budgets 1.5,2,3,4,6] [--targets seq_len,micro_batch]
        [--models qwen-embed,benchmarks/models/untied-mistral.json] [--resolution 64] [--steps 3]

Every run has `run.budget` set to the budget: memlab's own enforcement (a memory cgroup where the machine
allows one, the RSS watchdog everywhere), so a configuration that needs more ends `over_budget`. The
workload is the ablation's (benchmarks/ablation.py: its DeepSpeed knobs, fp32, parameters and optimizer
on NVMe); only the target moves. Peak memory grows with sequence length and micro batch, so for each
model, budget, engine and target the measurement is a search for the boundary between a value that
trains and the next that does not: it starts at fit's prediction (so a right prediction costs two runs),
walks outwards with a doubling stride until it brackets the boundary, then bisects it down to one
step (`--resolution` tokens for seq_len, 1 for micro_batch). A value where nothing trains is "none".

It prints the table (and the goals: MemAscend trains at budgets where stock cannot; at the smallest
budget where stock trains, MemAscend's longest sequence is at least 2x stock's; every prediction within
one step of the measurement) and writes benchmarks/out/fit_under_budget.md and .html.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from ablation import WORKLOAD  # noqa: E402
from memlab import Knobs, Lab  # noqa: E402
from memlab.sizing import GiB, fit  # noqa: E402
from memlab.units import parse_bytes  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
ENGINES = ("deepspeed", "memascend")
DEFAULT_MODELS = ("qwen-embed", os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                                             "untied-mistral.json"))
SEARCH_CEILING = {"seq_len": 1 << 16, "micro_batch": 1 << 10}  # where the walk upwards gives up


class Trials:
    """Real runs of one model, engine, budget and target, each value run at most once."""

    def __init__(self, lab, model, engine, budget, target, steps, seq_len):
        self.lab, self.model, self.engine, self.budget, self.target = lab, model, engine, budget, target
        self.base = Knobs({**WORKLOAD, "run.steps": steps, "run.seq_len": seq_len, "run.budget": budget},
                          engine=engine)
        self.results = {}  # value: (trained, run id, status)

    def trains(self, value):
        if value not in self.results:
            run = self.lab.run(self.base.set({f"run.{self.target}": value}), model=self.model, wait=True)
            status = run.summary["status"]
            if status not in ("ok", "over_budget"):
                raise SystemExit(f"{self.engine} {self.target}={value}: the run ended {status}: "
                                 f"{run.summary.get('error')} ({run.path})")
            self.results[value] = (status == "ok", run.run_id, status)
            print(f"  {self.engine:9} budget {self.budget / GiB:g} GiB {self.target}={value}: {status}",
                  file=sys.stderr, flush=True)
        return self.results[value][0]


def search(trials, start, step, ceiling):
    """The largest multiple of `step` that trains (None: not even `step`), starting at `start`."""
    start = max(step, (start or step) // step * step)
    if trials.trains(start):
        low, stride = start, step  # walk up until a value fails
        high = low + stride
        while high <= ceiling and trials.trains(high):
            low, stride = high, stride * 2
            high = low + stride
        high = min(high, ceiling + step)  # nothing above the ceiling is tried
    else:
        high, stride = start, step  # walk down until a value trains
        low = high - stride
        while low >= step and not trials.trains(low):
            high, stride = low, stride * 2
            low = high - stride
        if low < step:
            if high == step or not trials.trains(step):
                return None
            low = step
    while high - low > step:  # bisect: low trains, high does not
        middle = (low + high) // 2 // step * step
        if middle in (low, high):
            break
        if trials.trains(middle):
            low = middle
        else:
            high = middle
    return low


def measure(lab, model, budgets, targets, steps, seq_len, resolution):
    rows = []
    for target in targets:
        step = resolution if target == "seq_len" else 1
        for budget in budgets:
            base = Knobs({**WORKLOAD, "run.steps": steps, "run.seq_len": seq_len})
            report = fit(model, base, target=target, ram_bytes=budget, engines=ENGINES, multiple_of=step,
                         maximum=SEARCH_CEILING[target])
            for engine in ENGINES:
                predicted = report[engine].value
                trials = Trials(lab, model, engine, budget, target, steps, seq_len)
                started = time.perf_counter()
                measured = search(trials, predicted, step, SEARCH_CEILING[target])
                rows.append({"model": model, "target": target, "budget": budget, "engine": engine,
                             "predicted": predicted, "measured": measured, "runs": len(trials.results),
                             "seconds": time.perf_counter() - started, "step": step,
                             "within_one_step": _within(predicted, measured, step)})
    return rows


def _within(predicted, measured, step):
    if predicted is None or measured is None:
        return predicted == measured
    return abs(predicted - measured) <= step


def _name(model):
    return os.path.splitext(os.path.basename(model))[0]


def table(rows):
    lines = ["| model | target | budget GiB | engine | measured | predicted | within one step | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_name(r['model'])} | {r['target']} | {r['budget'] / GiB:g} | {r['engine']} | "
                     f"{r['measured'] if r['measured'] is not None else 'none'} | "
                     f"{r['predicted'] if r['predicted'] is not None else 'none'} | "
                     f"{'yes' if r['within_one_step'] else 'NO'} | {r['runs']} |")
    return "\n".join(lines)


def goals(rows):
    """The issue's three goals, each as (text, met), per model and target."""
    out = []
    keys = sorted({(r["model"], r["target"]) for r in rows})
    for model, target in keys:
        cell = {(r["budget"], r["engine"]): r["measured"] for r in rows if (r["model"], r["target"]) == (model,
                                                                                                        target)}
        budgets = sorted({b for b, _ in cell})
        only_memascend = [b for b in budgets if cell[(b, "deepspeed")] is None and cell[(b, "memascend")]]
        out.append((f"{_name(model)} {target}: MemAscend trains where stock cannot at "
                    f"{', '.join(f'{b / GiB:g}' for b in only_memascend) or 'no budget'} GiB", bool(only_memascend)))
        if target == "seq_len":
            trained = [b for b in budgets if cell[(b, "deepspeed")]]
            if trained:
                b = trained[0]
                ratio = cell[(b, "memascend")] / cell[(b, "deepspeed")] if cell[(b, "memascend")] else 0.0
                out.append((f"{_name(model)} seq_len at {b / GiB:g} GiB (stock's smallest): MemAscend "
                            f"{ratio:.2f}x stock (goal >= 2x)", ratio >= 2))
            else:
                out.append((f"{_name(model)} seq_len: stock trains at no budget measured", False))
    missed = [r for r in rows if not r["within_one_step"]]
    out.append((f"predictions within one step: {len(rows) - len(missed)} / {len(rows)}", not missed))
    return out


def plot(rows, path):
    keys = sorted({(r["model"], r["target"]) for r in rows})
    figure = make_subplots(rows=1, cols=len(keys), subplot_titles=[f"{_name(m)}: {t}" for m, t in keys])
    colors = {"deepspeed": "#636efa", "memascend": "#ef553b"}
    for col, (model, target) in enumerate(keys, start=1):
        for engine in ENGINES:
            cell = sorted((r for r in rows if (r["model"], r["target"], r["engine"]) == (model, target, engine)),
                          key=lambda r: r["budget"])
            budgets = [r["budget"] / GiB for r in cell]
            figure.add_trace(go.Scatter(x=budgets, y=[r["measured"] or 0 for r in cell], mode="lines+markers",
                                        name=f"{engine} measured", line={"color": colors[engine]},
                                        legendgroup=engine, showlegend=col == 1), row=1, col=col)
            figure.add_trace(go.Scatter(x=budgets, y=[r["predicted"] or 0 for r in cell], mode="lines+markers",
                                        name=f"{engine} predicted (memlab fit)",
                                        line={"color": colors[engine], "dash": "dash"},
                                        legendgroup=engine, showlegend=col == 1), row=1, col=col)
        figure.update_xaxes(title_text="RAM budget (GiB)", row=1, col=col)
        figure.update_yaxes(title_text=f"largest {target} that trains (0: none)", row=1, col=col)
    figure.update_layout(title="Fit under a RAM budget: real runs vs memlab fit")
    figure.write_html(path, include_plotlyjs="cdn")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1.5,2,3,4,6", help="GiB, comma-separated (or sizes: 1536MiB)")
    parser.add_argument("--targets", default="seq_len,micro_batch")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--resolution", type=int, default=64, help="seq_len step in tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256, help="seq_len while micro_batch is the target")
    parser.add_argument("--store", default=None, help="run store (default: a fresh folder under benchmarks/out)")
    args = parser.parse_args(argv)
    budgets = [parse_bytes(b if any(c.isalpha() for c in b) else f"{b}GiB") for b in args.budgets.split(",")]
    targets = args.targets.split(",")
    for target in targets:
        if target not in SEARCH_CEILING:
            parser.error(f"--targets: {target!r} is not one of {', '.join(SEARCH_CEILING)}")
    os.makedirs(OUT, exist_ok=True)
    lab = Lab(args.store or os.path.join(OUT, "fit_under_budget-runs"))
    rows = []
    for model in args.models.split(","):
        rows += measure(lab, model, budgets, targets, args.steps, args.seq_len, args.resolution)
    text = table(rows)
    report = "\n".join(f"- {'met' if met else 'MISSED'}: {line}" for line, met in goals(rows))
    print(text)
    print(report)
    with open(os.path.join(OUT, "fit_under_budget.md"), "w") as f:
        f.write(f"{text}\n\n{report}\n")
    plot(rows, os.path.join(OUT, "fit_under_budget.html"))
    print(f"wrote {os.path.join(OUT, 'fit_under_budget.md')} and fit_under_budget.html", file=sys.stderr)


if __name__ == "__main__":
    main()
