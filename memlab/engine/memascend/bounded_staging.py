"""Bounded optimizer staging (beyond MemAscend): every sub-group larger than
a bound is stepped in slices through staging buffers of that size.

Stock DeepSpeed 0.19 sizes every optimizer swap buffer to the largest
sub-group (`PartitionedOptimizerSwapper(largest_numel=max(sub-group numel))`)
and the partitioned parameter swap buffer to the largest sub-group too: with
the default `sub_group_size` (1e9) that is the whole model's partition, and a
parameter larger than `sub_group_size` (the embedding, typically) is a
sub-group of its own. At its first step CPU Adam also creates exp_avg and
exp_avg_sq for the whole sub-group as pageable tensors (8 bytes per element).

Here the staging bound B (`memascend.staging_elements`; auto: the largest
sub-group, at most 4M elements) comes from memlab's rule (ds_rules.staging_plan)
on the sub-groups this engine's stage 3 makes, so it needs no plan from outside
the process. Every sub-group whose optimizer state is swapped, of one parameter
or many, is *streamed* (none goes through DeepSpeed's whole-sub-group step): for each slice (ds_rules.staging_slices: B less one alignment,
starting at aligned offsets of the sub-group's flat fp32 master), the master,
exp_avg, exp_avg_sq and gradient slices are read at their file offsets into
B-element pool buffers, the same CPU Adam kernel updates them, and they are
written back, together with the updated slice of each parameter in it
(ds_rules.parameter_writes: whole aligned blocks of each parameter's swap file;
the block a slice's end cuts is carried to the next slice and written again,
whole). Adam is element-wise and slices start at multiples of the kernel's
vector width, so the result is bit-identical to the whole-sub-group step.
First-step state starts as zeros in the staging buffers: no full-size pageable
copy. Gradients of a streamed sub-group are written to NVMe in pieces cut where
slices begin (ds_rules.gradient_pieces), so each is read into one slice.

What a streamed sub-group needs from the files is read with DeepSpeed's aio
handle at file offsets (`async_pread/async_pwrite(buffer, path, offset)`).
Not supported together with pipelined optimizer swapping (refused by
validation).
"""
import os

import torch

from ...ds_rules import (AIO_ALIGNED_BYTES, MIN_AIO_BYTES, STAGING_ALIGNMENT, gradient_pieces, numel_alignment,
                         parameter_writes, staging_plan_of_groups, staging_slices)
from .. import patching
from ..patching import original as _require
from . import direct_storage

STATE_NAMES = ("exp_avg", "exp_avg_sq")
SHIFT_CHUNK_ELEMENTS = 1 << 18  # read_unaligned moves a piece through this much scratch at a time (1 MiB in fp32)
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
        if self.probes is not None:
            self.probes.record_io("in", [buffer], [path])
        direct_storage.submit_read(self.handle, buffer, path, offset_bytes)
        self.pending += 1

    def write(self, buffer, path, offset_bytes):
        if self.probes is not None:
            self.probes.record_io("out", [buffer], [path])
        direct_storage.submit_write(self.handle, buffer, path, offset_bytes)
        self.pending += 1

    def wait(self):
        if self.pending:
            assert self.handle.wait() == self.pending
            self.pending = 0


def io_parallelism(swapper):
    """aio.intra_op_parallelism of an optimizer swapper (its alignment is 1024 bytes x that)."""
    return swapper.aligned_bytes // AIO_ALIGNED_BYTES


