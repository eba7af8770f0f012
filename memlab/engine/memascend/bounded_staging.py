"""Bounded optimizer staging (beyond MemAscend): stream a large sub-group
through staging buffers of bounded size.

Stock DeepSpeed 0.19 sizes every optimizer swap buffer to the largest
sub-group (`PartitionedOptimizerSwapper(largest_numel=max(sub-group numel))`)
and the partitioned parameter swap buffer to the largest sub-group too. One
parameter larger than `sub_group_size` (the embedding, typically) is a
sub-group of its own, so both are sized by it: 4 x 519 MiB + 519 MiB for a
Qwen2.5-0.5B embedding. At its first step CPU Adam also creates exp_avg and
exp_avg_sq for the whole sub-group as pageable tensors (8 bytes per element).

Here the staging bound B is the largest multi-parameter sub-group
(`memascend.staging_elements`, auto), found by memlab's rule
(ds_rules.staging_plan) on the sub-groups this engine's stage 3 makes, so it
needs no plan from outside the process. A sub-group that is one parameter
larger than B is *streamed*: for each B-element slice, the fp32 master,
exp_avg, exp_avg_sq and gradient slices are read at their file offsets into
B-sized pool buffers, the same CPU Adam kernel updates them, and they are
written back, together with the updated parameter slice. Adam is element-
wise and slices start at multiples of the kernel's vector width, so the
result is bit-identical to the whole-tensor step. First-step state starts as
zeros in the staging buffers: no full-size pageable copy.

What a streamed sub-group needs from the files is read with DeepSpeed's aio
handle at file offsets (`async_pread/async_pwrite(buffer, path, offset)`).
Not supported together with pipelined optimizer swapping (refused by
validation); checkpoints of streamed sub-groups are not written by this
module.
"""
import os

import torch

from ...ds_rules import staging_plan_of_groups, streamed_sub_group
from .. import patching
from ..patching import original as _require
from . import direct_storage

STATE_NAMES = ("exp_avg", "exp_avg_sq")
# Stage-3 steps that move a whole sub-group through the pool; a streamed
# sub-group does their work slice by slice in _optimizer_step instead. At init
# (initialize_optimizer_states) they would only rewrite the parameter files
# with the master weights they were made from.
SKIPPED_WHEN_STREAMED = ("_prepare_sub_group", "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group",
                         "_partitioned_params_swap_out")


class StreamIO:
    """Offset reads and writes through an aio handle, counted by the probes."""

    def __init__(self, handle, probes):
        self.handle = handle
        self.probes = probes
        self.pending = 0

    def read(self, buffer, path, offset_bytes):
        self.probes.record_io("in", [buffer], [path])
        direct_storage.submit_read(self.handle, buffer, path, offset_bytes)
        self.pending += 1

    def write(self, buffer, path, offset_bytes):
        self.probes.record_io("out", [buffer], [path])
        direct_storage.submit_write(self.handle, buffer, path, offset_bytes)
        self.pending += 1

    def wait(self):
        if self.pending:
            assert self.handle.wait() == self.pending
            self.pending = 0


def slices(numel, bound):
    for start in range(0, numel, bound):
        yield start, min(bound, numel - start)


