"""Real offloaded runs on the CPU accelerator, checked against what the knobs and
the model imply. Each module-scoped run is a real DeepSpeed ZeRO-3 run with
parameters and optimizer state swapped through NVMe files."""
import json
import math
import os
import subprocess
import sys
import time

import psutil
import pytest

from memlab import Knobs, Lab, ModelSpec, load_run
from memlab import components as C
from memlab.runs import summarize
from memlab.sizing import aligned_numel, largest_sub_group, swappable
from memlab.telemetry import PINNED_BACKENDS, page_round

pytestmark = pytest.mark.engine
FP32 = 4


@pytest.fixture(scope="module")
def swap_root(tmp_path_factory):
    return tmp_path_factory.mktemp("swap")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def stock(lab, swap_root):
    """The default preset, DeepSpeed's behaviour, 3 steps."""
    started = time.monotonic()
    run = lab.run({"run.steps": 3, "run.swap_dir": str(swap_root)})
    returned_after = time.monotonic() - started
    assert not run.done, "Lab.run must return while the worker is still running"
    assert returned_after < 5
    summary = run.wait(timeout=600)
    assert summary is not None, "run did not finish in 10 minutes"
    assert summary["status"] == "ok", summary["error"]
    return run


@pytest.fixture(scope="module")
def model():
    return ModelSpec.resolve("tiny-llama")


@pytest.fixture(scope="module")
def resolved(stock, model):
    return Knobs.from_dict(stock.knobs).resolve(model)


def allocs(run, component):
    return [e for e in run.allocations if e["component"] == component]


