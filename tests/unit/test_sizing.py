"""The what-if estimator, fit, CLI and sizing panel, without running the engine.

Pure: no DeepSpeed, no torch. The estimates are checked against DeepSpeed's
sizing rules (memlab.sizing's functions, which tests/engine/test_engine.py checks
against real runs) and against each other; tests/engine/test_sizing_accuracy.py
checks them against real runs.
"""
import json
import math
import subprocess
import sys

import pytest

import memlab
from memlab import components as C
from memlab.knobs import KnobError, Knobs
from memlab.models import ModelSpec
from memlab.sizing import (GiB, MiB, Hardware, SizingError, aligned_numel, estimate, fit, largest_sub_group,
                           nvme_footprint, page_round, pow2_round, staging_plan, swappable)

SMALL = ModelSpec.resolve("small-llama")
TINY = ModelSpec.resolve("tiny-llama")
FP32 = 4
P = "zero_optimization.offload_param."
O = "zero_optimization.offload_optimizer."
CUDA = Hardware(gpus=1, gpu_bytes=80 * GiB, ram_bytes=128 * GiB, accelerator="cuda")


def buffers(est, component):
    return [b for b in est.buffers if b.component == component]


# ------------------------------------------------------------------ the estimate's shape

def test_public_names():
    assert memlab.estimate is estimate and memlab.fit is fit
    assert callable(memlab.sizing_panel)


def test_components_use_the_probes_vocabulary_and_add_up():
    est = estimate("small-llama")
    for phase in est.phases.values():
        assert set(phase) == set(C.ALL)
        assert all(isinstance(v, int) and v >= 0 for v in phase.values())
    assert est.peak_host_bytes == max(sum(v for k, v in p.items() if k not in C.OUTSIDE_RSS)
                                      for p in est.phases.values())
    assert est.components == est.phases[est.peak_phase]
    assert est.peak_engine_host_bytes == max(sum(v for k, v in p.items() if k not in C.NOT_ENGINE)
                                             for p in est.phases.values())
    json.dumps(est.to_dict())  # JSON-safe
    assert "peak host" in est.table()


def test_stock_buffers_follow_deepspeeds_rules():
    est = estimate("small-llama", {P + "buffer_count": 7, P + "buffer_size": 17_000_000, O + "buffer_count": 5,
                                   "zero_optimization.sub_group_size": 10_000_000})
    numels = [t.numel for t in SMALL.tensors()]
    (pool,) = buffers(est, C.PARAM_POOL)
    assert pool.requested == 7 * aligned_numel(17_000_000, FP32) * FP32
    assert pool.reserved == page_round(pool.requested) and pool.backend == "aio-mlock"
    largest = largest_sub_group(numels, 10_000_000)
    (partition,) = buffers(est, C.PARAM_PARTITION_BUFFER)
    assert partition.requested == sum(aligned_numel(n, FP32) for n in largest) * FP32
    optimizer = buffers(est, C.OPTIMIZER_POOL)
    assert len(optimizer) == 5
    assert all(b.requested == aligned_numel(sum(largest), FP32) * FP32 for b in optimizer)
    (grad,) = buffers(est, C.GRAD_FLAT)
    assert grad.requested == SMALL.num_params * FP32
    small = sorted(b.requested for b in buffers(est, C.SMALL_PARTITIONS))
    assert small == sorted(n * FP32 for n in numels if not swappable(n, FP32, 1 << 20))
    assert not buffers(est, C.PARAM_CPU_FLAT)  # max_in_cpu 0: every swappable partition lives on NVMe
    assert est.nvme_bytes == nvme_footprint(numels, FP32, 1 << 20, 10_000_000)


def test_max_in_cpu_keeps_the_model_in_a_flat_buffer_and_drops_the_partition_buffer():
    est = estimate("small-llama", {P + "max_in_cpu": 10**9})
    (flat,) = buffers(est, C.PARAM_CPU_FLAT)
    assert flat.requested == SMALL.num_params * FP32
    assert not buffers(est, C.PARAM_PARTITION_BUFFER)
    assert "in.param" not in est.swap_per_step  # the whole model fits max_in_cpu: no parameter swapping


