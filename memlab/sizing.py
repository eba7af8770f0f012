"""DeepSpeed 0.19's sizing rules, from tensor shapes alone (no torch, no deepspeed).

These are the rules the engine applies when it sizes its host buffers and
decides what to swap; the what-if estimator is built on them and tests
check measured runs against them. Each function names the DeepSpeed code it
mirrors.
"""
AIO_ALIGNED_BYTES = 1024  # swap_tensor/constants.py
MIN_AIO_BYTES = 1024 * 1024  # swap_tensor/constants.py


def aligned_numel(numel, element_size, intra_op_parallelism=1):
    """`_io_aligned_numel`: elements rounded up to 1024 x intra_op_parallelism bytes."""
    alignment = AIO_ALIGNED_BYTES * intra_op_parallelism // element_size
    return -(-int(numel) // alignment) * alignment


def min_swap_bytes(block_size):
    """`min_aio_bytes`: tensors smaller than this stay in RAM."""
    return max(MIN_AIO_BYTES, block_size)


def swappable(numel, element_size, block_size):
    """`swappable_tensor`: a partition goes through NVMe only if it is at least min_aio_bytes."""
    return numel * element_size >= min_swap_bytes(block_size)


def sub_groups(numels, sub_group_size):
    """`DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups`: parameters in
    order, a sub-group closes once it reaches sub_group_size elements (so one
    parameter larger than it is a sub-group of its own). Returns lists of numels."""
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
    """The sub-group with most elements (first on ties), as in stage3.py."""
    best = []
    for group in sub_groups(numels, sub_group_size):
        if sum(group) > sum(best):
            best = group
    return best


MIN_STAGING_ELEMENTS = 1 << 22  # below this, streaming a slice costs more in I/O calls than it saves
STAGING_ALIGNMENT = 1024  # elements: 4 KiB in fp32, 2 KiB in bf16, O_DIRECT-safe for either


def staging_plan(numels, sub_group_size, staging_elements="auto"):
    """Bounded optimizer staging (memascend.optimizer_staging=bounded).

    Returns {"bound": B, "streamed": [sub-group indices], "largest_kept_group": numels}.
    auto B: the largest sub-group of more than one parameter (those cannot be
    streamed), else the largest sub-group smaller than the largest; never below
    MIN_STAGING_ELEMENTS unless the largest sub-group is smaller. A sub-group
    that is one parameter of more than B elements is streamed through B-element
    slices; the others keep DeepSpeed's whole-sub-group path."""
    groups = sub_groups(numels, sub_group_size)
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
    streamed = [i for i, (g, s) in enumerate(zip(groups, sizes)) if len(g) == 1 and s > bound]
    kept = [i for i in range(len(groups)) if i not in streamed]
    keep = max(kept, key=lambda i: sizes[i]) if kept else None
    return {"bound": bound, "streamed": streamed,
            "largest_kept_group": groups[keep] if keep is not None else [min(bound, largest)],
            "largest_multi_group": max([s for g, s in zip(groups, sizes) if len(g) > 1], default=0)}


def nvme_footprint(numels, param_bytes, block_size, sub_group_size, intra_op_parallelism=1, params_on_nvme=True,
                   optimizer_on_nvme=True):
    """Bytes the swap files hold: swappable parameter partitions in the model
    dtype, and per swappable sub-group its fp32 master, two Adam states and
    gradient (DeepSpeed writes each aligned to 1024 x intra_op_parallelism bytes)."""
    total = 0
    if params_on_nvme:
        total += sum(aligned_numel(n, param_bytes, intra_op_parallelism) * param_bytes
                     for n in numels if swappable(n, param_bytes, block_size))
    if optimizer_on_nvme:
        for group in sub_groups(numels, sub_group_size):
            size = sum(group)
            if swappable(size, 4, block_size):
                total += 4 * aligned_numel(size, 4, intra_op_parallelism) * 4
    return total
