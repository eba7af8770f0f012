"""What a training step creates and frees, one builder per component: the
activations (device-side: host RAM on the CPU accelerator), the optimizer
transients, the reduce bucket, and the free chunks they leave in glibc's heap
(calibrated). Bytes throughout."""
import functools
from dataclasses import dataclass

from ..ds_rules import FP32, FUSED_CHUNK_ELEMENTS, NORM_BUFFER_ELEMENTS
from ..units import MiB
from .layout import kept_groups

# glibc serves a block of at least its mmap threshold with mmap (returned to the kernel on free) and smaller
# ones from its arenas, where freed blocks stay as heap_free. Unset, the threshold rises to the largest block
# freed so far, up to DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), which training reaches early (the
# logits, the gradients); allocator.MALLOC_MMAP_THRESHOLD_ fixes it.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB

# --- calibrated on this machine (2 cores, torch 2.13 CPU, DeepSpeed 0.19.8, transformers 5.x);
# docs/SIZING.md ("Calibrated terms") says on which runs.
FRAMEWORK_BYTES = 396 * MiB  # the worker's RSS before the model is built: interpreter, torch, deepspeed, transformers, ops, gloo
RUNTIME_BYTES = 58 * MiB  # `runtime` once the engine is ready: modules, ops, aio handles, CPU Adam (docs/SIZING.md)
# glibc arenas' free bytes (heap_free): tensors below 32 MiB come from the heap, and what is freed there stays
# as free chunks. Fitted by least squares on 30 runs (docs/SIZING.md): a floor, plus these multiples of the
# heap-sized bytes of ...
HEAP_FREE_BASE = 20 * MiB
# With allocator.MALLOC_MMAP_THRESHOLD_ fixed, blocks of at least the threshold are mmapped from the process's
# start, imports and init included, and leave no free chunks: the floor is then 2 MiB (the mean residual
# of 20 runs with the threshold at 1 MiB: 12 model families, stock and MemAscend, and 8 small-llama and
# tied-Qwen2 configurations, where the 20 MiB floor over-predicted every one by 10-28 MiB).
HEAP_FREE_BASE_FIXED_THRESHOLD = 2 * MiB
HEAP_FREE_PARAMS = 2.0  # ... parameters (each parameter's gradient and its copies)
HEAP_FREE_OPTIMIZER = 1.1  # ... the optimizer transients (fp64 norm copy, first-step Adam state)
HEAP_FREE_ACTIVATIONS = 1.4  # ... the saved activations (freed in backward, with their gradients)


@dataclass
class Activations:
    """The device-side tensors of one step; each peak is `saved` (what autograd keeps for backward)
    plus what is live at that point. What is saved is the model's own (ModelSpec.saved_activations:
    transformers' forward on fake tensors), the head and the loss aside: those are the terms below."""

    tokens: int
    layer_saved: int  # what the largest layer saves (a checkpointed layer saves it again in recompute)
    saved_full: int  # saved without gradient checkpointing
    logits_fp32: int
    logits_out: int  # the lm_head output (+ its fp32 upcast for the loss)
    lm_head: int  # the lm_head weight's gradient
    layer_grads: int  # the largest gather group's gradients, the embedding and lm_head aside
    layer_io: int  # a layer's output and its gradient
    gathered: int  # the largest gather group's whole parameters, in elements
    tied: bool
    checkpointed: object = None  # () -> saved with gradient checkpointing (derived when asked)

    @functools.cached_property
    def saved_checkpointed(self):
        """Saved with gradient checkpointing: each layer's input (none when offloaded), and the rest."""
        return self.checkpointed()

    def forward(self, saved):
        return saved + self.logits_out + self.logits_fp32  # the loss: logits and log_softmax's saved output

    def loss(self, saved):
        return saved + 3 * self.logits_fp32  # log_softmax output, its gradient and the logits' gradient

    def lm_head_backward(self, saved):
        return saved + self.logits_fp32 + self.lm_head  # lm_head weight gradient, logits gradient live

    def last_layer(self, saved):
        return saved + self.layer_grads + self.layer_io

    def recompute(self, saved):
        return saved + self.layer_saved + self.layer_grads + self.layer_io

    def backward(self, saved, checkpointing, boundary=None):
        """The backward peak; `boundary`: the host bytes of the accumulation boundary (CPU accelerator)."""
        candidates = [self.loss(saved), self.lm_head_backward(saved), self.last_layer(saved),
                      self.lm_head * (2 if self.tied else 1)]  # tied: the lm_head gradient waits for the embedding's
        if boundary is not None:
            candidates.append(boundary)
        if checkpointing:
            candidates.append(self.recompute(saved))
        return max(candidates)


