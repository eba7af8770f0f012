"""Exact pinning: every buffer the engine pins takes its bytes rounded to the page.

Stock on CUDA, `accelerator.pin_memory` goes to PyTorch's CachingHostAllocator,
which rounds each block up to the next power of two and caches freed blocks
(a 1.02 GiB gradient buffer takes 2 GiB). DeepSpeed 0.19 carries MemAscend's
fix as its native pinning backend (posix_memalign + mlock, then
cudaHostRegister); in 0.19.8 every engine path that pins (CPU flat parameter
buffer, gradient flat buffer, small partitions, `pin_empty` scratch buffers)
goes through `accelerator.pin_memory` / `pin_empty`, so selecting that backend
covers them all. The parent sets DS_PIN_MEMORY_BACKEND=native for the worker
(memlab.knobs resolves it); this module checks that it took effect.

On the CPU accelerator this is real mlock (VmLck grows by exactly the page-
rounded bytes); the CUDA registration (`register_host_memory`) cannot run
here and is DeepSpeed's code, not memlab's.

One path the native backend leaks, and this module closes: with parameters
in RAM (offload_param cpu), stage3 `_move_to_flat_buffer` copies each pinned
Init partition into the CPU flat buffer and redirects `ds_tensor.data` to it.
The native allocation is freed only when its root tensor is collected, and
the redirected tensor still holds that root (its view base): every partition
stayed locked beside its copy, a second copy of the parameters (measured:
78 MiB of a 20M-parameter GPT-2's partitions, for the whole run). The backend
frees a redirected tensor's original region by the address it recorded
(`unpin`), which is what this does once the copy is made.

And one read the native backend exposes: `swap_into_buffer` (a partition on
NVMe brought into that flat buffer for good, max_in_cpu) reads straight into
the destination when the aio handle knows it as locked and its size is
I/O-aligned, and never checks its address. Stock pinning is invisible to the
aio handle, so stock always reads through a swap buffer; with the native
backend the flat buffer is the handle's own locked memory, and a partition
that starts at an unaligned offset (hidden size 1000) was read with O_DIRECT
into an unaligned address: it came back as zeros, the first loss was
ln(vocab) and training did not move. Such a destination is read through a
swap buffer, as stock does.
"""

from ...ds_rules import reads_in_place


def install(knobs, context):
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper as pps
    from deepspeed.runtime.zero import stage3
    from deepspeed.utils.pin_memory import get_active_native_pinned_memory

    from .. import patching

    pins = get_active_native_pinned_memory()
    if pins is None:
        raise RuntimeError("memascend.pinning=exact needs DS_PIN_MEMORY_BACKEND=native in the worker's environment")
    optimizer_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    original_move = patching.original(optimizer_cls, "_move_to_flat_buffer")

    def _move_to_flat_buffer(self, param_list, flat_buffer, avoid_copy=False):
        pinned = [(p.ds_tensor, p.ds_tensor.data_ptr()) for p in param_list
                  if getattr(getattr(p, "ds_tensor", None), "ds_pinned", False)]
        result = original_move(self, param_list, flat_buffer, avoid_copy=avoid_copy)
        for tensor, address in pinned:
            if tensor.data_ptr() != address:  # now a view of the flat buffer: its own pages are unused
                pins.unpin(tensor)
        return result

    patching.replace(optimizer_cls, "_move_to_flat_buffer", _move_to_flat_buffer)

    swapper_cls = pps.AsyncPartitionedParameterSwapper
    # DeepSpeed's (the adaptive pool, installed after this, replaces it with its own under the same rule)
    swap_into = patching.original(swapper_cls, "swap_into_buffer")

    def swap_into_buffer(self, param, dest_buffer):
        if reads_in_place(dest_buffer.data_ptr()):
            return swap_into(self, param, dest_buffer)
        self.swap_in([param], async_op=False)  # into a swap buffer, then copied: stock's path
        dest_buffer.data.copy_(param.ds_tensor.data)
        self.remove_partition_and_release_buffers([param])

    patching.replace(swapper_cls, "swap_into_buffer", swap_into_buffer)
