"""What-if sizing: DeepSpeed 0.19's sizing rules applied to one configuration,
from tensor shapes alone (no torch, no deepspeed). docs/SIZING.md explains
every term.

    hardware.py   Hardware (the machine an estimate is for), SizingError
    layout.py     Layout: the knobs and one rank's partitions, sub-groups, swap and flat-buffer flags
    buffers.py    the host buffers DeepSpeed allocates, one builder per component
    tensors.py    what a step creates and frees: activations, optimizer transients, reduce bucket, heap_free
    storage.py    NVMe: the swap footprint and the bytes swapped per step
    phases.py     host bytes per phase, GPU figures per device
    estimator.py  estimate(): the builders called in order; SWITCH_HOOKS, where each memascend.* switch acts
    result.py     Buffer, Estimate
    fitting.py    fit(): the largest seq_len, micro batch or model that fits a budget

The rules themselves (alignment, swap threshold, sub-groups, staging, page
rounding) are memlab.ds_rules'; they are importable from here under their old
names too. The what-if estimator is built on them and tests check measured
runs against them.
"""
from ..ds_rules import (AIO_ALIGNED_BYTES, DTYPE_BYTES, FP32, FUSED_CHUNK_ELEMENTS,  # noqa: F401 (re-exported)
                        DEFAULT_STAGING_ELEMENTS, MIN_AIO_BYTES, NORM_BUFFER_ELEMENTS, PAGE_BYTES, STAGING_ALIGNMENT,
                        aligned_numel, largest_sub_group, min_swap_bytes, min_swap_numel, module_groups, page_round,
                        partition_numel, pow2_round, staging_plan, streamed_sub_group, sub_groups, swappable)
from ..units import GiB, MiB, format_bytes  # noqa: F401 (re-exported)
from .estimator import SWITCH_HOOKS, estimate  # noqa: F401 (re-exported)
from .fitting import SEARCH_LIMITS, TARGETS, FitReport, FitResult, fit  # noqa: F401 (re-exported)
from .hardware import ACCELERATORS, Hardware, SizingError  # noqa: F401 (re-exported)
from .phases import PHASES  # noqa: F401 (re-exported)
from .result import Buffer, Estimate, _fmt  # noqa: F401 (re-exported)
from .storage import nvme_footprint  # noqa: F401 (re-exported)
from .tensors import (FRAMEWORK_BYTES, GLIBC_MMAP_THRESHOLD_MAX, HEAP_FREE_ACTIVATIONS,  # noqa: F401 (re-exported)
                      HEAP_FREE_BASE, HEAP_FREE_OPTIMIZER, HEAP_FREE_PARAMS, RUNTIME_BYTES)
