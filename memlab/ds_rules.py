"""DeepSpeed 0.19.8's rules, each once, from shapes and knob values alone.

The rules by which the engine sizes its host buffers and decides what to swap,
written out so that memlab can apply them without importing torch or
DeepSpeed: knob validation (memlab.knobs), the what-if estimate
(memlab.sizing), the probes and the engine patches (memlab.engine) all take
them from here. Standard library only, and it imports nothing of memlab.

Every rule names the source it mirrors in its docstring: a path under the
installed `deepspeed/` package and the function (or, where the rule is
another library's, that library's file), so a new DeepSpeed release is
checked against one module.
"""
import functools
import math
import os

# ----------------------------------------------------------------------------- dtypes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per element of each run.dtype
FP32 = DTYPE_BYTES["fp32"]  # master weights, Adam states and offloaded gradients are fp32

# ----------------------------------------------------------------------------- I/O alignment, swap threshold

AIO_ALIGNED_BYTES = 1024  # deepspeed/runtime/swap_tensor/utils.py AIO_ALIGNED_BYTES
MIN_AIO_BYTES = 1024 * 1024  # deepspeed/runtime/swap_tensor/utils.py MIN_AIO_BYTES


def io_alignment_bytes(intra_op_parallelism=1):
    """Bytes every swapped tensor is aligned to: `aligned_bytes` in
    deepspeed/runtime/swap_tensor/partitioned_param_swapper.py
    AsyncPartitionedParameterSwapper._configure_aio (and optimizer_utils.py
    OptimizerSwapper.__init__): AIO_ALIGNED_BYTES x aio.intra_op_parallelism."""
    return AIO_ALIGNED_BYTES * intra_op_parallelism


def numel_alignment(element_size, intra_op_parallelism=1):
    """Elements every swapped tensor is aligned to: `numel_alignment` in
    deepspeed/runtime/swap_tensor/partitioned_param_swapper.py _configure_aio
    (and optimizer_utils.py OptimizerSwapper.__init__): aligned_bytes // swap_element_size."""
    return io_alignment_bytes(intra_op_parallelism) // element_size