def test_params_and_optimizer_in_ram():
    est = estimate("tiny-llama", {P + "device": "cpu", O + "device": "cpu"})
    assert not buffers(est, C.PARAM_POOL) and not buffers(est, C.OPTIMIZER_POOL)
    state = sum(b.requested for b in buffers(est, C.OPTIMIZER_STATE))
    assert state == 3 * TINY.num_params * FP32  # fp32 master + Adam's two states
    assert est.swap_per_step == {} and est.nvme_bytes == 0


def test_optimizer_only_offload_keeps_the_partitions_on_the_device():
    # offload_param none: stage3 defragments the partitions into one flat buffer on the device,
    # never pinned; on the CPU accelerator that is host RAM, on CUDA a GPU's memory
    knobs = {P + "device": "none"}
    cpu, cuda = estimate("small-llama", knobs), estimate("small-llama", knobs, CUDA)
    (flat,) = buffers(cpu, C.PARAM_CPU_FLAT)
    assert (flat.requested, flat.backend) == (SMALL.num_params * FP32, "pageable")
    for est in (cpu, cuda):
        assert not buffers(est, C.PARAM_POOL) and not buffers(est, C.SMALL_PARTITIONS)
        assert buffers(est, C.OPTIMIZER_POOL)  # the optimizer is still on NVMe
        assert "in.param" not in est.swap_per_step
    assert not buffers(cuda, C.PARAM_CPU_FLAT)
    assert cuda.gpu["param_partitions"] == SMALL.num_params * FP32
    nvme = estimate("small-llama", {}, CUDA)
    assert nvme.gpu["param_partitions"] == 0
    assert cuda.gpu["total"] - nvme.gpu["total"] == SMALL.num_params * FP32


def test_swapped_bytes_per_step_follow_the_partition_sizes():
    est = estimate("tiny-llama")
    numels = [t.numel for t in TINY.tensors()]
    swapped = sum(aligned_numel(n, FP32) * FP32 for n in numels if swappable(n, FP32, 1 << 20))
    total = TINY.num_params * FP32
    steady = est.swap_per_step
    assert steady["in.param"] == 2 * swapped and steady["out.param"] == swapped
    assert steady["in.gradient"] == steady["out.gradient"] == swapped
    assert steady["in.optimizer"] == steady["out.optimizer"] == 3 * total
    assert est.swap_first_step["in.optimizer"] == total  # no Adam state on disk before the first step
    assert est.swap_read_bytes_per_step == sum(v for k, v in steady.items() if k.startswith("in."))


def test_a_tied_embedding_is_fetched_four_times_per_step():
    est = estimate("qwen-embed")
    spec = ModelSpec.resolve("qwen-embed")
    sizes = {t.name: aligned_numel(t.numel, FP32) * FP32 for t in spec.tensors() if swappable(t.numel, FP32, 1 << 20)}
    embedding = sizes.pop("model.embed_tokens.weight")
    assert est.swap_per_step["in.param"] == 4 * embedding + 2 * sum(sizes.values())


# ------------------------------------------------------------------ memascend switches

def test_adaptive_pool_sizes_buffers_by_partition_classes():
    stock = estimate("qwen-embed")
    adaptive = estimate("qwen-embed", {"memascend.pool": "adaptive"})
    pool = buffers(adaptive, C.PARAM_POOL)
    embedding = 151_936 * 896 * FP32
    # one embedding-sized buffer, three MLP projections, q and o (k/v are below 1 MiB: not swapped)
    assert sorted(b.requested for b in pool) == sorted([embedding] + [896 * 4864 * FP32] * 3 + [896 * 896 * FP32] * 2)
    assert sum(b.reserved for b in pool) < sum(b.reserved for b in buffers(stock, C.PARAM_POOL)) / 4


