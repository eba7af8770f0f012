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
"""


def install(knobs, context):
    from deepspeed.utils.pin_memory import get_active_native_pinned_memory

    if get_active_native_pinned_memory() is None:
        raise RuntimeError("memascend.pinning=exact needs DS_PIN_MEMORY_BACKEND=native in the worker's environment")