def install(knobs, context):
    from deepspeed.runtime.swap_tensor import optimizer_utils
    from deepspeed.runtime.swap_tensor import partitioned_optimizer_swapper as pos
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper as pps
    from deepspeed.runtime.zero import stage3

    staging_elements = knobs["memascend.staging_elements"]  # a bound, or "auto" where nothing resolved it
    probes = context["probes"]
    # Every patch below acts only where DeepSpeed swaps (optimizer or parameters on NVMe), so
    # installing them for a run that swaps nothing changes nothing.

    swapper_cls = pos.PartitionedOptimizerSwapper
    base_cls = optimizer_utils.OptimizerSwapper
    zero_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    param_swapper_cls = pps.AsyncPartitionedParameterSwapper
    original = {
        "partitions": _require(zero_cls, "_create_fp16_partitions_with_defragmentation"),
        "init": _require(swapper_cls, "__init__"),
        "swap_out_gradients": _require(base_cls, "_swap_out_gradients"),
        "initialize_parameters": _require(base_cls, "_initialize_parameters"),
        "reserve": _require(param_swapper_cls, "reserve_partitioned_swap_space"),
    }
    for name in ("unscale_and_clip_grads", "_optimizer_step", "_optimizer_states_and_gradient_swap_in",
                 "_optimizer_states_and_gradient_swap_out", "reset_swap_buffers", "get_full_hp_param",
                 "set_full_hp_param") + SKIPPED_WHEN_STREAMED:
        original[name] = _require(zero_cls, name)

    # -- the plan, from the sub-groups this engine makes (stage3 builds its partitions, reserves the
    # parameter swap buffer and then makes the optimizer swapper, in that order, in one __init__)
    plan = {}

    def _create_fp16_partitions_with_defragmentation(self, fp16_param_groups):
        groups = [[p.partition_numel() for p in sub_group] for param_group in fp16_param_groups
                  for sub_group in self._create_fp16_sub_groups(param_group["params"])]
        plan.update(staging_plan_of_groups(groups, staging_elements) if groups else {})
        return original["partitions"](self, fp16_param_groups)

    # -- pool and partition buffer: sized by B, not by the largest sub-group ----
    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, *args, **kwargs):
        bound = plan.get("bound", largest_numel)
        original["init"](self, swap_config, aio_config, base_folder, optimizer, min(largest_numel, bound),
                         *args, **kwargs)
        self.memlab_bound = self._io_aligned_numel(bound)

    def reserve_partitioned_swap_space(self, partition_num_elems):
        if plan and streamed_sub_group(len(partition_num_elems), sum(partition_num_elems), plan["bound"]):
            partition_num_elems = plan["largest_kept_group"]  # the streamed sub-group writes its params slice by slice
        return original["reserve"](self, partition_num_elems)

    # -- gradients: large ones are written in B-element pieces ---------------------
    def _swap_out_gradients(self, parameter, gradient_offsets, gradient_tensors, gradient_swapper):
        offsets, tensors = [], []
        for offset, tensor in zip(gradient_offsets, gradient_tensors):
            if tensor.numel() > self.largest_numel and self.is_swappable_tensor(tensor=tensor):
                for start, length in slices(tensor.numel(), self.largest_numel):
                    offsets.append(offset + start)
                    tensors.append(tensor.narrow(0, start, length))
            else:
                offsets.append(offset)
                tensors.append(tensor)
        return original["swap_out_gradients"](self, parameter, offsets, tensors, gradient_swapper)

    # -- init: a streamed sub-group's fp32 master is written slice by slice --------
    def _initialize_parameters(self, parameters, src_tensors, aio_handle):
        small = [(p, s) for p, s in zip(parameters, src_tensors) if s.numel() <= self.largest_numel]
        if small:
            original["initialize_parameters"](self, [p for p, _ in small], [s for _, s in small], aio_handle)
        for parameter, src in zip(parameters, src_tensors):
            if src.numel() <= self.largest_numel:
                continue
            (path,) = self._get_swap_paths(parameters=[parameter], num_elems=[src.numel()])
            direct_storage.reserve(path, self._io_aligned_numel(src.numel()) * src.element_size())
            io = StreamIO(aio_handle, probes)
            (buffer,) = self.swap_buffer_manager.allocate(num_elems=self.largest_numel, count=1, dtype=self.dtype)
            for start, length in slices(src.numel(), self.largest_numel):
                buffer.narrow(0, 0, length).copy_(src.narrow(0, start, length))
                io.write(buffer.narrow(0, 0, self._io_aligned_numel(length)), path, start * src.element_size())
                io.wait()
            self.swap_buffer_manager.free([buffer])

    # -- the step: streamed sub-groups bypass the whole-sub-group path ---------------
    def streamed(self, sub_group_id):
        if not self._swappable_optimizer_subgroup(sub_group_id):
            return False
        return streamed_sub_group(len(self.fp16_groups[sub_group_id]),
                                  self.fp16_partitioned_groups_flat_numel[sub_group_id],
                                  self.optimizer_swapper.largest_numel)

    def unscale_and_clip_grads(self, sub_group_id, total_norm):
        if not streamed(self, sub_group_id):
            return original["unscale_and_clip_grads"](self, sub_group_id, total_norm)
        self.memlab_total_norm = total_norm  # applied slice by slice in _optimizer_step

    def _optimizer_step(self, sub_group_id):
        if not streamed(self, sub_group_id):
            return original["_optimizer_step"](self, sub_group_id)
        stream_sub_group(self, sub_group_id, probes)

    # initialize_optimizer_states swaps each sub-group in, hangs a gradient on it,
    # and swaps it out. For a streamed one, an untouched (virtual) tensor of the
    # right size stands in for the master weights: no bytes are read or resident.
    def _optimizer_states_and_gradient_swap_in(self, sub_group_id, timer_names=None):
        if not streamed(self, sub_group_id):
            return original["_optimizer_states_and_gradient_swap_in"](self, sub_group_id, timer_names)
        numel = self.fp16_partitioned_groups_flat_numel[sub_group_id]
        self.fp32_partitioned_groups_flat[sub_group_id].data = torch.empty(
            numel, dtype=self.fp32_partitioned_groups_flat[sub_group_id].dtype)

    def _optimizer_states_and_gradient_swap_out(self, sub_group_id, timer_names=None):
        if not streamed(self, sub_group_id):
            return original["_optimizer_states_and_gradient_swap_out"](self, sub_group_id, timer_names)
        fp32_param = self.fp32_partitioned_groups_flat[sub_group_id]
        fp32_param.grad = None
        fp32_param.data = torch.empty(0, dtype=fp32_param.dtype)

    # load_checkpoint rebuilds every sub-group's parameters from its (loaded) fp32 master in
    # reset_swap_buffers; the whole-sub-group path skips a streamed one, which is rebuilt slice by slice
    def reset_swap_buffers(self):
        original["reset_swap_buffers"](self)
        for sub_group_id in range(len(self.fp16_groups)):
            if streamed(self, sub_group_id):
                params_from_master(self, sub_group_id, probes)

    # deepspeed.utils.safe_get/set_full_fp32_param and *_optimizer_state: a streamed sub-group's
    # master and Adam state are on NVMe only (its in-RAM tensor is a placeholder), read and written
    # here slice by slice into a full-size tensor, which is what the call returns or is given
    def get_full_hp_param(self, param, optim_state_key=None):
        group = self.grad_position[self.get_param_id(param)][0] if param.requires_grad else None
        if group is None or not streamed(self, group):
            return original["get_full_hp_param"](self, param, optim_state_key)
        partition = torch.empty(self.fp16_partitioned_groups_flat_numel[group], dtype=torch.float32)
        stream_state(self, group, optim_state_key, partition, probes, write=False)
        return self._fp32_state_allgather(param, partition)

    def set_full_hp_param(self, value, param, optim_state_key=None):
        group = self.grad_position[self.get_param_id(param)][0] if param.requires_grad else None
        if group is None or not streamed(self, group):
            return original["set_full_hp_param"](self, value, param, optim_state_key)
        numel = self.fp16_partitioned_groups_flat_numel[group]
        partition = value.flatten().narrow(0, numel * self._get_param_partition_rank(param), numel)
        stream_state(self, group, optim_state_key, partition.float(), probes, write=True)

    def skip_when_streamed(name):
        def method(self, sub_group_id, *args, **kwargs):
            if not streamed(self, sub_group_id):
                return original[name](self, sub_group_id, *args, **kwargs)

        method.__name__ = name
        return method

    patching.replace(zero_cls, "_create_fp16_partitions_with_defragmentation",
                     _create_fp16_partitions_with_defragmentation)
    patching.replace(swapper_cls, "__init__", __init__)
    patching.replace(param_swapper_cls, "reserve_partitioned_swap_space", reserve_partitioned_swap_space)
    patching.replace(base_cls, "_swap_out_gradients", _swap_out_gradients)
    patching.replace(base_cls, "_initialize_parameters", _initialize_parameters)
    for function in (unscale_and_clip_grads, _optimizer_step, _optimizer_states_and_gradient_swap_in,
                     _optimizer_states_and_gradient_swap_out, reset_swap_buffers, get_full_hp_param,
                     set_full_hp_param):
        patching.replace(zero_cls, function.__name__, function)
    for name in SKIPPED_WHEN_STREAMED:
        patching.replace(zero_cls, name, skip_when_streamed(name))


