"""Instrumentation of DeepSpeed's host memory, without forking DeepSpeed.

Each hook is a narrow rebinding of one DeepSpeed 0.19.x attribute, named after
what it observes (the narrowest DeepSpeed function through which each kind
of host memory passes):
- locked allocations: `aio_handle.new_cpu_locked_tensor` / `free_cpu_locked_tensor`;
- accelerator pinning: `type(get_accelerator()).pin_memory`;
- parameter pool occupancy: `AsyncPartitionedParameterSwapper` buffer methods;
- optimizer pool occupancy: `SwapBufferManager.__init__/allocate/free`;
- bytes swapped: `swap_in_tensors` / `swap_out_tensors` in every swap_tensor module;
- what the engine builds beyond its buffers (`runtime`) and the tensors in
  flight (`activations`): glibc's heap, read with the samples (see `attribute`).

The owner (component) of an allocation is the DeepSpeed function on the call
stack. State is read by the sampler thread, so every change holds `lock`.
"""
import os
import sys
import threading
import time
import weakref

from .. import components as C
from ..ds_rules import page_round, pow2_round
from ..telemetry import PAGE, PINNED_BACKENDS, heap_reading, read_status
from . import patching
from .patching import SUPPORTED_DEEPSPEED, UnsupportedDeepSpeed, check_version  # noqa: F401  (tests import them)
from .patching import original as _require


# DeepSpeed function (co_qualname) on the stack -> component of what it allocates
OWNERS = {
    "AsyncPartitionedParameterSwapper._configure_aio": C.PARAM_POOL,
    "AsyncPartitionedParameterSwapper.reserve_partitioned_swap_space": C.PARAM_PARTITION_BUFFER,
    "SwapBufferManager.__init__": C.OPTIMIZER_POOL,
    "DeepSpeedZeroOptimizer_Stage3._setup_for_real_optimizer": C.GRAD_FLAT,
    "DeepSpeedZeroOptimizer_Stage3._create_param_groups_fp16_flat_cpu_memory": C.PARAM_CPU_FLAT,
    "DeepSpeedZeroOptimizer_Stage3.initialize_optimizer_states": C.OPTIMIZER_TRANSIENTS,
    "Init._partition_param": C.SMALL_PARTITIONS,
    "AdaptiveParamPool._allocate": C.PARAM_POOL,  # memascend.pool=adaptive
}
# Allocation backends that are glibc malloc blocks (posix_memalign: torch's CPU
# tensors, DeepSpeed's locked and native-pinned buffers); CUDA's pinned host
# memory (cudaHostAlloc) is not.
HEAP_BACKENDS = frozenset({"aio-mlock", "native-mlock", "pageable"})
# Components whose `used` bytes are the pool's occupancy, not the request.
POOLS = {C.PARAM_POOL: "param", C.OPTIMIZER_POOL: "optimizer"}
SWAP_MODULES = ("utils", "partitioned_param_swapper", "optimizer_utils", "partitioned_optimizer_swapper",
                "pipelined_optimizer_swapper", "async_swapper")


def swap_file_kind(path):
    """param | gradient | optimizer, from DeepSpeed's swap file names."""
    name = os.path.basename(path)
    if "_param." in name:
        return "param"
    if "_gradient_" in name:
        return "gradient"
    return "optimizer"


def owner_on_stack(depth=2):
    frame = sys._getframe(depth)
    while frame is not None:
        component = OWNERS.get(frame.f_code.co_qualname)
        if component:
            return component
        frame = frame.f_back
    return C.OTHER


