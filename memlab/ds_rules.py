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

MIN_STAGING_ELEMENTS = 1 << 22  # below this, streaming a slice costs more in I/O calls than it saves
STAGING_ALIGNMENT = 1024  # elements: 4 KiB in fp32, 2 KiB in bf16, O_DIRECT-safe for either


def streamed_sub_group(parameters, numel, bound):
    """Is a sub-group of `parameters` parameters and `numel` elements streamed
    through `bound`-element staging slices (memascend.optimizer_staging=bounded)?
    Only one of a single parameter above the bound: DeepSpeed's stage3.py
    steps a sub-group whole (DeepSpeedZeroOptimizer_Stage3._optimizer_step), and
    memlab.engine.memascend.bounded_staging replaces that for these alone."""
    return parameters == 1 and numel > bound


def staging_plan(numels, sub_group_size, staging_elements="auto"):
    """Bounded optimizer staging (memascend.optimizer_staging=bounded), memlab's
    rule on DeepSpeed's sub-groups (sub_groups above), applied by
    memlab.engine.memascend.bounded_staging.

    Returns {"bound": B, "streamed": [sub-group indices], "largest_kept_group": numels,
    "largest_multi_group": elements}.
    auto B: the largest sub-group of more than one parameter (those cannot be
    streamed), else the largest sub-group smaller than the largest; never below
    MIN_STAGING_ELEMENTS unless the largest sub-group is smaller. A sub-group
    that is one parameter of more than B elements is streamed through B-element
    slices (streamed_sub_group); the others keep DeepSpeed's whole-sub-group path."""
    return staging_plan_of_groups(sub_groups(numels, sub_group_size), staging_elements)


def staging_plan_of_groups(groups, staging_elements="auto"):
    """staging_plan on sub-groups already made (lists of numels): what the engine
    patch derives from the sub-groups DeepSpeed built."""
    sizes = [sum(g) for g in groups]
    largest = max(sizes)
    if staging_elements == "auto":
        multi = [s for g, s in zip(groups, sizes) if len(g) > 1]
        smaller = [s for s in sizes if s < largest]
        bound = max(multi) if multi else (max(smaller) if smaller else largest)
        bound = min(largest, max(bound, MIN_STAGING_ELEMENTS))
    else:
        bound = int(staging_elements)
    bound = -(-bound // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
    streamed = [i for i, (g, s) in enumerate(zip(groups, sizes)) if streamed_sub_group(len(g), s, bound)]
    kept = [i for i in range(len(groups)) if i not in streamed]
    keep = max(kept, key=lambda i: sizes[i]) if kept else None
    return {"bound": bound, "streamed": streamed,
            "largest_kept_group": groups[keep] if keep is not None else [min(bound, largest)],
            "largest_multi_group": max([s for g, s in zip(groups, sizes) if len(g) > 1], default=0)}


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