def stream_sub_group(zero, sub_group_id, probes):
    """One Adam step of a one-parameter sub-group, B elements at a time."""
    swapper = zero.optimizer_swapper
    swapper._flush_gradient_swapper(swapper.gradient_swapper)  # gradient pieces are on disk
    fp32_param = zero.fp32_partitioned_groups_flat[sub_group_id]
    swap_info = swapper._get_param_swap_info(fp32_param)
    numel = swap_info.numel()
    (param,) = zero.fp16_groups[sub_group_id]
    # parameters on NVMe are updated in their swap file; on the CPU or the device (offload_param
    # cpu | none) there is no parameter swapper and the partition is in RAM
    on_nvme = getattr(param, "nvme_swapper", None) is not None
    param_path = param.nvme_swapper.get_path(param, must_exist=True) if on_nvme else None
    master_path = swap_info.get_swap_paths()[0]
    state_paths = [os.path.join(swapper.swap_folder, f"{swap_info.param_id}.{name}.memlab.swp") for name in STATE_NAMES]

    group = zero.optimizer.param_groups[zero.sub_group_to_group_id[sub_group_id]]
    steps = zero.__dict__.setdefault("memlab_steps", {})
    steps[sub_group_id] = steps.get(sub_group_id, 0) + 1
    first_step = steps[sub_group_id] == 1  # no state on disk yet: it starts as zeros
    if first_step:
        for path in state_paths:
            direct_storage.reserve(path, swapper._io_aligned_numel(numel) * swapper.swap_element_size)
    beta1, beta2 = group["betas"]
    combined_scale = zero.loss_scale
    if zero.clip_grad > 0.:  # as in unscale_and_clip_grads
        clip = ((zero.memlab_total_norm / zero.loss_scale) + 1e-6) / zero.clip_grad
        combined_scale = torch.clamp(clip, min=1.0) * zero.loss_scale

    bound = swapper.largest_numel
    buffers = swapper.swap_buffer_manager.allocate(num_elems=bound, count=4, dtype=swapper.dtype)
    assert buffers is not None, "memascend staging: optimizer pool has fewer than 4 free buffers"
    master, exp_avg, exp_avg_sq, grad = buffers
    io = StreamIO(swapper.aio_handle, probes)
    element = master.element_size()
    # while swapped out, ds_tensor is a placeholder: the swapper knows the element size
    param_element = param.nvme_swapper.swap_element_size if on_nvme else param.ds_tensor.element_size()
    try:
        for start, length in slices(numel, bound):
            aligned = swapper._io_aligned_numel(length)
            io.read(master.narrow(0, 0, aligned), master_path, start * element)
            if first_step:
                exp_avg.narrow(0, 0, length).zero_()
                exp_avg_sq.narrow(0, 0, length).zero_()
            else:
                io.read(exp_avg.narrow(0, 0, aligned), state_paths[0], start * element)
                io.read(exp_avg_sq.narrow(0, 0, aligned), state_paths[1], start * element)
            read_gradient_slice(swap_info, grad, start, length, io)
            io.wait()

            chunk = [b.narrow(0, 0, length) for b in (master, grad, exp_avg, exp_avg_sq)]
            chunk[1].mul_(1. / combined_scale)
            zero.optimizer.ds_opt_adam.adam_update(zero.optimizer.opt_id, steps[sub_group_id], group["lr"], beta1,
                                                   beta2, group["eps"], group["weight_decay"],
                                                   group["bias_correction"], *chunk)

            io.write(master.narrow(0, 0, aligned), master_path, start * element)
            io.write(exp_avg.narrow(0, 0, aligned), state_paths[0], start * element)
            io.write(exp_avg_sq.narrow(0, 0, aligned), state_paths[1], start * element)
            write_param_slice(zero, param, param_path, master, grad, start, length, aligned, io, param_element)
            io.wait()
    finally:
        swapper.swap_buffer_manager.free(buffers)
    swap_info.release_unswapped_gradients()