class Probes:
    """Live host-memory state of one worker, updated by DeepSpeed hooks."""

    def __init__(self, writer):
        self.writer = writer
        self.lock = threading.RLock()
        self.live = {}  # key -> alloc event fields
        self.component_bytes = dict.fromkeys(C.ALL, 0)
        self.pinned_reserved = 0
        self.exact_used = 0  # pinned bytes in exactly-sized buffers
        self.pools = {}  # name -> {"capacity": per-buffer bytes list, "used": per-buffer bytes list}
        self.pool_dirty = False
        self.pinned_used_peak = 0  # since the last step event
        self.swap_in_bytes = self.swap_out_bytes = 0
        self.swap_in_ops = self.swap_out_ops = 0
        self.swap_by_kind = {}  # "in.param" -> bytes since the last step
        self.param_swappers = weakref.WeakSet()
        self.optimizer_managers = weakref.WeakSet()
        self.heap_owned = 0  # bytes of live allocations that are malloc blocks (all but CUDA's pinned ones)
        self.framework_bytes = None
        self.runtime_bytes = None  # set when the engine is ready (engine_ready)
        self.heap_floor = None  # unowned heap bytes when the engine was ready, lowered as the build's are freed
        self.hook_seconds = 0.0  # time spent in the occupancy hooks, measured
        self.sample_now = None  # the sampler's sample_once: called as a transient is recorded
        self._next_key = 0

    # -- allocations -----------------------------------------------------------
    def record_alloc(self, component, requested, reserved, backend, key=None, sample=True):
        """Record a live allocation. A transient one is sampled at once (`sample`
        False: the caller records several and calls sample_transient after the last)."""
        with self.lock:
            if key is None:
                key = f"a{self._next_key}"
                self._next_key += 1
            if key in self.live:
                return key  # the same buffer seen twice (pinning hook, then inspection)
            fields = {"id": key, "component": component, "requested": int(requested), "reserved": int(reserved),
                      "backend": backend}
            self.live[key] = fields
            self.component_bytes[component] += fields["reserved"]
            if backend in HEAP_BACKENDS:
                self.heap_owned += fields["reserved"]
            if backend in PINNED_BACKENDS:
                self.pinned_reserved += fields["reserved"]
                if component not in POOLS:
                    self.exact_used += fields["requested"]
            self._note_used()
        self.writer.emit("alloc", **fields)
        if component in C.TRANSIENT and sample:
            self.sample_transient()
        return key

    def sample_transient(self):
        """A sample now, while a transient is alive: it may be gone before the next tick."""
        if self.sample_now is not None:
            started = time.perf_counter()
            self.sample_now()
            self.hook_seconds += time.perf_counter() - started

    def record_free(self, key):
        with self.lock:
            fields = self.live.pop(key, None)
            if fields is None:
                return
            self.component_bytes[fields["component"]] -= fields["reserved"]
            if fields["backend"] in HEAP_BACKENDS:
                self.heap_owned -= fields["reserved"]
            if fields["backend"] in PINNED_BACKENDS:
                self.pinned_reserved -= fields["reserved"]
                if fields["component"] not in POOLS:
                    self.exact_used -= fields["requested"]
        self.writer.emit("free", **fields)

    # -- pools -----------------------------------------------------------------
    def pinned_used(self):
        return self.exact_used + sum(sum(p["used"]) for p in self.pools.values())

    def _note_used(self):
        self.pinned_used_peak = max(self.pinned_used_peak, self.pinned_used())

    def set_pool(self, name, capacities, used):
        with self.lock:
            self.pools[name] = {"capacity": list(capacities), "used": list(used)}
            self.pool_dirty = True
            self._note_used()

    def refresh_param_pool(self):
        used = []
        for swapper in self.param_swappers:
            if hasattr(swapper, "buffer_capacities"):  # memascend.pool=adaptive: sized per class
                capacities = swapper.buffer_capacities()
            else:
                capacities = [int(swapper.aligned_elements_per_buffer) * swapper.swap_element_size] * \
                    swapper.param_buffer_count
            occupancy = [0] * len(capacities)
            for param_id, buffer_id in swapper.param_id_to_buffer_id.items():
                occupancy[buffer_id] = swapper.param_id_to_numel[param_id] * swapper.swap_element_size
            for buffer_id in swapper.reserved_buffer_ids:  # held whole for the fp32 -> param write-out
                occupancy[buffer_id] = capacities[buffer_id]
            used.append((capacities, occupancy))
        if used:
            self.set_pool("param", [c for caps, _ in used for c in caps], [u for _, occ in used for u in occ])

    def refresh_optimizer_pool(self):
        caps, occupancy = [], []
        for manager in self.optimizer_managers:
            element = manager.all_buffers[0].element_size() if manager.all_buffers else 0
            held = dict.fromkeys(range(manager.count), 0)
            for index, numel in getattr(manager, "_memlab_used", {}).items():
                held[index] = numel * element
            caps += [manager.num_elems * element] * manager.count
            occupancy += [held[i] for i in range(manager.count)]
        if caps:
            self.set_pool("optimizer", caps, occupancy)

    def pool_events(self):
        """Pool snapshots changed since the last call (sampler thread)."""
        with self.lock:
            if not self.pool_dirty:
                return []
            self.pool_dirty = False
            return [{"name": name, "capacity": sum(p["capacity"]),
                     "buffers": [[c, u] for c, u in zip(p["capacity"], p["used"])]} for name, p in self.pools.items()]

    # -- I/O ---------------------------------------------------------------------
    def record_io(self, direction, buffers, paths):
        with self.lock:
            for buffer, path in zip(buffers, paths):
                key = f"{direction}.{swap_file_kind(path)}"
                self.swap_by_kind[key] = self.swap_by_kind.get(key, 0) + buffer.nbytes
                if direction == "in":
                    self.swap_in_bytes += buffer.nbytes
                    self.swap_in_ops += 1
                else:
                    self.swap_out_bytes += buffer.nbytes
                    self.swap_out_ops += 1

    # -- step accounting ---------------------------------------------------------
    def take_step_counters(self):
        """Bytes swapped and the pinned peak since the last step; resets them."""
        with self.lock:
            out = {"swap_in_bytes": self.swap_in_bytes, "swap_out_bytes": self.swap_out_bytes,
                   "swap_in_ops": self.swap_in_ops, "swap_out_ops": self.swap_out_ops,
                   "swap_by_kind": dict(self.swap_by_kind),
                   "pinned_used_peak": self.pinned_used_peak, "pinned_reserved": self.pinned_reserved}
            self.swap_in_bytes = self.swap_out_bytes = self.swap_in_ops = self.swap_out_ops = 0
            self.swap_by_kind = {}
            self.pinned_used_peak = self.pinned_used()
        out.update(cuda_step_peaks())  # CUDA only: the step's GPU peaks (then reset)
        return out

    # -- attribution (sampler thread) -----------------------------------------------
    def _buffers_in_rss(self):
        """Bytes of the recorded allocations that count in RSS (under `lock`)."""
        return sum(v for k, v in self.component_bytes.items() if k not in C.OUTSIDE_RSS and k != C.OTHER)

    def engine_ready(self, rss, heap):
        """Called once deepspeed.initialize has returned and its buffers are recorded.
        `runtime` is what building the model and engine left in RSS beyond the buffers
        (DeepSpeed's and transformers' modules, aio handles, CPU Adam, ops loaded).
        The unowned heap bytes then are the floor above which every heap block no
        component owns is a tensor in flight; what of them the build still frees
        later (a copy made at init, dropped at the first step) lowers the floor at
        the end of a step (step_ended)."""
        with self.lock:
            owned, inside = self.heap_owned, self._buffers_in_rss()
        self.runtime_bytes = max(0, rss - self.framework_bytes - inside - heap.free)
        self.heap_floor = heap.live - owned

    def step_ended(self):
        """From the training thread between steps, when no hook is half-way through a
        record: the runtime's heap is never more than the unowned heap now, and the
        runtime never more than what RSS leaves for it beside the tensors in flight
        (what the build frees may have been resident, or blocks it never wrote)."""
        if self.heap_floor is None:
            return
        started = time.perf_counter()
        heap, rss = heap_reading(), read_status()["VmRSS"]
        if heap.known:
            with self.lock:
                owned, inside = self.heap_owned, self._buffers_in_rss()
                self.heap_floor = min(self.heap_floor, heap.live - owned)
                in_flight = max(0, heap.live - owned - self.heap_floor)
                room = rss - self.framework_bytes - inside - heap.free - in_flight
                self.runtime_bytes = max(0, min(self.runtime_bytes, room))
        self.hook_seconds += time.perf_counter() - started

    def attribute(self, rss, page_cache, heap):
        """Per-component bytes for one sample. The buffers are the probes' records.
        `activations` (tensors in flight: what autograd saves, the logits, the
        gradients on their way to the reduce bucket, the buckets, gathered
        parameters) is glibc's live heap above the runtime's share of it, less what
        the components own: on the CPU accelerator every such tensor is a malloc
        block. `other` is RSS minus all of it. Until the engine
        is ready, what the build holds beyond its buffers is `runtime`."""
        with self.lock:
            parts = dict(self.component_bytes)
            pinned_reserved, pinned_used = self.pinned_reserved, self.pinned_used()
            owned = self.heap_owned
        parts[C.FRAMEWORK] = rss if self.framework_bytes is None else self.framework_bytes
        parts[C.HEAP_FREE] = heap.free
        parts[C.PAGE_CACHE] = page_cache
        parts[C.ACTIVATIONS] = parts[C.RUNTIME] = parts[C.OTHER] = 0
        inside = sum(v for k, v in parts.items() if k not in C.OUTSIDE_RSS and k != C.OTHER)
        if self.runtime_bytes is None:
            parts[C.RUNTIME] = max(0, rss - inside)
        else:
            if heap.known:
                parts[C.ACTIVATIONS] = max(0, heap.live - owned - self.heap_floor)
            parts[C.RUNTIME] = self.runtime_bytes
            parts[C.OTHER] = max(0, rss - inside - parts[C.RUNTIME] - parts[C.ACTIVATIONS])
        fields = {"components": parts, "pinned_reserved": pinned_reserved, "pinned_used": pinned_used}
        fields.update(cuda_memory())  # CUDA only: GPU and torch-pinned bytes as PyTorch's allocators count them
        return fields


