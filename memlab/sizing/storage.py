"""What goes to NVMe: the swap files' footprint, and the bytes read and
written through them per training step."""
from ..ds_rules import FP32, aligned_numel, kept_gradient_numel, streamed_parameter_numel, sub_groups, swappable
from .layout import bounded


def nvme_footprint(numels, param_bytes, block_size, sub_group_size, intra_op_parallelism=1, params_on_nvme=True,
                   optimizer_on_nvme=True, groups=None):
    """Bytes the swap files hold: swappable parameter partitions in the model
    dtype, and per swappable sub-group its fp32 master, two Adam states and
    gradient (DeepSpeed writes each aligned to 1024 x intra_op_parallelism bytes)."""
    total = 0
    if params_on_nvme:
        total += sum(aligned_numel(n, param_bytes, intra_op_parallelism) * param_bytes
                     for n in numels if swappable(n, param_bytes, block_size))
    if optimizer_on_nvme:
        for group in groups if groups is not None else sub_groups(numels, sub_group_size):
            size = sum(group)
            if swappable(size, FP32, block_size):
                total += 4 * aligned_numel(size, FP32, intra_op_parallelism) * FP32
    return total


def nvme_bytes(layout, storage="files"):
    """The swap footprint per rank (nvme_footprint). Hook of memascend.storage: `direct` puts the same
    tensors at fixed offsets in one region (direct_storage), which Lab preallocates to this footprint."""
    v = layout.values
    return nvme_footprint(layout.parts, layout.element, v["aio.block_size"], v["zero_optimization.sub_group_size"],
                          layout.io, layout.params_nvme, layout.opt_nvme, layout.groups)


def _param_fetches(layout):
    """Forward + backward fetches of each parameter swapped in training: {partition index: fetches}."""
    structure, checkpointing = layout.spec.structure, layout.checkpointing
    layers = structure["layers"] + "."
    last_modules = {m for m in structure["last_modules"] if m}
    uses = {}
    for index, (name, swapped) in enumerate(zip(layout.names, layout.swapped_in_training)):
        if not swapped:
            continue
        fetches = 2
        if structure["tied"] and name == structure["input_embedding"]:
            fetches = 4  # the embedding and the lm_head each fetch it, in forward and backward
        elif checkpointing and name.startswith(layers):
            # recomputed in backward; the last module a layer runs is still gathered from the recompute
            # when its backward runs, so it is not fetched a third time
            fetches = 2 if name.rpartition(".")[0] in last_modules else 3  # the parameter's own module
        uses[index] = fetches
    return uses


def swap_per_step(layout, staging="stock", grad_staging="stock"):
    """Bytes through the swap files per training step, by direction and kind, as the probes count them
    (`swap_by_kind`): (steady state, first step). Parameters (partitioned_param_swapper) only while they
    really swap, fetched in every micro-batch (run.grad_accum); per swapped sub-group its three fp32
    states and its gradients (optimizer swappers; gradient remainders and gradients below the swap floor
    stay in RAM). Hook of memascend.optimizer_staging: `bounded` reads and writes every swapped sub-group
    in slices, its gradients in pieces cut where slices begin, and its parameters in whole aligned blocks
    (bounded_staging). Hook of memascend.grad_staging: `bounded` sums micro-batches in the gradient files,
    so each micro-batch writes the swapped gradients and each after the first reads them back first."""
    out = {}
    micro_batches = layout.values.get("run.grad_accum", 1)
    e, io = layout.element, layout.io
    written = {}  # partition index: parameter bytes written at the optimizer step
    uses = {}
    if layout.real_swapping:
        uses = _param_fetches(layout)
        written = {i: aligned_numel(layout.parts[i], e, io) * e for i in uses}
        out["in.param"] = micro_batches * sum(written[i] * uses[i] for i in uses)
    bound = layout.values["memascend.staging_elements"]
    streams = bounded(layout, staging)
    opt_bytes = 0
    starts = [sum(len(g) for g in layout.groups[:i]) for i in range(len(layout.groups))]
    for i in layout.swappable_groups:
        group, size = layout.groups[i], layout.group_sizes[i]
        opt_bytes += aligned_numel(size, FP32, io)  # one tensor per state (in slices: the same, slices are aligned)
        if not streams:
            continue
        offset = 0  # every swapped sub-group is streamed (ds_rules.streamed_sub_group)
        for j, numel in enumerate(group):
            if starts[i] + j in written:  # in whole aligned blocks per slice, not the partition at once
                written[starts[i] + j] = streamed_parameter_numel(offset, numel, bound, e, io) * e
            offset += numel
    swapped_grads = sum(layout.group_sizes[i] for i in layout.swappable_groups)
    grad_bytes = FP32 * (swapped_grads - kept_gradient_elements(layout, staging))
    opt_bytes *= FP32
    if layout.real_swapping:
        out["out.param"] = sum(written.values())
    if opt_bytes:
        out["out.optimizer"] = 3 * opt_bytes
        out["in.optimizer"] = 3 * opt_bytes
    if grad_bytes:
        summed_on_nvme = micro_batches if grad_staging == "bounded" else 1
        out["out.gradient"] = grad_bytes * summed_on_nvme
        out["in.gradient"] = grad_bytes * summed_on_nvme
    first = dict(out)
    if opt_bytes:
        first["in.optimizer"] = opt_bytes  # no Adam state on disk yet: the master weights only
    return out, first


def kept_gradient_elements(layout, staging="stock"):
    """Elements of the swapped sub-groups' gradients the optimizer swapper keeps in RAM until the step
    (ds_rules.kept_gradient_numel: a file per parameter, or per piece where bounded staging cuts
    gradients where its slices start); the rest it writes to NVMe."""
    bound = layout.values["memascend.staging_elements"] if bounded(layout, staging) else None
    block_size = layout.values["aio.block_size"]
    return sum(kept_gradient_numel(layout.groups[i], block_size, layout.io, bound) for i in layout.swappable_groups)
