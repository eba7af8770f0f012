"""The what-if estimator against real runs: each configuration below is run
here (DeepSpeed ZeRO-3, CPU accelerator, parameters and optimizer state really
swapped through NVMe files, 2 steps) and every prediction is checked against
what the probes measured:

- pools and flat buffers exact to the page: the estimate's buffers equal the
  run's `alloc` events (component and reserved bytes, one by one);
- bytes swapped per step, by direction and kind: exact (step 1 and step 2);
- peak engine host bytes (summary field) within 5%;
- peak RSS (the kernel's VmHWM) within 10%.
The table also lists the components that are not buffers at the peak (the
estimate's in the phase where the run peaked) and `other`: those are not yet
within 5% or 16 MiB, and `other` not yet within 3% of RSS, on every run
(docs/SIZING.md, "Accuracy"), so they are printed, not asserted.
With two ranks, every rank's buffers are checked and the peaks are the node's
(the summary's peak of the sum over ranks against ranks x the per-rank estimate).

The bounds are the issue's; none is loosened here. `pytest -s` prints the
table of predicted vs measured components of every run.
"""
import collections
import os

import pytest
from helpers import run_together

from memlab import Knobs, Lab
from memlab import components as C
from memlab.sizing import Hardware, estimate

pytestmark = pytest.mark.engine

MiB = 1 << 20
# Qwen2 with tied embeddings and a vocabulary large enough that the embedding
# (67M elements) dominates, as in real Qwen models: bounded staging streams it.
TIED = {"model_type": "qwen2", "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
        "tie_word_embeddings": True, "max_position_embeddings": 2048}
P = "zero_optimization.offload_param."
O = "zero_optimization.offload_optimizer."

# heap_free (glibc's free chunks, part of the engine figure) is predictable only
# when glibc's mmap threshold is: left dynamic, it rises to the largest block
# freed so far, so which tensors land in the heap depends on the order of frees
# (the same configuration measured 121-143 MiB of heap_free at its peak, and the
# model missed by up to 130 MiB across these ten). Every stock run fixes it at 1 MiB,
# every MemAscend run has the threshold memascend.heap=fixed sets; the estimate applies
# the same rule (blocks below the threshold come from the heap) with the threshold it
# is given. docs/SIZING.md, "Accuracy".
ALLOCATOR = {"deepspeed": {"allocator.MALLOC_MMAP_THRESHOLD_": 1 << 20}, "memascend": {}}
RUNS = {
    # name: (model, engine, knobs)
    "stock": ("small-llama", "deepspeed", {}),
    "buffers": ("small-llama", "deepspeed", {
        P + "buffer_count": 8, P + "buffer_size": 20_000_000, O + "buffer_count": 6,
        "zero_optimization.sub_group_size": 8_000_000, "aio.block_size": 2 << 20}),
    "pipelined": ("small-llama", "deepspeed", {
        O + "pipeline_read": True, O + "pipeline_write": True, O + "buffer_count": 12,
        "run.micro_batch": 2, "run.seq_len": 256}),
    "params_on_cpu": ("small-llama", "deepspeed", {P + "device": "cpu", O + "buffer_count": 6}),
    # optimizer-only offload: the partitions stay on the device (host RAM on the CPU accelerator)
    "params_on_device": ("small-llama", "deepspeed", {P + "device": "none", O + "buffer_count": 6}),
    "max_in_cpu": ("small-llama", "deepspeed", {P + "max_in_cpu": 1_000_000_000, "run.seq_len": 384}),
    "memascend": ("small-llama", "memascend", {"run.seq_len": 512, O + "buffer_count": 6}),
    "memascend_gc": ("small-llama", "memascend", {"run.gradient_checkpointing": True, "run.micro_batch": 4,
                                                  "run.seq_len": 256, O + "buffer_count": 10}),
    "tied": (TIED, "deepspeed", {"run.micro_batch": 2, "run.seq_len": 256}),
    "tied_memascend": (TIED, "memascend", {P + "buffer_count": 3}),
    # two ranks on this node (DeepSpeed's launcher, gloo): each rank's buffers from its partitions
    "two_ranks": ("small-llama", "deepspeed", {"run.ranks": 2}),
}
STEPS = 2
BUFFER_COMPONENTS = (C.PARAM_POOL, C.PARAM_PARTITION_BUFFER, C.PARAM_CPU_FLAT, C.SMALL_PARTITIONS,
                     C.OPTIMIZER_POOL, C.GRAD_FLAT, C.OPTIMIZER_STATE, C.OPTIMIZER_TRANSIENTS)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every configuration run once, two at a time (each run's memory is its own worker's):
    name -> (Run, Estimate)."""
    store = os.environ.get("MEMLAB_ACCURACY_STORE")  # keep the runs (pytest removes old temp folders)
    lab = Lab(store or tmp_path_factory.mktemp("accuracy-runs"))
    swap = str(tmp_path_factory.mktemp("accuracy-swap"))
    jobs, predictions = [], []
    for name, (model, engine, knobs) in RUNS.items():
        knobs = Knobs({**ALLOCATOR[engine], **knobs, "run.steps": STEPS, "run.swap_dir": swap}, engine=engine)
        hardware = Hardware(ranks_per_node=knobs["run.ranks"])
        predictions.append(estimate(model, knobs, hardware))  # before the run: a prediction, not a fit
        jobs.append((knobs, model))
    out = {}
    for name, run, predicted in zip(RUNS, run_together(lab, jobs), predictions):
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        out[name] = (run, predicted)
    return out


def live_allocations(run, rank=None):
    """The run's allocations not freed, of one rank (all ranks record the same kinds of buffer)."""
    freed = {(e.get("rank"), e["id"]) for e in run.events if e["kind"] == "free"}
    return [e for e in run.allocations if (e.get("rank"), e["id"]) not in freed and e.get("rank") == rank]