def test_bounded_staging_sizes_the_optimizer_pool_by_the_bound():
    spec = ModelSpec.resolve("qwen-embed")
    knobs = {"zero_optimization.sub_group_size": 10**8}
    stock = estimate(spec, knobs)
    bounded = estimate(spec, {**knobs, "memascend.optimizer_staging": "bounded"})
    plan = staging_plan([t.numel for t in spec.tensors()], 10**8)
    assert plan["streamed"] == [0, 1]  # the embedding and the sub-group of the rest: both above 4M elements
    per = aligned_numel(plan["bound"], FP32) * FP32
    assert [b.requested for b in buffers(bounded, C.OPTIMIZER_POOL)] == [per] * 4
    assert buffers(stock, C.PARAM_PARTITION_BUFFER)
    assert buffers(bounded, C.PARAM_PARTITION_BUFFER) == []  # both write their parameters from the staging buffers
    # a bound above every sub-group: each is one slice, still streamed; the pool is the largest sub-group
    whole = estimate(spec, {**knobs, "memascend.optimizer_staging": "bounded", "memascend.staging_elements": 10**9})
    assert buffers(whole, C.PARAM_PARTITION_BUFFER) == []
    assert [b.requested for b in buffers(whole, C.OPTIMIZER_POOL)] == [b.requested for b in
                                                                      buffers(stock, C.OPTIMIZER_POOL)]
    # no full-size first-step Adam copy of the streamed embedding
    first = lambda e: e.phases["optimizer_step_first"][C.OPTIMIZER_TRANSIENTS]  # noqa: E731
    assert first(bounded) < first(stock) / 3
    assert bounded.peak_host_bytes < stock.peak_host_bytes


def test_fused_checks_drop_the_fp64_norm_copy():
    spec = ModelSpec.resolve("qwen-embed")
    stock = estimate(spec)
    fused = estimate(spec, {"memascend.grad_checks": "fused"})
    largest = max(t.numel for t in spec.tensors())
    assert stock.phases["backward"][C.ACTIVATIONS] - fused.phases["backward"][C.ACTIVATIONS] <= 8 * largest
    assert fused.phases["backward"][C.ACTIVATIONS] <= stock.phases["backward"][C.ACTIVATIONS]


def test_fp16_overflow_check_temporaries_on_cuda():
    stock = estimate("small-llama", {"run.dtype": "fp16"}, CUDA)
    fused = estimate("small-llama", {"run.dtype": "fp16", "memascend.grad_checks": "fused"}, CUDA)
    diff = stock.phases["optimizer_step"][C.OPTIMIZER_TRANSIENTS] - fused.phases["optimizer_step"][C.OPTIMIZER_TRANSIENTS]
    assert diff == SMALL.num_params  # one P-byte bool temporary at a time


def test_exact_pinning_removes_cudas_power_of_two_rounding():
    torch_pinned = estimate("small-llama", hardware=CUDA)
    exact = estimate("small-llama", {"memascend.pinning": "exact"}, CUDA)
    (grad,) = buffers(torch_pinned, C.GRAD_FLAT)
    assert grad.backend == "torch-pinned" and grad.reserved == pow2_round(SMALL.num_params * FP32)
    (grad,) = buffers(exact, C.GRAD_FLAT)
    assert grad.backend == "native-mlock" and grad.reserved == page_round(SMALL.num_params * FP32)
    assert exact.pinned_reserved_bytes < torch_pinned.pinned_reserved_bytes
    # on the CPU accelerator the torch path pins nothing
    (grad,) = buffers(estimate("small-llama"), C.GRAD_FLAT)
    assert grad.backend == "pageable" and grad.reserved == grad.requested


