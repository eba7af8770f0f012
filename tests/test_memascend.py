"""The MemAscend engine: each optimization alone and all together give the
stock run's losses exactly (fp32, CPU accelerator, fixed seed), and each
changes the host memory it is meant to change."""
import os
import random
import subprocess

import pytest
import torch

from memlab import Knobs, KnobError, Lab, ModelSpec
from memlab import components as C
from memlab.engine.memascend import direct_storage, fused_checks
from memlab.knobs import MEMASCEND_SWITCHES
from memlab.sizing import aligned_numel, staging_plan
from memlab.telemetry import page_round

# A tied-embedding Qwen2 whose embedding (8.4M elements) is one sub-group
# larger than the staging bound, so bounded staging really streams it.
STREAMED = {"model_type": "qwen2", "vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 512}


# ------------------------------------------------------------------ fused checks

def stock_has_inf_or_nan(x):
    return bool(torch.isinf(x).any() or torch.isnan(x).any())


@pytest.mark.parametrize("position", [0, 1, 1023, 1024, 4095, 4096, 9999])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_fused_overflow_flag_equals_stock(position, bad):
    x = torch.randn(10_000)
    assert fused_checks.has_inf_or_nan(x, chunk=1024) is False
    assert stock_has_inf_or_nan(x) is False
    x[position] = bad
    assert fused_checks.has_inf_or_nan(x, chunk=1024) is True
    assert stock_has_inf_or_nan(x) is True


def test_fused_norm_equals_stock_to_fp64_rounding():
    import math

    generator = torch.Generator().manual_seed(0)
    for n in (1, 1000, 1 << 20, 3_000_001):
        x = torch.randn(n, generator=generator) * 3
        exact = math.sqrt(math.fsum(v * v for v in x.to(torch.float64).tolist()))
        stock = float(x.to(torch.float64).norm(2))  # _constant_buffered_norm2 for n < 2.5e8
        fused = fused_checks.norm2(x, chunk=65_536)
        assert fused.dtype == torch.float64
        # The stated bound: summing n squares in fp64 in any order errs by at most n x 2^-52 relative.
        assert abs(float(fused) - stock) <= n * 2 ** -52 * stock
        assert abs(float(fused) - exact) <= 1e-14 * exact


# ------------------------------------------------------------------ staging plan

def test_staging_plan_streams_only_one_parameter_groups_above_the_bound():
    numels = [8_388_608, 65_536, 16_384, 16_384, 65_536, 528_384, 256, 256]  # embedding first, then a layer
    plan = staging_plan(numels, sub_group_size=8_388_608)
    assert plan["streamed"] == [0]
    assert plan["bound"] == 1 << 22  # the multi-parameter group is smaller than the floor
    assert plan["largest_kept_group"] == numels[1:]
    no_stream = staging_plan(numels, sub_group_size=10**9)  # one group of everything: nothing to stream
    assert no_stream["streamed"] == [] and no_stream["bound"] == aligned_numel(sum(numels), 4, 4)


def test_staging_elements_below_a_multi_parameter_group_is_refused():
    knobs = Knobs({"memascend.optimizer_staging": "bounded", "memascend.staging_elements": 4096,
                   "zero_optimization.sub_group_size": 10**8})
    with pytest.raises(KnobError, match="memascend.staging_elements=4096: smaller than the largest sub-group"):
        knobs.resolve(ModelSpec.resolve("tiny-llama"))


def test_bounded_staging_refuses_pipelined_swapping():
    knobs = Knobs({"memascend.optimizer_staging": "bounded", "zero_optimization.offload_optimizer.pipeline_read": True,
                   "zero_optimization.offload_optimizer.buffer_count": 12})
    with pytest.raises(KnobError, match="memascend.optimizer_staging='bounded': not supported with"):
        knobs.resolve(ModelSpec.resolve("tiny-llama"))


def test_engine_memascend_turns_every_switch_on():
    knobs = Knobs(engine="memascend")
    assert knobs.engine == "memascend"
    assert all(knobs[name] == optimized for name, (_, optimized) in MEMASCEND_SWITCHES.items())
    assert knobs.resolve(ModelSpec.resolve("tiny-llama"))["allocator.DS_PIN_MEMORY_BACKEND"] == "native"
    one = Knobs({"memascend.pool": "adaptive"})
    assert one.engine == "custom"


# ------------------------------------------------------------------ direct storage

def aio_handle():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().load(verbose=False).aio_handle(block_size=1 << 20, queue_depth=8, single_submit=False,
                                                             overlap_events=True, intra_op_parallelism=1)


def round_trip(region_path, device, tmp_path):
    """Write tensors of many sizes through the extent map with DeepSpeed's aio
    handle, read them back into fresh buffers, compare checksums."""
    import hashlib

    handle = aio_handle()
    extents = direct_storage.ExtentMap(direct_storage.Region(region_path, 1 << 20, device=device))
    direct_storage.ACTIVE = extents
    if device:
        direct_storage._count_sync_reads_in_wait()
    rng = random.Random(0)
    written = {}
    for i in range(24):
        numel = aligned_numel(rng.randint(1, 300_000), 4)
        tensor = handle.new_cpu_locked_tensor(numel, torch.zeros(1))
        tensor.copy_(torch.randn(numel))
        path = str(tmp_path / f"{i}_param.tensor.swp")
        direct_storage.submit_write(handle, tensor, path)
        assert extents.extents[path][0] % direct_storage.EXTENT_ALIGNMENT == 0
        written[path] = (hashlib.sha256(tensor.numpy().tobytes()).hexdigest(), numel)
    assert handle.wait() == len(written)
    for path, (digest, numel) in written.items():
        buffer = handle.new_cpu_locked_tensor(numel, torch.zeros(1))
        direct_storage.submit_read(handle, buffer, path)
        assert handle.wait() == 1  # memlab's own reads on a device count like aio completions
        assert hashlib.sha256(buffer.numpy().tobytes()).hexdigest() == digest
    path, (digest, numel) = next(iter(written.items()))
    part = handle.new_cpu_locked_tensor(1000, torch.zeros(1))
    if device:  # memlab's own device read takes an unaligned offset through a bounce buffer
        direct_storage.submit_read(handle, part, path, offset=4 * 100)
        handle.wait()
        whole = handle.new_cpu_locked_tensor(numel, torch.zeros(1))
        direct_storage.submit_read(handle, whole, path)
        handle.wait()
        assert torch.equal(part, whole[100:1100])
    else:  # aio with O_DIRECT would silently read the wrong bytes: refused
        with pytest.raises(ValueError, match="not a multiple of 512"):
            direct_storage.submit_read(handle, part, path, offset=4 * 100)
    direct_storage.ACTIVE = None
    assert not any(f.endswith(".swp") for f in os.listdir(tmp_path))  # no file per tensor
    return extents


def test_direct_storage_round_trips_bit_for_bit_in_a_region_file(tmp_path):
    extents = round_trip(str(tmp_path / "region.bin"), False, tmp_path)
    assert extents.region.capacity >= extents.next_offset > 1 << 20  # it grew past its first size
    offsets = sorted(extents.extents.values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))  # extents never overlap


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    try:
        device = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"loop devices are not available here: {exc}")
    yield device
    subprocess.run(["losetup", "-d", device], check=False)


