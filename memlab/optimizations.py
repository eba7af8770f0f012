"""memlab's engine optimizations (MemAscend's, and memlab's own): one record each.

A record says everything the parent needs about a `memascend.*` switch: its
name, DeepSpeed's behaviour and the optimized value, what it does, the
validation it adds, and which module under memlab/engine/memascend/ installs
it in the worker. Adding a switch is that module plus one record here; the
knobs, the CLI's list, the dashboard's switch panel, `engine="memascend"` and
the worker's installer all read this table. The estimate reads each switch's
value where the component it changes is sized (memlab/sizing).

Records are in install order: bounded staging and direct storage wrap
DeepSpeed's swappers before the adaptive pool replaces the parameter
swapper's buffers, and the probes wrap what all of them patched.
Standard library only (the parent validates without importing DeepSpeed).
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .errors import KnobError


# memascend.heap=fixed: glibc's own starting threshold (DEFAULT_MMAP_THRESHOLD_MIN), held there instead of
# rising. Measured on a tied Qwen2 (hidden 1024, 128 tokens, MemAscend, 6 steps): the heap's free chunks at
# each step's peak stay at 2 MiB, where with the threshold at 1 MiB they grow 18 -> 45 MiB over four steps
# (activations and their gradients of 128 KiB - 1 MiB freed in backward), step times alike.
HEAP_MMAP_THRESHOLD = 128 << 10


@dataclass(frozen=True)
class Optimization:
    switch: str  # the knob, memascend.*
    stock: str  # DeepSpeed's own behaviour
    optimized: str
    doc: str
    installer: Optional[str]  # module of memlab.engine.memascend with install(knobs, context); None: env only
    checks: Tuple[Callable, ...] = ()  # check(resolved knobs): raise KnobError for what it cannot run
    # variables the engine's process starts with, when optimized (each also an allocator.* knob)
    environment: Tuple[Tuple[str, object], ...] = ()

    def check_environment(self, knob, name, given):
        """Refuse a value `given` by hand (None: nothing given) for the variable `name` this
        switch sets: the switch would overwrite it. `knob` is how the user named it."""
        value = dict(self.environment)[name]
        if given is not None and str(given) != str(value):
            raise KnobError(knob, given, f"{self.switch}={self.optimized} sets it to {value}; "
                                         f"set {self.switch}={self.stock} to choose another value")


def _check_storage_device(r):
    device = r.values.get("memascend.storage_device")
    if device and r.values.get("memascend.storage") != "direct":
        raise KnobError("memascend.storage_device", device, "needs memascend.storage=direct")


def _check_bounded_staging(r):
    if r.values.get("memascend.optimizer_staging") != "bounded":
        return
    if r["zero_optimization.offload_optimizer.pipeline_read"] or r["zero_optimization.offload_optimizer.pipeline_write"]:
        raise KnobError("memascend.optimizer_staging", "bounded",
                        "not supported with offload_optimizer.pipeline_read/pipeline_write")
    if r["zero_optimization.offload_optimizer.ratio"] != 1.0:
        raise KnobError("memascend.optimizer_staging", "bounded", "needs offload_optimizer.ratio 1.0")


def _check_adaptive_gds(r):
    if r.values.get("memascend.pool") == "adaptive" and r["aio.use_gds"]:
        raise KnobError("memascend.pool", "adaptive", "not supported with aio.use_gds (GDS keeps the pool on the GPU)")


OPTIMIZATIONS = (
    Optimization("memascend.storage", "files", "direct",
                 "all swapped tensors at fixed offsets in one preallocated region instead of a file each",
                 "direct_storage", (_check_storage_device,)),
    Optimization("memascend.optimizer_staging", "stock", "bounded",
                 "every sub-group whose optimizer state is on NVMe is stepped slice by slice through bounded "
                 "buffers; no full-size first-step copy",
                 "bounded_staging", (_check_bounded_staging,)),
    # before grad_checks: fused_checks' has_overflow falls back to this one's when there is no flat buffer
    Optimization("memascend.grad_staging", "stock", "bounded",
                 "no gradient flat buffer (a 2-4 byte element per parameter): each reduced bucket's gradients go "
                 "straight to the optimizer's fp32 gradients or to NVMe",
                 "grad_staging"),
    Optimization("memascend.grad_checks", "stock", "fused",
                 "overflow check and gradient norm in bounded slices, no buffer-sized temporaries",
                 "fused_checks"),
    Optimization("memascend.pinning", "torch", "exact",
                 "pinned buffers take exactly their bytes rounded to the page (DeepSpeed's native backend)",
                 "exact_pinning", environment=(("DS_PIN_MEMORY_BACKEND", "native"),)),
    Optimization("memascend.pool", "fixed", "adaptive",
                 "parameter swap buffers sized by the partitions that use them, grown on demand",
                 "adaptive_pool", (_check_adaptive_gds,)),
    # glibc's default threshold rises to the largest block freed (up to 32 MiB), so freed tensors below it
    # stay in the heap as free chunks (heap_free) whose total depends on the order of frees
    Optimization("memascend.heap", "dynamic", "fixed",
                 f"glibc's mmap threshold fixed at {HEAP_MMAP_THRESHOLD >> 10} KiB: every tensor of that size or "
                 "more is mapped on its own and returned to the system when freed, instead of leaving free "
                 "chunks in the heap",
                 None, environment=(("MALLOC_MMAP_THRESHOLD_", HEAP_MMAP_THRESHOLD),)),
)
BY_SWITCH = {o.switch: o for o in OPTIMIZATIONS}