def test_bounded_grad_staging_keeps_only_what_the_swapper_leaves_in_ram():
    from memlab.ds_rules import sub_groups, swapped_gradient_numel

    staged = {"memascend.grad_staging": "bounded"}
    # optimizer on NVMe, one file per gradient: what stays in RAM is each gradient's remainder past its
    # whole 1024-byte blocks, and the gradients below the 1 MiB swap floor (small-llama's norms)
    groups = sub_groups([t.numel for t in SMALL.tensors()], Knobs().resolve(SMALL)["zero_optimization.sub_group_size"])
    kept = sum(n - swapped_gradient_numel(n, 1 << 20) for group in groups for n in group)
    stock, bounded = estimate(SMALL), estimate(SMALL, staged)
    assert [b.requested for b in buffers(stock, C.GRAD_FLAT)] == [SMALL.num_params * FP32]
    assert [(b.requested, b.backend) for b in buffers(bounded, C.GRAD_FLAT)] == [(kept * FP32, "pageable")]
    assert 0 < kept < SMALL.num_params / 100
    assert stock.peak_host_bytes - bounded.peak_host_bytes >= (SMALL.num_params - kept) * FP32
    # optimizer on the CPU: the gradients go straight to its fp32 gradients, nothing is kept
    assert buffers(estimate(SMALL, {**staged, O + "device": "cpu"}), C.GRAD_FLAT) == []


def test_gradient_accumulation_repeats_the_fetches_and_bounded_staging_sums_on_nvme():
    """run.grad_accum N: each micro-batch fetches the swapped parameters again (stock and bounded alike);
    the gradients cross the files once a step in stock (summed in its flat buffer) and once a micro-batch
    with bounded gradient staging (written each micro-batch, read back before each later one adds to them);
    the host buffers do not change."""
    for staged in ({}, {"memascend.grad_staging": "bounded"}):
        one = estimate(SMALL, staged)
        for n in (2, 4):
            many = estimate(SMALL, {**staged, "run.grad_accum": n})
            summed = n if staged else 1
            assert many.swap_per_step == {**one.swap_per_step, "in.param": n * one.swap_per_step["in.param"],
                                          "in.gradient": summed * one.swap_per_step["in.gradient"],
                                          "out.gradient": summed * one.swap_per_step["out.gradient"]}
            assert many.buffers == one.buffers


def test_the_70b_estimate_with_memascend_fits_64_gib():
    """The README's predicted figure: Llama-3.1-70B, bf16, one 80 GB GPU, every MemAscend switch."""
    est = estimate("llama-3.1-70b", {"run.dtype": "bf16"}, Hardware(gpus=1, gpu_bytes=80 * GiB, accelerator="cuda"),
                   engine="memascend")
    assert est.peak_host_bytes < 64 * GiB
    # stock: one bf16 element per parameter (131 GiB); left: the gradient pieces below DeepSpeed's 1 MiB swap
    # floor (bounded optimizer staging cuts gradients where its slices start), well under 1 GiB
    flat = 2 * ModelSpec.resolve("llama-3.1-70b").num_params
    assert 0 < est.components[C.GRAD_FLAT] < flat / 500


def test_direct_storage_changes_no_host_buffer():
    a, b = estimate("small-llama"), estimate("small-llama", {"memascend.storage": "direct"})
    assert a.buffers == b.buffers and a.peak_host_bytes == b.peak_host_bytes and a.nvme_bytes == b.nvme_bytes


def test_memascend_engine_never_needs_more_host_memory_than_stock():
    for model in ("small-llama", "qwen-embed", "qwen2.5-7b", "llama-3.1-70b"):
        for hw in (Hardware(), CUDA):
            stock = estimate(model, {"run.dtype": "bf16"}, hw, engine="deepspeed")
            optimized = estimate(model, {"run.dtype": "bf16"}, hw, engine="memascend")
            assert optimized.engine == "memascend" and stock.engine == "deepspeed"
            assert optimized.peak_host_bytes <= stock.peak_host_bytes, (model, hw.accelerator)


# ------------------------------------------------------------------ traps: the same KnobError as validation

@pytest.mark.parametrize("knobs", [
    {P + "buffer_size": 1000},
    {O + "buffer_count": 3},
    {"memascend.optimizer_staging": "bounded", O + "pipeline_write": True, O + "buffer_count": 12},
])
def test_traps_raise_the_validation_error(knobs):
    with pytest.raises(KnobError) as validation:
        Knobs(knobs).resolve(SMALL)
    with pytest.raises(KnobError) as estimated:
        estimate(SMALL, knobs)
    assert str(estimated.value) == str(validation.value)