# ====================================================================== CUDA

def _cuda_in_use():
    """torch, if this process has imported it and initialized CUDA; else None.
    Never imports torch nor initializes CUDA itself (the sampler runs from the start)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return torch if cuda is not None and cuda.is_initialized() else None
    except Exception:
        return None


def torch_host_pinned(stats):
    """(reserved, active) bytes of PyTorch's pinned host allocator from
    `torch.cuda.host_memory_stats()`: blocks it owns (power-of-two sizes, cached
    ones included) and blocks handed out. Newer torch names the owned bytes
    `allocated_bytes` and the handed-out ones `active_bytes`; where a
    `reserved_bytes` stat exists, it is the owned bytes and `allocated_bytes` the
    handed-out ones. None for a figure the stats do not carry."""
    def get(name):
        value = stats.get(f"{name}.current", stats.get(name))
        return int(value) if isinstance(value, (int, float)) else None

    if get("reserved_bytes") is not None:
        return get("reserved_bytes"), get("allocated_bytes")
    return get("allocated_bytes"), get("active_bytes")


_cuda_device = None  # the training thread's device, once cuda_step_peaks has run there


def _rank_device(torch):
    """The device the sampler thread reports: the training thread's (a thread's
    current CUDA device is its own), else this rank's local one."""
    if _cuda_device is not None:
        return _cuda_device
    local = int(os.environ.get("LOCAL_RANK", 0) or 0)
    return local if local < torch.cuda.device_count() else 0


