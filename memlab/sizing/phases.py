"""The components put together: host bytes per phase of a run (and what of
them the probes cannot see), and the GPU figures per device on CUDA."""
from .. import components as C
from ..ds_rules import FP32, aligned_numel
from .result import _rss
from .tensors import FRAMEWORK_BYTES, RUNTIME_BYTES

PHASES = ("model_init", "engine_init", "forward", "backward", "optimizer_step_first", "optimizer_step")


def by_component(buffers, only=None):
    """Reserved bytes per component (every component of C.ALL, 0 where none) of `buffers`."""
    out = {name: 0 for name in C.ALL}
    for b in buffers:
        if only is None or b.component in only:
            out[b.component] += b.reserved
    return out


def _phase(buffers, heap_free, activations=0, transients=0, runtime=RUNTIME_BYTES, state=0, checkpoints=0):
    out = dict(buffers)
    out[C.OFFLOADED_CHECKPOINTS] += int(checkpoints)
    out[C.FRAMEWORK] = FRAMEWORK_BYTES
    out[C.ACTIVATIONS] = int(activations)
    out[C.OPTIMIZER_TRANSIENTS] += int(transients)
    out[C.OPTIMIZER_STATE] += int(state)
    out[C.HEAP_FREE] = heap_free
    out[C.RUNTIME] = int(runtime)
    out[C.OTHER] = 0  # the probes attribute every byte; what they cannot see is `hidden` below
    return out


def phases(layout, buffers, acts, transients, heap, bucket, adam_state, offloaded):
    """Host bytes per component in each phase, the bytes of each the probes cannot see (optimizer
    transients they attribute to `activations`: fp16's overflow temporaries, heap blocks no hook records), and
    the peak phase. `buffers`: those allocated at init. model_init holds the parameter pool and the small
    partitions (partition_parameters.Init), and its runtime twice the largest tensor; engine_init every init
    buffer, and its runtime the engine's plus 4 bytes x the largest sub-group (coarse init transients,
    docs/SIZING.md). Device-side tensors are host memory only on the CPU accelerator."""
    persistent = by_component(buffers)
    model_init = by_component(buffers, only=(C.PARAM_POOL, C.SMALL_PARTITIONS))
    device = 0 if layout.cuda else 1
    saved = acts.saved_checkpointed if layout.checkpointing else acts.saved_full
    forward = acts.forward(saved)
    backward = acts.backward(saved, layout.checkpointing, None if layout.cuda else transients.boundary)
    gathered_host = 0
    if layout.world > 1 and not layout.cuda:  # all-gathered full parameters are device tensors
        gathered_host = acts.gathered * layout.element
    lingering, first = transients.lingering, transients.first_step + transients.overflow
    steady = transients.overflow + lingering
    out = {
        "model_init": _phase(model_init, heap.static, runtime=2 * max(layout.full) * layout.element),
        "engine_init": _phase(persistent, heap.static, runtime=RUNTIME_BYTES + FP32 * max(layout.group_sizes)),
        "forward": _phase(persistent, heap.live, device * (bucket + forward + gathered_host), state=adam_state,
                          checkpoints=offloaded, transients=lingering),
        "backward": _phase(persistent, heap.live, device * (bucket + backward + gathered_host), state=adam_state,
                           checkpoints=offloaded, transients=lingering),
        "optimizer_step_first": _phase(persistent, heap.after, device * bucket, transients=first, state=adam_state),
        "optimizer_step": _phase(persistent, heap.after, device * bucket, transients=steady, state=adam_state),
    }
    # the probes see CPU Adam's first-step state (and the pipelined swapper's lingering copy of it); fp16's
    # overflow temporaries (CUDA only) they count as tensors in flight
    hidden = {"forward": 0, "backward": 0, "optimizer_step_first": transients.overflow,
              "optimizer_step": transients.overflow}
    return out, hidden, max(PHASES, key=lambda p: _rss(out[p]))


def gpu(layout, acts, transients, bucket):
    """Per device on CUDA (stage3 and transformers' forward/backward): persistent parameters (at most
    stage3_param_persistence_threshold elements, whole), the gathered parameters (one gather group plus
    stage3_max_live_parameters), the activation peak, the reduce bucket, and on CUDA the boundary's
    offloaded gradients (a bucket's are copied to the device and kept until written out); with GDS the
    parameter pool too; with offload_param none, the rank's parameter partitions. None on the CPU accelerator."""
    if not layout.cuda:
        return None
    v, e, full = layout.values, layout.element, layout.full
    persistence = v["zero_optimization.stage3_param_persistence_threshold"]
    persistent_params = sum(n * e for n in full if n <= persistence)
    gathered = (acts.gathered + min(v["zero_optimization.stage3_max_live_parameters"], sum(full))) * e
    saved, ckpt = acts.saved_full, acts.saved_checkpointed
    act_full = max(acts.forward(saved), acts.loss(saved), acts.lm_head_backward(saved))
    act_ckpt = max(acts.forward(ckpt), acts.loss(ckpt), acts.recompute(ckpt))
    out = {
        "persistent_params": persistent_params,
        "params_gathered": gathered,
        "activations": act_ckpt if layout.checkpointing else act_full,
        "activations_full": act_full,
        "activations_checkpointed": act_ckpt,
        "reduce_bucket": bucket,
        "boundary_gradients": FP32 * transients.bucket_elements + transients.norm_copy,
    }
    # offload_param none: this rank's partitions stay on the GPU
    out["param_partitions"] = layout.numel * e if layout.params_on_device else 0
    out["total"] = (persistent_params + out["param_partitions"] + gathered + bucket
                    + max(out["activations"], out["boundary_gradients"]))
    if v["aio.use_gds"] and layout.params_nvme:
        count = v["zero_optimization.offload_param.buffer_count"]
        out["param_pool"] = count * aligned_numel(v["zero_optimization.offload_param.buffer_size"], e, layout.io) * e
        out["total"] += out["param_pool"]
    return out