@pytest.mark.parametrize("knobs", [
    {O + "pipeline_read": True, O + "buffer_count": 8},
    {"zero_optimization.stage3_max_live_parameters": 10**6},
    {"zero_optimization.stage3_max_reuse_distance": 10**9},
])
def test_a_risk_is_sized_like_any_configuration(knobs):
    # DeepSpeed runs these on some models (memlab warns before a run): the estimate answers
    assert Knobs(knobs).resolve(SMALL).risks
    assert estimate(SMALL, knobs).peak_host_bytes > 0


def test_fp16_needs_cuda_hardware_not_this_machine(monkeypatch):
    import memlab.knobs as K

    monkeypatch.setattr(K, "_cpu_fp16_supported", lambda: False)  # a CPU without oneDNN's fp16 kernels
    with pytest.raises(KnobError, match="fp16 training needs a GPU"):
        estimate("tiny-llama", {"run.dtype": "fp16"}, Hardware())
    assert estimate("tiny-llama", {"run.dtype": "fp16"}, CUDA).knobs["run.dtype"] == "fp16"


@pytest.mark.parametrize("kwargs, text", [
    ({"ranks_per_node": 0}, "ranks_per_node"),
    ({"accelerator": "tpu"}, "accelerator"),
    ({"ram_bytes": -1}, "ram_bytes"),
    ({"gpus": 2, "ranks_per_node": 4, "accelerator": "cuda"}, "more ranks"),
])
def test_hardware_is_validated(kwargs, text):
    with pytest.raises(SizingError, match=text):
        Hardware(**kwargs)


# ------------------------------------------------------------------ activations, GPU, ranks

def test_activations_grow_with_tokens_and_checkpointing_cuts_them():
    def acts(**run):
        return estimate("small-llama", {f"run.{k}": v for k, v in run.items()}).phases["forward"][C.ACTIVATIONS]

    assert acts(seq_len=256) > acts(seq_len=128)
    # sdpa saves no s^2 term: twice the sequences of half the length save nearly the same (the rotary
    # tables are per sequence length, and one sequence keeps some views two would copy)
    assert acts(seq_len=256) == pytest.approx(acts(seq_len=128, micro_batch=2), rel=0.01)
    assert acts(seq_len=1024, gradient_checkpointing=True) < acts(seq_len=1024)


def test_device_tensors_leave_host_memory_on_cuda():
    cpu = estimate("qwen2.5-7b", {"run.dtype": "bf16", "run.seq_len": 4096})
    cuda = estimate("qwen2.5-7b", {"run.dtype": "bf16", "run.seq_len": 4096}, CUDA)
    assert cpu.gpu is None
    assert cuda.phases["forward"][C.ACTIVATIONS] == 0 and cpu.phases["forward"][C.ACTIVATIONS] > 10 * GiB
    g = cuda.gpu
    assert g["activations_checkpointed"] < g["activations_full"]
    assert g["total"] >= g["params_gathered"] + g["reduce_bucket"] + g["activations"]
    assert g["reduce_bucket"] == min(cuda.knobs["zero_optimization.reduce_bucket_size"], ModelSpec.resolve(
        "qwen2.5-7b").num_params) * 2


def test_checkpoints_offloaded_to_host_are_pinned_buffers():
    knobs = Knobs({"run.dtype": "bf16", "run.seq_len": 32768, "run.gradient_checkpointing": True},
                  passthrough={"activation_checkpointing": {"cpu_checkpointing": True}})
    spec = ModelSpec.resolve("qwen2.5-14b")
    est = estimate(spec, knobs, CUDA)
    ckpt = buffers(est, C.OFFLOADED_CHECKPOINTS)
    assert len(ckpt) == spec.num_layers
    per_layer = 32768 * spec.hidden_size * 2
    assert all(b.requested == per_layer and b.reserved == pow2_round(per_layer) for b in ckpt)
    assert est.phases["backward"][C.OFFLOADED_CHECKPOINTS] == spec.num_layers * pow2_round(per_layer)
    exact = estimate(spec, knobs.with_engine("memascend"), CUDA)
    assert exact.phases["backward"][C.OFFLOADED_CHECKPOINTS] == spec.num_layers * page_round(per_layer)


