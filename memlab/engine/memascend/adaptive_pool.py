"""Adaptive parameter swap pool: buffers sized by the partitions that use them.

Stock DeepSpeed 0.19 (`AsyncPartitionedParameterSwapper._configure_aio`) locks
`buffer_count` buffers of `buffer_size` elements up front, and every swapped
partition takes a whole buffer: with buffer_size fitted to the embedding, a
q_proj fills ~2% of its slot. Here a buffer belongs to a size class (the
partition's I/O-aligned element count: embedding/LM head, MLP, attention...),
is allocated the first time its class needs one more buffer than it has, and
goes back to its class when released. So the pool holds, per class, the
largest number of that class's partitions ever gathered at once.

`buffer_count` keeps its role as the prefetch depth (`available_swap_in_buffers`),
so the engine prefetches as much as stock; a demand fetch never asserts "Not
enough buffers": it gets a new buffer instead. `buffer_size` no longer caps a
partition's size.
"""
import os
import shutil

import torch

from ...ds_rules import io_alignment_bytes, min_swap_bytes, numel_alignment, reads_in_place
from .. import patching
from ..patching import original as _require


class AdaptiveParamPool:
    """Locked buffers in size classes; ids are stable for the swapper's bookkeeping."""

    def __init__(self, handle, dtype):
        self.handle = handle  # aio handle: its page-locked allocator
        self.example = torch.zeros(1, dtype=dtype)
        self.tensors = []  # buffer id -> locked tensor
        self.sizes = []  # buffer id -> elements (the class)
        self.free = {}  # class -> free buffer ids

    def take(self, aligned_numel):
        ids = self.free.get(aligned_numel)
        if ids:
            return ids.pop()
        return self._allocate(aligned_numel)

    def _allocate(self, aligned_numel):
        self.tensors.append(self.handle.new_cpu_locked_tensor(aligned_numel, self.example))
        self.sizes.append(aligned_numel)
        return len(self.tensors) - 1

    def give(self, buffer_id):
        self.free.setdefault(self.sizes[buffer_id], []).append(buffer_id)

    def view(self, buffer_id, numel):
        return self.tensors[buffer_id].narrow(0, 0, numel)


