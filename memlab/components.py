"""The shared vocabulary: every byte memlab reports belongs to one component.

Probes, estimates, summaries and legends all use these names, so a measured
run and an estimate compare component by component.
"""

FRAMEWORK = "framework"
RUNTIME = "runtime"
PARAM_POOL = "param_pool"
PARAM_PARTITION_BUFFER = "param_partition_buffer"
PARAM_CPU_FLAT = "param_cpu_flat"
SMALL_PARTITIONS = "small_partitions"
OPTIMIZER_POOL = "optimizer_pool"
GRAD_FLAT = "grad_flat"
OPTIMIZER_STATE = "optimizer_state"
OPTIMIZER_TRANSIENTS = "optimizer_transients"
ACTIVATIONS = "activations"
OFFLOADED_CHECKPOINTS = "offloaded_checkpoints"
PAGE_CACHE = "page_cache"
HEAP_FREE = "heap_free"
OTHER = "other"

# Stacking order for charts: the engine's own buffers first, then transients,
# then what the engine does not own.
ALL = (
    FRAMEWORK,
    RUNTIME,
    PARAM_POOL,
    PARAM_PARTITION_BUFFER,
    PARAM_CPU_FLAT,
    SMALL_PARTITIONS,
    OPTIMIZER_POOL,
    GRAD_FLAT,
    OPTIMIZER_STATE,
    OPTIMIZER_TRANSIENTS,
    ACTIVATIONS,
    OFFLOADED_CHECKPOINTS,
    PAGE_CACHE,
    HEAP_FREE,
    OTHER,
)

# Components that are not the offload engine's own host memory
# (summary field `peak_engine_host_bytes` excludes them): code and objects
# (framework, runtime), the model's tensors in flight, and what nobody owns.
NOT_ENGINE = frozenset({FRAMEWORK, RUNTIME, ACTIVATIONS, OTHER})

# Components whose allocations live for moments (a sub-group's optimizer step):
# shorter than the sampling interval, so the probes take a sample as each is
# recorded rather than leave the peak to whether a tick falls inside one.
TRANSIENT = frozenset({OPTIMIZER_TRANSIENTS})

# Components whose bytes are inside the process RSS. page_cache is kernel
# memory, not RSS: it is reported beside RSS, never subtracted from it.
OUTSIDE_RSS = frozenset({PAGE_CACHE})

DESCRIPTIONS = {
    FRAMEWORK: "interpreter and libraries before the engine starts",
    RUNTIME: "what building the model and engine holds beyond its buffers (modules, ops, aio handles, CPU Adam)",
    PARAM_POOL: "parameter swap buffers (offload_param.buffer_count x buffer_size)",
    PARAM_PARTITION_BUFFER: "partitioned swap buffer for the largest optimizer sub-group's parameters",
    PARAM_CPU_FLAT: "CPU flat parameter buffer (params kept in RAM up to max_in_cpu)",
    SMALL_PARTITIONS: "partitions too small to swap, and persistent parameters",
    OPTIMIZER_POOL: "optimizer swap buffers (offload_optimizer.buffer_count x largest sub-group)",
    GRAD_FLAT: "gradient flat buffer (one element per parameter)",
    OPTIMIZER_STATE: "fp32 master weights and Adam state in host RAM (optimizer offloaded to the CPU)",
    OPTIMIZER_TRANSIENTS: "first-step state copies, fp64 norm copy, overflow-check and dtype temporaries",
    ACTIVATIONS: "tensors in flight in host RAM (on the CPU accelerator: activations, logits, gradients, buckets)",
    OFFLOADED_CHECKPOINTS: "activation checkpoints offloaded to host memory",
    PAGE_CACHE: "swap-file pages in the kernel page cache (outside RSS)",
    HEAP_FREE: "bytes glibc's heap holds but does not use (fragmentation of the ordinary heap)",
    OTHER: "RSS not attributed to any component above",
}