def test_ranks_partition_the_model_and_nodes_multiply():
    one = estimate("llama-3.1-8b", {"run.dtype": "bf16"}, Hardware(accelerator="cuda", gpus=8, ranks_per_node=1))
    eight = estimate("llama-3.1-8b", {"run.dtype": "bf16"}, Hardware(accelerator="cuda", gpus=8, ranks_per_node=8))
    spec = ModelSpec.resolve("llama-3.1-8b")
    (grad,) = buffers(eight, C.GRAD_FLAT)
    assert grad.requested == sum(math.ceil(t.numel / 8) for t in spec.tensors()) * 2
    assert eight.node_peak_host_bytes == 8 * eight.peak_host_bytes
    assert eight.peak_host_bytes < one.peak_host_bytes
    assert eight.node_nvme_bytes == 8 * eight.nvme_bytes
    assert eight.nvme_bytes < one.nvme_bytes


# ------------------------------------------------------------------ fit

def test_fit_seq_len_is_the_largest_that_fits():
    hw = Hardware(ram_bytes=3 * GiB)
    report = fit("small-llama", hardware=hw, target="seq_len", multiple_of=64)
    for engine, result in report.results.items():
        assert result.value is not None and result.value % 64 == 0
        assert result.estimate.fits() and result.estimate.knobs["run.seq_len"] == result.value
        assert not estimate("small-llama", {"run.seq_len": result.value + 64}, hw, engine=engine).fits()
        assert result.binding in C.ALL and result.limit == "ram"
    assert report["memascend"].value >= report["deepspeed"].value
    json.dumps(report.to_dict())
    assert "largest seq_len" in report.table()


def test_fit_micro_batch_and_nothing_fits():
    report = fit("small-llama", target="micro_batch", ram_bytes=4 * GiB)
    assert report["deepspeed"].value >= 1
    nothing = fit("qwen2.5-7b", target="seq_len", ram_bytes=1 * GiB)
    assert nothing["deepspeed"].value is None and nothing["deepspeed"].binding in C.ALL


def test_fit_models_picks_the_largest_that_fits_and_names_the_binding_component():
    models = ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b"]
    knobs = {"run.dtype": "bf16", "zero_optimization.sub_group_size": 10**8}
    report = fit(None, knobs, CUDA, target="model", models=models, ram_bytes=128 * GiB)
    for engine, result in report.results.items():
        assert result.value in models and result.estimate.fits(ram_bytes=128 * GiB)
        if result.failing is not None:
            assert result.binding in C.ALL or result.binding.startswith("gpu:")


def test_fit_needs_a_budget_and_a_known_target():
    with pytest.raises(SizingError, match="budget"):
        fit("tiny-llama")
    with pytest.raises(SizingError, match="target"):
        fit("tiny-llama", target="layers", ram_bytes=GiB)


def test_fit_gpu_budget_binds_on_cuda():
    hw = Hardware(gpus=1, gpu_bytes=24 * GiB, ram_bytes=1024 * GiB, accelerator="cuda")
    result = fit("qwen2.5-7b", {"run.dtype": "bf16"}, hw, target="seq_len", engines=("memascend",))["memascend"]
    assert result.limit == "gpu" and result.binding.startswith("gpu:")
    assert result.estimate.gpu["total"] <= 24 * GiB < result.failing.gpu["total"]


# ------------------------------------------------------------------ CLI

