"""Bounded gradient staging: no gradient flat buffer; each reduced bucket's
gradient partitions go straight to where the optimizer step reads them.

Stock DeepSpeed 0.19 (runtime/zero/stage3.py) allocates in
`_setup_for_real_optimizer` a flat buffer of one gradient-accumulation element
per parameter partition (pinned with offload_optimizer.pin_memory), kept for
the whole run: 2-4 bytes per parameter, the largest host buffer of a big model
(131 GiB for a 70B model in bf16). `partition_grads` copies each reduced
gradient partition into its slice of that buffer, and, at the accumulation
boundary, from there to where the step reads it: the sub-group's fp32
gradient (optimizer state in RAM) or, for a sub-group whose optimizer state is
on NVMe, a gradient file written at the end of the bucket. With one
micro-batch per step the buffer only ever holds a copy of what goes on.

Here, at the boundary, `partition_grads` takes each partition as reduced (in
the accumulation dtype, as stock copies it) and hands it to stock's own
`_offload_grad_partition_at_boundary`: the same norm on the same values, the
same fp32 copy or the same gradient swap-out. What stays in RAM of the
bucket is what DeepSpeed keeps of a swapped gradient (the remainder that is
not a whole aligned block, and gradients below the swap floor): in stock those
are views of the flat buffer; here they would be views of the bucket, which
the next bucket overwrites, so they are copied into one small store that
every step reuses (the `grad_flat` component: all that is left of the flat
buffer).
fp16's overflow check (stock: isinf/isnan over the flat buffer at the step)
sees every summed gradient here as it is staged at the boundary.

Gradient accumulation (several micro-batches per step) sums where the
gradient will be read: a sub-group whose optimizer state is in RAM sums into
its fp32 gradient (which stock keeps for the whole run anyway); a swapped
sub-group sums on NVMe, in the very gradient files the step reads: the first
micro-batch writes them, each later one reads its parameter's pieces back
through one optimizer pool buffer, adds, and writes them again. RAM stays
bounded by one pool buffer and one parameter partition; the price is one
extra read and write of the gradients per micro-batch after the first. The
sum is stock's to the bit: the previous sum in the accumulation dtype (stored
losslessly in the wider master dtype) plus the new partition, in that dtype.

Without offload_optimizer the flat buffer is the optimizer's gradients
themselves: there the switch leaves the engine as stock and says so on
stderr.
"""
import sys
import weakref

import torch

from ... import components as C
from ...ds_rules import AIO_ALIGNED_BYTES, kept_gradient_numel
from .bounded_staging import StreamIO
from .fused_checks import has_inf_or_nan

INACTIVE = "memlab: memascend.grad_staging=bounded does not act here ({}): DeepSpeed's gradient flat buffer is used"


def inactive_reason(optimizer):
    """Why the switch leaves this optimizer as stock, or None where it acts."""
    if not optimizer.offload_optimizer:
        return "no offload_optimizer: the flat buffer is the optimizer's gradients"
    return None


