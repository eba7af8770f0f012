"""The MemAscend engine's parts without a run: the fused checks equal stock's,
the staging plan and the knobs' refusals, direct storage's round trips. The
real runs (each optimization gives the stock run's losses exactly and changes
the host memory it is meant to change): tests/engine/test_memascend_runs.py."""
import os
import random
import subprocess

import pytest
import torch

from memlab import Knobs, KnobError, ModelSpec
from memlab.engine.memascend import direct_storage, fused_checks
from memlab.optimizations import HEAP_MMAP_THRESHOLD
from memlab.knobs import MEMASCEND_SWITCHES
from memlab.ds_rules import (DEFAULT_STAGING_ELEMENTS, gradient_pieces, numel_alignment, parameter_writes,
                             staging_alignment, staging_slices, staging_step, streamed_gradient_numel,
                             streamed_parameter_numel, sub_groups, swapped_gradient_numel)
from memlab.sizing import aligned_numel, staging_plan


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

def test_staging_plan_streams_every_swapped_sub_group():
    numels = [8_388_608, 65_536, 16_384, 16_384, 65_536, 528_384, 256, 256]  # embedding first, then a layer
    plan = staging_plan(numels, sub_group_size=8_388_608)
    assert plan["streamed"] == [0, 1] and plan["bound"] == DEFAULT_STAGING_ELEMENTS
    assert plan["largest_kept_group"] == []  # no sub-group is stepped whole: no partitioned swap buffer
    # one sub-group of every parameter (DeepSpeed's default sub_group_size): streamed, same bound
    whole = staging_plan(numels, sub_group_size=10**9)
    assert whole["streamed"] == [0] and whole["bound"] == DEFAULT_STAGING_ELEMENTS
    # a model whose largest sub-group is below the default: the bound is that sub-group (one slice)
    small = staging_plan(numels[1:], sub_group_size=10**9)
    assert small["streamed"] == [0] and small["bound"] == aligned_numel(sum(numels[1:]), 4, 4)  # 1024 elements
    # a sub-group too small for DeepSpeed to swap its optimizer state (under 1 MiB in fp32) is kept:
    # DeepSpeed steps it in RAM and writes its parameters through the partitioned swap buffer
    mixed = staging_plan(numels, sub_group_size=100_000)
    kept = [g for i, g in enumerate(sub_groups(numels, 100_000)) if i not in mixed["streamed"]]
    assert kept and all(sum(g) * 4 < 1 << 20 for g in kept)
    assert mixed["largest_kept_group"] == max(kept, key=sum)
    # a bound set by hand is rounded up to the alignment, and is at least two of it
    assert staging_plan(numels, 10**9, 5000)["bound"] == 5120
    assert staging_plan(numels, 10**9, 2048, intra_op_parallelism=4)["bound"] == 2 * staging_alignment(4)