def cuda_memory():
    """Sample fields on CUDA, {} elsewhere: GPU bytes allocated and reserved by
    PyTorch's caching allocator (this rank's device), and the pinned host bytes
    its CachingHostAllocator reserves and hands out, measured (the probes' own
    torch-pinned figure is a model: a power of two per buffer)."""
    torch = _cuda_in_use()
    if torch is None:
        return {}
    try:
        device = _rank_device(torch)
        out = {"gpu_allocated": int(torch.cuda.memory_allocated(device)),
               "gpu_reserved": int(torch.cuda.memory_reserved(device))}
    except Exception:
        return {}
    try:
        reserved, active = torch_host_pinned(torch.cuda.host_memory_stats())
    except Exception:  # torch without host allocator stats
        reserved = active = None
    if reserved is not None:
        out["torch_pinned_reserved"] = reserved
    if active is not None:
        out["torch_pinned_active"] = active
    return out


def cuda_step_peaks():
    """Step fields on CUDA, {} elsewhere: the GPU's peak allocated and reserved
    bytes since the last call, whose peaks it then resets. Called from the
    training thread: its current device is the one the samples then report."""
    global _cuda_device
    torch = _cuda_in_use()
    if torch is None:
        return {}
    try:
        _cuda_device = torch.cuda.current_device()
        out = {"gpu_peak_allocated": int(torch.cuda.max_memory_allocated()),
               "gpu_peak_reserved": int(torch.cuda.max_memory_reserved())}
        torch.cuda.reset_peak_memory_stats()
    except Exception:
        return {}
    return out


# ====================================================================== hooks