class BoundedGradStaging:
    """The optimizer's gradient path without the flat buffer (one per optimizer)."""

    def __init__(self, optimizer, probes=None, streamed=False):
        self.optimizer = optimizer
        self.probes = probes
        self.streamed = streamed  # memascend.optimizer_staging=bounded cuts gradients where its slices start
        self.overflow = False  # fp16: an inf or nan among the gradients staged since the last check
        self.store, self.cursor = None, 0  # the kept pieces of swapped gradients (_keep_unswapped)
        self.slots = {}  # (sub-group, offset): its kept piece's place in the store, this step

    def setup_for_real_optimizer(self):
        """stage3 `_setup_for_real_optimizer`, without the gradient flat buffer."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero import stage3

        opt = self.optimizer
        opt._create_fp32_partitions()
        stage3.dist.barrier()
        opt._create_next_swappable_fp32_groups()  # to support pipelined optimizer swapping
        opt.initialize_optimizer_states()
        stage3.dist.barrier()
        if opt.contiguous_gradients:  # the IPG buckets
            for dtype, bucket in opt.ipg_buckets.items():
                bucket.buffer = torch.empty(opt.reduce_bucket_size, dtype=dtype,
                                            device=get_accelerator().current_device_name())
        opt.grad_partitions_flat_buffer = None  # readers of it: has_overflow (replaced), offload_states
        opt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition = {}
        kept = self.kept_numel()
        if kept:  # made with the engine's buffers, below what training allocates and frees in the heap
            self.store = self._allocate(kept, opt.master_weights_and_grads_dtype)
        stage3.pinned_memory_summary("ZeRO-3 optimizer init")

    def kept_numel(self):
        """Elements of the swapped sub-groups' gradients the swapper keeps in RAM each step, by its
        own alignment and swap floor (ds_rules.kept_gradient_numel)."""
        opt = self.optimizer
        swapper = getattr(opt, "optimizer_swapper", None)
        if swapper is None:
            return 0
        io = swapper.aligned_bytes // AIO_ALIGNED_BYTES
        bound = swapper.largest_numel if self.streamed else None  # bounded staging's own bound
        return sum(kept_gradient_numel([p.partition_numel() for p in opt.fp16_groups[i]], swapper.min_aio_bytes,
                                       io, bound)
                   for i in range(len(opt.fp16_groups)) if opt._swappable_optimizer_subgroup(i))

    def partition_grads(self, params, grad_partitions):
        """stage3 `partition_grads` without the flat buffer: each partition, summed with what earlier
        micro-batches of the step left where the step reads it, goes there again (at the boundary
        through stock's own `_offload_grad_partition_at_boundary`, which also takes its norm)."""
        from deepspeed.accelerator import get_accelerator

        opt = self.optimizer
        boundary = opt.is_gradient_accumulation_boundary()
        gradients, offsets, staged = {}, {}, []
        check_overflow = boundary and opt.dtype == torch.float16
        for param, grad_partition in zip(params, grad_partitions):
            if param.partition_numel() * opt._get_param_partition_rank(param) >= param.ds_numel:
                param.grad = None  # this rank's partition of it is padding only
                continue
            # stock sums from its second micro-batch on; a parameter that had no gradient yet this
            # step has nothing stored to add to (stock would add last step's)
            accumulate = opt.micro_step_id > 0 and param.ds_id in opt._offload_boundary_param_ids
            opt._offload_boundary_param_ids.add(param.ds_id)
            # the values stock's flat buffer would hold (a copy in the accumulation dtype, or its sum)
            grad = grad_partition.to(opt.gradient_accumulation_dtype).view(-1)
            if accumulate:
                grad = self.stored(param, grad.numel()).to(opt.gradient_accumulation_dtype).add_(grad)
            if check_overflow and not self.overflow:
                self.overflow = has_inf_or_nan(grad)
            if boundary:
                opt._offload_grad_partition_at_boundary(param, grad, gradients, offsets)
            else:
                self._store(param, grad, gradients, offsets)
            staged.append(grad)
            if not get_accelerator().is_synchronized_device() and param.grad is not None:
                param.grad.record_stream(get_accelerator().current_stream())
            param.grad = None
        opt._swap_out_offload_fp32_gradients(gradients, offsets)
        self._keep_unswapped(gradients)
        return staged

    def _store(self, param, grad, gradients, offsets):
        """Between micro-batches: `_offload_grad_partition_at_boundary` without the norm (the
        boundary takes it of the whole sum)."""
        opt = self.optimizer
        i, dest_offset, _ = opt.grad_position[opt.get_param_id(param)]
        master = grad.to(dtype=opt.master_weights_and_grads_dtype)
        if opt._swappable_optimizer_subgroup(i):
            gradients.setdefault(i, []).append(master)
            offsets.setdefault(i, []).append(dest_offset)
        else:
            opt.fp32_partitioned_groups_flat[i].grad.narrow(0, dest_offset, grad.numel()).copy_(master)

    def stored(self, param, numel):
        """The gradient of `param` the step's earlier micro-batches left: a view of its sub-group's
        fp32 gradient (optimizer state in RAM), or read from the gradient files and kept pieces
        of a swapped sub-group, each file through the start of one pool buffer (O_DIRECT)."""
        opt = self.optimizer
        i, dest, _ = opt.grad_position[opt.get_param_id(param)]
        if not opt._swappable_optimizer_subgroup(i):
            return opt.fp32_partitioned_groups_flat[i].grad.narrow(0, dest, numel)
        swapper = opt.optimizer_swapper
        info = swapper._get_param_swap_info(opt.fp32_partitioned_groups_flat[i])
        out = torch.empty(numel, dtype=swapper.dtype)
        end = dest + numel
        pieces = [piece for piece in info.swapped_gradients.values() if dest <= piece.offset < end]
        if pieces:
            swapper._flush_gradient_swapper(swapper.gradient_swapper)  # its writes done, its buffers free
            longest = swapper._io_aligned_numel(max(piece.length for piece in pieces))
            (buffer,) = swapper.swap_buffer_manager.allocate(num_elems=longest, count=1, dtype=swapper.dtype)
            io = StreamIO(getattr(swapper, "read_aio_handle", None) or swapper.aio_handle, self.probes)
            try:
                for piece in pieces:
                    io.read(buffer.narrow(0, 0, swapper._io_aligned_numel(piece.length)), piece.path, 0)
                    io.wait()
                    out.narrow(0, piece.offset - dest, piece.length).copy_(buffer.narrow(0, 0, piece.length))
            finally:
                swapper.swap_buffer_manager.free([buffer])
        for offset, fragment in info.unswapped_gradients.items():
            if dest <= offset < end:
                out.narrow(0, offset - dest, fragment.numel()).copy_(fragment.view(-1))
        return out

    def _keep_unswapped(self, gradients):
        """Copy the gradient pieces the swapper kept in RAM (views of this bucket) into the kept store."""
        swapper = getattr(self.optimizer, "optimizer_swapper", None)
        if swapper is None:
            return
        kept = []
        for i in gradients:
            info = swapper._get_param_swap_info(self.optimizer.fp32_partitioned_groups_flat[i])
            if info is not None:
                kept += [(info, offset) for offset, tensor in info.unswapped_gradients.items() if not _owned(tensor)]
        if not kept:
            return
        total = sum(info.unswapped_gradients[offset].numel() for info, offset in kept
                    if (info.param_id, offset) not in self.slots)
        dtype = kept[0][0].unswapped_gradients[kept[0][1]].dtype
        if self.store is None or self.cursor + total > self.store.numel():
            # more than the geometry said (a shape the rule does not know): correct, one more store
            self.store, self.cursor = self._allocate(total, dtype), 0
        for info, offset in kept:
            piece = info.unswapped_gradients[offset]
            copy = self.slots.get((info.param_id, offset))  # a later micro-batch's sum: the same place
            if copy is None or copy.numel() != piece.numel():
                copy = self.store.narrow(0, self.cursor, piece.numel())
                self.cursor += piece.numel()
                self.slots[(info.param_id, offset)] = copy
            copy.copy_(piece.view(-1))
            info.unswapped_gradients[offset] = copy.view(piece.shape)

    def step_ended(self):
        """The step has read (and the swapper released) every kept piece: the next backward
        fills the store from its start. One store, made at init, serves every step: a small block
        allocated in the middle of backward and freed at the step would sit above the activations'
        freed chunks at the heap's top, which glibc then cannot trim (measured on a tied Qwen2:
        +12 MiB of free heap at the peak)."""
        self.cursor = 0
        self.slots = {}

    def _allocate(self, numel, dtype):
        store = torch.empty(numel, dtype=dtype)
        store._memlab_grad_staging = True
        if self.probes is not None:
            key = self.probes.record_alloc(C.GRAD_FLAT, store.nbytes, store.nbytes, "pageable")
            weakref.finalize(store, self.probes.record_free, key)  # once no swapper holds a piece of it
        return store

    def has_overflow(self, partition_gradients=True):
        """fp16's overflow flag over every gradient staged since the last check, reduced over the ranks."""
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero import stage3

        opt = self.optimizer
        flag = torch.tensor([int(self.overflow)], dtype=torch.uint8, device=get_accelerator().current_device_name())
        self.overflow = False
        stage3.dist.all_reduce(flag, op=stage3.dist.ReduceOp.MAX, group=opt.dp_process_group)
        opt._model_parallel_all_reduce(tensor=flag, op=stage3.dist.ReduceOp.MAX)
        return bool(flag[0].item())


def _owned(tensor):
    """Is `tensor` already in a buffer of ours (kept from an earlier bucket)?"""
    base = tensor._base if tensor._base is not None else tensor
    return getattr(base, "_memlab_grad_staging", False)


def install(knobs, context):
    from deepspeed.runtime.zero import stage3

    from .. import patching
    from ..patching import original as _require

    optimizer_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    original_has_overflow = _require(optimizer_cls, "has_overflow")
    original_step = _require(optimizer_cls, "step")
    for name in ("_offload_grad_partition_at_boundary", "_swap_out_offload_fp32_gradients", "_create_fp32_partitions",
                 "initialize_optimizer_states"):
        _require(optimizer_cls, name)
    probes = context.get("probes")
    streamed = knobs.get("memascend.optimizer_staging") == "bounded"

    originals = {name: _require(optimizer_cls, name) for name in ("_setup_for_real_optimizer", "partition_grads")}

    def staging(optimizer):
        """The optimizer's BoundedGradStaging, or None where the switch does not act (stock)."""
        return optimizer.__dict__.get("_memlab_grad_staging")

    def _setup_for_real_optimizer(self):
        reason = inactive_reason(self)
        if reason is not None:
            print(INACTIVE.format(reason), file=sys.stderr, flush=True)
            return originals["_setup_for_real_optimizer"](self)
        self.__dict__["_memlab_grad_staging"] = BoundedGradStaging(self, probes, streamed)
        staging(self).setup_for_real_optimizer()

    def partition_grads(self, params_to_release, grad_partitions):
        if staging(self) is None:
            return originals["partition_grads"](self, params_to_release, grad_partitions)
        return staging(self).partition_grads(params_to_release, grad_partitions)

    def has_overflow(self, partition_gradients=True):
        if not partition_gradients or staging(self) is None:
            return original_has_overflow(self, partition_gradients)
        return staging(self).has_overflow(partition_gradients)

    def step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        if staging(self) is not None:
            staging(self).step_ended()
        return result

    patching.replace(optimizer_cls, "_setup_for_real_optimizer", _setup_for_real_optimizer)
    patching.replace(optimizer_cls, "step", step)
    patching.replace(optimizer_cls, "partition_grads", partition_grads)
    patching.replace(optimizer_cls, "has_overflow", has_overflow)
