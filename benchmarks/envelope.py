"""memlab's validation against plain DeepSpeed, on knob sets and model shapes
drawn at random.

    .venv/bin/python benchmarks/envelope.py [--seed N] [--samples 16] [--steps 3]

Each draw (seeded; the seed is printed, so a run can be repeated) is a model
shape (tied and untied embeddings, one to four layers, three families) and a
set of DeepSpeed knobs. memlab's validation says refused, warned (a risk it
runs after a warning) or accepted; scripts/plain_deepspeed.py then trains the
same configuration in plain DeepSpeed (no memlab in the process) for --steps
steps, two at a time. Prints the confusion table (memlab's verdict x whether
DeepSpeed crashed), every disagreement with its knobs and DeepSpeed's message,
and writes benchmarks/out/envelope.md and envelope.html. The goal: nothing
refused that runs, nothing accepted without a warning that crashes.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import plotly.graph_objects as go  # noqa: E402

from memlab import Knobs, KnobError, ModelSpec, oplocks  # noqa: E402
from memlab.knobs import ResolvedKnobs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
PLAIN_DEEPSPEED = os.path.join(HERE, os.pardir, "scripts", "plain_deepspeed.py")

# shapes no test uses as they are: a family, its sizes, tied or not, a layer count, all drawn
FAMILIES = {
    "llama": lambda rng: {"model_type": "llama", "vocab_size": rng.choice([4096, 8192, 16384]),
                          "hidden_size": rng.choice([256, 384, 512]), "intermediate_size": rng.choice([688, 1024, 1376]),
                          "num_attention_heads": 8, "num_key_value_heads": rng.choice([2, 8]),
                          "tie_word_embeddings": rng.random() < 0.5, "max_position_embeddings": 256},
    "qwen2": lambda rng: {"model_type": "qwen2", "vocab_size": rng.choice([8192, 32768]),
                          "hidden_size": rng.choice([256, 512]), "intermediate_size": rng.choice([704, 1408]),
                          "num_attention_heads": 8, "num_key_value_heads": 2,
                          "tie_word_embeddings": rng.random() < 0.5, "max_position_embeddings": 256},
    "gpt2": lambda rng: {"model_type": "gpt2", "vocab_size": rng.choice([4096, 16384]), "n_embd": rng.choice([256, 512]),
                         "n_head": 8, "n_positions": 256},
}
LAYERS = {"llama": "num_hidden_layers", "qwen2": "num_hidden_layers", "gpt2": "n_layer"}
CHOICES = {
    "zero_optimization.offload_param.device": ["nvme", "nvme", "cpu", "none"],
    "zero_optimization.offload_optimizer.device": ["nvme", "nvme", "cpu"],
    "zero_optimization.offload_param.buffer_count": [2, 3, 4, 5, 8],
    "zero_optimization.offload_param.buffer_size": ["auto", 1_000_000, 4_000_000],
    "zero_optimization.offload_param.max_in_cpu": [0, 0, 1_000_000, 10**9],
    "zero_optimization.offload_optimizer.buffer_count": [3, 4, 6, 8, 12],
    "zero_optimization.offload_optimizer.pipeline_read": [False, False, True],
    "zero_optimization.offload_optimizer.pipeline_write": [False, False, True],
    "zero_optimization.stage3_max_live_parameters": [0, 0, 10**6, 10**7, 10**9],
    "zero_optimization.stage3_max_reuse_distance": [0, 0, 10**6, 10**9],
    "zero_optimization.stage3_prefetch_bucket_size": [0, 10**6, 5 * 10**7],
    "zero_optimization.sub_group_size": ["auto", 10**6, 10**9],
    "aio.block_size": [2**20, 2**21],
    "run.micro_batch": [1, 2],
}


def draw(rng):
    family = rng.choice(sorted(FAMILIES))
    config = FAMILIES[family](rng)
    config[LAYERS[family]] = rng.choice([1, 2, 3, 4])
    return config, {name: rng.choice(options) for name, options in CHOICES.items()}


def verdict(config, knobs):
    """(refused | warned | accepted, the reasons) from memlab's validation, and the ds_config to run."""
    resolved = ResolvedKnobs(Knobs(knobs), ModelSpec.resolve(config), accelerator="cpu", check=False)
    refusals, risks = resolved.refusals(), resolved.risks
    if refusals:
        return "refused", [str(e) for e in refusals], resolved
    return ("warned" if risks else "accepted"), [str(r) for r in risks], resolved