def install(knobs, context):
    from deepspeed.runtime.swap_tensor import optimizer_utils
    from deepspeed.runtime.swap_tensor import partitioned_optimizer_swapper as pos
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper as pps
    from deepspeed.runtime.zero import stage3

    staging_elements = knobs["memascend.staging_elements"]  # a bound, or "auto" where nothing resolved it
    probes = context["probes"]
    # Every patch below acts only where DeepSpeed swaps optimizer state to NVMe, so
    # installing them for a run that swaps nothing changes nothing.

    swapper_cls = pos.PartitionedOptimizerSwapper
    base_cls = optimizer_utils.OptimizerSwapper
    zero_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    param_swapper_cls = pps.AsyncPartitionedParameterSwapper
    original = {
        "zero_init": _require(zero_cls, "__init__"),
        "partitions": _require(zero_cls, "_create_fp16_partitions_with_defragmentation"),
        "init": _require(swapper_cls, "__init__"),
        "swap_out_gradients": _require(base_cls, "_swap_out_gradients"),
        "initialize_parameters": _require(base_cls, "_initialize_parameters"),
        "reserve": _require(param_swapper_cls, "reserve_partitioned_swap_space"),
    }
    for name in ("unscale_and_clip_grads", "_optimizer_step", "_optimizer_states_and_gradient_swap_in",
                 "_optimizer_states_and_gradient_swap_out", "_release_swap_buffers", "_writeback_swap_state",
                 "_get_fp32_opt_state_partition",
                 "reset_swap_buffers", "get_full_hp_param",
                 "set_full_hp_param") + SKIPPED_WHEN_STREAMED:
        original[name] = _require(zero_cls, name)

    # -- the plan, from the sub-groups this engine makes (stage3's __init__ builds its partitions,
    # reserves the parameter swap buffer and then makes the optimizer swapper, in that order)
    plan = {}

    def zero_init(self, *args, **kwargs):
        plan.clear()
        aio = kwargs.get("aio_config") or {}
        plan["aio"] = (aio.get("intra_op_parallelism", 1), aio.get("block_size", MIN_AIO_BYTES))
        return original["zero_init"](self, *args, **kwargs)

    zero_init.__name__ = "__init__"

    def _create_fp16_partitions_with_defragmentation(self, fp16_param_groups):
        # staging acts on optimizer state swapped to NVMe, stepped by DeepSpeed's CPU Adam (its kernel
        # steps a slice; another optimizer, a torch one, steps whole sub-groups as stock does)
        if self.swap_optimizer and hasattr(self.optimizer, "ds_opt_adam"):
            groups = [[p.partition_numel() for p in sub_group] for param_group in fp16_param_groups
                      for sub_group in self._create_fp16_sub_groups(param_group["params"])]
            if groups:
                plan.update(staging_plan_of_groups(groups, staging_elements, *plan.get("aio", (1, MIN_AIO_BYTES))))
        self.memlab_streams = bool(plan.get("streamed"))
        return original["partitions"](self, fp16_param_groups)

    # -- pool and partition buffer: sized by B, not by the largest sub-group ----
    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, *args, **kwargs):
        bound = plan.get("bound", largest_numel)
        self.memlab_streams = bool(plan.get("streamed"))
        original["init"](self, swap_config, aio_config, base_folder, optimizer, min(largest_numel, bound),
                         *args, **kwargs)

    def reserve_partitioned_swap_space(self, partition_num_elems):
        if plan.get("streamed"):  # streamed sub-groups write their parameters from the staging buffers
            partition_num_elems = plan["largest_kept_group"]
            if not partition_num_elems:
                return None  # every sub-group is streamed: stock's buffer would never be used
        return original["reserve"](self, partition_num_elems)

    # -- gradients of a streamed sub-group: written in pieces cut where slices begin ----
    def _swap_out_gradients(self, parameter, gradient_offsets, gradient_tensors, gradient_swapper):
        swap_info = self.swap_params_info.get(base_cls.parameter_id(parameter))
        if swap_info is None or not getattr(self, "memlab_streams", False):  # not swapped, or not streamed
            return original["swap_out_gradients"](self, parameter, gradient_offsets, gradient_tensors,
                                                  gradient_swapper)
        offsets, tensors = [], []
        for offset, tensor in zip(gradient_offsets, gradient_tensors):
            for start, length in gradient_pieces(offset, tensor.numel(), self.largest_numel, io_parallelism(self)):
                offsets.append(start)
                tensors.append(tensor.narrow(0, start - offset, length))
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
            for start in range(0, src.numel(), self.largest_numel):
                length = min(self.largest_numel, src.numel() - start)
                buffer.narrow(0, 0, length).copy_(src.narrow(0, start, length))
                io.write(buffer.narrow(0, 0, self._io_aligned_numel(length)), path, start * src.element_size())
                io.wait()
            self.swap_buffer_manager.free([buffer])

    # -- the step: streamed sub-groups bypass the whole-sub-group path ---------------
    def streamed(self, sub_group_id):
        # DeepSpeed's own test of streamed_sub_group: every sub-group whose optimizer state it swaps
        return getattr(self, "memlab_streams", False) and self._swappable_optimizer_subgroup(sub_group_id)

    def unscale_and_clip_grads(self, sub_group_id, total_norm):
        if not streamed(self, sub_group_id):
            return original["unscale_and_clip_grads"](self, sub_group_id, total_norm)
        self.memlab_total_norm = total_norm  # applied slice by slice in _optimizer_step

    def _optimizer_step(self, sub_group_id):
        if not streamed(self, sub_group_id):
            return original["_optimizer_step"](self, sub_group_id)
        StreamedGroup(self, sub_group_id, probes).step()

    # initialize_optimizer_states swaps each sub-group in, hangs a gradient on it,
    # and swaps it out. For a streamed one, an untouched (virtual) tensor of the
    # right size stands in for the master weights: no bytes are read or resident.
    # DeepSpeed's fp32 gradient API (safe_get/set/update_full_grad and their local forms) swaps a
    # sub-group in and reads or writes its whole gradient: for a streamed one the gradient is read
    # from its pieces into a tensor of the sub-group's size (only on that path, never in training)
    # and written back piece by piece.
    def _optimizer_states_and_gradient_swap_in(self, sub_group_id, timer_names=None):
        if not streamed(self, sub_group_id):
            return original["_optimizer_states_and_gradient_swap_in"](self, sub_group_id, timer_names)
        numel = self.fp16_partitioned_groups_flat_numel[sub_group_id]
        fp32_param = self.fp32_partitioned_groups_flat[sub_group_id]
        fp32_param.data = torch.empty(numel, dtype=fp32_param.dtype)
        group = StreamedGroup(self, sub_group_id, probes)
        if group.swap_info.has_gradients():  # after a backward: the API's path
            fp32_param.grad = torch.empty(numel, dtype=fp32_param.dtype)
            group.gradient_range(fp32_param.grad, 0, write=False)

    def _release_swap_buffers(self, sub_group_id):
        if not streamed(self, sub_group_id):
            return original["_release_swap_buffers"](self, sub_group_id)
        _optimizer_states_and_gradient_swap_out(self, sub_group_id)

    def _writeback_swap_state(self, sub_group_id, write_opt_state, write_gradients):
        if not streamed(self, sub_group_id):
            return original["_writeback_swap_state"](self, sub_group_id, write_opt_state, write_gradients)
        fp32_param = self.fp32_partitioned_groups_flat[sub_group_id]
        if write_gradients and fp32_param.grad is not None:
            StreamedGroup(self, sub_group_id, probes).gradient_range(fp32_param.grad, 0, write=True)
        _optimizer_states_and_gradient_swap_out(self, sub_group_id)

    def _get_fp32_opt_state_partition(self, param, release_swap_buffers, optim_state_key=None):
        group, offset, numel = self.grad_position[self.get_param_id(param)]
        if not streamed(self, group):
            return original["_get_fp32_opt_state_partition"](self, param, release_swap_buffers, optim_state_key)
        # the local API: a master or Adam state range read into its own tensor; one a setter is handed
        # (release_swap_buffers False) is written back at the swap-out that follows it
        value = torch.empty(numel, dtype=torch.float32)
        StreamedGroup(self, group, probes).state_range(optim_state_key, value, offset, write=False)
        if not release_swap_buffers:
            self.__dict__.setdefault("memlab_state_writes", {}).setdefault(group, []).append(
                (optim_state_key, value, offset))
        return value, group

    def _optimizer_states_and_gradient_swap_out(self, sub_group_id, timer_names=None):
        if not streamed(self, sub_group_id):
            return original["_optimizer_states_and_gradient_swap_out"](self, sub_group_id, timer_names)
        for key, value, offset in self.__dict__.get("memlab_state_writes", {}).pop(sub_group_id, []):
            StreamedGroup(self, sub_group_id, probes).state_range(key, value, offset, write=True)
        fp32_param = self.fp32_partitioned_groups_flat[sub_group_id]
        fp32_param.grad = None
        fp32_param.data = torch.empty(0, dtype=fp32_param.dtype)

    # load_checkpoint rebuilds every sub-group's parameters from its (loaded) fp32 master in
    # reset_swap_buffers; the whole-sub-group path skips a streamed one, which is rebuilt slice by slice
    def reset_swap_buffers(self):
        original["reset_swap_buffers"](self)
        for sub_group_id in range(len(self.fp16_groups)):
            if streamed(self, sub_group_id):
                StreamedGroup(self, sub_group_id, probes).params_from_master()

    # deepspeed.utils.safe_get/set_full_fp32_param and *_optimizer_state: a streamed sub-group's
    # master and Adam state are on NVMe only (its in-RAM tensor is a placeholder); the parameter's
    # range of them is read or written here through one pool buffer
    def get_full_hp_param(self, param, optim_state_key=None):
        group, offset, numel = self.grad_position[self.get_param_id(param)] if param.requires_grad else (None,) * 3
        if group is None or not streamed(self, group):
            return original["get_full_hp_param"](self, param, optim_state_key)
        partition = torch.empty(numel, dtype=torch.float32)
        StreamedGroup(self, group, probes).state_range(optim_state_key, partition, offset, write=False)
        return self._fp32_state_allgather(param, partition)

    def set_full_hp_param(self, value, param, optim_state_key=None):
        group, offset, numel = self.grad_position[self.get_param_id(param)] if param.requires_grad else (None,) * 3
        if group is None or not streamed(self, group):
            return original["set_full_hp_param"](self, value, param, optim_state_key)
        partition = value.flatten().narrow(0, numel * self._get_param_partition_rank(param), numel)
        StreamedGroup(self, group, probes).state_range(optim_state_key, partition.float(), offset, write=True)

    def skip_when_streamed(name):
        def method(self, sub_group_id, *args, **kwargs):
            if not streamed(self, sub_group_id):
                return original[name](self, sub_group_id, *args, **kwargs)

        method.__name__ = name
        return method

    patching.replace(zero_cls, "__init__", zero_init)
    patching.replace(zero_cls, "_create_fp16_partitions_with_defragmentation",
                     _create_fp16_partitions_with_defragmentation)
    patching.replace(swapper_cls, "__init__", __init__)
    patching.replace(param_swapper_cls, "reserve_partitioned_swap_space", reserve_partitioned_swap_space)
    patching.replace(base_cls, "_swap_out_gradients", _swap_out_gradients)
    patching.replace(base_cls, "_initialize_parameters", _initialize_parameters)
    for function in (unscale_and_clip_grads, _optimizer_step, _optimizer_states_and_gradient_swap_in,
                     _optimizer_states_and_gradient_swap_out, _release_swap_buffers, _writeback_swap_state,
                     _get_fp32_opt_state_partition,
                     reset_swap_buffers, get_full_hp_param,
                     set_full_hp_param):
        patching.replace(zero_cls, function.__name__, function)
    for name in SKIPPED_WHEN_STREAMED:
        patching.replace(zero_cls, name, skip_when_streamed(name))


