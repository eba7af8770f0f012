"""The MemAscend engine on real runs: each optimization alone and all together
give the stock run's losses exactly (fp32, CPU accelerator, fixed seed), and
each changes the host memory it is meant to change. Its parts without a run:
tests/unit/test_memascend.py."""
import pytest
from helpers import run_together

from memlab import Knobs, KnobError, Lab, ModelSpec
from memlab import components as C
from memlab.knobs import MEMASCEND_SWITCHES
from memlab.sizing import aligned_numel, estimate
from memlab.telemetry import page_round

# A tied-embedding Qwen2 whose embedding (8.4M elements) is one sub-group
# larger than the staging bound, so bounded staging really streams it.
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
    (partition,) = [a for a in runs["memascend.optimizer_staging"].allocations
                    if a["component"] == C.PARAM_PARTITION_BUFFER]
    assert partition["requested"] == sum(aligned_numel(n, 4) for n in knobs.staging_plan["largest_kept_group"]) * 4
    # Same bytes through the files per step as stock: streaming moves the same data in slices.
    assert runs["memascend.optimizer_staging"].summary["swap_write_bytes_per_step"] == \
        runs["stock"].summary["swap_write_bytes_per_step"]


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


# A Llama whose partitions are not I/O-aligned (hidden 1000): with max_in_cpu above 0 every
# partition on NVMe is brought into the CPU flat buffer at init (swap_into_buffer), most at
# unaligned offsets.
UNALIGNED = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 1000, "intermediate_size": 1400,
             "num_hidden_layers": 2, "num_attention_heads": 10, "num_key_value_heads": 10,
             "max_position_embeddings": 256}


@pytest.mark.engine
def test_partitions_brought_into_ram_at_init_match_stock(tmp_path):
    # The adaptive pool failed there with DeepSpeed's `No buffer available to swap param 0.` (its
    # assert counts the fixed pool's free buffers); exact pinning made the flat buffer memory the
    # aio handle reads into directly, and a partition at an unaligned address came back as zeros
    # (first loss ln(vocab), no learning). Both now read such partitions through a swap buffer.
    in_ram = {"zero_optimization.offload_param.max_in_cpu": 1_000_000_000, "run.steps": 2}
    variants = {"stock": Knobs(in_ram), "pool": Knobs({**in_ram, "memascend.pool": "adaptive"}),
                "pinning": Knobs({**in_ram, "memascend.pinning": "exact"}), "all": Knobs(in_ram, engine="memascend")}
    runs = run_together(Lab(tmp_path), [(knobs, UNALIGNED) for knobs in variants.values()])
    losses = {}
    for name, run in zip(variants, runs):
        assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        losses[name] = run.summary["losses"]
    assert len(losses["stock"]) == 2 and losses["stock"][1] != losses["stock"][0]  # it trains
    assert all(got == losses["stock"] for got in losses.values()), losses