def stream_state(zero, sub_group_id, key, tensor, probes, write):
    """A streamed sub-group's fp32 master (`key` None) or Adam state `key` from NVMe into
    `tensor`, or from `tensor` to NVMe, B elements at a time through one pool buffer.
    Adam state that no step has made yet is a KeyError, as in stock (CPU Adam makes it lazily)."""
    swapper = zero.optimizer_swapper
    swap_info = swapper._get_param_swap_info(zero.fp32_partitioned_groups_flat[sub_group_id])
    if key is None:
        path = swap_info.get_swap_paths()[0]
    elif key in STATE_NAMES and zero.__dict__.get("memlab_steps", {}).get(sub_group_id):
        path = os.path.join(swapper.swap_folder, f"{swap_info.param_id}.{key}.memlab.swp")
    else:
        raise KeyError(key)
    (buffer,) = swapper.swap_buffer_manager.allocate(num_elems=swapper.largest_numel, count=1, dtype=swapper.dtype)
    assert buffer is not None, "memascend staging: no free optimizer pool buffer"
    io = StreamIO(swapper.aio_handle, probes)
    try:
        for start, length in slices(tensor.numel(), swapper.largest_numel):
            aligned = swapper._io_aligned_numel(length)
            if write:
                buffer.narrow(0, 0, length).copy_(tensor.narrow(0, start, length))
                io.write(buffer.narrow(0, 0, aligned), path, start * buffer.element_size())
            else:
                io.read(buffer.narrow(0, 0, aligned), path, start * buffer.element_size())
            io.wait()
            if not write:
                tensor.narrow(0, start, length).copy_(buffer.narrow(0, 0, length))
    finally:
        swapper.swap_buffer_manager.free([buffer])