def ranks(run):
    return sorted({e.get("rank") for e in run.allocations}, key=lambda r: -1 if r is None else r)


def accuracy_rows(run, est):
    """(component, predicted, measured, error) rows for one run (buffers of its first rank, peaks of the node)."""
    rows = []
    allocs = live_allocations(run, ranks(run)[0])
    for component in BUFFER_COMPONENTS:
        predicted = sum(b.reserved for b in est.buffers if b.component == component)
        got = sum(a["reserved"] for a in allocs if a["component"] == component)
        if predicted or got:
            rows.append((component, predicted, got))
    s = run.summary
    node = est.hardware.ranks_per_node
    at_phase = est.probed_at(s["peak_phase"], s["peak_step"])
    for component in (C.FRAMEWORK, C.RUNTIME, C.ACTIVATIONS, C.HEAP_FREE, C.OTHER):
        rows.append((f"{component} at the peak", node * at_phase.get(component, 0),
                     s["components_at_peak"].get(component, 0)))
    rows.append(("peak engine host" + (" (node)" if node > 1 else ""), node * est.probed_peak_engine_host_bytes,
                 s["peak_engine_host_bytes"]))
    rows.append(("peak RSS" + (" (node)" if node > 1 else ""), est.node_peak_host_bytes, s["peak_rss_bytes"]))
    return [(name, p, m, (p - m) / m if m else 0.0) for name, p, m in rows]


@pytest.mark.parametrize("name", list(RUNS))
def test_pools_and_flat_buffers_exact_to_the_page(measured, name):
    run, est = measured[name]
    assert len(ranks(run)) == est.hardware.ranks_per_node
    predicted = collections.Counter((b.component, b.reserved, b.backend) for b in est.buffers
                                    if b.component in BUFFER_COMPONENTS)
    for rank in ranks(run):
        got = collections.Counter((a["component"], a["reserved"], a["backend"]) for a in live_allocations(run, rank)
                                  if a["component"] in BUFFER_COMPONENTS)
        assert got == predicted, (f"{name} rank {rank}: measured-only {dict(got - predicted)}; "
                                  f"predicted-only {dict(predicted - got)}")


@pytest.mark.parametrize("name", list(RUNS))
def test_bytes_swapped_per_step_by_kind(measured, name):
    run, est = measured[name]
    for step in run.steps:
        want = est.swap_first_step if step["index"] == 1 else est.swap_per_step
        got = {k: v for k, v in step["swap_by_kind"].items() if v}
        assert got == {k: v for k, v in want.items() if v}, f"{name} step {step['index']}"


@pytest.mark.parametrize("name", list(RUNS))
def test_peak_engine_host_bytes_within_5_percent(measured, name):
    run, est = measured[name]
    got = run.summary["peak_engine_host_bytes"]  # the node's: the peak of the sum over its ranks
    predicted = est.probed_peak_engine_host_bytes * est.hardware.ranks_per_node
    assert abs(predicted - got) <= 0.05 * got, (
        f"{name}: predicted {predicted / MiB:.0f} MiB, measured {got / MiB:.0f} MiB ({(predicted - got) / got:+.1%}); "
        f"heap_free predicted {est.phases['optimizer_step']['heap_free'] / MiB:.0f} MiB")


@pytest.mark.parametrize("name", list(RUNS))
def test_peak_rss_within_10_percent(measured, name):
    run, est = measured[name]
    got = run.summary["peak_rss_bytes"]
    predicted = est.node_peak_host_bytes
    assert abs(predicted - got) <= 0.10 * got, (
        f"{name}: predicted {predicted / MiB:.0f} MiB ({est.peak_phase}), measured {got / MiB:.0f} MiB "
        f"({(predicted - got) / got:+.1%})")


def test_print_the_accuracy_table(measured):
    lines = ["| run | component | predicted MiB | measured MiB | error |", "|---|---|---|---|---|"]
    for name, (run, est) in measured.items():
        for component, predicted, got, error in accuracy_rows(run, est):
            lines.append(f"| {name} | {component} | {predicted / MiB:.2f} | {got / MiB:.2f} | {error:+.2%} |")
    table = "\n".join(lines)
    print("\n" + table)
    path = os.environ.get("MEMLAB_ACCURACY_TABLE")
    if path:
        with open(path, "w") as f:
            f.write(table + "\n")
