"""DeepSpeed 0.19's sizing rules, from tensor shapes alone (no torch, no deepspeed).

These are the rules the engine applies when it sizes its host buffers and
decides what to swap; the what-if estimator is built on them and tests
check measured runs against them. Each function names the DeepSpeed code it
mirrors.
"""
AIO_ALIGNED_BYTES = 1024  # swap_tensor/constants.py
MIN_AIO_BYTES = 1024 * 1024  # swap_tensor/constants.py


def aligned_numel(numel, element_size, intra_op_parallelism=1):
    """`_io_aligned_numel`: elements rounded up to 1024 x intra_op_parallelism bytes."""
    alignment = AIO_ALIGNED_BYTES * intra_op_parallelism // element_size
    return -(-int(numel) // alignment) * alignment


def min_swap_bytes(block_size):
    """`min_aio_bytes`: tensors smaller than this stay in RAM."""
    return max(MIN_AIO_BYTES, block_size)


def swappable(numel, element_size, block_size):
    """`swappable_tensor`: a partition goes through NVMe only if it is at least min_aio_bytes."""
    return numel * element_size >= min_swap_bytes(block_size)


def sub_groups(numels, sub_group_size):
    """`DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups`: parameters in
    order, a sub-group closes once it reaches sub_group_size elements (so one
    parameter larger than it is a sub-group of its own). Returns lists of numels."""
    numels = list(numels)
    if sub_group_size is None or sub_group_size >= sum(numels):
        return [numels]
    groups, current, size = [], [], 0
    for index, numel in enumerate(numels):
        current.append(numel)
        size += numel
        if size >= sub_group_size or index == len(numels) - 1:
            groups.append(current)
            current, size = [], 0
    return groups


def largest_sub_group(numels, sub_group_size):
    """The sub-group with most elements (first on ties), as in stage3.py."""
    best = []
    for group in sub_groups(numels, sub_group_size):
        if sum(group) > sum(best):
            best = group
    return best


MIN_STAGING_ELEMENTS = 1 << 22  # below this, streaming a slice costs more in I/O calls than it saves
STAGING_ALIGNMENT = 1024  # elements: 4 KiB in fp32, 2 KiB in bf16, O_DIRECT-safe for either


def staging_plan(numels, sub_group_size, staging_elements="auto"):
    """Bounded optimizer staging (memascend.optimizer_staging=bounded).

    Returns {"bound": B, "streamed": [sub-group indices], "largest_kept_group": numels}.
    auto B: the largest sub-group of more than one parameter (those cannot be
    streamed), else the largest sub-group smaller than the largest; never below
    MIN_STAGING_ELEMENTS unless the largest sub-group is smaller. A sub-group
    that is one parameter of more than B elements is streamed through B-element
    slices; the others keep DeepSpeed's whole-sub-group path."""
    groups = sub_groups(numels, sub_group_size)
    sizes = [sum(g) for g in groups]
    largest = max(sizes)
    if staging_elements == "auto":
        multi = [s for g, s in zip(groups, sizes) if len(g) > 1]
        smaller = [s for s in sizes if s < largest]
        bound = max(multi) if multi else (max(smaller) if smaller else largest)
        bound = min(largest, max(bound, MIN_STAGING_ELEMENTS))
    else:
        bound = int(staging_elements)
    bound = -(-bound // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
    streamed = [i for i, (g, s) in enumerate(zip(groups, sizes)) if len(g) == 1 and s > bound]
    kept = [i for i in range(len(groups)) if i not in streamed]
    keep = max(kept, key=lambda i: sizes[i]) if kept else None
    return {"bound": bound, "streamed": streamed,
            "largest_kept_group": groups[keep] if keep is not None else [min(bound, largest)],
            "largest_multi_group": max([s for g, s in zip(groups, sizes) if len(g) > 1], default=0)}


def nvme_footprint(numels, param_bytes, block_size, sub_group_size, intra_op_parallelism=1, params_on_nvme=True,
                   optimizer_on_nvme=True, groups=None):
    """Bytes the swap files hold: swappable parameter partitions in the model
    dtype, and per swappable sub-group its fp32 master, two Adam states and
    gradient (DeepSpeed writes each aligned to 1024 x intra_op_parallelism bytes)."""
    total = 0
    if params_on_nvme:
        total += sum(aligned_numel(n, param_bytes, intra_op_parallelism) * param_bytes
                     for n in numels if swappable(n, param_bytes, block_size))
    if optimizer_on_nvme:
        for group in groups if groups is not None else sub_groups(numels, sub_group_size):
            size = sum(group)
            if swappable(size, 4, block_size):
                total += 4 * aligned_numel(size, 4, intra_op_parallelism) * 4
    return total


# =====================================================================================
# What-if estimate: host memory (and GPU memory, NVMe, I/O) of one configuration,
# from the model's shapes and the knobs alone. docs/SIZING.md explains every term.
# =====================================================================================
from dataclasses import dataclass, field
from typing import Optional

from . import components as C

MiB = 1 << 20
GiB = 1 << 30
PAGE_BYTES = 4096  # x86-64 / aarch64 default page; native pinning and the aio allocator round to it
FP32 = 4
NORM_BUFFER_ELEMENTS = 250_000_000  # stage3 `_constant_buffered_norm2(buffer_size=250000000)`
FUSED_CHUNK_ELEMENTS = 1 << 20  # memlab.engine.memascend.fused_checks.CHUNK
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc

# --- calibrated on this machine (2 cores, torch 2.13 CPU, DeepSpeed 0.19.8, transformers 5.x);
# docs/SIZING.md ("Calibrated terms") says on which runs.
FRAMEWORK_BYTES = 352 * MiB  # interpreter + torch + deepspeed + transformers, RSS before the model is built
RUNTIME_BYTES = 90 * MiB  # what the engine holds beyond its buffers after initialize (aio threads, CPU Adam, graphs)
# glibc arenas' free bytes (heap_free): tensors below 32 MiB come from the heap, and what is freed there stays
# as free chunks. Fitted by least squares on 30 runs (docs/SIZING.md): a floor, plus these multiples of the
# heap-sized bytes of ...
HEAP_FREE_BASE = 20 * MiB
HEAP_FREE_PARAMS = 2.0  # ... parameters (each parameter's gradient and its copies)
HEAP_FREE_OPTIMIZER = 1.1  # ... the optimizer transients (fp64 norm copy, first-step Adam state)
HEAP_FREE_ACTIVATIONS = 1.4  # ... the saved activations (freed in backward, with their gradients)

PHASES = ("model_init", "engine_init", "forward", "backward", "optimizer_step_first", "optimizer_step")
ACCELERATORS = ("cpu", "cuda")


class SizingError(ValueError):
    """A hardware description or fit request memlab cannot use (one-line message)."""


@dataclass(frozen=True)
class Hardware:
    """The machine an estimate is for. `ram_bytes` and `gpu_bytes` are budgets
    (per node, per GPU); None means "not given". `accelerator="cpu"` is
    DeepSpeed's CPU accelerator (device-side tensors are host memory);
    "cuda" puts activations, gathered parameters and reduce buckets on the GPUs."""

    ram_bytes: Optional[int] = None
    gpus: int = 0  # per node
    gpu_bytes: Optional[int] = None  # per GPU
    ranks_per_node: int = 1
    nodes: int = 1
    accelerator: str = "cpu"

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise SizingError(f"hardware.accelerator={self.accelerator!r}: must be cpu or cuda")
        for name in ("ranks_per_node", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SizingError(f"hardware.{name}={value!r}: must be a whole number >= 1")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise SizingError(f"hardware.gpus={self.gpus!r}: must be a whole number >= 0")
        for name in ("ram_bytes", "gpu_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SizingError(f"hardware.{name}={value!r}: must be a positive number of bytes or None")
        if self.accelerator == "cuda" and self.gpus and self.ranks_per_node > self.gpus:
            raise SizingError(f"hardware.ranks_per_node={self.ranks_per_node}: more ranks than the {self.gpus} GPUs "
                              f"of a node (one rank per GPU)")

    @property
    def world_size(self):
        return self.ranks_per_node * self.nodes

    @property
    def cuda(self):
        return self.accelerator == "cuda"

    @classmethod
    def cuda_node(cls, gpus=1, gpu_bytes=80 * GiB, ram_bytes=None, nodes=1):
        """A CUDA node with one rank per GPU."""
        return cls(ram_bytes=ram_bytes, gpus=gpus, gpu_bytes=gpu_bytes, ranks_per_node=max(1, gpus), nodes=nodes,
                   accelerator="cuda")

    @classmethod
    def this_machine(cls):
        """This machine: its RAM, the CPU accelerator, one rank."""
        import os

        return cls(ram_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def to_dict(self):
        return {"ram_bytes": self.ram_bytes, "gpus": self.gpus, "gpu_bytes": self.gpu_bytes,
                "ranks_per_node": self.ranks_per_node, "nodes": self.nodes, "accelerator": self.accelerator}


@dataclass(frozen=True)
class Buffer:
    """One host allocation as the probes record it (an `alloc` event)."""

    component: str
    requested: int
    reserved: int
    backend: str  # aio-mlock | native-mlock | torch-pinned | pageable
    what: str = ""


def page_round(nbytes):
    return -(-int(nbytes) // PAGE_BYTES) * PAGE_BYTES


def pow2_round(nbytes):
    """PyTorch's CachingHostAllocator: a pinned block is the next power of two."""
    return 1 << max(int(nbytes) - 1, 0).bit_length()


@dataclass
class Estimate:
    """What one configuration needs, per rank unless a field says per node.

    `phases[name][component]` is host bytes during each phase; the peak is the
    largest phase. Components use the probes' names (memlab.components), in the
    meaning DESIGN.md gives them; `as_probed()` re-attributes them the way the
    probes can observe them, for comparison with a measured run."""

    model: str
    engine: str
    knobs: dict
    hardware: Hardware
    buffers: list
    phases: dict
    peak_phase: str
    gpu: Optional[dict]
    nvme_bytes: int
    swap_per_step: dict
    swap_first_step: dict
    tokens: int
    notes: list = field(default_factory=list)
    probe_hidden: dict = field(default_factory=dict)  # phase -> bytes the probes cannot see (optimizer transients)

    # -- per rank ----------------------------------------------------------------------
    @property
    def components(self):
        """Host bytes by component at the peak phase."""
        return dict(self.phases[self.peak_phase])

    @property
    def peak_host_bytes(self):
        return _rss(self.phases[self.peak_phase])

    @property
    def peak_engine_host_bytes(self):
        return max(_engine(p) for p in self.phases.values())

    @property
    def pinned_reserved_bytes(self):
        return sum(b.reserved for b in self.buffers if b.backend != "pageable")

    @property
    def pinned_requested_bytes(self):
        return sum(b.requested for b in self.buffers if b.backend != "pageable")

    @property
    def locked_bytes(self):
        """Bytes mlock'ed (VmLck): the aio pools and, with native pinning, the pinned buffers."""
        return sum(b.reserved for b in self.buffers if b.backend in ("aio-mlock", "native-mlock"))

    @property
    def swap_read_bytes_per_step(self):
        return sum(v for k, v in self.swap_per_step.items() if k.startswith("in."))

    @property
    def swap_write_bytes_per_step(self):
        return sum(v for k, v in self.swap_per_step.items() if k.startswith("out."))

    # -- per node -------------------------------------------------------------------------
    @property
    def node_peak_host_bytes(self):
        return self.peak_host_bytes * self.hardware.ranks_per_node

    @property
    def node_components(self):
        return {k: v * self.hardware.ranks_per_node for k, v in self.components.items()}

    @property
    def node_pinned_reserved_bytes(self):
        return self.pinned_reserved_bytes * self.hardware.ranks_per_node

    @property
    def node_nvme_bytes(self):
        return self.nvme_bytes * self.hardware.ranks_per_node

    @property
    def gpu_peak_bytes(self):
        return None if self.gpu is None else self.gpu["total"]

    # -- budgets --------------------------------------------------------------------------
    def fits(self, ram_bytes=None, gpu_bytes=None):
        """Whether the node's host peak fits `ram_bytes` (default: hardware.ram_bytes)
        and each GPU's peak fits `gpu_bytes` (default: hardware.gpu_bytes)."""
        ram = self.hardware.ram_bytes if ram_bytes is None else ram_bytes
        gpu = self.hardware.gpu_bytes if gpu_bytes is None else gpu_bytes
        if ram is not None and self.node_peak_host_bytes > ram:
            return False
        if gpu is not None and self.gpu is not None and self.gpu["total"] > gpu:
            return False
        return True

    def largest_component(self, include_framework=False):
        parts = {k: v for k, v in self.components.items() if include_framework or k != C.FRAMEWORK}
        return max(parts, key=parts.get)

    # -- the probes' view -------------------------------------------------------------------
    def as_probed(self):
        """Per phase, components as the probes attribute them: transients they
        cannot see (first-step Adam state, fp64 norm copy, dtype copies) go to
        `other`. RSS is unchanged."""
        out = {}
        for phase, parts in self.phases.items():
            parts = dict(parts)
            hidden = self.probe_hidden.get(phase, 0)
            parts[C.OPTIMIZER_TRANSIENTS] -= hidden
            parts[C.OTHER] += hidden
            out[phase] = parts
        return out

    @property
    def probed_peak_engine_host_bytes(self):
        """`peak_engine_host_bytes` as a run's summary measures it (probes' attribution)."""
        return max(_engine(p) for p in self.as_probed().values())

    # -- output -------------------------------------------------------------------------------
    def to_dict(self):
        return {
            "model": self.model, "engine": self.engine, "hardware": self.hardware.to_dict(), "tokens": self.tokens,
            "peak_phase": self.peak_phase, "peak_host_bytes": self.peak_host_bytes,
            "peak_engine_host_bytes": self.peak_engine_host_bytes,
            "node_peak_host_bytes": self.node_peak_host_bytes,
            "components": self.components, "node_components": self.node_components,
            "phases": {k: dict(v) for k, v in self.phases.items()},
            "pinned_reserved_bytes": self.pinned_reserved_bytes, "pinned_requested_bytes": self.pinned_requested_bytes,
            "locked_bytes": self.locked_bytes,
            "buffers": [b.__dict__.copy() for b in self.buffers],
            "gpu": None if self.gpu is None else dict(self.gpu),
            "nvme_bytes": self.nvme_bytes, "node_nvme_bytes": self.node_nvme_bytes,
            "swap_per_step": dict(self.swap_per_step), "swap_first_step": dict(self.swap_first_step),
            "swap_read_bytes_per_step": self.swap_read_bytes_per_step,
            "swap_write_bytes_per_step": self.swap_write_bytes_per_step,
            "fits": self.fits() if (self.hardware.ram_bytes or self.hardware.gpu_bytes) else None,
            "knobs": dict(self.knobs), "notes": list(self.notes),
        }

    def table(self):
        """The estimate as plain text (what `memlab estimate` prints)."""
        hw = self.hardware
        lines = [f"{self.model}  engine={self.engine}  {self.knobs['run.micro_batch']} x {self.knobs['run.seq_len']} "
                 f"tokens  {self.knobs['run.dtype']}  {hw.accelerator}  {hw.ranks_per_node} rank(s)/node x "
                 f"{hw.nodes} node(s)", f"host memory per rank at the peak ({self.peak_phase}):"]
        for name in C.ALL:
            value = self.components.get(name, 0)
            if value:
                lines.append(f"  {name:24s} {_fmt(value):>12s}")
        lines.append(f"  {'peak host':24s} {_fmt(self.peak_host_bytes):>12s}")
        if hw.ranks_per_node > 1:
            lines.append(f"  {'peak host per node':24s} {_fmt(self.node_peak_host_bytes):>12s}")
        lines.append(f"  {'engine host (peak)':24s} {_fmt(self.peak_engine_host_bytes):>12s}")
        lines.append(f"  {'pinned reserved/requested':24s} {_fmt(self.pinned_reserved_bytes):>12s} / "
                     f"{_fmt(self.pinned_requested_bytes)}  (locked {_fmt(self.locked_bytes)})")
        if self.gpu is not None:
            g = self.gpu
            lines.append(f"GPU per device: {_fmt(g['total'])} (params {_fmt(g['params_gathered'] + g['persistent_params'])},"
                         f" activations {_fmt(g['activations'])}, reduce bucket {_fmt(g['reduce_bucket'])}; "
                         f"with gradient checkpointing {_fmt(g['activations_checkpointed'])}, "
                         f"without {_fmt(g['activations_full'])})")
        lines.append(f"NVMe per rank: {_fmt(self.nvme_bytes)};  swapped per step: read "
                     f"{_fmt(self.swap_read_bytes_per_step)}, write {_fmt(self.swap_write_bytes_per_step)}")
        if hw.ram_bytes or hw.gpu_bytes:
            lines.append(f"fits: {'yes' if self.fits() else 'NO'}"
                         + (f" (RAM {_fmt(hw.ram_bytes)})" if hw.ram_bytes else "")
                         + (f" (GPU {_fmt(hw.gpu_bytes)})" if hw.gpu_bytes else ""))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"<Estimate {self.model} {self.engine} peak {_fmt(self.peak_host_bytes)} ({self.peak_phase}), "
                f"engine {_fmt(self.peak_engine_host_bytes)}>")


def _fmt(n):
    if n is None:
        return "–"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def _rss(parts):
    return sum(v for k, v in parts.items() if k not in C.OUTSIDE_RSS)


def _engine(parts):
    return sum(v for k, v in parts.items() if k not in C.NOT_ENGINE)


class _Partitioned:
    """A model as one of `world` ranks sees it: every partition ceil(numel / world)
    (stage3 `_aligned_size` // world). Duck-types what ResolvedKnobs reads."""

    def __init__(self, model, world, full=None):
        from .models import TensorSpec

        self.model = model
        self.name = model.name
        self.full = full if full is not None else model.tensors()  # derived once per estimate
        if world == 1:
            self._tensors = self.full
        else:
            self._tensors = [TensorSpec(t.name, t.shape, -(-t.numel // world)) for t in self.full]
        self.num_params = sum(t.numel for t in self._tensors)
        self.largest_tensor = max(self._tensors, key=lambda t: t.numel)

    def tensors(self):
        return list(self._tensors)


def _module_groups(names):
    """Index lists of tensors gathered together: a module's own tensors with its
    direct children's (transformers' initialize_weights under ZeRO-3; in backward
    the projections of one attention block or one MLP)."""
    groups = {}
    for index, name in enumerate(names):
        module = name.rsplit(".", 1)[0]
        parent = module.rsplit(".", 1)[0] if "." in module else ""
        for group in {module, parent}:
            groups.setdefault(group, []).append(index)
    return list(groups.values())


def _saved_per_token(spec, e):
    """Bytes autograd saves per token of one decoder layer (transformers' Llama /
    Mistral / Qwen2 with sdpa attention; measured with saved_tensors_hooks): two
    RMSNorms (fp32 input, fp32 rms, normed and weighted in the dtype), q and the
    attention output, k and v (not repeated for GQA), sdpa's fp32 logsumexp per
    head, and the MLP's gate, up, act(gate) and down input."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    norm = FP32 * h + FP32 + 2 * e * h
    return 2 * norm + e * (2 * q + 2 * kv) + FP32 * spec.num_heads + 4 * e * i


def _heap_parts(spec, full, e, T, checkpointing, cpu_checkpointing, largest_grad, first_step_state, fused):
    """Heap-sized bytes (tensors below glibc's largest mmap threshold, 32 MiB) of the parameters, the
    optimizer transients and the saved activations: what can end up as free chunks in glibc's arenas."""
    limit = GLIBC_MMAP_THRESHOLD_MAX

    def heap(nbytes):
        return nbytes if nbytes < limit else 0

    params = sum(heap(n * e) for n in full)
    optimizer = heap(8 * min(largest_grad, FUSED_CHUNK_ELEMENTS if fused else NORM_BUFFER_ELEMENTS)) + heap(
        first_step_state)
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layer = [T * h * FP32, T * FP32, T * h * e, T * h * e] * 2 + [T * q * e] * 2 + [T * kv * e] * 2 + [
        T * spec.num_heads * FP32] + [T * i * e] * 4

    per_layer = sum(heap(b) for b in layer)
    if checkpointing:
        saved = (0 if cpu_checkpointing else spec.num_layers * heap(T * h * e)) + per_layer
    else:
        saved = spec.num_layers * per_layer
    saved += 2 * heap(T * spec.vocab_size * FP32)  # the logits and log_softmax's output
    return params, optimizer, saved


def estimate(model, knobs=None, hardware=None, engine=None):
    """Predict host memory (per component and phase), pinned bytes, GPU memory,
    NVMe footprint and bytes swapped per step for one configuration.

    `model`: preset name, config.json path, checkpoint folder, dict or ModelSpec.
    `knobs`: Knobs, a dict of dotted knob names, or None (defaults).
    `hardware`: Hardware (default: this machine, CPU accelerator, one rank).
    `engine`: "deepspeed" or "memascend" sets every memascend.* switch.
    Raises the same KnobError as validation for the traps DeepSpeed crashes on."""
    from .knobs import Knobs
    from .models import ModelSpec

    spec = ModelSpec.resolve(model)
    if knobs is None:
        knobs = Knobs(engine=engine or "deepspeed")
    elif isinstance(knobs, dict):
        knobs = Knobs(knobs, engine=engine or "deepspeed")
    elif engine is not None and engine != knobs.engine:
        knobs = knobs.with_engine(engine)
    hw = hardware if hardware is not None else Hardware()
    if not isinstance(hw, Hardware):
        raise SizingError(f"hardware: expected memlab.sizing.Hardware, got {type(hw).__name__}")
    # "auto" and the traps are resolved against the whole model, as Lab.run does for any number of ranks;
    # the buffers are then sized by each rank's partitions
    whole = _Partitioned(spec, 1)
    resolved = knobs.resolve(whole, accelerator=hw.accelerator)
    view = whole if hw.world_size == 1 else _Partitioned(spec, hw.world_size, whole.full)
    return _estimate(spec, view, resolved, hw)


def _estimate(spec, view, r, hw):
    v = r.values
    world = hw.world_size
    tensors = view.tensors()
    names = [t.name for t in tensors]
    parts = [t.numel for t in tensors]  # partition numel per rank
    full = [t.numel for t in view.full] if world > 1 else parts
    P = sum(parts)
    e = _DTYPE_BYTES[v["run.dtype"]]
    e_g = _DTYPE_BYTES[v["data_types.grad_accum_dtype"] or v["run.dtype"]]
    io = v["aio.intra_op_parallelism"]
    block = v["aio.block_size"]
    m = min_swap_bytes(block)
    params_nvme = v["zero_optimization.offload_param.device"] == "nvme"
    opt_nvme = v["zero_optimization.offload_optimizer.device"] == "nvme"
    native = v["allocator.DS_PIN_MEMORY_BACKEND"] == "native"
    adaptive = v.get("memascend.pool") == "adaptive"
    bounded = v.get("memascend.optimizer_staging") == "bounded" and opt_nvme
    fused = v.get("memascend.grad_checks") == "fused"
    cuda = hw.cuda
    notes = []

    def pinned(component, nbytes, what, pin=True):
        """A buffer that goes through accelerator.pin_memory."""
        if not pin:
            return Buffer(component, nbytes, nbytes, "pageable", what)
        if native:
            return Buffer(component, nbytes, page_round(nbytes), "native-mlock", what)
        if cuda:
            return Buffer(component, nbytes, pow2_round(nbytes), "torch-pinned", what)
        return Buffer(component, nbytes, nbytes, "pageable", what)  # CPU accelerator: pin_memory is a no-op

    buffers = []
    groups = sub_groups(parts, v["zero_optimization.sub_group_size"])
    group_sizes = [sum(g) for g in groups]
    largest_group_index = max(range(len(groups)), key=lambda i: group_sizes[i])  # first of equals, as stage3
    swap_floor = -(-m // e)  # elements: a partition of at least this many is swapped
    swapped = [params_nvme and n >= swap_floor for n in parts]

    # -- how much of the model stays in a CPU flat buffer (max_in_cpu trap) -------------------
    # stage3 gives the leading sub-groups that fit in min(P, max_in_cpu) elements a place in the flat buffer
    # (_create_fp16_partitions_with_defragmentation): their partitions, small ones too, move there
    if params_nvme:
        max_in_cpu = v["zero_optimization.offload_param.max_in_cpu"]
        flat_elements = min(P, max_in_cpu)
        real_swapping = P > max_in_cpu
    else:
        flat_elements, real_swapping = P, False
    in_flat = [False] * len(parts)
    offset = index = 0
    for group, size in zip(groups, group_sizes):
        covered = offset + size <= max(flat_elements, 1)
        for _ in group:
            in_flat[index] = covered or not params_nvme
            index += 1
        offset += size
    swapped_in_training = [s and not f for s, f in zip(swapped, in_flat)]

    # -- parameter swap pool (partitioned_param_swapper._configure_aio) ------------------------
    module_groups = _module_groups(names)
    if params_nvme and not (v["aio.use_gds"] and cuda):
        if adaptive:
            classes = {}
            for group in module_groups:
                counts = {}
                for index in group:
                    if swapped[index]:
                        size = aligned_numel(parts[index], e, io)
                        counts[size] = counts.get(size, 0) + 1
                for size, count in counts.items():
                    classes[size] = max(classes.get(size, 0), count)
            for size in sorted(classes, reverse=True):
                for _ in range(classes[size]):
                    buffers.append(Buffer(C.PARAM_POOL, size * e, page_round(size * e), "aio-mlock",
                                          f"adaptive pool: {size} elements"))
        else:
            count = v["zero_optimization.offload_param.buffer_count"]
            nbytes = count * aligned_numel(v["zero_optimization.offload_param.buffer_size"], e, io) * e
            buffers.append(Buffer(C.PARAM_POOL, nbytes, page_round(nbytes), "aio-mlock",
                                  f"{count} x buffer_size"))

    # -- small partitions (Init._partition_param): not swappable, kept in RAM ------------------
    persistence = v["zero_optimization.stage3_param_persistence_threshold"]
    pin_params = v["zero_optimization.offload_param.pin_memory"]
    for index, n in enumerate(parts):
        if params_nvme and not swapped[index] and not in_flat[index]:
            persistent_on_gpu = cuda and full[index] <= persistence
            if not persistent_on_gpu:
                buffers.append(pinned(C.SMALL_PARTITIONS, n * e, names[index], pin=pin_params))

    # -- CPU flat parameter buffer (stage3 _create_param_groups_fp16_flat_cpu_memory) ----------
    if flat_elements > 0:
        buffers.append(pinned(C.PARAM_CPU_FLAT, flat_elements * e, "min(P, max_in_cpu) elements"))

    # -- partitioned swap buffer (stage3: reserve_partitioned_swap_space) ----------------------
    if params_nvme and real_swapping:
        largest = groups[largest_group_index]
        start = sum(len(g) for g in groups[:largest_group_index])
        numels = full[start:start + len(largest)] if world > 1 else largest
        if bounded and len(largest) == 1 and largest[0] > v["memascend.staging_elements"]:
            numels = r.staging_plan["largest_kept_group"]
        nbytes = sum(aligned_numel(n, e, io) for n in numels) * e
        buffers.append(Buffer(C.PARAM_PARTITION_BUFFER, nbytes, page_round(nbytes), "aio-mlock",
                              "largest sub-group's partitions"))

    # -- optimizer: NVMe pool, or state in RAM -------------------------------------------------
    ratio = v["zero_optimization.offload_optimizer.ratio"]
    first_offloaded = int((1 - ratio) * len(groups)) if ratio < 1 else 0
    swappable_groups = [i for i, s in enumerate(group_sizes)
                        if opt_nvme and i >= first_offloaded and swappable(s, FP32, block)]
    swappable_set = set(swappable_groups)
    state_groups = [i for i in range(len(groups)) if i not in swappable_set]
    if opt_nvme:
        largest_numel = max(group_sizes)
        if bounded:
            largest_numel = min(largest_numel, v["memascend.staging_elements"])
        per = aligned_numel(largest_numel, FP32, io) * FP32
        for _ in range(v["zero_optimization.offload_optimizer.buffer_count"]):
            buffers.append(Buffer(C.OPTIMIZER_POOL, per, page_round(per), "aio-mlock", "largest sub-group, fp32"))
    pin_opt = v["zero_optimization.offload_optimizer.pin_memory"]
    state_elements = sum(group_sizes[i] for i in state_groups)
    for i in state_groups:  # sub-groups whose optimizer state stays in RAM (16 bytes per element)
        nbytes = FP32 * group_sizes[i]
        buffers.append(Buffer(C.OPTIMIZER_STATE, nbytes, nbytes, "pageable", f"sub-group {i} fp32 master weights"))
        # stage3 initialize_optimizer_states: a pinned fp32 gradient per such sub-group (kept)
        buffers.append(pinned(C.OPTIMIZER_TRANSIENTS, nbytes, f"sub-group {i} fp32 gradient", pin=pin_opt))
    adam_state_bytes = 2 * FP32 * state_elements  # created by CPU Adam at the first step, kept
    lazy = [Buffer(C.OPTIMIZER_STATE, FP32 * group_sizes[i], FP32 * group_sizes[i], "pageable",
                   f"sub-group {i} Adam {name} (first step)") for i in state_groups for name in ("exp_avg", "exp_avg_sq")]

    # -- gradient flat buffer (stage3 _setup_for_real_optimizer) --------------------------------
    buffers.append(pinned(C.GRAD_FLAT, P * e_g, "one element per parameter partition", pin=pin_opt))

    persistent = {name: 0 for name in C.ALL}
    for b in buffers:
        persistent[b.component] += b.reserved
    model_init_buffers = {name: 0 for name in C.ALL}
    for b in buffers:
        if b.component in (C.PARAM_POOL, C.SMALL_PARTITIONS):
            model_init_buffers[b.component] += b.reserved

    # -- device-side tensors (activations, gathered params, reduce bucket) ---------------------
    T = v["run.micro_batch"] * v["run.seq_len"]
    V, h = spec.vocab_size, spec.hidden_size
    L = spec.num_layers
    per_layer = _saved_per_token(spec, e)
    rope = 2 * T * spec.head_dim * e
    ids = 16 * T + 8
    final_norm = T * (FP32 * h + FP32 + 2 * e * h)
    logits_fp32 = T * V * FP32
    logits_out = T * V * e + (logits_fp32 if e != FP32 else 0)  # lm_head output (+ its fp32 upcast for the loss)
    checkpointing = v["run.gradient_checkpointing"]
    saved_full = L * T * per_layer + rope + ids + final_norm
    # DeepSpeed's own knob for offloading activation checkpoints to host memory (a ds_config section memlab
    # passes through): each layer's checkpoint (its input) goes through accelerator.pin_memory.
    passthrough = getattr(r.knobs, "passthrough", {}) or {}
    cpu_checkpointing = checkpointing and bool((passthrough.get("activation_checkpointing") or {}).get(
        "cpu_checkpointing"))
    checkpoint_buffers = []
    if cpu_checkpointing:
        checkpoint_buffers = [pinned(C.OFFLOADED_CHECKPOINTS, T * h * e, f"layer {i} activation checkpoint (per step)")
                              for i in range(L)]
    offloaded = sum(b.reserved for b in checkpoint_buffers)
    saved_ckpt = (0 if cpu_checkpointing else L * T * h * e) + rope + ids + final_norm
    saved = saved_ckpt if checkpointing else saved_full
    lm_head_bytes = V * h * e
    tied = spec.tied_embeddings
    module_sizes = [sum(full[i] for i in g) for g in module_groups]
    group_params = max(module_sizes)
    ends = ("embed_tokens.weight", "lm_head.weight")
    layer_grads = max([size for g, size in zip(module_groups, module_sizes)
                       if not any(names[i].endswith(ends) for i in g)], default=0) * e
    bucket = min(v["zero_optimization.reduce_bucket_size"], sum(full)) * e if v[
        "zero_optimization.contiguous_gradients"] else 0

    # -- in backward, each reduced bucket of gradients is partitioned (stage3 partition_grads): at the
    # accumulation boundary every gradient's norm goes through an fp64 copy (_constant_buffered_norm2), and the
    # bucket's gradients of swapped sub-groups are kept as device-side fp32 tensors until written out together.
    largest_grad = max(parts)
    norm_copy = 8 * min(largest_grad, FUSED_CHUNK_ELEMENTS if fused else NORM_BUFFER_ELEMENTS)
    swapped_grad_elements = sum(group_sizes[i] for i in swappable_groups)
    bucket_elements = min(max(v["zero_optimization.reduce_bucket_size"], largest_grad), swapped_grad_elements)
    dtype_copies = FP32 * bucket_elements if e_g != FP32 else 0  # fp32 on the CPU accelerator: no copy
    boundary = norm_copy + dtype_copies  # device tensors: host RAM on the CPU accelerator
    overflow = P if (v["run.dtype"] == "fp16" and not fused) else 0  # has_overflow: isinf / isnan bool temporaries
    kept = [i for i in swappable_groups
            if not (bounded and len(groups[i]) == 1 and group_sizes[i] > v["memascend.staging_elements"])]
    first_step_state = 2 * FP32 * max([group_sizes[i] for i in kept], default=0)  # CPU Adam's lazy exp_avg/exp_avg_sq
    lingering = 0
    if v["zero_optimization.offload_optimizer.pipeline_read"] or v["zero_optimization.offload_optimizer.pipeline_write"]:
        # PipelinedOptimizerSwapper copies the first step's pageable Adam states into its buffers but keeps
        # them referenced (no release_memory) until the sub-group is swapped in again at step 2: every
        # swapped sub-group's states stay resident through step 2's forward and backward.
        lingering = 2 * FP32 * sum(group_sizes[i] for i in kept)
        first_step_state = max(first_step_state, lingering)

    forward = saved + logits_out + logits_fp32  # the loss: logits and log_softmax's saved output
    backward_candidates = {
        "loss": saved + 3 * logits_fp32,  # log_softmax output, its gradient and the logits' gradient
        "lm_head": saved + logits_fp32 + lm_head_bytes,  # lm_head weight gradient, logits gradient live
        "last layer": saved + layer_grads + 2 * T * h * e,
        "embedding": lm_head_bytes * (2 if tied else 1),  # tied: the lm_head gradient waits for the embedding's
        "boundary": boundary,
    }
    if checkpointing:
        backward_candidates["recompute"] = saved + T * per_layer + layer_grads + 2 * T * h * e
    if cuda:
        backward_candidates.pop("boundary")
    backward_where = max(backward_candidates, key=backward_candidates.get)
    backward = backward_candidates[backward_where]
    gathered_host = 0
    if world > 1 and not cuda:  # all-gathered full parameters are device tensors (host on the CPU accelerator)
        gathered_host = group_params * e

    # -- calibrated terms -----------------------------------------------------------------------------
    heap_params, heap_optimizer, heap_saved = _heap_parts(spec, full, e, T, checkpointing, cpu_checkpointing,
                                                          largest_grad, first_step_state, fused)
    if cuda:
        heap_saved = 0  # activations are GPU memory
    # Once the first backward has freed the activations, their chunks stay in glibc's arenas: heap_free is
    # largest after backward (optimizer step). In later forwards and backwards the activations live inside
    # those chunks again, so the arena (free + live activation bytes) does not shrink below that size.
    heap_static = int(HEAP_FREE_BASE + HEAP_FREE_PARAMS * heap_params + HEAP_FREE_OPTIMIZER * heap_optimizer)
    heap_after = heap_static + int(HEAP_FREE_ACTIVATIONS * heap_saved)
    heap_live = max(heap_static, heap_after - heap_saved)

    def phase(buffers_by_component, activations=0, transients=0, extra_other=0, state=0, checkpoints=0,
              heap_free=heap_static):
        out = dict(buffers_by_component)
        out[C.OFFLOADED_CHECKPOINTS] += int(checkpoints)
        out[C.FRAMEWORK] = FRAMEWORK_BYTES
        out[C.ACTIVATIONS] = int(activations)
        out[C.OPTIMIZER_TRANSIENTS] += int(transients)
        out[C.OPTIMIZER_STATE] += int(state)
        out[C.HEAP_FREE] = heap_free
        out[C.OTHER] = int(RUNTIME_BYTES + extra_other)
        return out

    device = 0 if cuda else 1  # device-side tensors are host memory only on the CPU accelerator
    largest_full = max(full) * e
    phases = {
        "model_init": phase(model_init_buffers, extra_other=2 * largest_full - RUNTIME_BYTES),
        "engine_init": phase(persistent, extra_other=FP32 * max(group_sizes)),
        "forward": phase(persistent, device * (bucket + forward + gathered_host), state=adam_state_bytes,
                         checkpoints=offloaded, transients=lingering, heap_free=heap_live),
        "backward": phase(persistent, device * (bucket + backward + gathered_host), state=adam_state_bytes,
                          checkpoints=offloaded, transients=lingering, heap_free=heap_live),
        "optimizer_step_first": phase(persistent, device * bucket, transients=first_step_state + overflow,
                                      state=adam_state_bytes, heap_free=heap_after),
        "optimizer_step": phase(persistent, device * bucket, transients=overflow + lingering, state=adam_state_bytes,
                                heap_free=heap_after),
    }
    probe_hidden = {"forward": lingering, "backward": lingering, "optimizer_step_first": first_step_state + overflow,
                    "optimizer_step": overflow + lingering}
    peak_phase = max(PHASES, key=lambda p: _rss(phases[p]))

    # -- GPU per device (CUDA) --------------------------------------------------------------------------
    gpu = None
    if cuda:
        persistent_params = sum(n * e for n in full if n <= persistence)
        live = v["zero_optimization.stage3_max_live_parameters"]
        gathered = (group_params + min(live, sum(full))) * e
        act_full = max(saved_full + logits_out + logits_fp32,
                       max(saved_full + 3 * logits_fp32, saved_full + logits_fp32 + lm_head_bytes))
        act_ckpt = max(saved_ckpt + logits_out + logits_fp32, saved_ckpt + 3 * logits_fp32,
                       saved_ckpt + T * per_layer + layer_grads + 2 * T * h * e)
        activations = act_ckpt if checkpointing else act_full
        gpu = {
            "persistent_params": persistent_params,
            "params_gathered": gathered,
            "activations": activations,
            "activations_full": act_full,
            "activations_checkpointed": act_ckpt,
            "reduce_bucket": bucket,
            # on CUDA a bucket's offloaded gradients are copied to the device and kept until written out
            "boundary_gradients": FP32 * bucket_elements + norm_copy,
        }
        gpu["total"] = persistent_params + gathered + bucket + max(activations, gpu["boundary_gradients"])
        if v["aio.use_gds"] and params_nvme:
            count = v["zero_optimization.offload_param.buffer_count"]
            gpu["param_pool"] = count * aligned_numel(v["zero_optimization.offload_param.buffer_size"], e, io) * e
            gpu["total"] += gpu["param_pool"]
        notes.append("GPU figures follow DeepSpeed's source; memlab has not measured them on a GPU")

    # -- NVMe and I/O per step ------------------------------------------------------------------------------
    nvme = nvme_footprint(parts, e, block, v["zero_optimization.sub_group_size"], io, params_nvme, opt_nvme, groups)
    swap_steady, swap_first = _swap_per_step(v, spec, names, parts, groups, group_sizes, swappable_groups,
                                             swapped_in_training,
                                             e, io, real_swapping, bounded, checkpointing)
    if v["zero_optimization.stage3_max_reuse_distance"] > 0 and real_swapping:
        notes.append("stage3_max_reuse_distance > 0: parameter reads per step assume no reuse (an upper bound)")
    return Estimate(model=spec.name, engine=r.engine, knobs=dict(v), hardware=hw, buffers=buffers + lazy + checkpoint_buffers,
                    phases=phases,
                    peak_phase=peak_phase, gpu=gpu, nvme_bytes=nvme, swap_per_step=swap_steady,
                    swap_first_step=swap_first, tokens=T, notes=notes, probe_hidden=probe_hidden)


_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _swap_per_step(v, spec, names, parts, groups, group_sizes, swappable_groups, swapped, e, io, real_swapping,
                   bounded, checkpointing):
    """Bytes through the swap files per training step, by direction and kind, as
    the probes count them (`swap_by_kind`): steady state and the first step."""
    out = {}
    if real_swapping:
        uses = {}  # forward + backward fetches of each parameter
        for index, name in enumerate(names):
            if not swapped[index]:
                continue
            fetches = 2
            if spec.tied_embeddings and name == "model.embed_tokens.weight":
                fetches = 4  # the embedding and the lm_head each fetch it, in forward and backward
            elif checkpointing and name.startswith("model.layers."):
                # recomputed in backward; the layer's last module (down_proj) is still gathered from the
                # recompute when its backward runs, so it is not fetched a third time
                fetches = 2 if ".mlp.down_proj." in name else 3
            uses[index] = fetches
        aligned = {i: aligned_numel(parts[i], e, io) * e for i in uses}
        out["in.param"] = sum(aligned[i] * uses[i] for i in uses)
        out["out.param"] = sum(aligned.values())
    bound = v["memascend.staging_elements"]
    grad_floor = -(-min_swap_bytes(v["aio.block_size"]) // FP32)  # fp32 gradients below this stay in RAM
    grad_bytes = opt_bytes = 0
    for i in swappable_groups:
        group, size = groups[i], group_sizes[i]
        if bounded and len(group) == 1 and size > bound:  # streamed: read and written in bound-sized slices
            pieces = grads = [min(bound, size - start) for start in range(0, size, bound)]
        else:
            pieces, grads = [size], group  # one tensor per state; a gradient file per parameter
        opt_bytes += sum(aligned_numel(p, FP32, io) for p in pieces) * FP32
        grad_bytes += sum(aligned_numel(n, FP32, io) for n in grads if n >= grad_floor) * FP32
    if opt_bytes:
        out["out.optimizer"] = 3 * opt_bytes
        out["in.optimizer"] = 3 * opt_bytes
    if grad_bytes:
        out["out.gradient"] = grad_bytes
        out["in.gradient"] = grad_bytes
    first = dict(out)
    if opt_bytes:
        first["in.optimizer"] = opt_bytes  # no Adam state on disk yet: the master weights only
    return out, first


# =====================================================================================
# fit: the largest sequence length, micro batch or model that fits a budget
# =====================================================================================
TARGETS = ("seq_len", "micro_batch", "model")
SEARCH_LIMITS = {"seq_len": 1 << 22, "micro_batch": 1 << 16}


@dataclass
class FitResult:
    """The answer for one engine. `value` is the largest seq_len / micro_batch /
    model that fits (None: not even the smallest); `estimate` is at that value;
    `binding` names the component that stops it (the one that grows most from
    the last fitting to the first failing value, or the largest where nothing
    fits), prefixed "gpu:" when the GPU budget binds; `limit` says what ended
    the search: "ram", "gpu", or "search range"."""

    engine: str
    target: str
    value: object
    estimate: Optional[Estimate]
    binding: Optional[str]
    limit: str
    failing: Optional[Estimate] = None
    failing_value: object = None
    evaluated: int = 0
    errors: dict = field(default_factory=dict)  # model -> KnobError text (target="model")

    def to_dict(self):
        return {"engine": self.engine, "target": self.target, "value": self.value, "binding": self.binding,
                "limit": self.limit, "failing_value": self.failing_value, "evaluated": self.evaluated,
                "peak_host_bytes": None if self.estimate is None else self.estimate.peak_host_bytes,
                "node_peak_host_bytes": None if self.estimate is None else self.estimate.node_peak_host_bytes,
                "gpu_peak_bytes": None if self.estimate is None else self.estimate.gpu_peak_bytes,
                "errors": dict(self.errors)}


@dataclass
class FitReport:
    target: str
    ram_bytes: Optional[int]
    gpu_bytes: Optional[int]
    results: dict  # engine -> FitResult

    def __getitem__(self, engine):
        return self.results[engine]

    def to_dict(self):
        return {"target": self.target, "ram_bytes": self.ram_bytes, "gpu_bytes": self.gpu_bytes,
                "results": {k: r.to_dict() for k, r in self.results.items()}}

    def table(self):
        budget = []
        if self.ram_bytes:
            budget.append(f"RAM {_fmt(self.ram_bytes)} per node")
        if self.gpu_bytes:
            budget.append(f"GPU {_fmt(self.gpu_bytes)} per device")
        lines = [f"largest {self.target} that fits {' and '.join(budget) or '(no budget)'}:"]
        for engine, r in self.results.items():
            if r.value is None:
                what = "nothing fits"
            else:
                what = f"{r.value}" + (f" (peak {_fmt(r.estimate.node_peak_host_bytes)})" if r.estimate else "")
            binding = f"; binding: {r.binding}" if r.binding else ""
            lines.append(f"  {engine:10s} {what}{binding}  [{r.limit}]")
        return "\n".join(lines)


def _binding(fitting, failing, ram, gpu):
    """The component that stops growth: compare the failing estimate with the fitting one."""
    over_gpu = gpu is not None and failing.gpu is not None and failing.gpu["total"] > gpu
    over_ram = ram is not None and failing.node_peak_host_bytes > ram
    if over_gpu and not over_ram:
        parts = {k: failing.gpu[k] for k in ("persistent_params", "params_gathered", "activations", "reduce_bucket",
                                             "boundary_gradients")}
        base = {k: (fitting.gpu[k] if fitting is not None else 0) for k in parts}
        growth = {k: parts[k] - base[k] for k in parts}
        key = max(growth, key=growth.get) if fitting is not None and max(growth.values()) > 0 else max(parts, key=parts.get)
        return "gpu:" + key, "gpu"
    parts = failing.components
    if fitting is None:
        return failing.largest_component(), "ram"
    before = fitting.components
    growth = {k: parts.get(k, 0) - before.get(k, 0) for k in parts}
    key = max(growth, key=growth.get)
    if growth[key] <= 0:
        key = failing.largest_component()
    return key, "ram"


def fit(model=None, knobs=None, hardware=None, target="seq_len", models=None, ram_bytes=None, gpu_bytes=None,
        engines=("deepspeed", "memascend"), minimum=None, maximum=None, multiple_of=1):
    """The largest `target` (seq_len, micro_batch, or the largest of `models`)
    whose estimate fits `ram_bytes` per node (and `gpu_bytes` per GPU), for each
    engine. Budgets default to the hardware's. Bisection on the estimator:
    peak memory grows monotonically with sequence length and micro batch."""
    from .knobs import Knobs

    if target not in TARGETS:
        raise SizingError(f"target={target!r}: must be one of {', '.join(TARGETS)}")
    hw = hardware if hardware is not None else Hardware()
    ram = ram_bytes if ram_bytes is not None else hw.ram_bytes
    gpu = gpu_bytes if gpu_bytes is not None else hw.gpu_bytes
    if ram is None and gpu is None:
        raise SizingError("fit needs a budget: ram_bytes (per node) or gpu_bytes (per GPU), or hardware with one")
    if isinstance(knobs, dict) or knobs is None:
        base = Knobs(knobs or {})
    else:
        base = knobs
    multiple_of = max(1, int(multiple_of))
    results = {}
    for engine in engines:
        engine_knobs = base.with_engine(engine)
        if target == "model":
            if not models:
                raise SizingError("target='model' needs models=[...] (preset names, config paths or dicts)")
            results[engine] = _fit_models(models, engine_knobs, hw, ram, gpu, engine)
            continue
        if model is None:
            raise SizingError(f"target={target!r} needs a model")
        name = f"run.{target}"
        low = max(minimum or (2 if target == "seq_len" else 1), multiple_of)
        low = -(-low // multiple_of) * multiple_of
        high = maximum or SEARCH_LIMITS[target]

        count = 0

        def at(value):
            nonlocal count
            count += 1
            return estimate(model, engine_knobs.set({name: value}), hw)

        def ok(est):
            return est.fits(ram, gpu)

        first = at(low)
        if not ok(first):
            binding, limit = _binding(None, first, ram, gpu)
            results[engine] = FitResult(engine, target, None, None, binding, limit, first, low, count)
            continue
        good, good_est, bad, bad_est = low, first, None, None
        value = low
        while bad is None:
            value = min(value * 2, high)
            value -= value % multiple_of
            if value <= good:
                break
            est = at(value)
            if ok(est):
                good, good_est = value, est
                if value >= high:
                    break
            else:
                bad, bad_est = value, est
        if bad is None:
            results[engine] = FitResult(engine, target, good, good_est, None, "search range", None, None, count)
            continue
        while bad - good > multiple_of:
            mid = (good + bad) // 2
            mid -= mid % multiple_of
            if mid <= good:
                break
            est = at(mid)
            if ok(est):
                good, good_est = mid, est
            else:
                bad, bad_est = mid, est
        binding, limit = _binding(good_est, bad_est, ram, gpu)
        results[engine] = FitResult(engine, target, good, good_est, binding, limit, bad_est, bad, count)
    return FitReport(target, ram, gpu, results)


def _fit_models(models, knobs, hw, ram, gpu, engine):
    from .knobs import KnobError
    from .models import ModelSpec

    specs = [ModelSpec.resolve(m) for m in models]
    specs.sort(key=lambda s: s.num_params)
    best = best_est = failing = failing_value = None
    errors = {}
    count = 0
    for spec in specs:
        try:
            est = estimate(spec, knobs, hw)
        except KnobError as exc:
            errors[spec.name] = str(exc)
            continue
        count += 1
        if est.fits(ram, gpu):
            best, best_est = spec.name, est
        elif failing is None:
            failing, failing_value = est, spec.name
    binding = limit = None
    if failing is not None:
        binding, limit = _binding(best_est, failing, ram, gpu)
    return FitResult(engine, "model", best, best_est, binding, limit or "search range", failing, failing_value, count,
                     errors)