def test_losses_are_finite_and_start_near_uniform(stock, model):
    losses = stock.summary["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # Random init: the first loss is close to ln(vocab), not hundreds (what the
    # partitions' uninitialized memory gives without a live HfDeepSpeedConfig).
    assert abs(losses[0] - math.log(model.vocab_size)) < 1.0


def test_param_pool_reserved_is_count_times_aligned_buffer(stock, resolved):
    pool = allocs(stock, C.PARAM_POOL)
    assert len(pool) == 1 and pool[0]["backend"] == "aio-mlock"
    count = resolved["zero_optimization.offload_param.buffer_count"]
    per_buffer = aligned_numel(resolved["zero_optimization.offload_param.buffer_size"], FP32) * FP32
    assert pool[0]["requested"] == count * per_buffer
    assert pool[0]["reserved"] == page_round(count * per_buffer)
    assert stock.pools["param"]["buffers"] == [[per_buffer, 0]] * count  # all returned after the run


def test_optimizer_pool_is_count_times_largest_sub_group(stock, resolved, model):
    numels = [t.numel for t in model.tensors()]
    largest = sum(largest_sub_group(numels, resolved["zero_optimization.sub_group_size"]))
    per_buffer = aligned_numel(largest, FP32) * FP32
    pool = allocs(stock, C.OPTIMIZER_POOL)
    assert len(pool) == resolved["zero_optimization.offload_optimizer.buffer_count"]
    assert all(a["requested"] == per_buffer and a["reserved"] == page_round(per_buffer) for a in pool)


def test_partition_buffer_and_grad_flat_sizes(stock, resolved, model):
    numels = [t.numel for t in model.tensors()]
    group = largest_sub_group(numels, resolved["zero_optimization.sub_group_size"])
    (partition,) = allocs(stock, C.PARAM_PARTITION_BUFFER)
    assert partition["requested"] == sum(aligned_numel(n, FP32) for n in group) * FP32
    grad = allocs(stock, C.GRAD_FLAT)
    assert sum(a["requested"] for a in grad) == model.num_params * FP32


def test_small_partitions_are_the_unswappable_tensors(stock, resolved, model):
    block = resolved["aio.block_size"]
    small = [t.numel * FP32 for t in model.tensors() if not swappable(t.numel, FP32, block)]
    assert sorted(a["requested"] for a in allocs(stock, C.SMALL_PARTITIONS)) == sorted(small)


def test_vm_lck_covers_every_locked_byte(stock):
    locked = sum(e["reserved"] for e in stock.allocations if e["backend"] == "aio-mlock")
    assert locked > 0
    assert stock.summary["peak_vm_lck_bytes"] >= locked
    assert stock.summary["peak_pinned_reserved_bytes"] == sum(
        e["reserved"] for e in stock.allocations if e["backend"] in PINNED_BACKENDS)
    # Every sample after the pools exist sees them in VmLck.
    samples = [s for s in stock.timeline.samples if s["pinned_reserved"] == locked]
    assert samples and all(s["vm_lck"] >= locked for s in samples)


def test_bytes_swapped_per_step_match_partition_sizes(stock, resolved, model):
    block = resolved["aio.block_size"]
    numels = [t.numel for t in model.tensors()]
    swapped = sum(aligned_numel(n, FP32) * FP32 for n in numels if swappable(n, FP32, block))
    total = model.num_params * FP32
    for step in stock.steps:
        kinds = step["swap_by_kind"]
        assert kinds["in.param"] == 2 * swapped  # gathered for forward and again for backward
        assert kinds["out.param"] == swapped  # updated partitions written back after the step
        assert kinds["out.gradient"] == kinds["in.gradient"] == swapped
        assert kinds["out.optimizer"] == 3 * total  # fp32 master, exp_avg, exp_avg_sq
        # The first step has no Adam state on disk yet: only the master weights are read.
        assert kinds["in.optimizer"] == (1 if step["index"] == 1 else 3) * total
        assert step["swap_in_bytes"] == sum(v for k, v in kinds.items() if k.startswith("in."))


def test_summary_is_rebuilt_identically_from_disk(stock):
    loaded = load_run(stock.path)
    assert loaded == stock
    assert loaded.summary == stock.summary
    assert summarize(loaded.events) == stock.summary
    with open(os.path.join(stock.path, "summary.json")) as f:
        assert json.load(f) == stock.summary


def test_swap_files_are_removed(stock, swap_root):
    assert not os.path.exists(os.path.join(swap_root, stock.run_id))
    assert os.listdir(swap_root) == []


def test_peak_rss_matches_the_kernel_within_3_percent(stock):
    kernel = stock.worker_max_rss_bytes
    assert kernel and kernel > 0
    assert abs(stock.summary["peak_rss_bytes"] - kernel) <= 0.03 * kernel


def test_components_add_up_to_rss(stock):
    for sample in stock.timeline.samples:
        parts = sample["components"]
        inside = sum(v for k, v in parts.items() if k not in C.OUTSIDE_RSS)
        if parts[C.OTHER] > 0:  # otherwise attribution exceeded RSS and other is clamped at 0
            assert inside == sample["rss"]


def test_sampler_runs_at_the_requested_rate(stock):
    samples = stock.timeline.t
    gaps = [b - a for a, b in zip(samples, samples[1:])]
    median = sorted(gaps)[len(gaps) // 2]
    assert 1 / 20 <= median <= 1 / 10 + 0.02


def test_phases_cover_every_step(stock):
    phases = [(e["name"], e["step"]) for e in stock.events if e["kind"] == "phase"]
    for index in (1, 2, 3):
        for name in ("forward", "backward", "optimizer_step"):
            assert (name, index) in phases


def test_stop_ends_a_run_and_leaves_nothing_behind(lab, swap_root):
    run = lab.run({"run.steps": 500, "run.swap_dir": str(swap_root)})
    deadline = time.monotonic() + 300
    while not run.steps and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.steps, "the run never reached its first step"
    pid = run._process.pid
    summary = run.stop()
    assert summary["status"] == "stopped"
    assert "stopped by the user" in summary["error"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert os.listdir(swap_root) == []
    assert load_run(run.path).summary["status"] == "stopped"


def test_params_and_optimizer_on_cpu(lab):
    run = lab.run({"zero_optimization.offload_param.device": "cpu",
                   "zero_optimization.offload_optimizer.device": "cpu", "run.steps": 2}, wait=True)
    assert run.summary["status"] == "ok", run.summary["error"]
    assert run.summary["swap_read_bytes_per_step"] == 0
    model = ModelSpec.resolve("tiny-llama")
    # fp32 master weights in RAM, plus Adam's two states after the first step
    state = sum(a["requested"] for a in allocs(run, C.OPTIMIZER_STATE))
    assert state == 3 * model.num_params * FP32


def test_cli_run_json_and_bad_knob(tmp_path):
    env = dict(os.environ, MEMLAB_SWAP_DIR=str(tmp_path / "swap"))
    ok = subprocess.run([sys.executable, "-m", "memlab.cli", "run", "--steps", "1", "--json", "--out",
                         str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["status"] == "ok" and summary["steps"] == 1
    assert "step 1" in ok.stderr  # progress line per step
    bad = subprocess.run([sys.executable, "-m", "memlab.cli", "run", "--set",
                          "zero_optimization.offload_param.buffer_cont=4", "--out", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "buffer_cont" in bad.stderr and "did you mean" in bad.stderr
    assert len(os.listdir(tmp_path / "runs")) == 1  # nothing was started for the bad one
