"""The host buffers DeepSpeed allocates, one builder per component: each takes
the Layout (and, where a MemAscend switch changes the component, that switch's
value) and returns the Buffers in allocation order."""
from .. import components as C
from ..ds_rules import FP32, aligned_numel, page_round, pow2_round
from .layout import bounded
from .storage import kept_gradient_elements
from .result import Buffer


def pinned_buffer(layout, component, nbytes, what, pin=True):
    """A buffer that goes through accelerator.pin_memory: DeepSpeed's native backend (utils/pin_memory.py)
    reserves it to the page, torch's CUDA caching host allocator to a power of two; on the CPU
    accelerator pin_memory is a no-op. memascend.pinning hooks in through Layout.pin_backend."""
    if not pin:
        return Buffer(component, nbytes, nbytes, "pageable", what)
    if layout.pin_backend == "native":
        return Buffer(component, nbytes, page_round(nbytes), "native-mlock", what)
    if layout.cuda:
        return Buffer(component, nbytes, pow2_round(nbytes), "torch-pinned", what)
    return Buffer(component, nbytes, nbytes, "pageable", what)


def param_pool(layout, pool="fixed"):
    """Parameter swap buffers: partitioned_param_swapper.AsyncPartitionedParameterSwapper._configure_aio,
    offload_param.buffer_count x buffer_size (aligned) in one mlock'ed aio buffer; none with GDS on CUDA.
    Hook of memascend.pool: `adaptive` sizes them by the partitions that use them (adaptive_pool)."""
    v, e = layout.values, layout.element
    if not layout.params_nvme or (v["aio.use_gds"] and layout.cuda):
        return []
    if pool == "adaptive":
        return adaptive_param_pool(layout)
    count = v["zero_optimization.offload_param.buffer_count"]
    nbytes = count * aligned_numel(v["zero_optimization.offload_param.buffer_size"], e, layout.io) * e
    return [Buffer(C.PARAM_POOL, nbytes, page_round(nbytes), "aio-mlock", f"{count} x buffer_size")]


def adaptive_param_pool(layout):
    """memascend.pool=adaptive (memlab.engine.memascend.adaptive_pool): per aligned partition size, as many
    buffers as one gather group (a module and its direct children) swaps in at once, largest first."""
    e, io = layout.element, layout.io
    classes = {}
    for group in layout.gather_groups:
        counts = {}
        for index in group:
            if layout.swapped[index]:
                size = aligned_numel(layout.parts[index], e, io)
                counts[size] = counts.get(size, 0) + 1
        for size, count in counts.items():
            classes[size] = max(classes.get(size, 0), count)
    return [Buffer(C.PARAM_POOL, size * e, page_round(size * e), "aio-mlock", f"adaptive pool: {size} elements")
            for size in sorted(classes, reverse=True) for _ in range(classes[size])]


def small_partitions(layout):
    """Partitions too small to swap (partition_parameters.Init._partition_param): kept in RAM, pinned as
    offload_param.pin_memory says; on CUDA a persistent parameter stays whole on the GPU instead."""
    if not layout.params_nvme:
        return []
    persistence = layout.values["zero_optimization.stage3_param_persistence_threshold"]
    pin = layout.values["zero_optimization.offload_param.pin_memory"]
    return [pinned_buffer(layout, C.SMALL_PARTITIONS, n * layout.element, layout.names[index], pin=pin)
            for index, n in enumerate(layout.parts)
            if not layout.swapped[index] and not layout.in_flat[index]
            and not (layout.cuda and layout.full[index] <= persistence)]


def param_cpu_flat(layout):
    """The CPU flat parameter buffer (stage3 _create_param_groups_fp16_flat_cpu_memory):
    min(P, max_in_cpu) elements, the whole model when parameters are not on NVMe. With
    offload_param none the partitions are defragmented into one flat buffer on the device
    (stage3 lp_param_buffer, never pinned): host RAM on the CPU accelerator, a GPU's memory on CUDA."""
    if layout.params_on_device:
        if layout.cuda:
            return []
        return [Buffer(C.PARAM_CPU_FLAT, layout.numel * layout.element, layout.numel * layout.element, "pageable",
                       "partitions on the device (the CPU accelerator's is host RAM)")]
    if layout.flat_elements <= 0:
        return []
    return [pinned_buffer(layout, C.PARAM_CPU_FLAT, layout.flat_elements * layout.element,
                          "min(P, max_in_cpu) elements")]


