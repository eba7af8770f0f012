"""estimate(): one configuration's knobs resolved against the model, the Layout
derived once, then one builder per component (buffers, tensors, storage) and
the phases and GPU figures put together (phases)."""
from .buffers import (grad_flat, offloaded_checkpoints, optimizer_pool, optimizer_state, param_cpu_flat, param_pool,
                      partition_buffer, small_partitions)
from .hardware import Hardware, SizingError
from .layout import Layout, Partitioned, pin_backend
from .phases import gpu, phases
from .result import Estimate
from .storage import nvme_bytes, swap_per_step
from .tensors import activations, heap_free, optimizer_transients, reduce_bucket

# Where each memascend.* switch changes the estimate: the builders that read its value (_estimate passes
# it by keyword; the Layout reads memascend.pinning). A switch that changes a component adds a keyword to
# that component's builder, a line here, and the value's pass in _estimate.
SWITCH_HOOKS = {
    "memascend.pool": (param_pool,),
    "memascend.optimizer_staging": (partition_buffer, optimizer_pool, optimizer_transients, swap_per_step),
    "memascend.grad_staging": (grad_flat, swap_per_step),
    "memascend.grad_checks": (optimizer_transients,),
    "memascend.pinning": (pin_backend,),
    "memascend.storage": (nvme_bytes,),
    "memascend.heap": (heap_free,),  # through allocator.MALLOC_MMAP_THRESHOLD_, which the switch sets
}


def estimate(model, knobs=None, hardware=None, engine=None):
    """Predict host memory (per component and phase), pinned bytes, GPU memory,
    NVMe footprint and bytes swapped per step for one configuration.

    `model`: preset name, config.json path, checkpoint folder, dict or ModelSpec.
    `knobs`: Knobs, a dict of dotted knob names, or None (defaults).
    `hardware`: Hardware (default: this machine, CPU accelerator, one rank).
    `engine`: "deepspeed" or "memascend" sets every memascend.* switch.
    Raises the same KnobError as validation for the traps DeepSpeed crashes on."""
    from ..knobs import AUTO, Knobs, model_dtype
    from ..models import ModelSpec

    spec = ModelSpec.resolve(model)
    if knobs is None:
        knobs = Knobs(engine=engine or "deepspeed")
    elif isinstance(knobs, dict):
        knobs = Knobs(knobs, engine=engine or "deepspeed")
    elif engine is not None and engine != knobs.engine:
        knobs = knobs.with_engine(engine)
    ranks = knobs["run.ranks"]  # ranks on this node, as Lab.run starts them; 1 unless set
    hw = hardware if hardware is not None else Hardware(ranks_per_node=ranks)
    if not isinstance(hw, Hardware):
        raise SizingError(f"hardware: expected memlab.sizing.Hardware, got {type(hw).__name__}")
    # what the builders will ask about the model, derived with one helper request
    dtype = knobs["run.dtype"]
    if dtype == AUTO:
        dtype = model_dtype(spec.torch_dtype, hw.cuda)[0]
    attn = knobs["run.attn_implementation"]
    spec.prepare(dtype, checkpointing=knobs["run.gradient_checkpointing"] or hw.cuda,
                 attn_implementation=None if attn == AUTO else attn)
    if ranks != 1 and ranks != hw.ranks_per_node:
        raise SizingError(f"run.ranks={ranks} but the hardware has {hw.ranks_per_node} rank(s) per node: "
                          f"give the ranks in one place")
    # "auto" and the traps are resolved against the whole model, as Lab.run does for any number of ranks;
    # the buffers are then sized by each rank's partitions
    whole = Partitioned(spec, 1)
    resolved = knobs.resolve(whole, accelerator=hw.accelerator)
    view = whole if hw.world_size == 1 else Partitioned(spec, hw.world_size, whole.full)
    return _estimate(spec, view, resolved, hw)


def _estimate(spec, view, resolved, hw):
    """The builders on one Layout: the host buffers in DeepSpeed's allocation order, then the step's
    tensors, the phases, the GPU figures and NVMe; each switch's value goes to the builders it changes."""
    layout = Layout.of(spec, view, resolved, hw)
    v = layout.values
    attn = v["run.attn_implementation"]
    spec.prepare(v["run.dtype"], checkpointing=layout.checkpointing or layout.cuda,  # what the builders ask, at once
                 attn_implementation=None if attn == spec.attn_implementation else attn)
    pool, staging = v.get("memascend.pool"), v.get("memascend.optimizer_staging")
    grad_checks, storage = v.get("memascend.grad_checks"), v.get("memascend.storage")
    grad_staging = v.get("memascend.grad_staging")

    state, adam = optimizer_state(layout)  # adam: the Adam state CPU Adam creates at the first step
    allocated = (param_pool(layout, pool=pool) + small_partitions(layout) + param_cpu_flat(layout)
                 + partition_buffer(layout, staging=staging) + optimizer_pool(layout, staging=staging) + state
                 + grad_flat(layout, grad_staging=grad_staging, staging=staging))
    checkpoints = offloaded_checkpoints(layout)
    acts = activations(layout)
    transients = optimizer_transients(layout, grad_checks=grad_checks, staging=staging)
    bucket = reduce_bucket(layout)
    by_phase, hidden, peak = phases(layout, allocated, acts, transients, heap_free(layout, transients), bucket,
                                    adam_state=sum(b.reserved for b in adam),
                                    offloaded=sum(b.reserved for b in checkpoints))
    device = gpu(layout, acts, transients, bucket)
    notes = []
    if device is not None:
        notes.append("GPU figures follow DeepSpeed's source; memlab has not measured them on a GPU")
    steady, first = swap_per_step(layout, staging=staging, grad_staging=grad_staging)
    if v["zero_optimization.stage3_max_reuse_distance"] > 0 and layout.real_swapping:
        notes.append("stage3_max_reuse_distance > 0: parameter reads per step assume no reuse (an upper bound)")
    return Estimate(model=spec.name, engine=resolved.engine, knobs=dict(v), hardware=hw,
                    buffers=allocated + adam + checkpoints, phases=by_phase, peak_phase=peak, gpu=device,
                    nvme_bytes=nvme_bytes(layout, storage=storage), swap_per_step=steady, swap_first_step=first,
                    tokens=layout.tokens, num_params=spec.num_params, notes=notes, probe_hidden=hidden)
