"""The configuration as every component builder reads it: the knobs' values,
the model as one rank holds it, and what DeepSpeed derives from the two
(sub-groups, which partitions swap, which sit in the CPU flat buffer, which
sub-groups keep their optimizer state in RAM). The rules themselves are
memlab.ds_rules'."""
from dataclasses import dataclass

from ..ds_rules import (DTYPE_BYTES, FP32, min_swap_numel, module_groups, partition_numel, sub_groups,
                        swappable)


class Partitioned:
    """A model as one of `world` ranks sees it: every partition ceil(numel / world)
    (stage3 `_aligned_size` // world). Duck-types what ResolvedKnobs reads."""

    def __init__(self, model, world, full=None):
        from ..models import TensorSpec

        self.model = model
        self.name = model.name
        self.full = full if full is not None else model.tensors()  # derived once per estimate
        if world == 1:
            self._tensors = self.full
        else:
            self._tensors = [TensorSpec(t.name, t.shape, partition_numel(t.numel, world), t.dtype) for t in self.full]
        self.num_params = sum(t.numel for t in self._tensors)
        self.largest_tensor = max(self._tensors, key=lambda t: t.numel)

    def tensors(self):
        return list(self._tensors)


def pin_backend(values):
    """The backend accelerator.pin_memory runs on. Hook of memascend.pinning:
    `exact` pins on DeepSpeed's native backend (exact_pinning; the knobs set
    allocator.DS_PIN_MEMORY_BACKEND to match)."""
    if values.get("memascend.pinning") == "exact":
        return "native"
    return values["allocator.DS_PIN_MEMORY_BACKEND"]


def bounded(layout, staging):
    """memascend.optimizer_staging=bounded is in effect (it stages optimizer state swapped to NVMe only)."""
    return staging == "bounded" and layout.opt_nvme


def kept_groups(layout, staging):
    """Swapped sub-groups stepped whole by DeepSpeed: all of them, or none where bounded staging
    streams them (ds_rules.streamed_sub_group: every swapped one)."""
    return [] if bounded(layout, staging) else list(layout.swappable_groups)


