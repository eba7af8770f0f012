"""Real runs of other causal-LM families (small configs, random weights), each
with parameters and optimizer state on NVMe, stock and MemAscend, two steps:
the same accounting as the default preset's runs (buffers exact to the page
against the estimate, bytes swapped per step exact, finite losses equal
between the engines) and the estimate's peaks within the accuracy bounds
(engine host 5%, RSS 10%)."""
import collections
import math

import pytest
from helpers import RUN_FAMILIES, run_together

from memlab import Knobs, Lab
from memlab import components as C
from memlab.sizing import Hardware, estimate

pytestmark = pytest.mark.engine

# Six families, two of them mixture-of-experts (experts in fused 3-D tensors, a router per layer); tied
# (qwen3) and untied heads, biases (gpt2, gpt_neox), a fused qkv (phi3, gpt_neox).
FAMILIES = ("qwen3", "gpt2", "gpt_neox", "phi3", "mixtral", "qwen3_moe")
ENGINES = ("deepspeed", "memascend")
# glibc's mmap threshold fixed, as in the accuracy runs (its dynamic threshold makes heap_free a matter
# of the order of frees): by hand for stock, by memascend.heap for MemAscend; every other knob at its default.
KNOBS = {"run.steps": 2, "run.seq_len": 64}
ALLOCATOR = {"deepspeed": {"allocator.MALLOC_MMAP_THRESHOLD_": 1 << 20}, "memascend": {}}
# two families train with eager attention (it saves each layer's attention probabilities), the others
# with transformers' default (sdpa)
ATTENTION = {"gpt2": "eager", "mixtral": "eager"}
BUFFERS = (C.PARAM_POOL, C.PARAM_PARTITION_BUFFER, C.PARAM_CPU_FLAT, C.SMALL_PARTITIONS, C.OPTIMIZER_POOL,
           C.GRAD_FLAT, C.OPTIMIZER_STATE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(family, engine) -> (Run, Estimate made before the run)."""
    lab = Lab(tmp_path_factory.mktemp("families"))
    swap = str(tmp_path_factory.mktemp("families-swap"))
    jobs, estimates = [], []
    for family, engine in CASES:
        knobs = Knobs({**KNOBS, **ALLOCATOR[engine], "run.swap_dir": swap,
                       "run.attn_implementation": ATTENTION.get(family, "auto")}, engine=engine)
        estimates.append(estimate(RUN_FAMILIES[family], knobs, Hardware()))  # before the run: a prediction
        jobs.append((knobs, RUN_FAMILIES[family]))
    out = {}
    for case, run, predicted in zip(CASES, run_together(lab, jobs), estimates):
        assert run.summary["status"] == "ok", f"{case}: {run.summary['error']}"
        assert run.summary["knobs"]["run"]["attn_implementation"] == ATTENTION.get(case[0], "sdpa")
        out[case] = (run, predicted)
    return out


CASES = [(f, e) for f in FAMILIES for e in ENGINES]


def live(run):
    freed = {e["id"] for e in run.events if e["kind"] == "free"}
    return [a for a in run.allocations if a["id"] not in freed]


@pytest.mark.parametrize("family, engine", CASES)
def test_buffers_are_the_estimates_to_the_page(runs, family, engine):
    run, est = runs[family, engine]
    predicted = collections.Counter((b.component, b.reserved) for b in est.buffers if b.component in BUFFERS)
    got = collections.Counter((a["component"], a["reserved"]) for a in live(run) if a["component"] in BUFFERS)
    assert got == predicted, f"measured-only {dict(got - predicted)}; predicted-only {dict(predicted - got)}"


@pytest.mark.parametrize("family, engine", CASES)
def test_bytes_swapped_per_step_are_the_estimates(runs, family, engine):
    run, est = runs[family, engine]
    assert len(run.steps) == 2
    for step in run.steps:
        want = est.swap_first_step if step["index"] == 1 else est.swap_per_step
        assert {k: v for k, v in step["swap_by_kind"].items() if v} == {k: v for k, v in want.items() if v}
    assert est.swap_per_step["in.param"] > 0  # parameters really swap


MOE = ("mixtral", "qwen3_moe")


@pytest.mark.parametrize("family", FAMILIES)
def test_losses_are_finite_and_equal_between_engines(runs, family):
    stock = [s["loss"] for s in runs[family, "deepspeed"][0].steps]
    memascend = [s["loss"] for s in runs[family, "memascend"][0].steps]
    assert all(math.isfinite(x) for x in stock)
    if family not in MOE:
        assert memascend == stock  # fp32, fixed seed: the same arithmetic
        return
    # An MoE backward on the CPU is not bitwise repeatable: two stock runs of one Mixtral config here gave
    # step-2 losses 10.441831 and 10.442159. Step 1 (a forward of the same initial weights) is the same
    # arithmetic in both engines; later steps are compared with nothing tighter than that.
    assert memascend[0] == stock[0]
    assert all(math.isfinite(x) for x in memascend)


@pytest.mark.parametrize("family, engine", CASES)
def test_peaks_are_the_estimates_within_the_bounds(runs, family, engine):
    run, est = runs[family, engine]
    engine_host, rss = run.summary["peak_engine_host_bytes"], run.summary["peak_rss_bytes"]
    assert abs(est.probed_peak_engine_host_bytes - engine_host) <= 0.05 * engine_host
    assert abs(est.node_peak_host_bytes - rss) <= 0.10 * rss