def run_plain(jobs, steps, folder):
    """Each (config, resolved) in plain DeepSpeed, two at a time: the JSON results, in order."""
    env = oplocks.use_extensions_root(dict(os.environ))
    results, running = [None] * len(jobs), []
    for index, (config, resolved) in enumerate(jobs):
        case = os.path.join(folder, str(index))
        os.makedirs(case)
        for name, data in (("model.json", config), ("ds_config.json", resolved.to_ds_config(os.path.join(case, "swap")))):
            with open(os.path.join(case, name), "w") as f:
                json.dump(data, f)
        command = [sys.executable, PLAIN_DEEPSPEED, os.path.join(case, "model.json"),
                   os.path.join(case, "ds_config.json"), "--steps", str(steps)]
        running.append((index, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                                env=dict(env, MASTER_PORT=str(29800 + index)))))
        while len(running) == 2 or (running and index == len(jobs) - 1):
            done, process = running.pop(0)
            out, _ = process.communicate()
            lines = out.strip().splitlines()
            results[done] = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {process.returncode}"}
            print(f"  [{done + 1}/{len(jobs)}] {'ran' if results[done]['ok'] else 'crashed'}", file=sys.stderr)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"seed {seed} (repeat with --seed {seed})", file=sys.stderr)
    rng = random.Random(seed)
    cases = []
    while len(cases) < args.samples:
        config, knobs = draw(rng)
        try:
            kind, reasons, resolved = verdict(config, knobs)
        except KnobError as exc:  # a knob set memlab cannot even resolve (e.g. a bad value): not a trap
            print(f"  skipped: {exc}", file=sys.stderr)
            continue
        cases.append({"model": config, "knobs": knobs, "verdict": kind, "reasons": reasons, "resolved": resolved})
    with tempfile.TemporaryDirectory(prefix="memlab-envelope-") as folder:
        results = run_plain([(c["model"], c["resolved"]) for c in cases], args.steps, folder)
    table = {(v, o): 0 for v in ("refused", "warned", "accepted") for o in ("crashed", "ran")}
    disagreements = []
    for case, result in zip(cases, results):
        outcome = "ran" if result["ok"] else "crashed"
        table[case["verdict"], outcome] += 1
        if (case["verdict"], outcome) in (("refused", "ran"), ("accepted", "crashed")):
            disagreements.append((case, result))
    lines = [f"seed {seed}, {len(cases)} draws, {args.steps} steps each in plain DeepSpeed 0.19.8", "",
             "| memlab says | DeepSpeed crashed | DeepSpeed ran |", "|---|---|---|"]
    lines += [f"| {v} | {table[v, 'crashed']} | {table[v, 'ran']} |" for v in ("refused", "warned", "accepted")]
    lines += ["", f"disagreements (refused but ran, accepted but crashed): {len(disagreements)}"]
    for case, result in disagreements:
        lines.append(f"- {case['verdict']} / {'ran' if result['ok'] else 'crashed'}: model {json.dumps(case['model'])}; "
                     f"knobs {json.dumps(case['knobs'])}; memlab: {case['reasons'] or '-'}; "
                     f"DeepSpeed: {result.get('error', 'ran')} (phase {result.get('phase')}, step {result.get('step')})")
    warned = [(c, r) for c, r in zip(cases, results) if c["verdict"] == "warned"]
    lines += ["", f"warned (memlab runs these after a warning): {len(warned)}"]
    for case, result in warned:
        lines.append(f"- {'ran' if result['ok'] else 'crashed: ' + result.get('error', '')}; {'; '.join(case['reasons'])}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "envelope.md"), "w") as f:
        f.write(text + "\n")
    fig = go.Figure([go.Bar(name=outcome, x=["refused", "warned", "accepted"],
                            y=[table[v, outcome] for v in ("refused", "warned", "accepted")])
                     for outcome in ("crashed", "ran")])
    fig.update_layout(barmode="group", template="plotly_white", title=f"memlab's verdict vs plain DeepSpeed (seed {seed})",
                      yaxis_title="draws")
    fig.write_html(os.path.join(OUT, "envelope.html"), include_plotlyjs="inline")
    print(f"wrote {OUT}/envelope.md and envelope.html", file=sys.stderr)
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
