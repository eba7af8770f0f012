"""The MemAscend engine on real runs: each optimization alone and all together
give the stock run's losses exactly (fp32, CPU accelerator, fixed seed), and
each changes the host memory it is meant to change. Its parts without a run:
tests/unit/test_memascend.py."""
import pytest
from helpers import UNALIGNED, run_together

from memlab import Knobs, KnobError, Lab, ModelSpec
from memlab import components as C
from memlab.knobs import MEMASCEND_SWITCHES
from memlab.ds_rules import sub_groups
from memlab.sizing import aligned_numel, estimate
from memlab.telemetry import page_round

# A tied-embedding Qwen2 whose embedding (8.4M elements) is a sub-group of its own, larger than the
# staging bound: bounded staging streams it in several slices (and the rest of the model in one).
STREAMED = {"model_type": "qwen2", "vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The streamed model, stock / each switch alone / all, 3 steps each."""
    lab = Lab(tmp_path_factory.mktemp("store"))
    variants = {"stock": Knobs(), "all": Knobs(engine="memascend")}
    for name, (_, optimized) in MEMASCEND_SWITCHES.items():
        variants[name] = Knobs({name: optimized})
    done = {}
    for name, run in zip(variants, run_together(lab, [(knobs.set(steps=3), STREAMED) for knobs in variants.values()])):
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        done[name] = run
    return done


@pytest.mark.engine
@pytest.mark.parametrize("variant", ["all"] + list(MEMASCEND_SWITCHES))
def test_losses_equal_the_stock_run_exactly(runs, variant):
    # Every optimization keeps the arithmetic: Adam is elementwise and streamed
    # slices start at multiples of the kernel's vector width; the fused norm
    # differs from stock only in fp64 rounding and feeds clipping, which is off.
    assert runs[variant].summary["losses"] == runs["stock"].summary["losses"]


@pytest.mark.engine
def test_adaptive_pool_holds_one_buffer_per_gathered_partition(runs):
    model = ModelSpec.resolve(STREAMED)
    stock = [a for a in runs["stock"].allocations if a["component"] == C.PARAM_POOL]
    adaptive = [a for a in runs["memascend.pool"].allocations if a["component"] == C.PARAM_POOL]
    embedding = aligned_numel(model.largest_tensor.numel, 4) * 4
    assert sum(a["requested"] for a in stock) == 5 * embedding  # buffer_count x buffer_size
    assert [a["requested"] for a in adaptive] == [embedding]  # only the embedding swaps; gathered once at a time
    assert runs["memascend.pool"].summary["fragmentation_at_peak"] < runs["stock"].summary["fragmentation_at_peak"]


@pytest.mark.engine
def test_bounded_staging_sizes_the_optimizer_pool_by_the_bound(runs):
    model = ModelSpec.resolve(STREAMED)
    knobs = Knobs({"memascend.optimizer_staging": "bounded"}).resolve(model)
    bound = knobs["memascend.staging_elements"]
    pool = [a for a in runs["memascend.optimizer_staging"].allocations if a["component"] == C.OPTIMIZER_POOL]
    assert [a["requested"] for a in pool] == [bound * 4] * 4
    stock_pool = [a for a in runs["stock"].allocations if a["component"] == C.OPTIMIZER_POOL]
    assert all(a["requested"] == aligned_numel(model.largest_tensor.numel, 4) * 4 for a in stock_pool)
    # every sub-group is streamed and writes its parameters from the staging buffers: no partition buffer
    assert knobs.staging_plan["largest_kept_group"] == []
    assert [a for a in runs["stock"].allocations if a["component"] == C.PARAM_PARTITION_BUFFER]
    assert not [a for a in runs["memascend.optimizer_staging"].allocations
                if a["component"] == C.PARAM_PARTITION_BUFFER]
    # The bytes through the files per step are the estimate's: the same data as stock, in slices, less
    # the gradient pieces a slice's start cuts below DeepSpeed's swap floor (those stay in RAM).
    for name, knobs in (("stock", {}), ("memascend.optimizer_staging", {"memascend.optimizer_staging": "bounded"})):
        predicted = estimate(STREAMED, knobs)
        for step in (e for e in runs[name].events if e["kind"] == "step"):
            want = predicted.swap_first_step if step["index"] == 1 else predicted.swap_per_step
            assert {k: v for k, v in step["swap_by_kind"].items() if v} == want, (name, step["index"])


@pytest.mark.engine
def test_exact_pinning_locks_page_rounded_bytes(runs):
    allocs = runs["memascend.pinning"].allocations
    grad = [a for a in allocs if a["component"] == C.GRAD_FLAT]
    assert grad and all(a["backend"] == "native-mlock" and a["reserved"] == page_round(a["requested"]) for a in grad)
    assert runs["memascend.pinning"].summary["peak_vm_lck_bytes"] >= sum(
        a["reserved"] for a in allocs if a["backend"] in ("native-mlock", "aio-mlock"))


@pytest.mark.engine
def test_direct_storage_creates_one_region_instead_of_a_file_per_tensor(runs):
    direct = runs["memascend.storage"].steps[-1]
    stock = runs["stock"].steps[-1]
    assert direct["swap_files"] == 1
    assert stock["swap_files"] > 5  # a file per parameter, optimizer state and gradient piece
    assert direct["swap_in_bytes"] == stock["swap_in_bytes"] and direct["swap_out_bytes"] == stock["swap_out_bytes"]


@pytest.mark.engine
def test_fixed_heap_threshold_returns_freed_tensors_to_the_system(runs):
    # With glibc's dynamic threshold a freed tensor below the largest block freed so far stays in the heap
    # as free chunks; fixed at 1 MiB, every tensor of 1 MiB or more is its own mapping, unmapped when freed.
    free = {name: runs[name].summary["components_at_peak"][C.HEAP_FREE] for name in ("stock", "memascend.heap")}
    assert free["memascend.heap"] < free["stock"], free


@pytest.mark.engine
def test_switches_report_what_was_installed(runs):
    for name in MEMASCEND_SWITCHES:
        assert any(name in message for message in runs[name].logs), name


@pytest.mark.engine
def test_adaptive_pool_runs_where_the_fixed_pool_asserts(tmp_path):
    # small-llama initializes 4 swapped MLP/attention tensors together: 2 fixed
    # buffers fail DeepSpeed at init ("Not enough buffers 2 for swapping 4"),
    # which validation refuses up front; the adaptive pool grows instead.
    two = {"zero_optimization.offload_param.buffer_count": 2, "run.steps": 2}
    with pytest.raises(KnobError, match="at least 4 buffers"):
        Knobs(two).resolve(ModelSpec.resolve("small-llama"))
    run = Lab(tmp_path).run(Knobs({**two, "memascend.pool": "adaptive"}), model="small-llama", wait=True)
    assert run.summary["status"] == "ok", run.summary["error"]
    assert len(run.summary["losses"]) == 2


@pytest.mark.engine
def test_bounded_staging_with_parameters_in_ram(tmp_path):
    # Parameters on the CPU, or left on the device (optimizer-only offload): the
    # streamed embedding has no parameter swap file, so its updated slices go
    # straight into the partition in RAM; each run matches stock step for step
    # (stock's arithmetic is the same wherever the partitions live).
    lab = Lab(tmp_path)
    device = "zero_optimization.offload_param.device"
    cases = [("deepspeed", "cpu"), ("memascend", "cpu"), ("memascend", "none")]
    # With parameters on the CPU, exact pinning once kept every pinned Init partition locked beside
    # its copy in the flat buffer (the copy redirects ds_tensor.data; the native allocation is freed
    # only with its root): the partitions held must be the estimate's, not a second copy of the model.
    losses = {}
    jobs = [(Knobs({device: where, "run.steps": 2}, engine=engine), STREAMED) for engine, where in cases]
    for (engine, where), (knobs, _), run in zip(cases, jobs, run_together(lab, jobs)):
        assert knobs.resolve(ModelSpec.resolve(STREAMED)).staging_plan["streamed"]  # the embedding is streamed
        assert run.summary["status"] == "ok", f"{engine}, {where}: {run.summary['error']}"
        losses[engine, where] = run.summary["losses"]
        freed = {e["id"] for e in run.events if e["kind"] == "free"}
        held = sum(a["reserved"] for a in run.allocations if a["component"] == C.SMALL_PARTITIONS and a["id"] not in freed)
        predicted = sum(b.reserved for b in estimate(STREAMED, knobs).buffers if b.component == C.SMALL_PARTITIONS)
        assert held == predicted, (engine, where, held, predicted)
    stock = losses["deepspeed", "cpu"]
    assert len(stock) == 2 and all(got == stock for got in losses.values()), losses


@pytest.mark.engine
def test_partitions_brought_into_ram_at_init_match_stock(tmp_path):
    # The adaptive pool failed there with DeepSpeed's `No buffer available to swap param 0.` (its
    # assert counts the fixed pool's free buffers); exact pinning made the flat buffer memory the
    # aio handle reads into directly, and a partition at an unaligned address came back as zeros
    # (first loss ln(vocab), no learning). Both now read such partitions through a swap buffer.
    # With every switch on, bounded staging reads the gradients stock misreads on this model (see
    # test_bounded_staging_streams_sub_groups_of_many_parameters): that run's reference is the same
    # engine with its optimizer on the CPU.
    in_ram = {"zero_optimization.offload_param.max_in_cpu": 1_000_000_000, "run.steps": 2}
    variants = {"stock": Knobs(in_ram), "pool": Knobs({**in_ram, "memascend.pool": "adaptive"}),
                "pinning": Knobs({**in_ram, "memascend.pinning": "exact"}), "all": Knobs(in_ram, engine="memascend"),
                "reference": Knobs({**in_ram, "zero_optimization.offload_optimizer.device": "cpu"})}
    runs = run_together(Lab(tmp_path), [(knobs, UNALIGNED) for knobs in variants.values()])
    losses = {}
    for name, run in zip(variants, runs):
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        losses[name] = run.summary["losses"]
    assert len(losses["stock"]) == 2 and losses["stock"][1] != losses["stock"][0]  # it trains
    assert losses["pool"] == losses["pinning"] == losses["stock"], losses
    assert losses["all"] == losses["reference"], losses


@pytest.mark.engine
def test_bounded_staging_streams_sub_groups_of_many_parameters(tmp_path):
    """Every swapped sub-group is streamed, of one parameter or many: with one sub-group of
    the whole model and with several, the optimizer pool is buffer_count x the bound (locked bytes
    independent of sub_group_size), and the losses are the optimizer's own, exactly, in fp32 and in
    bf16. The reference is the same engine with its optimizer on the CPU (the same CPU Adam, no
    swapping), not stock with the optimizer on NVMe: on this model (hidden 1000, so most parameters
    start at offsets in their sub-group that are not 512-byte aligned) stock reads those gradients
    with O_DIRECT into unaligned pinned memory, the read fails without an error, and it steps them on
    stale buffer contents (tests/engine/test_traps.py shows which, in plain DeepSpeed)."""
    bound = 300_032  # a multiple of the staging alignment, far below every sub-group below
    nvme_optimizer = {"memascend.optimizer_staging": "bounded", "memascend.staging_elements": bound}
    cpu_optimizer = {"zero_optimization.offload_optimizer.device": "cpu"}
    cases = {  # name: (dtype, knobs)
        "reference": ("fp32", {**cpu_optimizer, "zero_optimization.sub_group_size": 10**9}),
        "one sub-group": ("fp32", {**nvme_optimizer, "zero_optimization.sub_group_size": 10**9}),
        "several": ("fp32", {**nvme_optimizer, "zero_optimization.sub_group_size": 3_000_000}),
        "bf16 reference": ("bf16", {**cpu_optimizer, "zero_optimization.sub_group_size": 3_000_000}),
        "bf16": ("bf16", {**nvme_optimizer, "zero_optimization.sub_group_size": 3_000_000}),
    }
    jobs = [(Knobs({**knobs, "run.dtype": dtype, "run.steps": 3}), UNALIGNED) for dtype, knobs in cases.values()]
    runs = dict(zip(cases, run_together(Lab(tmp_path), jobs)))
    for name, run in runs.items():
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
    for name, (_, knobs) in cases.items():
        if "memascend.optimizer_staging" in knobs:
            groups = sub_groups([t.numel for t in ModelSpec.resolve(UNALIGNED).tensors()],
                                knobs["zero_optimization.sub_group_size"])
            plan = Knobs(knobs).resolve(ModelSpec.resolve(UNALIGNED)).staging_plan
            assert plan["streamed"] == list(range(len(groups))) and any(len(g) > 1 for g in groups)
            pool = [a["requested"] for a in runs[name].allocations if a["component"] == C.OPTIMIZER_POOL]
            assert pool == [bound * 4] * 4, name
            assert not [a for a in runs[name].allocations if a["component"] == C.PARAM_PARTITION_BUFFER]
    reference = runs["reference"].summary["losses"]
    assert len(reference) == 3 and reference[2] != reference[0]
    assert runs["one sub-group"].summary["losses"] == reference
    assert runs["several"].summary["losses"] == reference
    assert runs["bf16"].summary["losses"] == runs["bf16 reference"].summary["losses"]


@pytest.mark.engine
def test_bounded_grad_staging_keeps_no_gradient_flat_buffer(tmp_path):
    """memascend.grad_staging=bounded allocates no gradient flat buffer (nothing locked for gradients,
    whatever sub_group_size), gives the optimizer's own losses exactly, with the optimizer on the CPU
    (gradients straight into its fp32 gradients: nothing of them kept) and on NVMe (what DeepSpeed keeps
    of the swapped gradients in RAM goes into one store made at init, the estimate's to the byte, which
    every step reuses: a store the engine's geometry did not foresee would be a second allocation).
    The reference is the CPU optimizer with stock gradient staging (on this unaligned shape stock's
    NVMe optimizer misreads gradients: test_bounded_staging_streams_sub_groups_of_many_parameters)."""
    staged = {"memascend.grad_staging": "bounded"}
    nvme = {**staged, "memascend.optimizer_staging": "bounded", "memascend.staging_elements": 300_032}
    cpu_optimizer = {"zero_optimization.offload_optimizer.device": "cpu"}
    cases = {  # name: (dtype, knobs)
        "reference": ("fp32", cpu_optimizer),
        "cpu": ("fp32", {**cpu_optimizer, **staged}),
        "nvme, one sub-group": ("fp32", {**nvme, "zero_optimization.sub_group_size": 10**9}),
        "nvme, several": ("fp32", {**nvme, "zero_optimization.sub_group_size": 3_000_000}),
        "bf16 reference": ("bf16", cpu_optimizer),
        "bf16 cpu": ("bf16", {**cpu_optimizer, **staged}),
    }
    steps = 3
    knobs = {name: Knobs({**k, "run.dtype": dtype, "run.steps": steps}) for name, (dtype, k) in cases.items()}
    runs = dict(zip(cases, run_together(Lab(tmp_path), [(k, UNALIGNED) for k in knobs.values()])))
    for name, run in runs.items():
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
    stock = [a for a in runs["reference"].allocations if a["component"] == C.GRAD_FLAT]
    assert [a["requested"] for a in stock] == [4 * ModelSpec.resolve(UNALIGNED).num_params]  # fp32, one per element
    for name, run in runs.items():
        if "reference" in name:
            continue
        predicted = [(b.requested, b.backend) for b in estimate(UNALIGNED, knobs[name]).buffers
                     if b.component == C.GRAD_FLAT]
        grads = [(a["requested"], a["backend"]) for a in run.allocations if a["component"] == C.GRAD_FLAT]
        assert grads == predicted, name  # pageable: nothing locked
        assert bool(grads) == ("nvme" in name), name
    reference = runs["reference"].summary["losses"]
    assert len(reference) == steps and reference[-1] != reference[0]
    for name in ("cpu", "nvme, one sub-group", "nvme, several"):
        assert runs[name].summary["losses"] == reference, name
    assert runs["bf16 cpu"].summary["losses"] == runs["bf16 reference"].summary["losses"]
    peak = {name: run.summary["peak_engine_host_bytes"] for name, run in runs.items()}
    assert peak["cpu"] < peak["reference"] and peak["bf16 cpu"] < peak["bf16 reference"]


@pytest.mark.engine
def test_gradient_accumulation_with_every_switch_gives_the_stock_losses(tmp_path):
    """run.grad_accum 2 and 4 on the streamed model: every switch together (gradients summed in the
    gradient files on NVMe between micro-batches) gives stock's losses to the bit, and the bytes through
    the files per step are the estimate's (each micro-batch fetches the parameters again; bounded
    gradient staging writes the gradients every micro-batch and reads them back after the first). With
    the optimizer on the CPU (gradients summed in its fp32 gradients), in fp32 and in bf16, the same."""
    cpu = {"zero_optimization.offload_optimizer.device": "cpu"}
    staged = {"memascend.grad_staging": "bounded"}
    cases = {  # name: (engine, knobs)
        "stock 2": ("deepspeed", {"run.grad_accum": 2}),
        "all 2": ("memascend", {"run.grad_accum": 2}),
        "stock 4": ("deepspeed", {"run.grad_accum": 4}),
        "all 4": ("memascend", {"run.grad_accum": 4}),
        "cpu stock 2": ("deepspeed", {**cpu, "run.grad_accum": 2}),
        "cpu staged 2": ("deepspeed", {**cpu, **staged, "run.grad_accum": 2}),
        "bf16 cpu stock 2": ("deepspeed", {**cpu, "run.grad_accum": 2, "run.dtype": "bf16"}),
        "bf16 cpu staged 2": ("deepspeed", {**cpu, **staged, "run.grad_accum": 2, "run.dtype": "bf16"}),
    }
    knobs = {name: Knobs({**k, "run.steps": 3}, engine=engine) for name, (engine, k) in cases.items()}
    runs = dict(zip(cases, run_together(Lab(tmp_path), [(k, STREAMED) for k in knobs.values()])))
    for name, run in runs.items():
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        assert not any("does not act" in line for line in run.logs), name
    for stock, switched in (("stock 2", "all 2"), ("stock 4", "all 4"), ("cpu stock 2", "cpu staged 2"),
                            ("bf16 cpu stock 2", "bf16 cpu staged 2")):
        losses = runs[stock].summary["losses"]
        assert len(losses) == 3 and losses[-1] != losses[0]
        assert runs[switched].summary["losses"] == losses, switched
    assert runs["stock 2"].summary["losses"] != runs["stock 4"].summary["losses"]  # the micro-batches count
    for name in ("stock 2", "all 2", "stock 4", "all 4"):
        predicted = estimate(STREAMED, knobs[name])
        for step in (e for e in runs[name].events if e["kind"] == "step"):
            want = predicted.swap_first_step if step["index"] == 1 else predicted.swap_per_step
            assert {k: v for k, v in step["swap_by_kind"].items() if v} == want, (name, step["index"])


@pytest.mark.engine
def test_stock_aio_reads_into_unaligned_memory_fail_silently(tmp_path):
    """DeepSpeed 0.19.8's aio op alone: a file read into pinned memory whose address is not 512-byte
    aligned returns as done and leaves the memory as it was (O_DIRECT refuses it; nothing reports
    it). Stock reads swapped gradients that way; bounded staging reads them at aligned places."""
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    handle = AsyncIOBuilder().load().aio_handle(1 << 20, 128, False, True, 1)
    numel = 1 << 18
    source = handle.new_cpu_locked_tensor(numel, torch.zeros(1))
    source.copy_(torch.arange(numel, dtype=torch.float32))
    path = str(tmp_path / "tensor.swp")
    assert handle.async_pwrite(source, path, 0) == 0 and handle.wait() == 1
    for shift, right in ((0, True), (128, True), (64, False), (16, False)):  # fp32 elements: 0, 512, 256, 64 bytes
        dest = handle.new_cpu_locked_tensor(numel + 1024, torch.zeros(1)).fill_(-1.0)
        assert handle.async_pread(dest.narrow(0, shift, numel), path, 0) == 0
        assert handle.wait() == 1  # done, as far as the handle says
        got = dest.narrow(0, shift, numel)
        assert torch.equal(got, source) == right, shift
        if not right:
            assert bool((got == -1.0).all())  # untouched
        handle.free_cpu_locked_tensor(dest)