def saved_tensors(layout, checkpointing):
    """(before the layers, per layer, after them): the sizes of the tensors autograd saves at this run's
    micro batch and sequence length, in the run's dtype."""
    saved = layout.spec.saved_activations(layout.values["run.dtype"], checkpointing,
                                          layout.values["run.attn_implementation"])
    b, s = layout.batch, layout.seq
    return saved.before(b, s), saved.layers(b, s), saved.after(b, s)


def activations(layout):
    """Activations (transformers' decoder forward and backward): what autograd saves in and around the
    layers, logits and their gradients, the gradients of one gather group."""
    spec, e, t, full, names = layout.spec, layout.element, layout.tokens, layout.full, layout.names
    structure = spec.structure
    vocab, h = structure["vocab_size"], structure["hidden_size"]
    before, layers, after = saved_tensors(layout, False)
    logits_fp32 = t * vocab * FP32
    module_sizes = [sum(full[i] for i in g) for g in layout.gather_groups]
    outer = {structure["input_embedding"], structure["output_embedding"]}
    layer_grads = max([size for g, size in zip(layout.gather_groups, module_sizes)
                       if not any(names[i] in outer for i in g)], default=0) * e

    def checkpointed():
        c_before, c_layers, c_after = saved_tensors(layout, True)
        return (0 if layout.cpu_checkpointing else sum(map(sum, c_layers))) + sum(c_before) + sum(c_after)

    return Activations(
        tokens=t, layer_saved=max(map(sum, layers), default=0),
        saved_full=sum(map(sum, layers)) + sum(before) + sum(after),
        logits_fp32=logits_fp32, logits_out=t * vocab * e + (logits_fp32 if e != FP32 else 0),
        lm_head=vocab * h * e, layer_grads=layer_grads, layer_io=2 * t * h * e, gathered=max(module_sizes),
        tied=structure["tied"], checkpointed=checkpointed)


def reduce_bucket(layout):
    """The reduce bucket (stage3.py IPG buckets, with contiguous_gradients): min(reduce_bucket_size, P)
    elements, resident from the first backward on."""
    v = layout.values
    if not v["zero_optimization.contiguous_gradients"]:
        return 0
    return min(v["zero_optimization.reduce_bucket_size"], sum(layout.full)) * layout.element


@dataclass
class OptimizerTransients:
    norm_copy: int  # the fp64 copy a gradient's norm goes through
    bucket_elements: int  # gradients of swapped sub-groups kept at the boundary, in elements
    boundary: int  # the accumulation boundary's device tensors (host RAM on the CPU accelerator)
    overflow: int  # has_overflow's isinf / isnan bool temporaries
    first_step: int  # CPU Adam's lazy exp_avg/exp_avg_sq at the first step
    lingering: int  # first-step states the pipelined swapper keeps through step 2's forward and backward