def install(knobs, context):
    from deepspeed.runtime.swap_tensor import partitioned_param_swapper as pps

    swapper_cls = pps.AsyncPartitionedParameterSwapper
    for name in ("_configure_aio", "_allocate_and_return_buffers_for_swap_in", "get_buffer",
                 "remove_partition_and_release_buffers", "reserve_available_buffers", "release_reserved_buffers",
                 "available_swap_in_buffers", "swap_in", "swap_into_buffer"):
        _require(swapper_cls, name)

    def _configure_aio(self, ds_config):
        # DeepSpeed's _configure_aio without the fixed `buffer_count x buffer_size` allocation.
        self.swap_config = ds_config.zero_config.offload_param
        torch_dtype_string = str(self.dtype).split(".")[1]
        self.swap_folder = os.path.join(self.swap_config.nvme_path, "zero_stage_3", f"{torch_dtype_string}params",
                                        f"rank{pps.dist.get_rank()}")
        shutil.rmtree(self.swap_folder, ignore_errors=True)
        os.makedirs(self.swap_folder, exist_ok=True)
        self.swap_element_size = torch.tensor([], dtype=self.dtype).element_size()
        self.aio_config = ds_config.aio_config
        self.use_gds = self.aio_config[pps.AIO_USE_GDS]
        if self.use_gds:
            raise RuntimeError("memascend.pool=adaptive does not support aio.use_gds")
        self.aio_handle = pps.AsyncIOBuilder().load(verbose=False).aio_handle
        self.min_aio_bytes = min_swap_bytes(self.aio_config[pps.AIO_BLOCK_SIZE])
        self.aligned_bytes = io_alignment_bytes(self.aio_config[pps.AIO_INTRA_OP_PARALLELISM])
        self.numel_alignment = numel_alignment(self.swap_element_size, self.aio_config[pps.AIO_INTRA_OP_PARALLELISM])
        self.elements_per_buffer = self.swap_config.buffer_size
        self.aligned_elements_per_buffer = self._io_aligned_numel(self.elements_per_buffer)
        self.param_buffer_count = self.swap_config.buffer_count
        self.available_buffer_ids = []  # unused: the pool below owns the buffers
        self.reserved_buffer_ids = []
        handle_args = dict(block_size=self.aio_config[pps.AIO_BLOCK_SIZE],
                           queue_depth=self.aio_config[pps.AIO_QUEUE_DEPTH],
                           single_submit=self.aio_config[pps.AIO_SINGLE_SUBMIT],
                           overlap_events=self.aio_config[pps.AIO_OVERLAP_EVENTS],
                           intra_op_parallelism=self.aio_config[pps.AIO_INTRA_OP_PARALLELISM])
        self.aio_read_handle = self.aio_handle(**handle_args)
        self.aio_write_handle = self.aio_handle(**handle_args)
        self.buffers = None
        self.adaptive_pool = AdaptiveParamPool(self.aio_read_handle, self.dtype)
        self.swap_out_params = []

    def _assign(self, param_id, numel):
        buffer_id = self.adaptive_pool.take(self._io_aligned_numel(numel))
        self.param_id_to_buffer_id[param_id] = buffer_id
        swap_buffer = self.adaptive_pool.view(buffer_id, self._io_aligned_numel(numel))
        self.param_id_to_swap_buffer[param_id] = swap_buffer
        return swap_buffer, swap_buffer.narrow(0, 0, numel)

    def _allocate_and_return_buffers_for_swap_in(self, params):
        compute_buffers, swap_buffers = [], []
        for param in params:
            param_id = param.ds_id
            assert param_id in self.param_id_to_numel, f" Number of elements in param {param_id} is unknown"
            assert param_id not in self.param_id_to_buffer_id, \
                f"param {param_id} already assigned swap buffer id {self.param_id_to_buffer_id[param_id]}"
            swap_buffer, compute_buffer = _assign(self, param_id, self.param_id_to_numel[param_id])
            compute_buffers.append(compute_buffer)
            swap_buffers.append(swap_buffer)
        return compute_buffers, swap_buffers

    def get_buffer(self, param, numel):
        self.param_id_to_numel[param.ds_id] = numel
        return _assign(self, param.ds_id, numel)[1]

    def remove_partition_and_release_buffers(self, params):
        for param in params:
            param_id = param.ds_id
            if param_id in self.param_id_to_buffer_id:
                self.adaptive_pool.give(self.param_id_to_buffer_id.pop(param_id))
                del self.param_id_to_swap_buffer[param_id]
                if param_id in self.available_params:
                    self.available_params.remove(param_id)
                    self.available_numel -= self.param_id_to_numel[param_id]
            param.ds_tensor.data = self.invalid_buffer.data
            param.ds_tensor.status = pps.PartitionedParamStatus.NOT_AVAILABLE

    def reserve_available_buffers(self):
        # Only offload_optimizer.fast_init uses it (memlab.knobs refuses that combination).
        raise RuntimeError("memascend.pool=adaptive does not support offload_optimizer.fast_init")

    def release_reserved_buffers(self):
        self.reserved_buffer_ids = []

    def available_swap_in_buffers(self):
        # The prefetch depth stays buffer_count, as in stock.
        return max(0, self.param_buffer_count - len(self.param_id_to_buffer_id))

    def swap_in(self, params, async_op=True, swap_in_buffers=None):
        # DeepSpeed's swap_in without the "Not enough buffers" assert: the pool grows instead.
        assert all(p.ds_tensor.status == pps.PartitionedParamStatus.NOT_AVAILABLE for p in params), \
            "Some params are already available or in flight"
        swap_in_paths = self._get_swap_paths(params)
        if swap_in_buffers is None:
            compute_buffers, swap_in_buffers = self._allocate_and_return_buffers_for_swap_in(params)
            inflight_numel = sum(t.numel() for t in compute_buffers)
        else:
            inflight_numel = sum(t.numel() for t in swap_in_buffers)
        pps.swap_in_tensors(self.aio_read_handle, swap_in_buffers, swap_in_paths)
        self._update_inflight_swap_in(params, swap_in_buffers, inflight_numel)
        if not async_op:
            self.synchronize_reads()

    def swap_into_buffer(self, param, dest_buffer):
        # DeepSpeed's swap_into_buffer (a partition brought into the CPU flat buffer for good, max_in_cpu)
        # without its `available_buffer_ids` assert: a destination the read cannot land in directly (not
        # locked, not I/O-aligned in size or in address) is read through a pool buffer, as any swap-in.
        assert param.ds_tensor.status == pps.PartitionedParamStatus.NOT_AVAILABLE, \
            f"param {param.ds_id} is already available or inflight"
        if (self.aio_read_handle.is_pinned(dest_buffer) and self._is_io_aligned(dest_buffer.numel())
                and reads_in_place(dest_buffer.data_ptr())):
            pps.swap_in_tensors(self.aio_read_handle, [dest_buffer], self._get_swap_paths([param]))
            self._update_inflight_swap_in([param], [dest_buffer], dest_buffer.numel())
            self.synchronize_reads()
            return
        self.swap_in([param], async_op=False)
        dest_buffer.data.copy_(param.ds_tensor.data)
        self.remove_partition_and_release_buffers([param])

    def buffer_capacities(self):
        return [n * self.swap_element_size for n in self.adaptive_pool.sizes]

    for function in (_configure_aio, _allocate_and_return_buffers_for_swap_in, get_buffer,
                     remove_partition_and_release_buffers, reserve_available_buffers, release_reserved_buffers,
                     available_swap_in_buffers, swap_in, swap_into_buffer):
        patching.replace(swapper_cls, function.__name__, function)
    patching.add(swapper_cls, "buffer_capacities", buffer_capacities)