class StreamedGroup:
    """One streamed sub-group of a stage-3 engine: its swap files, its parameters and
    where each sits in the flat master, and its slices (ds_rules.staging_slices)."""

    def __init__(self, zero, sub_group_id, probes):
        from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

        self.zero, self.sub_group_id = zero, sub_group_id
        self.swapper = swapper = zero.optimizer_swapper
        self.available = PartitionedParamStatus.AVAILABLE
        self.io = StreamIO(swapper.aio_handle, probes)
        self.swap_info = swapper._get_param_swap_info(zero.fp32_partitioned_groups_flat[sub_group_id])
        self.numel = self.swap_info.numel()
        self.bound = swapper.largest_numel
        parallelism = io_parallelism(swapper)
        self.slices = staging_slices(self.numel, self.bound, parallelism)
        self.master_path = self.swap_info.get_swap_paths()[0]
        self.state_paths = [os.path.join(swapper.swap_folder, f"{self.swap_info.param_id}.{name}.memlab.swp")
                            for name in STATE_NAMES]
        self.params = zero.fp16_groups[sub_group_id]
        self.partitions = zero.fp16_partitioned_groups[sub_group_id]
        numels = [part.ds_numel for part in self.partitions]
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        # parameters on NVMe are written to their swap files; on the CPU or the device (offload_param
        # cpu | none) there is no parameter swapper and every partition is in RAM
        swappers = [p.nvme_swapper for p in self.params if getattr(p, "nvme_swapper", None) is not None]
        self.param_swapper = swappers[0] if swappers else None
        param_bytes = self.param_swapper.swap_element_size if swappers else self.partitions[0].element_size()
        self.writes = parameter_writes(numels, self.bound, param_bytes, parallelism)
        self.param_alignment = numel_alignment(param_bytes, parallelism)  # the rule parameter_writes applies
        self.carried = {}  # parameter index: its values in the block the last slice's end cut

    def step(self):
        """One Adam step of the sub-group, one slice at a time."""
        zero, swapper = self.zero, self.swapper
        swapper._flush_gradient_swapper(swapper.gradient_swapper)  # gradient pieces are on disk
        group = zero.optimizer.param_groups[zero.sub_group_to_group_id[self.sub_group_id]]
        steps = zero.__dict__.setdefault("memlab_steps", {})
        steps[self.sub_group_id] = step = steps.get(self.sub_group_id, 0) + 1
        if step == 1:  # no state on disk yet: it starts as zeros
            for path in self.state_paths:
                direct_storage.reserve(path, swapper._io_aligned_numel(self.numel) * swapper.swap_element_size)
        beta1, beta2 = group["betas"]
        combined_scale = zero.loss_scale
        if zero.clip_grad > 0.:  # as in unscale_and_clip_grads
            clip = ((zero.memlab_total_norm / zero.loss_scale) + 1e-6) / zero.clip_grad
            combined_scale = torch.clamp(clip, min=1.0) * zero.loss_scale

        buffers = swapper.swap_buffer_manager.allocate(num_elems=self.bound, count=4, dtype=swapper.dtype)
        assert buffers is not None, "memascend staging: optimizer pool has fewer than 4 free buffers"
        master, exp_avg, exp_avg_sq, grad = buffers
        element, io = master.element_size(), self.io
        try:
            for index, (first, end) in enumerate(self.slices):
                aligned = swapper._io_aligned_numel(end - first)
                io.read(master.narrow(0, 0, aligned), self.master_path, first * element)
                for buffer, path in zip((exp_avg, exp_avg_sq), self.state_paths):
                    if step == 1:
                        buffer.narrow(0, 0, end - first).zero_()
                    else:
                        io.read(buffer.narrow(0, 0, aligned), path, first * element)
                self.read_gradients(grad, first, end)
                io.wait()

                chunk = [b.narrow(0, 0, end - first) for b in (master, grad, exp_avg, exp_avg_sq)]
                chunk[1].mul_(1. / combined_scale)
                zero.optimizer.ds_opt_adam.adam_update(zero.optimizer.opt_id, step, group["lr"], beta1, beta2,
                                                       group["eps"], group["weight_decay"], group["bias_correction"],
                                                       *chunk)

                io.write(master.narrow(0, 0, aligned), self.master_path, first * element)
                for buffer, path in zip((exp_avg, exp_avg_sq), self.state_paths):
                    io.write(buffer.narrow(0, 0, aligned), path, first * element)
                self.write_params(index, master, grad)  # the gradient is consumed: its buffer is scratch
                io.wait()
        finally:
            swapper.swap_buffer_manager.free(buffers)
        self.swap_info.release_unswapped_gradients()

    def read_gradients(self, dest, first, end):
        """Gradient elements [first, end) into dest: swapped pieces (cut where slices begin,
        so each is inside one) and the fragments that stayed in RAM. aio opens files with
        O_DIRECT, and a read into memory not aligned to the device's block fails without an
        error (the buffer keeps what it held: stock DeepSpeed 0.19.8 steps such parameters on
        stale data), so a piece whose place is unaligned is read at the aligned place before it
        and moved up (read_unaligned). Waits for every read it submits."""
        unaligned = []
        for piece in sorted(self.swap_info.swapped_gradients.values(), key=lambda p: p.offset):
            if not first <= piece.offset < end:
                continue
            if (piece.offset - first) % STAGING_ALIGNMENT:
                unaligned.append(piece)
            else:
                self.io.read(dest.narrow(0, piece.offset - first, piece.length), piece.path, 0)
        self.io.wait()
        for piece in unaligned:  # in order, one at a time: each moves memory its neighbour holds
            self.read_unaligned(dest, piece.offset - first, piece.length, piece.path)
        for offset, fragment in self.swap_info.unswapped_gradients.items():
            if first <= offset < end:
                dest.narrow(0, offset - first, fragment.numel()).copy_(fragment)

    def pool_buffer(self):
        """One optimizer pool buffer of the bound, for reads and writes outside the step. After a
        backward the gradient swapper holds every pool buffer until its writes are flushed."""
        swapper = self.swapper
        swapper._flush_gradient_swapper(swapper.gradient_swapper)
        (buffer,) = swapper.swap_buffer_manager.allocate(num_elems=self.bound, count=1, dtype=swapper.dtype)
        assert buffer is not None, "memascend staging: no free optimizer pool buffer"
        return buffer

    def gradient_range(self, tensor, offset, write):
        """The sub-group's gradient elements [offset, offset + tensor.numel()): read into `tensor` a
        slice at a time through one pool buffer, or written from it, each swapped piece to its own
        file (whole: pieces never cross a slice) and each fragment kept in RAM copied in place."""
        swapper = self.swapper
        buffer = self.pool_buffer()
        end = offset + tensor.numel()
        try:
            if not write:
                for first, slice_end in self.slices:
                    a, b = max(first, offset), min(slice_end, end)
                    if a < b:
                        self.read_gradients(buffer, first, slice_end)
                        tensor.narrow(0, a - offset, b - a).copy_(buffer.narrow(0, a - first, b - a))
                return
            for piece in self.swap_info.swapped_gradients.values():
                if offset <= piece.offset < end:
                    buffer.narrow(0, 0, piece.length).copy_(tensor.narrow(0, piece.offset - offset, piece.length))
                    self.io.write(buffer.narrow(0, 0, swapper._io_aligned_numel(piece.length)), piece.path, 0)
                    self.io.wait()
            for start, fragment in self.swap_info.unswapped_gradients.items():
                if offset <= start < end:
                    fragment.copy_(tensor.narrow(0, start - offset, fragment.numel()).view(fragment.shape))
        finally:
            swapper.swap_buffer_manager.free([buffer])

    def read_unaligned(self, dest, position, length, path):
        """`length` elements of `path` into dest at an unaligned `position`: read at the aligned
        place `shift` elements before it, then moved up by `shift` (from the end, through a small
        scratch tensor), and the `shift` elements the read covered restored."""
        shift = position % STAGING_ALIGNMENT
        before = dest.narrow(0, position - shift, shift).clone()
        self.io.read(dest.narrow(0, position - shift, length), path, 0)
        self.io.wait()
        chunk = torch.empty(min(length, SHIFT_CHUNK_ELEMENTS), dtype=dest.dtype)
        end = length
        while end > 0:  # from the end: no chunk overwrites what a later one still has to move
            start = max(0, end - len(chunk))
            moved = chunk.narrow(0, 0, end - start)
            moved.copy_(dest.narrow(0, position - shift + start, end - start))
            dest.narrow(0, position + start, end - start).copy_(moved)
            end = start
        dest.narrow(0, position - shift, shift).copy_(before)

    def write_params(self, index, master, scratch):
        """The updated parameters of slice `index` (its master values in `master`): into the
        partitions in RAM, and into the swap files of those on NVMe, in whole aligned blocks
        staged in `scratch` (viewed as the parameters' dtype; waited on and reused when full)."""
        slice_first = self.slices[index][0]
        staged = scratch.view(self.param_swapper.dtype) if self.param_swapper is not None else None
        position = 0
        for param_index, first, end, file_first, file_end in self.writes[index]:
            part = self.partitions[param_index]
            offset = self.offsets[param_index]
            values = master.narrow(0, offset + first - slice_first, end - first)
            if staged is None or part.status == self.available:
                part.data.narrow(0, first, end - first).copy_(values)
                continue
            if position + file_end - file_first > staged.numel():
                self.io.wait()
                position = 0
            block = staged.narrow(0, position, file_end - file_first)
            head = first - file_first
            if head:
                block.narrow(0, 0, head).copy_(self.carried.pop(param_index))
            block.narrow(0, head, end - first).copy_(values)
            tail = end - end % self.param_alignment
            if end < part.ds_numel and tail < end:  # the next slice writes this block again, whole
                self.carried[param_index] = block.narrow(0, tail - file_first, end - tail).clone()
            path = self.param_swapper.get_path(self.params[param_index], must_exist=True)
            self.io.write(block, path, file_first * staged.element_size())
            position += file_end - file_first

    def params_from_master(self):
        """The sub-group's parameters rewritten from its fp32 master, slice by slice (what stock's
        _reassign_or_swap_out_partitioned_parameters does whole)."""
        swapper = self.swapper
        buffers = swapper.swap_buffer_manager.allocate(num_elems=self.bound, count=2, dtype=swapper.dtype)
        assert buffers is not None, "memascend staging: optimizer pool has fewer than 2 free buffers"
        master, scratch = buffers
        try:
            for index, (first, end) in enumerate(self.slices):
                self.io.read(master.narrow(0, 0, swapper._io_aligned_numel(end - first)), self.master_path,
                             first * master.element_size())
                self.io.wait()
                self.write_params(index, master, scratch)
                self.io.wait()
        finally:
            swapper.swap_buffer_manager.free(buffers)

    def state_range(self, key, tensor, offset, write):
        """Elements [offset, offset + tensor.numel()) of the fp32 master (`key` None) or of Adam
        state `key`: read into `tensor`, or written from it (the aligned blocks around them are
        read first and written back whole). Adam state no step has made yet is a KeyError, as in
        stock (CPU Adam makes it lazily)."""
        swapper = self.swapper
        if key is None:
            path = self.master_path
        elif key in STATE_NAMES and self.zero.__dict__.get("memlab_steps", {}).get(self.sub_group_id):
            path = self.state_paths[STATE_NAMES.index(key)]
        else:
            raise KeyError(key)
        buffer = self.pool_buffer()
        end = offset + tensor.numel()
        try:
            for first, slice_end in self.slices:
                a, b = max(first, offset), min(slice_end, end)
                if a >= b:
                    continue
                aligned = buffer.narrow(0, 0, swapper._io_aligned_numel(slice_end - first))
                self.io.read(aligned, path, first * buffer.element_size())
                self.io.wait()
                if write:
                    buffer.narrow(0, a - first, b - a).copy_(tensor.narrow(0, a - offset, b - a))
                    self.io.write(aligned, path, first * buffer.element_size())
                    self.io.wait()
                else:
                    tensor.narrow(0, a - offset, b - a).copy_(buffer.narrow(0, a - first, b - a))
        finally:
            swapper.swap_buffer_manager.free([buffer])