def cli(*args):
    return subprocess.run([sys.executable, "-m", "memlab.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_estimate_json_matches_the_api():
    out = cli("estimate", "--model", "small-llama", "--engine", "memascend", "--set", "run.seq_len=512", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    api = estimate("small-llama", Knobs({"run.seq_len": 512}, engine="memascend"))
    assert data["peak_host_bytes"] == api.peak_host_bytes and data["components"] == api.components
    text = cli("estimate", "--model", "qwen2.5-14b", "--gpus", "8", "--gpu-mem", "80", "--ram", "512",
               "--set", "run.dtype=bf16")
    assert text.returncode == 0 and "per node" in text.stdout and "GPU per device" in text.stdout


def test_cli_fit_json_and_bad_input():
    out = cli("fit", "--model", "small-llama", "--ram", "3", "--target", "seq_len", "--multiple-of", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["results"]) == {"deepspeed", "memascend"}
    models = cli("fit", "--target", "model", "--models", "tiny-llama", "small-llama", "--ram", "2")
    assert models.returncode == 0 and "largest model" in models.stdout
    bad = cli("estimate", "--set", P + "buffer_size=10")
    assert bad.returncode == 2 and "buffer_size" in bad.stderr and bad.stderr.count("\n") == 1
    no_budget = cli("fit", "--model", "tiny-llama")
    assert no_budget.returncode == 2 and "budget" in no_budget.stderr


# ------------------------------------------------------------------ the panel (no browser)

@pytest.fixture
def panel():
    from memlab.views.sizing_panel import SizingPanel

    return SizingPanel(model="small-llama", hardware=Hardware(ram_bytes=8 * GiB))


def bar(panel, component, label):
    trace = next(t for t in panel.figure.data if t.name == component)
    return trace.y[list(trace.x).index(label)]


def test_panel_draws_both_engines_and_the_curve(panel):
    assert panel.error is None and panel.redraws == 1 and panel.curve_redraws == 1
    ds = sum(bar(panel, c, "DeepSpeed") for c in C.ALL if c != C.PAGE_CACHE)
    ma = sum(bar(panel, c, "MemAscend") for c in C.ALL if c != C.PAGE_CACHE)
    assert ma <= ds
    curve = next(t for t in panel.figure.data if t.name == "DeepSpeed")
    # grows with the context (a dip of a few MiB is possible where the logits cross glibc's mmap threshold)
    assert len(curve.x) == len(panel.slider.options) and curve.y[-1] == max(curve.y) > curve.y[0]
    budget = next(t for t in panel.figure.data if t.name == "RAM budget")
    assert len(budget.x) == 2
    assert panel.figure._widget_data  # persisted for saved notebooks


def test_slider_redraws_bars_with_one_batch_update_and_keeps_the_curve(panel, monkeypatch):
    updates = []
    original = type(panel.figure).batch_update

    def counting(self):
        updates.append(1)
        return original(self)

    monkeypatch.setattr(type(panel.figure), "batch_update", counting)
    before = bar(panel, C.ACTIVATIONS, "DeepSpeed")
    panel.slider.value = 8192
    assert panel.seq_len.value == 8192
    assert updates == [1] and panel.redraws == 2 and panel.curve_redraws == 1
    assert bar(panel, C.ACTIVATIONS, "DeepSpeed") > before
    marker = next(t for t in panel.figure.data if t.name == "current")
    assert list(marker.x) == [8192, 8192]


def test_panel_inputs_model_path_pasted_json_and_errors(panel, tmp_path):
    panel.model.value = "(pasted config.json)"
    assert panel.error and "paste" in panel.error
    panel.pasted.value = json.dumps(TINY.config)
    assert panel.error is None and "llama" in panel.status.value
    panel.pasted.value = "{not json"
    assert "not valid JSON" in panel.error
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL.config))
    panel.model.value = "(config.json path)"
    panel.path.value = str(path)
    assert panel.error is None
    redraws = panel.redraws
    panel.sub_group.value = "many"  # a bad knob: its message, nothing redrawn
    assert "sub_group_size" in panel.error and panel.redraws == redraws and "color:#b00" in panel.status.value
    panel.sub_group.value = "auto"
    assert panel.error is None and panel.redraws == redraws + 1


def test_panel_axis_and_hardware(panel):
    panel.axis.value = "micro_batch"
    curve = next(t for t in panel.figure.data if t.name == "MemAscend")
    assert list(curve.x) == list(panel.slider.options) and panel.figure.layout.xaxis2.title.text == "micro batch"
    panel.accelerator.value = "cuda"
    panel.gpus.value = 2
    panel.ranks.value = 2
    assert panel.error is None and panel.estimates["deepspeed"].hardware.ranks_per_node == 2
    assert "GPU" in panel.status.value


def test_panel_overlays_a_finished_run(tmp_path):
    from memlab.runs import Run, summarize
    from memlab.views.sizing_panel import MEASURED, PREDICTED, SizingPanel

    knobs = Knobs({"run.steps": 2}).resolve(TINY)
    events = [{"t": 0, "kind": "run_start", "run_id": "r", "knobs": knobs.to_dict(), "model": TINY.to_dict()},
              {"t": 1, "kind": "sample", "rss": 700 * MiB, "vm_lck": 0, "vm_hwm": 700 * MiB, "page_cache": 0,
               "io_read": 0, "io_write": 0, "pinned_reserved": 0, "pinned_used": 0,
               "components": {C.FRAMEWORK: 350 * MiB, C.GRAD_FLAT: 22 * MiB, C.OTHER: 328 * MiB}}]
    run = Run(tmp_path / "r", events, summarize(events, status="ok"))
    panel = SizingPanel(run=run)
    assert panel.error is None
    assert bar(panel, C.FRAMEWORK, MEASURED) * panel_divisor(panel) == pytest.approx(350 * MiB, rel=1e-6)
    assert bar(panel, C.GRAD_FLAT, PREDICTED) > 0


def panel_divisor(panel):
    title = panel.figure.layout.yaxis.title.text
    return GiB if "GiB" in title else MiB


# ---------------------------------------------------------------- inputs that cannot lie

@pytest.mark.parametrize("field, value, message", [
    ("ram_bytes", float("inf"), "finite"), ("ram_bytes", float("nan"), "finite"), ("gpu_bytes", -1, "positive"),
    ("ram_bytes", 2 ** 60, "1 PiB"),
])
def test_hardware_refuses_non_finite_and_absurd_sizes(field, value, message):
    with pytest.raises(SizingError, match=message):
        Hardware(**{field: value, "gpus": 1, "accelerator": "cuda"})


def test_gpu_memory_without_gpus_is_refused_not_ignored():
    with pytest.raises(SizingError, match="GPU memory given without GPUs"):
        Hardware(gpu_bytes=80 * GiB)


def test_run_ranks_is_honoured_or_refused():
    assert estimate("small-llama", {"run.ranks": 2}).hardware.ranks_per_node == 2
    with pytest.raises(SizingError, match="run.ranks=2 but the hardware has 4"):
        estimate("small-llama", {"run.ranks": 2}, Hardware(ranks_per_node=4))


@pytest.mark.parametrize("options", [{"multiple_of": 0}, {"multiple_of": 1.5}, {"minimum": 0}, {"maximum": -3},
                                     {"minimum": 64, "maximum": 8}])
def test_fit_validates_its_search(options):
    with pytest.raises(SizingError):
        fit("small-llama", ram_bytes=4 * GiB, **options)


def test_fit_says_why_nothing_fits_and_reports_a_bad_candidate_without_failing():
    report = fit("llama-3.1-70b", ram_bytes=GiB)
    assert report["deepspeed"].value is None
    assert "nothing fits: at seq_len 2 the node peaks at" in report.table() and "over RAM 1.00 GiB" in report.table()
    models = fit(target="model", models=["tiny-llama", "no-such-model", "small-llama"], ram_bytes=8 * GiB)
    assert models["deepspeed"].value == "small-llama"
    assert "no-such-model" in models["deepspeed"].errors and "skipped no-such-model" in models.table()


def test_the_cli_exits_quietly_when_its_reader_goes_away():
    reader = subprocess.Popen([sys.executable, "-m", "memlab.cli", "estimate", "--model", "llama-3.1-70b", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # gone before the first line, as `| head` is after its first: every write fails
    err = reader.stderr.read()
    reader.wait()
    assert reader.returncode == 0 and b"Traceback" not in err, err.decode()