def partition_buffer(layout, staging="stock"):
    """The partitioned swap buffer (stage3 reserve_partitioned_swap_space): the largest sub-group's whole
    parameters, aligned; only while parameters really swap. Hook of memascend.optimizer_staging: `bounded`
    streams every swapped sub-group and writes its parameters from the staging buffers, so the largest
    sub-group whose optimizer state is not swapped sizes the buffer (none when there is none)."""
    if not (layout.params_nvme and layout.real_swapping):
        return []
    e, index = layout.element, layout.largest_group
    largest = layout.groups[index]
    start = sum(len(g) for g in layout.groups[:index])
    numels = layout.full[start:start + len(largest)] if layout.world > 1 else largest
    if bounded(layout, staging):  # only sub-groups whose optimizer state stays in RAM use it
        numels = layout.resolved.staging_plan["largest_kept_group"]
        if not numels:
            return []
    nbytes = sum(aligned_numel(n, e, layout.io) for n in numels) * e
    return [Buffer(C.PARAM_PARTITION_BUFFER, nbytes, page_round(nbytes), "aio-mlock", "largest sub-group's partitions")]


def optimizer_pool(layout, staging="stock"):
    """Optimizer swap buffers (swap_tensor/optimizer_utils.OptimizerSwapper): offload_optimizer.buffer_count
    buffers of the largest sub-group in fp32, aligned, mlock'ed. Hook of memascend.optimizer_staging:
    `bounded` caps each at the staging bound."""
    if not layout.opt_nvme:
        return []
    largest = max(layout.group_sizes)
    if bounded(layout, staging):
        largest = min(largest, layout.values["memascend.staging_elements"])
    per = aligned_numel(largest, FP32, layout.io) * FP32
    return [Buffer(C.OPTIMIZER_POOL, per, page_round(per), "aio-mlock", "largest sub-group, fp32")
            for _ in range(layout.values["zero_optimization.offload_optimizer.buffer_count"])]


def optimizer_state(layout):
    """Sub-groups whose optimizer state stays in RAM (16 bytes per element): per sub-group its fp32 master
    weights and (stage3 initialize_optimizer_states) a pinned fp32 gradient, kept. Returns (buffers allocated
    at init, the Adam exp_avg/exp_avg_sq CPU Adam creates at the first step and keeps)."""
    pin = layout.values["zero_optimization.offload_optimizer.pin_memory"]
    buffers, lazy = [], []
    for i in layout.state_groups:
        nbytes = FP32 * layout.group_sizes[i]
        buffers.append(Buffer(C.OPTIMIZER_STATE, nbytes, nbytes, "pageable", f"sub-group {i} fp32 master weights"))
        buffers.append(pinned_buffer(layout, C.OPTIMIZER_TRANSIENTS, nbytes, f"sub-group {i} fp32 gradient", pin=pin))
        lazy += [Buffer(C.OPTIMIZER_STATE, nbytes, nbytes, "pageable", f"sub-group {i} Adam {name} (first step)")
                 for name in ("exp_avg", "exp_avg_sq")]
    return buffers, lazy


def grad_flat(layout, grad_staging="stock", staging="stock"):
    """The gradient flat buffer (stage3 _setup_for_real_optimizer): one element of the gradient
    accumulation dtype per parameter partition, pinned as offload_optimizer.pin_memory says. Hook of
    memascend.grad_staging: `bounded` has no flat buffer (grad_staging), only a store, made at init, for
    the part of the swapped sub-groups' gradients DeepSpeed keeps in RAM until the step (remainders of
    whole aligned blocks, gradients below the swap floor; memascend.optimizer_staging decides where
    gradients are cut), in fp32."""
    if grad_staging == "bounded":
        kept = FP32 * kept_gradient_elements(layout, staging)
        return [Buffer(C.GRAD_FLAT, kept, kept, "pageable", "swapped gradients' parts kept in RAM")] if kept else []
    pin = layout.values["zero_optimization.offload_optimizer.pin_memory"]
    return [pinned_buffer(layout, C.GRAD_FLAT, layout.numel * layout.grad_element,
                          "one element per parameter partition", pin=pin)]


def offloaded_checkpoints(layout):
    """With DeepSpeed's activation_checkpointing.cpu_checkpointing (a pass-through ds_config section),
    each layer's checkpoint (its input) goes through accelerator.pin_memory (checkpointing.py), per step."""
    if not layout.cpu_checkpointing:
        return []
    nbytes = layout.tokens * layout.spec.hidden_size * layout.element
    return [pinned_buffer(layout, C.OFFLOADED_CHECKPOINTS, nbytes, f"layer {i} activation checkpoint (per step)")
            for i in range(layout.spec.num_layers)]