def install(probes):
    """Hook DeepSpeed; call before zero.Init / deepspeed.initialize."""
    import deepspeed

    check_version(deepspeed.__version__)
    _hook_locked_allocations(probes)
    _hook_accelerator_pinning(probes)
    _hook_param_pool(probes)
    _hook_optimizer_pool(probes)
    _hook_swap_io(probes)
    _hook_flat_buffer_moves(probes)
    _hook_first_step_adam_state(probes)


def _hook_locked_allocations(probes):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    handle_cls = AsyncIOBuilder().load(verbose=False).aio_handle
    original_new = _require(handle_cls, "new_cpu_locked_tensor")
    original_free = _require(handle_cls, "free_cpu_locked_tensor")

    def new_cpu_locked_tensor(self, numel, example):
        tensor = original_new(self, numel, example)
        requested = int(numel) * example.element_size()
        # posix_memalign(page) + mlock: exactly the pages asked for
        probes.record_alloc(owner_on_stack(), requested, page_round(requested, PAGE), "aio-mlock",
                            key=f"p{tensor.data_ptr()}")
        return tensor

    def free_cpu_locked_tensor(self, tensor):
        probes.record_free(f"p{tensor.data_ptr()}")
        return original_free(self, tensor)

    patching.replace(handle_cls, "new_cpu_locked_tensor", new_cpu_locked_tensor)
    patching.replace(handle_cls, "free_cpu_locked_tensor", free_cpu_locked_tensor)


def _hook_accelerator_pinning(probes):
    from deepspeed.accelerator import get_accelerator

    accelerator_cls = type(get_accelerator())
    original_pin = _require(accelerator_cls, "pin_memory")

    def pin_memory(self, tensor, *args, **kwargs):
        out = original_pin(self, tensor, *args, **kwargs)
        probes.record_alloc(owner_on_stack(), out.nbytes, *pinned_reservation(out), key=f"p{out.data_ptr()}")
        return out

    patching.replace(accelerator_cls, "pin_memory", pin_memory)
    _hook_native_pin_frees(probes)


def _hook_native_pin_frees(probes):
    """DS_PIN_MEMORY_BACKEND=native frees by address (unpin, or a GC finalizer)."""
    from deepspeed.utils import pin_memory as native

    pins_cls = native.NativePinnedMemory
    original_release = _require(pins_cls, "_release")
    original_unpin = _require(pins_cls, "unpin")

    def _release(handle, begin, *args, **kwargs):
        probes.record_free(f"p{begin}")
        return original_release(handle, begin, *args, **kwargs)

    def unpin(self, tensor):
        probes.record_free(f"p{getattr(tensor, 'ds_pin_base', None) or tensor.data_ptr()}")
        return original_unpin(self, tensor)

    patching.replace(pins_cls, "_release", staticmethod(_release))
    patching.replace(pins_cls, "unpin", unpin)


def pinned_reservation(tensor):
    """(reserved bytes, backend) of a tensor an accelerator returned from pin_memory."""
    requested = tensor.nbytes
    if getattr(tensor, "ds_pinned", False):
        return page_round(requested, PAGE), "native-mlock"
    if tensor.device.type == "cpu" and tensor.is_pinned():
        # CUDA only: PyTorch's CachingHostAllocator rounds a block up to a power of two
        return pow2_round(requested), "torch-pinned"
    return requested, "pageable"


def _hook_param_pool(probes):
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper as pps

    swapper_cls = pps.AsyncPartitionedParameterSwapper
    original_init = _require(swapper_cls, "__init__")

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        probes.param_swappers.add(self)
        probes.refresh_param_pool()

    patching.replace(swapper_cls, "__init__", __init__)
    for name in ("get_buffer", "_allocate_and_return_buffers_for_swap_in", "remove_partition_and_release_buffers",
                 "reserve_available_buffers", "release_reserved_buffers"):
        _after(swapper_cls, name, lambda self: probes.refresh_param_pool(), probes)