def test_direct_storage_round_trips_on_a_raw_block_device(loop_device, tmp_path):
    from memlab.lab import check_block_device

    check_block_device(loop_device)  # a free loop device passes validation
    extents = round_trip(loop_device, True, tmp_path)
    assert extents.region.capacity == 64 << 20
    with pytest.raises(direct_storage.RegionFull, match="needed"):
        extents.reserve("too-big", 128 << 20)


def test_a_mounted_or_regular_path_is_refused_as_storage_device(tmp_path):
    from memlab.lab import check_block_device, mounted_devices

    with pytest.raises(KnobError, match="is not a block device"):
        check_block_device(str(tmp_path))
    with pytest.raises(KnobError, match="cannot use it"):
        check_block_device(str(tmp_path / "missing"))
    mounted = sorted(d for d in mounted_devices() if os.path.exists(d))
    if mounted:
        with pytest.raises(KnobError, match="is mounted"):
            check_block_device(mounted[0])


def test_storage_device_needs_direct_storage():
    with pytest.raises(KnobError, match="needs memascend.storage=direct"):
        Knobs({"memascend.storage_device": "/dev/loop0"}).resolve(ModelSpec.resolve("tiny-llama"))


# ------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The streamed model, stock / each switch alone / all, 3 steps each."""
    lab = Lab(tmp_path_factory.mktemp("store"))
    variants = {"stock": Knobs(), "all": Knobs(engine="memascend")}
    for name, (_, optimized) in MEMASCEND_SWITCHES.items():
        variants[name] = Knobs({name: optimized})
    done = {}
    for name, knobs in variants.items():
        run = lab.run(knobs.set(steps=3), model=STREAMED, wait=True)
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