def aligned_numel(numel, element_size, intra_op_parallelism=1):
    """deepspeed/runtime/swap_tensor/partitioned_param_swapper.py
    AsyncPartitionedParameterSwapper._io_aligned_numel (the same in
    optimizer_utils.py and async_swapper.py): elements rounded up to
    numel_alignment, i.e. to 1024 x intra_op_parallelism bytes."""
    alignment = numel_alignment(element_size, intra_op_parallelism)
    return -(-int(numel) // alignment) * alignment


def min_swap_bytes(block_size):
    """`min_aio_bytes` in deepspeed/runtime/swap_tensor/partitioned_param_swapper.py
    _configure_aio (and optimizer_utils.py OptimizerSwapper.__init__):
    max(MIN_AIO_BYTES, aio.block_size); tensors smaller than this stay in RAM."""
    return max(MIN_AIO_BYTES, block_size)


def swappable(numel, element_size, block_size):
    """deepspeed/runtime/swap_tensor/partitioned_param_swapper.py
    AsyncPartitionedParameterSwapper.swappable_tensor (optimizer_utils.py
    is_swappable_tensor for optimizer state and gradients): a tensor goes
    through NVMe only if it is at least min_aio_bytes."""
    return numel * element_size >= min_swap_bytes(block_size)


def swapped_gradient_numel(numel, block_size, intra_op_parallelism=1):
    """Elements of an fp32 gradient (piece) of `numel` that DeepSpeed writes to NVMe:
    deepspeed/runtime/swap_tensor/optimizer_utils.py OptimizerSwapper._swap_out_gradients, after
    _adjust_for_misaligned_lengths splits a swappable tensor into its aligned part and a remainder;
    each is then swapped only if swappable, so the remainder (and a tensor below the floor) stays in RAM."""
    if not swappable(numel, FP32, block_size):
        return 0
    aligned = numel - numel % numel_alignment(FP32, intra_op_parallelism)
    return aligned if swappable(aligned, FP32, block_size) else 0


def min_swap_numel(element_size, block_size):
    """The fewest elements a swapped tensor has: `swappable` as an element count
    (numel >= this exactly when swappable(numel, element_size, block_size))."""
    return -(-min_swap_bytes(block_size) // element_size)


# ----------------------------------------------------------------------------- partitions and sub-groups

def partition_numel(numel, world):
    """Elements of one rank's partition of a parameter: deepspeed/runtime/zero/
    partition_parameters.py Init._partition_param, `_aligned_size(param) //
    world` with `_padding_size` padding numel up to a multiple of world."""
    return -(-int(numel) // world)


def sub_groups(numels, sub_group_size):
    """deepspeed/runtime/zero/stage3.py DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups:
    parameters in order, a sub-group closes once it reaches sub_group_size
    elements (so one parameter larger than it is a sub-group of its own).
    Returns lists of numels."""
    numels = list(numels)
    if sub_group_size is None or sub_group_size >= sum(numels):
        return [numels]
    groups, current, size = [], [], 0
    for index, numel in enumerate(numels):
        current.append(numel)
        size += numel
        if size >= sub_group_size or index == len(numels) - 1:
            groups.append(current)
            current, size = [], 0
    return groups


def largest_sub_group(numels, sub_group_size):
    """The sub-group with most elements (first on ties): deepspeed/runtime/zero/
    stage3.py DeepSpeedZeroOptimizer_Stage3._create_fp16_partitions_with_defragmentation
    (`largest_partition_numel`, given to reserve_partitioned_swap_space)."""
    best = []
    for group in sub_groups(numels, sub_group_size):
        if sum(group) > sum(best):
            best = group
    return best


O_DIRECT_ALIGNMENT = 512  # bytes: the smallest logical block size Linux's O_DIRECT accepts memory at


def stale_gradient_reads(numels, sub_group_size, block_size, intra_op_parallelism=1):
    """Indices of the parameters whose swapped fp32 gradient stock DeepSpeed 0.19.8 reads into
    unaligned memory: deepspeed/runtime/swap_tensor/partitioned_optimizer_swapper.py
    _swap_in_pinned_gradients reads each gradient file into the sub-group's pinned buffer at the
    parameter's offset in the sub-group. aio opens the file with O_DIRECT, and where that offset is
    not a multiple of O_DIRECT_ALIGNMENT bytes the read fails without an error: the buffer keeps what
    it held and Adam steps the parameter on it (measured with DeepSpeed's aio op itself,
    tests/engine/test_memascend_runs.py)."""
    stale, index = [], 0
    for group in sub_groups(numels, sub_group_size):
        swapped, offset = swappable(sum(group), FP32, block_size), 0  # its optimizer state on NVMe
        for numel in group:
            if swapped and offset * FP32 % O_DIRECT_ALIGNMENT and swapped_gradient_numel(
                    numel, block_size, intra_op_parallelism):
                stale.append(index)
            offset += numel
            index += 1
    return stale


# ----------------------------------------------------------------------------- module gather groups

def module_groups(names):
    """Index lists of the tensors (by dotted parameter name) gathered together:
    a module's own parameters with its direct children's, as
    transformers/integrations/deepspeed.py initialize_weights_zero3 gathers
    them (`GatheredParameters(params)`) at init under ZeRO-3; in backward the
    projections of one attention block or one MLP are live together the same way."""
    return _module_groups(tuple(names))


@functools.lru_cache(maxsize=16)  # a model's names, asked by validation and by sizing on every estimate
def _module_groups(names):
    groups = {}
    for index, name in enumerate(names):
        module = name.rsplit(".", 1)[0]
        parent = module.rsplit(".", 1)[0] if "." in module else ""
        for group in {module, parent}:
            groups.setdefault(group, []).append(index)
    return tuple(tuple(group) for group in groups.values())


def largest_module_group(names):
    """Most tensors of `names` gathered at once by module_groups (0 for none)."""
    return max((len(group) for group in module_groups(names)), default=0)


# ----------------------------------------------------------------------------- bounded optimizer staging

DEFAULT_STAGING_ELEMENTS = 1 << 22  # auto bound: 16 MiB fp32 buffers; fewer elements cost more I/O calls per step
STAGING_ALIGNMENT = 1024  # elements: 4 KiB in fp32, 2 KiB in bf16, O_DIRECT-safe for either


def staging_alignment(intra_op_parallelism=1):
    """Elements every staging slice starts at a multiple of: STAGING_ALIGNMENT, and twice the
    largest element alignment of a swapped parameter (numel_alignment of a 2-byte dtype), so a
    parameter's write (whole aligned blocks) is at most one slice plus one alignment. It is also
    a multiple of CPU Adam's vector width, so each element is updated by the same instructions as
    in the whole-sub-group step (bit-identical)."""
    return math.lcm(STAGING_ALIGNMENT, 2 * numel_alignment(2, intra_op_parallelism))


def streamed_sub_group(numel, block_size):
    """Is a sub-group of `numel` elements stepped by bounded staging in slices
    (memascend.optimizer_staging=bounded)? Every one whose optimizer state DeepSpeed swaps
    (stage3.py DeepSpeedZeroOptimizer_Stage3._swappable_optimizer_subgroup: `swappable` in fp32),
    of one parameter or many, larger than the bound or not: memlab.engine.memascend.bounded_staging
    replaces DeepSpeed's whole-sub-group step (_optimizer_step and the swaps around it) for these."""
    return swappable(numel, FP32, block_size)


def staging_step(bound, intra_op_parallelism=1):
    """Elements of one staging slice of a streamed sub-group: the bound less one alignment, which
    is what a parameter's write may add before and after its elements in the slice."""
    return bound - staging_alignment(intra_op_parallelism)


def staging_slices(numel, bound, intra_op_parallelism=1):
    """The slices [(first, end)] of a streamed sub-group of `numel` elements (its flat fp32
    master, Adam states and gradient): consecutive, staging_step elements each but the last."""
    step = staging_step(bound, intra_op_parallelism)
    return [(first, min(first + step, numel)) for first in range(0, numel, step)]


def slice_cuts(offset, numel, bound, intra_op_parallelism=1):
    """The places, in the sub-group, where a slice starts inside the element range [offset,
    offset + numel) of one of its parameters (a range: slices start at multiples of staging_step)."""
    step = staging_step(bound, intra_op_parallelism)
    return range((offset // step + 1) * step, offset + numel, step)


def gradient_pieces(offset, numel, bound, intra_op_parallelism=1):
    """A gradient of `numel` elements at `offset` in a streamed sub-group, cut where slices
    begin: [(offset, numel)] pieces, each inside one slice."""
    edges = [offset, *slice_cuts(offset, numel, bound, intra_op_parallelism), offset + numel]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


def parameter_writes(numels, bound, param_bytes, intra_op_parallelism=1):
    """Per slice of a streamed sub-group of parameters (`numels`, in order), what is written of
    each parameter's swap file: [[(param index, first, end, file_first, file_end)]], in the
    parameter's own elements: one write per gradient piece. The file is written in whole aligned
    blocks (O_DIRECT), so a write starts at `first` rounded down and ends at `end` rounded up to
    the parameter's element alignment; the block a slice's edge cuts is written again, whole, by
    the next slice."""
    align = numel_alignment(param_bytes, intra_op_parallelism)
    step = staging_step(bound, intra_op_parallelism)
    writes = [[] for _ in range(-(-sum(numels) // step))]
    offset = 0
    for index, numel in enumerate(numels):
        for start, length in gradient_pieces(offset, numel, bound, intra_op_parallelism):
            a, b = start - offset, start - offset + length
            writes[start // step].append((index, a, b, a - a % align, -(-b // align) * align))
        offset += numel
    return writes


def streamed_gradient_numel(offset, numel, bound, block_size, intra_op_parallelism=1):
    """sum(swapped_gradient_numel(piece)) over gradient_pieces(offset, numel, ...), without
    listing the pieces: every piece but the first and the last is one whole slice."""
    cuts = slice_cuts(offset, numel, bound, intra_op_parallelism)
    count = lambda n: swapped_gradient_numel(n, block_size, intra_op_parallelism)  # noqa: E731
    if not cuts:
        return count(numel)
    return count(cuts[0] - offset) + (len(cuts) - 1) * count(cuts.step) + count(offset + numel - cuts[-1])


def kept_gradient_numel(group, block_size, intra_op_parallelism=1, bound=None):
    """Elements of a swapped sub-group's fp32 gradients (`group`: its parameters' partition numels, in
    order) that the optimizer swapper keeps in RAM until the step instead of writing them: each
    gradient's remainder past its whole aligned blocks, and gradients below the swap floor
    (swapped_gradient_numel). `bound`: the staging bound when bounded staging cuts the gradients
    where its slices start (streamed_gradient_numel), else None (one piece per parameter)."""
    swapped, offset = 0, 0
    for numel in group:
        if bound is None:
            swapped += swapped_gradient_numel(numel, block_size, intra_op_parallelism)
        else:
            swapped += streamed_gradient_numel(offset, numel, bound, block_size, intra_op_parallelism)
        offset += numel
    return sum(group) - swapped


def streamed_parameter_numel(offset, numel, bound, param_bytes, intra_op_parallelism=1):
    """sum(file_end - file_first) of one parameter's parameter_writes, without listing them: its
    aligned length, and one more block for each cut that falls inside a block (every cut of a
    parameter falls at the same place in its block: slices start at multiples of the alignment)."""
    align = numel_alignment(param_bytes, intra_op_parallelism)
    cuts = slice_cuts(offset, numel, bound, intra_op_parallelism)
    return aligned_numel(numel, param_bytes, intra_op_parallelism) + (len(cuts) * align if offset % align else 0)


def staging_plan(numels, sub_group_size, staging_elements="auto", intra_op_parallelism=1, block_size=MIN_AIO_BYTES):
    """Bounded optimizer staging (memascend.optimizer_staging=bounded), memlab's
    rule on DeepSpeed's sub-groups (sub_groups above), applied by
    memlab.engine.memascend.bounded_staging.

    Returns {"bound": B, "streamed": [sub-group indices], "largest_kept_group": numels}.
    auto B: the largest swapped sub-group, at most DEFAULT_STAGING_ELEMENTS; a bound is rounded up
    to the staging alignment and is at least two of it. Every sub-group whose optimizer state is
    swapped is streamed through B-element buffers in slices (streamed_sub_group), so the optimizer
    pool's buffers are B elements however large sub_group_size or the largest tensor is, and no
    sub-group's parameters go through the partitioned swap buffer; the largest sub-group kept (its
    optimizer state too small to swap, stepped in RAM by DeepSpeed) sizes that buffer."""
    return staging_plan_of_groups(sub_groups(numels, sub_group_size), staging_elements, intra_op_parallelism,
                                  block_size)


def staging_plan_of_groups(groups, staging_elements="auto", intra_op_parallelism=1, block_size=MIN_AIO_BYTES):
    """staging_plan on sub-groups already made (lists of numels): what the engine
    patch derives from the sub-groups DeepSpeed built."""
    sizes = [sum(g) for g in groups]
    streamed = [i for i, s in enumerate(sizes) if streamed_sub_group(s, block_size)]
    largest = max([sizes[i] for i in streamed] or sizes)
    bound = min(largest, DEFAULT_STAGING_ELEMENTS) if staging_elements == "auto" else int(staging_elements)
    alignment = staging_alignment(intra_op_parallelism)
    bound = max(2 * alignment, -(-bound // alignment) * alignment)
    kept = [i for i in range(len(groups)) if i not in streamed]
    keep = max(kept, key=lambda i: sizes[i]) if kept else None
    return {"bound": bound, "streamed": streamed,
            "largest_kept_group": groups[keep] if keep is not None else []}


# ----------------------------------------------------------------------------- gradient checks

# deepspeed/runtime/zero/stage3.py DeepSpeedZeroOptimizer_Stage3._constant_buffered_norm2(buffer_size=250000000):
# each gradient's norm goes through an fp64 copy of up to this many elements
NORM_BUFFER_ELEMENTS = 250_000_000
# memascend.grad_checks=fused (memlab.engine.memascend.fused_checks): the overflow check and the norm read the
# gradient in slices of this many elements (1 MiB of bool, 8 MiB of fp64 at most)
FUSED_CHUNK_ELEMENTS = 1 << 20

# ----------------------------------------------------------------------------- pinned and locked memory

PAGE_BYTES = 4096  # x86-64 / aarch64 default page: what sizing assumes of a machine it sizes


def reads_in_place(address, page_bytes=PAGE_BYTES):
    """Can an O_DIRECT read land at this address? DeepSpeed's swap_into_buffer
    reads straight into a locked, size-aligned destination without asking; a
    partition starting at an unaligned offset of a flat buffer comes back as
    zeros. memlab's patches read such a destination through a swap buffer."""
    return address % page_bytes == 0


def page_round(nbytes, page_bytes=PAGE_BYTES):
    """Bytes a locked buffer takes: deepspeed/ops/csrc/pin_memory/page_alloc.cpp
    ds_page_aligned_alloc (posix_memalign(sysconf(_SC_PAGESIZE)) + mlock), which
    both the aio handle's new_cpu_locked_tensor and the native pinning backend
    (deepspeed/utils/pin_memory.py) allocate through: the request rounded up to the page."""
    return -(-int(nbytes) // page_bytes) * page_bytes


def pow2_round(nbytes):
    """Bytes a torch-pinned buffer takes on CUDA: PyTorch's CachingHostAllocator
    (aten/src/ATen/core/CachingHostAllocator.h; DeepSpeed's default
    accelerator.pin_memory goes through it) hands out the next power of two."""
    return 1 << max(int(nbytes) - 1, 0).bit_length()


# ----------------------------------------------------------------------------- the accelerator

NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"


CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def cpu_fp16_supported(cpuinfo="/proc/cpuinfo"):
    """Would DeepSpeed's CPU accelerator train in fp16 here? Its is_fp16_supported is
    torch.ops.mkldnn._is_mkldnn_fp16_supported(): oneDNN's fp16 kernels, which need a
    CPU with AVX512-FP16 or AMX-FP16. Read from the CPU's flags, without importing torch."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_FP16_FLAGS)
    except OSError:
        pass
    return False


def cuda_present():
    """Would DeepSpeed pick its CUDA accelerator here? deepspeed/accelerator/
    real_accelerator.py get_accelerator chooses "cuda" where torch.cuda has a
    device; that needs the NVIDIA driver, checked without importing torch:
    the driver exposes NVIDIA_DRIVER_FILE."""
    return os.path.exists(NVIDIA_DRIVER_FILE)