def _hook_optimizer_pool(probes):
    from deepspeed.runtime.swap_tensor import utils

    manager_cls = utils.SwapBufferManager
    original_init = _require(manager_cls, "__init__")
    original_allocate = _require(manager_cls, "allocate")
    original_free = _require(manager_cls, "free")

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._memlab_used = {}  # buffer index -> elements handed out
        probes.optimizer_managers.add(self)
        probes.refresh_optimizer_pool()

    def allocate(self, num_elems, count, dtype):
        buffers = original_allocate(self, num_elems, count, dtype)
        if buffers is not None:
            for buffer in buffers:
                self._memlab_used[self.used_buffer_index[id(buffer)]] = num_elems
            probes.refresh_optimizer_pool()
        return buffers

    def free(self, buffers):
        indices = [self.used_buffer_index[id(b)] for b in buffers if id(b) in self.used_buffer_index]
        result = original_free(self, buffers)
        for index in indices:
            self._memlab_used.pop(index, None)
        probes.refresh_optimizer_pool()
        return result

    patching.replace(manager_cls, "__init__", __init__)
    patching.replace(manager_cls, "allocate", allocate)
    patching.replace(manager_cls, "free", free)


def _hook_swap_io(probes):
    import importlib

    modules = [importlib.import_module(f"deepspeed.runtime.swap_tensor.{m}") for m in SWAP_MODULES]
    original_in = _require(modules[0], "swap_in_tensors")
    original_out = _require(modules[0], "swap_out_tensors")

    def swap_in_tensors(handle, buffers, paths):
        probes.record_io("in", buffers, paths)
        return original_in(handle, buffers, paths)

    def swap_out_tensors(handle, buffers, paths):
        probes.record_io("out", buffers, paths)
        return original_out(handle, buffers, paths)

    for module in modules:  # each module imported the functions by name
        if hasattr(module, "swap_in_tensors"):
            patching.replace(module, "swap_in_tensors", swap_in_tensors)
        if hasattr(module, "swap_out_tensors"):
            patching.replace(module, "swap_out_tensors", swap_out_tensors)


def _hook_flat_buffer_moves(probes):
    """stage3 `_move_to_flat_buffer` copies partitions into the CPU flat parameter
    buffer and drops them (offload_param.device=cpu, or max_in_cpu): free their
    records as it happens (on the CPU accelerator their pin was a no-op, so no
    other hook sees the free)."""
    from deepspeed.runtime.zero import stage3

    optimizer_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    original = _require(optimizer_cls, "_move_to_flat_buffer")

    def _move_to_flat_buffer(self, param_list, flat_buffer, avoid_copy=False):
        before = _partition_keys(param_list)
        result = original(self, param_list, flat_buffer, avoid_copy=avoid_copy)
        _forget_partitions(probes, before - _partition_keys(param_list))
        return result

    patching.replace(optimizer_cls, "_move_to_flat_buffer", _move_to_flat_buffer)


def _partition_keys(params):
    return {f"p{p.ds_tensor.data_ptr()}" for p in params if getattr(p, "ds_tensor", None) is not None}


def _forget_partitions(probes, keys):
    with probes.lock:
        stale = [key for key in keys if key in probes.live and probes.live[key]["component"] == C.SMALL_PARTITIONS
                 and probes.live[key]["backend"] == "pageable"]
    for key in stale:
        probes.record_free(key)


def _hook_first_step_adam_state(probes):
    """CPU Adam creates a sub-group's exp_avg and exp_avg_sq at its first step (zeros_like, plain RAM).
    A sub-group whose state stays in RAM keeps them (optimizer_state). One whose state is swapped to
    NVMe writes them out and drops them when its swap info is released (release_memory) or, with the
    pipelined swapper, when its next swap-in hands the same tensors pool buffers (set_buffers): until
    then they are optimizer_transients."""
    import torch
    from deepspeed.runtime.swap_tensor import optimizer_utils
    from deepspeed.runtime.zero import stage3

    zero_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    original_step = _require(zero_cls, "_optimizer_step")

    def _optimizer_step(self, sub_group_id):
        fp32 = self.fp32_partitioned_groups_flat[sub_group_id]
        fresh = not self.optimizer.state.get(fp32)
        result = original_step(self, sub_group_id)
        if fresh:
            started = time.perf_counter()
            component = C.OPTIMIZER_TRANSIENTS if self._swappable_optimizer_subgroup(sub_group_id) else \
                C.OPTIMIZER_STATE
            for value in self.optimizer.state.get(fp32, {}).values():
                if torch.is_tensor(value) and value.device.type == "cpu" and value.numel() > 1:
                    probes.record_alloc(component, value.nbytes, value.nbytes, "pageable",
                                        key=f"p{value.untyped_storage().data_ptr()}", sample=False)
            probes.hook_seconds += time.perf_counter() - started
            if component in C.TRANSIENT:
                probes.sample_transient()  # both states recorded: one sample sees the pair
        return result

    patching.replace(zero_cls, "_optimizer_step", _optimizer_step)

    context_cls = optimizer_utils.SwapTensorContext
    for name in ("release_memory", "set_buffers"):
        original = _require(context_cls, name)

        def dropped(self, *args, _original=original, **kwargs):
            tensor = self.compute_tensor
            key = f"p{tensor.untyped_storage().data_ptr()}" if tensor.numel() else None
            result = _original(self, *args, **kwargs)
            if key is not None:
                with probes.lock:
                    transient = probes.live.get(key, {}).get("component") == C.OPTIMIZER_TRANSIENTS
                if transient:
                    probes.record_free(key)
            return result

        patching.replace(context_cls, name, dropped)