def params_from_master(zero, sub_group_id, probes):
    """A streamed sub-group's parameter rewritten from its fp32 master, B elements at a time
    (what stock's _reassign_or_swap_out_partitioned_parameters does whole)."""
    swapper = zero.optimizer_swapper
    fp32_param = zero.fp32_partitioned_groups_flat[sub_group_id]
    swap_info = swapper._get_param_swap_info(fp32_param)
    (param,) = zero.fp16_groups[sub_group_id]
    on_nvme = getattr(param, "nvme_swapper", None) is not None
    param_path = param.nvme_swapper.get_path(param, must_exist=True) if on_nvme else None
    master_path = swap_info.get_swap_paths()[0]
    param_element = param.nvme_swapper.swap_element_size if on_nvme else param.ds_tensor.element_size()
    buffers = swapper.swap_buffer_manager.allocate(num_elems=swapper.largest_numel, count=2, dtype=swapper.dtype)
    assert buffers is not None, "memascend staging: optimizer pool has fewer than 2 free buffers"
    master, scratch = buffers
    io = StreamIO(swapper.aio_handle, probes)
    element = master.element_size()
    try:
        for start, length in slices(swap_info.numel(), swapper.largest_numel):
            aligned = swapper._io_aligned_numel(length)
            io.read(master.narrow(0, 0, aligned), master_path, start * element)
            io.wait()
            write_param_slice(zero, param, param_path, master, scratch, start, length, aligned, io, param_element)
            io.wait()
    finally:
        swapper.swap_buffer_manager.free(buffers)


def read_gradient_slice(swap_info, dest, start, length, io):
    """Gradient elements [start, start+length) into dest: swapped pieces (cut
    at the same B boundaries, so a piece is inside one slice) and fragments
    that stayed in RAM."""
    end = start + length
    for piece in swap_info.swapped_gradients.values():
        if start <= piece.offset < end:
            io.read(dest.narrow(0, piece.offset - start, piece.length), piece.path, 0)
    for offset, fragment in swap_info.unswapped_gradients.items():
        if start <= offset < end:
            dest.narrow(0, offset - start, fragment.numel()).copy_(fragment)


def write_param_slice(zero, param, path, master, scratch, start, length, aligned, io, param_element):
    """The updated parameter slice: into its swap file (or its in-RAM partition)."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

    if path is None or param.ds_tensor.status == PartitionedParamStatus.AVAILABLE:
        param.ds_tensor.data.narrow(0, start, length).copy_(master.narrow(0, 0, length))
        return
    param_dtype = param.nvme_swapper.dtype
    if param_dtype == master.dtype:
        io.write(master.narrow(0, 0, aligned), path, start * param_element)
    else:  # bf16/fp16 parameters: convert into the (already consumed) gradient buffer
        converted = scratch.view(param_dtype)
        aligned_param = param.nvme_swapper._io_aligned_numel(length)
        converted.narrow(0, 0, length).copy_(master.narrow(0, 0, length))
        io.write(converted.narrow(0, 0, aligned_param), path, start * param_element)