@dataclass
class Layout:
    """One rank's view of one configuration. Sizes in elements unless named bytes."""

    spec: object  # ModelSpec
    values: dict  # the resolved knobs' values
    resolved: object  # ResolvedKnobs (its staging plan and pass-through ds_config sections)
    hardware: object  # Hardware
    cuda: bool  # the CUDA accelerator (else device-side tensors are host memory)
    world: int  # ranks in all
    names: list  # parameter names, in the model's order
    parts: list  # partition numel per rank
    full: list  # whole parameter numel (== parts on one rank)
    numel: int  # parameter elements this rank holds (sum of its partitions)
    element: int  # bytes per element of the model dtype
    grad_element: int  # bytes per element of the gradient accumulation dtype
    io: int  # aio.intra_op_parallelism (I/O alignment is 1024 bytes x this)
    params_nvme: bool
    params_on_device: bool  # offload_param none: partitions in one flat buffer on the device
    opt_nvme: bool
    pin_backend: str  # torch | native
    groups: list  # optimizer sub-groups (lists of partition numels)
    group_sizes: list
    swapped: list  # per partition: large enough to swap through NVMe
    flat_elements: int  # elements of the CPU flat parameter buffer
    real_swapping: bool  # parameters really go through NVMe in training (max_in_cpu trap)
    in_flat: list  # per partition: kept in the CPU flat buffer
    swappable_groups: list  # sub-groups whose optimizer state is swapped
    state_groups: list  # sub-groups whose optimizer state stays in RAM
    gather_groups: tuple  # partitions gathered together (a module and its direct children), index tuples
    tokens: int  # per micro batch
    batch: int  # sequences per micro batch
    seq: int  # tokens per sequence
    checkpointing: bool
    cpu_checkpointing: bool  # activation checkpoints offloaded to host memory

    @classmethod
    def of(cls, spec, view, resolved, hardware):
        v = resolved.values
        tensors = view.tensors()
        names, parts = [t.name for t in tensors], [t.numel for t in tensors]
        params_nvme = v["zero_optimization.offload_param.device"] == "nvme"
        params_on_device = v["zero_optimization.offload_param.device"] == "none"
        opt_nvme = v["zero_optimization.offload_optimizer.device"] == "nvme"
        element = DTYPE_BYTES[v["run.dtype"]]
        groups = sub_groups(parts, v["zero_optimization.sub_group_size"])
        group_sizes = [sum(g) for g in groups]
        swap_floor = min_swap_numel(element, v["aio.block_size"])  # a partition of at least this many is swapped
        flat_elements, real_swapping, in_flat = _cpu_flat(v, parts, groups, group_sizes, params_nvme)
        swappable_groups = _swappable_groups(v, group_sizes, opt_nvme)
        offloaded = set(swappable_groups)
        checkpointing = v["run.gradient_checkpointing"]
        return cls(
            spec=spec, values=v, resolved=resolved, hardware=hardware, cuda=hardware.cuda,
            world=hardware.world_size, names=names, parts=parts,
            full=[t.numel for t in view.full] if hardware.world_size > 1 else parts, numel=sum(parts),
            element=element, grad_element=DTYPE_BYTES[v["data_types.grad_accum_dtype"] or v["run.dtype"]],
            io=v["aio.intra_op_parallelism"], params_nvme=params_nvme, params_on_device=params_on_device,
            opt_nvme=opt_nvme, pin_backend=pin_backend(v),
            groups=groups, group_sizes=group_sizes, swapped=[params_nvme and n >= swap_floor for n in parts],
            flat_elements=flat_elements, real_swapping=real_swapping, in_flat=in_flat,
            swappable_groups=swappable_groups, state_groups=[i for i in range(len(groups)) if i not in offloaded],
            gather_groups=module_groups(names), tokens=v["run.micro_batch"] * v["run.seq_len"],
            batch=v["run.micro_batch"], seq=v["run.seq_len"],
            checkpointing=checkpointing, cpu_checkpointing=checkpointing and _cpu_checkpointing(resolved))

    @property
    def largest_group(self):
        """Index of the largest sub-group (the first of equals, as stage3)."""
        return max(range(len(self.groups)), key=lambda i: self.group_sizes[i])

    @property
    def swapped_in_training(self):
        """Per partition: read from NVMe while training (swapped, not in the CPU flat buffer)."""
        return [s and not f for s, f in zip(self.swapped, self.in_flat)]


def _cpu_checkpointing(resolved):
    """DeepSpeed's own knob for offloading activation checkpoints to host memory (a ds_config section
    memlab passes through): each layer's checkpoint (its input) goes through accelerator.pin_memory."""
    passthrough = getattr(resolved.knobs, "passthrough", {}) or {}
    return bool((passthrough.get("activation_checkpointing") or {}).get("cpu_checkpointing"))


def _cpu_flat(v, parts, groups, group_sizes, params_nvme):
    """How much of the model stays in a CPU flat buffer (max_in_cpu trap): stage3 gives the leading
    sub-groups that fit in min(P, max_in_cpu) elements a place in the flat buffer
    (_create_fp16_partitions_with_defragmentation); their partitions, small ones too, move there.
    Returns (flat elements, whether parameters really swap, per partition: in the flat buffer)."""
    total = sum(parts)
    if params_nvme:
        max_in_cpu = v["zero_optimization.offload_param.max_in_cpu"]
        flat_elements, real_swapping = min(total, max_in_cpu), total > max_in_cpu
    else:
        flat_elements, real_swapping = total, False
    in_flat = []
    offset = 0
    for group, size in zip(groups, group_sizes):
        covered = offset + size <= max(flat_elements, 1)
        in_flat += [covered or not params_nvme] * len(group)
        offset += size
    return flat_elements, real_swapping, in_flat


def _swappable_groups(v, group_sizes, opt_nvme):
    """Sub-groups whose optimizer state goes to NVMe: past offload_optimizer.ratio's leading share
    (stage3 partial offload), and large enough to swap."""
    ratio = v["zero_optimization.offload_optimizer.ratio"]
    first_offloaded = int((1 - ratio) * len(group_sizes)) if ratio < 1 else 0
    return [i for i, s in enumerate(group_sizes)
            if opt_nvme and i >= first_offloaded and swappable(s, FP32, v["aio.block_size"])]