@pytest.mark.parametrize("seed", range(40))
def test_slices_pieces_and_parameter_writes_cover_each_element_once(seed):
    """Drawn sub-groups (parameter sizes, bound, dtype, I/O parallelism): the slices tile the
    sub-group at aligned starts; every gradient piece lies inside one slice; each parameter's
    writes cover its elements once, in order, in whole aligned blocks that fit a staging buffer,
    and a write starts before its first element only where the previous slice's write of that
    parameter ended inside that block (the carried block)."""
    rng = random.Random(seed)
    io = rng.choice([1, 1, 2, 4])
    param_bytes = rng.choice([2, 4])
    numels = [rng.choice([rng.randrange(1, 5000), rng.randrange(1, 300_000), 1 << rng.randrange(8, 18)])
              for _ in range(rng.randrange(1, 12))]
    size = sum(numels)
    bound = staging_plan(numels, 10**9, rng.randrange(2048, max(4096, size)), io)["bound"]
    alignment = staging_alignment(io)
    slices = staging_slices(size, bound, io)
    assert [first for first, _ in slices] == list(range(0, size, staging_step(bound, io)))
    assert slices[-1][1] == size and all(a % alignment == 0 for a, _ in slices)
    assert all(end - first <= bound - alignment for first, end in slices)
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    block_size = rng.choice([1 << 20, 1 << 21])
    for offset, numel in zip(offsets, numels):
        pieces = gradient_pieces(offset, numel, bound, io)
        assert sum(length for _, length in pieces) == numel and pieces[0][0] == offset
        for start, length in pieces:
            assert any(first <= start and start + length <= end for first, end in slices)
        # the sizing's closed form is the sum over the pieces
        assert streamed_gradient_numel(offset, numel, bound, block_size, io) == sum(
            swapped_gradient_numel(length, block_size, io) for _, length in pieces)
    block = numel_alignment(param_bytes, io)
    done, written = [0] * len(numels), [0] * len(numels)
    for writes in parameter_writes(numels, bound, param_bytes, io):
        for index, first, end, file_first, file_end in writes:
            assert first == done[index] < end <= numels[index]
            assert file_first == first - first % block and file_end == -(-end // block) * block
            assert (file_end - file_first) * param_bytes <= bound * 4  # fits the staging buffer it is built in
            if file_first < first:
                assert done[index] % block  # the block the previous write cut, carried
            done[index] = end
            written[index] += file_end - file_first
    assert done == numels
    assert written == [streamed_parameter_numel(offset, numel, bound, param_bytes, io)
                       for offset, numel in zip(offsets, numels)]


def test_the_optimizer_pool_is_the_bound_whatever_the_sub_groups():
    """Any bound of at least two alignments is accepted, with sub-groups of many parameters above
    it (they are streamed too), and the optimizer pool is buffer_count x the bound: the same for
    every sub_group_size that makes a sub-group larger than the bound."""
    from memlab import components as C
    from memlab.sizing import estimate

    model = ModelSpec.resolve("tiny-llama")
    pools = []
    for sub_group_size in (10**9, 10**6, 200_000):
        knobs = {"memascend.optimizer_staging": "bounded", "memascend.staging_elements": 65_536,
                 "zero_optimization.sub_group_size": sub_group_size}
        assert Knobs(knobs).resolve(model).staging_plan["streamed"]
        pools.append([b.requested for b in estimate(model, knobs).buffers if b.component == C.OPTIMIZER_POOL])
    assert pools == [[65_536 * 4] * 4] * 3
    with pytest.raises(KnobError, match="memascend.staging_elements=1000"):
        Knobs({"memascend.staging_elements": 1000}).resolve(model)


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


def test_fixed_heap_sets_the_threshold_for_the_worker_the_estimate_and_an_attached_program():
    from memlab.engine import attached
    from memlab.sizing import estimate

    model = ModelSpec.resolve("small-llama")
    fixed = Knobs({"memascend.heap": "fixed"}).resolve(model)
    assert fixed["allocator.MALLOC_MMAP_THRESHOLD_"] == HEAP_MMAP_THRESHOLD
    assert Knobs().resolve(model)["allocator.MALLOC_MMAP_THRESHOLD_"] is None
    assert attached.environment("memascend.heap", {})["MALLOC_MMAP_THRESHOLD_"] == str(HEAP_MMAP_THRESHOLD)
    # the estimate applies the same rule: blocks of 1 MiB or more leave no free chunks behind
    at_step = {k: estimate(model, Knobs(knobs)).phases["optimizer_step"]["heap_free"]
               for k, knobs in (("dynamic", {}), ("fixed", {"memascend.heap": "fixed"}))}
    assert at_step["fixed"] < at_step["dynamic"], at_step


def test_fixed_heap_refuses_a_threshold_the_user_chose():
    model = ModelSpec.resolve("small-llama")
    knob = "allocator.MALLOC_MMAP_THRESHOLD_"
    with pytest.raises(KnobError, match=rf"{knob}.*memascend.heap=fixed sets it to {HEAP_MMAP_THRESHOLD}"):
        Knobs({"memascend.heap": "fixed", knob: 4 << 20}).resolve(model)
    with pytest.raises(KnobError, match=knob):
        Knobs({knob: 4 << 20}, engine="memascend").resolve(model)
    # the switch off, or the value the switch sets: the user's choice stands
    assert Knobs({"memascend.heap": "dynamic", knob: 4 << 20}).resolve(model)[knob] == 4 << 20
    assert Knobs({"memascend.heap": "fixed", knob: HEAP_MMAP_THRESHOLD}).resolve(model)[knob] == HEAP_MMAP_THRESHOLD
    # a program memlab attaches to: a threshold in its own environment is refused the same way
    from memlab.engine import attached

    with pytest.raises(KnobError, match="MALLOC_MMAP_THRESHOLD_='4194304': memascend.heap=fixed sets it to"):
        attached.environment("memascend.heap", {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)})
    assert attached.environment("memascend.heap", {"MALLOC_MMAP_THRESHOLD_": str(HEAP_MMAP_THRESHOLD)})[
        "MALLOC_MMAP_THRESHOLD_"] == str(HEAP_MMAP_THRESHOLD)


# ------------------------------------------------------------------ direct storage

def aio_handle():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().load(verbose=False).aio_handle(block_size=1 << 20, queue_depth=8, single_submit=False,
                                                             overlap_events=True, intra_op_parallelism=1)


@pytest.fixture(autouse=True)
def no_patch_outlives_its_test(monkeypatch):
    """What a test installs in this process (a patched aio wait, the active
    extent map) is undone after it, passed or failed."""
    from memlab.engine import patching

    monkeypatch.setattr(direct_storage, "ACTIVE", direct_storage.ACTIVE)
    yield
    patching.undo_all()


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


def test_direct_storage_refuses_to_read_what_was_never_written(tmp_path):
    extents = direct_storage.ExtentMap(direct_storage.Region(str(tmp_path / "region.bin"), 1 << 20))
    with pytest.raises(direct_storage.SwapNeverWritten, match="never written"):
        extents.locate(str(tmp_path / "7.tensor.swp"), 0, 4096)
    assert extents.extents == {}  # no fresh extent of zeros was handed out


def test_direct_storage_checkpoint_files_are_stocks_and_come_back(tmp_path):
    """A save writes each optimizer tensor out as the file stock keeps (its bytes, its size;
    gradients aside); after a load, the files DeepSpeed copied back go into the region."""
    folder = tmp_path / "optimizer"
    folder.mkdir()
    extents = direct_storage.ExtentMap(direct_storage.Region(str(tmp_path / "region.bin"), 1 << 20))
    master, gradient = str(folder / "3.tensor.swp"), str(folder / "3_gradient_0_10.tensor.swp")
    payload = bytes(range(256)) * 20  # 5120 bytes: not a multiple of the extent alignment
    for path in (master, gradient):
        _, offset = extents.locate(path, 0, len(payload), write=True)
        extents.region.pwrite(payload, offset)
    assert extents.write_files(str(folder)) == [master]  # gradients stay out of checkpoints, as in stock
    with open(master, "rb") as f:
        assert f.read() == payload
    with open(master, "wb") as f:  # a checkpoint's version, copied back by load_checkpoint
        f.write(payload[::-1])
    extents.take_files(str(folder))
    assert not os.path.exists(master)  # now in the region only
    _, offset = extents.locate(master, 0, len(payload))
    assert extents.region.pread(len(payload), offset) == payload[::-1]


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