def optimizer_transients(layout, grad_checks="stock", staging="stock"):
    """In backward each reduced bucket of gradients is partitioned (stage3 partition_grads): at the
    accumulation boundary every gradient's norm goes through an fp64 copy (_constant_buffered_norm2), and
    the bucket's gradients of swapped sub-groups are kept as device-side fp32 tensors until written out
    together; fp16 checks overflow on full-size temporaries; CPU Adam creates a stepped sub-group's state
    lazily. Hooks: memascend.grad_checks=fused bounds the norm copy to a chunk and drops the overflow
    temporaries (fused_checks); memascend.optimizer_staging=bounded streams every swapped sub-group,
    so none needs a whole first-step state (bounded_staging)."""
    v = layout.values
    fused = grad_checks == "fused"
    largest_grad = max(layout.parts)
    norm_copy = 8 * min(largest_grad, FUSED_CHUNK_ELEMENTS if fused else NORM_BUFFER_ELEMENTS)
    swapped_grad_elements = sum(layout.group_sizes[i] for i in layout.swappable_groups)
    bucket_elements = min(max(v["zero_optimization.reduce_bucket_size"], largest_grad), swapped_grad_elements)
    dtype_copies = FP32 * bucket_elements if layout.grad_element != FP32 else 0  # fp32: no copy
    kept = [layout.group_sizes[i] for i in kept_groups(layout, staging)]
    first_step = 2 * FP32 * max(kept, default=0)
    lingering = 0
    if v["zero_optimization.offload_optimizer.pipeline_read"] or v["zero_optimization.offload_optimizer.pipeline_write"]:
        # PipelinedOptimizerSwapper copies the first step's pageable Adam states into its buffers but keeps
        # them referenced (no release_memory) until the sub-group is swapped in again at step 2: every
        # swapped sub-group's states stay resident through step 2's forward and backward.
        lingering = 2 * FP32 * sum(kept)
        first_step = max(first_step, lingering)
    return OptimizerTransients(
        norm_copy=norm_copy, bucket_elements=bucket_elements, boundary=norm_copy + dtype_copies,
        overflow=layout.numel if (v["run.dtype"] == "fp16" and not fused) else 0, first_step=first_step,
        lingering=lingering)


@dataclass
class HeapFree:
    static: int  # before any activation is freed (model and engine init)
    after: int  # once the first backward has freed the activations (optimizer steps)
    live: int  # in later forwards and backwards, the activations living in those chunks again


def heap_free(layout, transients):
    """glibc arenas' free chunks (calibrated, HEAP_FREE_*): a multiple of the heap-sized bytes (tensors below
    glibc's mmap threshold: the fixed one if set, else the dynamic threshold's ceiling) of the parameters,
    the optimizer transients and the saved activations. Once the first backward has freed the activations,
    their chunks stay in glibc's arenas: heap_free is largest after backward (optimizer step). In later
    forwards and backwards the activations live inside those chunks again, so the arena (free + live
    activation bytes) does not shrink below that size."""
    threshold = layout.values["allocator.MALLOC_MMAP_THRESHOLD_"]
    limit = GLIBC_MMAP_THRESHOLD_MAX if threshold is None else threshold

    def heap(nbytes):
        return nbytes if nbytes < limit else 0

    params = sum(heap(n * layout.element) for n in layout.full)
    optimizer = heap(transients.norm_copy) + heap(transients.first_step)
    saved = 0
    if not layout.cuda:  # on CUDA the activations are GPU memory
        # the layers' tensors (the calibration's terms: what is saved around the layers is not in them)
        heap_layers = [sum(map(heap, layer)) for layer in saved_tensors(layout, False)[1]]
        if layout.checkpointing:
            inputs = 0 if layout.cpu_checkpointing else sum(
                heap(b) for layer in saved_tensors(layout, True)[1] for b in layer)
            saved = inputs + max(heap_layers, default=0)
        else:
            saved = sum(heap_layers)
        saved += 2 * heap(layout.tokens * layout.spec.vocab_size * FP32)  # the logits and log_softmax's output
    base = HEAP_FREE_BASE if threshold is None else HEAP_FREE_BASE_FIXED_THRESHOLD
    static = int(base + HEAP_FREE_PARAMS * params + HEAP_FREE_OPTIMIZER * optimizer)
    after = static + int(HEAP_FREE_ACTIVATIONS * saved)
    return HeapFree(static=static, after=after, live=max(static, after - saved))