def _after(cls, name, callback, probes=None):
    original = _require(cls, name)

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        started = time.perf_counter()
        callback(self)
        if probes is not None:
            probes.hook_seconds += time.perf_counter() - started
        return result

    wrapper.__name__ = name
    wrapper.__qualname__ = original.__qualname__
    patching.replace(cls, name, wrapper)


# ====================================================================== after init

def attribute_engine_buffers(probes, engine):
    """Record the engine's host buffers that did not pass through a pinning hook
    (pin_memory off, or the CPU accelerator's no-op pinning), and register the
    measures of device-side tensors that live in host RAM."""
    optimizer = engine.optimizer
    _forget_moved_partitions(probes, [p for p in engine.module.parameters() if hasattr(p, "ds_status")])
    grad_flat = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if grad_flat is not None and grad_flat.device.type == "cpu":
        probes.record_alloc(C.GRAD_FLAT, grad_flat.nbytes, grad_flat.nbytes, "pageable",
                            key=f"p{grad_flat.data_ptr()}")
    for flat in getattr(optimizer, "param_groups_fp16_flat_cpu_memory", []):
        if flat.numel() > 1:
            probes.record_alloc(C.PARAM_CPU_FLAT, flat.nbytes, flat.nbytes, "pageable", key=f"p{flat.data_ptr()}")
    # offload_param none: stage3 defragments the partitions into one flat buffer on the device
    device_flat = getattr(optimizer, "lp_param_buffer", None)
    if device_flat is not None and device_flat.device.type == "cpu":
        probes.record_alloc(C.PARAM_CPU_FLAT, device_flat.nbytes, device_flat.nbytes, "pageable",
                            key=f"p{device_flat.data_ptr()}")
    _attribute_cpu_optimizer_state(probes, optimizer)


def _forget_moved_partitions(probes, params):
    """Safety net after initialize: Init partitions whose data no parameter points
    to any more (moved into a flat buffer by a path the hook above did not see)."""
    current = _partition_keys(params)
    with probes.lock:
        keys = [key for key, fields in probes.live.items() if fields["component"] == C.SMALL_PARTITIONS]
    _forget_partitions(probes, set(keys) - current)


def _attribute_cpu_optimizer_state(probes, optimizer):
    """With the optimizer on the CPU, the fp32 master partitions live in RAM."""
    if getattr(optimizer, "optimizer_swapper", None) is not None:
        return
    for flat in getattr(optimizer, "fp32_partitioned_groups_flat", []):
        if flat.numel() and flat.device.type == "cpu":
            probes.record_alloc(C.OPTIMIZER_STATE, flat.nbytes, flat.nbytes, "pageable",
                                key=f"p{flat.untyped_storage().data_ptr()}")


def attribute_optimizer_state(probes, optimizer):
    """Adam's exp_avg / exp_avg_sq, created lazily at the first step when the
    optimizer state stays in host RAM (optimizer offloaded to the CPU)."""
    if getattr(optimizer, "optimizer_swapper", None) is not None:
        return
    for state in optimizer.optimizer.state.values():
        for value in state.values():
            if hasattr(value, "untyped_storage") and value.device.type == "cpu" and value.numel() > 1:
                probes.record_alloc(C.OPTIMIZER_STATE, value.nbytes, value.nbytes, "pageable",
                                    key=f"p{value.untyped_storage().data_ptr()}")
