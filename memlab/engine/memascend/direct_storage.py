"""Direct storage: every swapped tensor at a fixed, aligned offset inside one region.

Stock DeepSpeed 0.19 keeps one swap file per tensor on a mounted file system
(`<id>_param.tensor.swp`, `<id>.tensor.swp`, `<id>_gradient_<off>_<len>...`),
created on first write and opened for every I/O operation. Here one region
holds them all: a single preallocated file in the run's swap folder, or a raw
block device the user names explicitly (`memascend.storage_device`; validated
by the parent: a block device, writable, not mounted). An extent allocator
maps each swap path DeepSpeed uses to (offset, size) in the region on its
first write; reads and writes still go through DeepSpeed's aio handle
(`async_pread/async_pwrite(buffer, region, offset)`), so the I/O engine is
unchanged and no per-tensor file is ever created.

One exception, forced by DeepSpeed 0.19.8: its aio read checks the target's
size with stat(), which is 0 for a block device, and asserts (aborting the
process). So on a raw device, reads are memlab's own O_DIRECT preadv, done at
submission; the handle's `wait()` counts them with its own completions, so
DeepSpeed's bookkeeping is unchanged. Writes go through aio on both.

Checkpoints: DeepSpeed's save_checkpoint copies the optimizer's swap folder
into the checkpoint and load_checkpoint copies it back. Under direct storage
that folder holds no file, so a save first writes each optimizer tensor of the
region out as the file stock DeepSpeed would have there (same name, same
bytes: the checkpoint is stock's, loadable either way), and removes them once
DeepSpeed has copied them; after a load, the first read of a path with no
extent, and every file DeepSpeed copied back before it rebuilds the swap buffers
(reset_swap_buffers), go into the region. A read of a path
that was never written and has no such file is an error (SwapNeverWritten),
never a fresh extent of zeros.
"""
import ctypes
import mmap
import os
import threading

from ...errors import RunError
from .. import patching
from ..patching import original as _require
from ..probes import SWAP_MODULES

EXTENT_ALIGNMENT = 4096  # O_DIRECT-safe on any logical block size up to 4 KiB
REGION_NAME = "memlab-region.swp"
GROW_STEP = 256 << 20  # a region file grows by at least this much when it runs out


class RegionFull(RunError, OSError):
    """The region (file or device) has no room for the next extent."""


class SwapNeverWritten(RunError, OSError):
    """A swap path read before anything was written there (and no checkpoint file brought it)."""


class Region:
    """The storage behind the extents: a file that can grow, or a fixed device."""

    def __init__(self, path, initial_bytes, device=False):
        self.path = path
        self.device = device
        self.fd = None
        if device:
            self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)  # kept open for memlab's own reads
            self.capacity = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(initial_bytes, EXTENT_ALIGNMENT))
            finally:
                os.close(fd)
            self.capacity = max(initial_bytes, EXTENT_ALIGNMENT)

    def pread(self, nbytes, offset):
        """Bytes of the region (4096-aligned extents: O_DIRECT-safe on a device)."""
        if self.device:
            length = -(-nbytes // EXTENT_ALIGNMENT) * EXTENT_ALIGNMENT
            with mmap.mmap(-1, length) as buffer:
                os.preadv(self.fd, [buffer], offset)
                return buffer[:nbytes]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)

    def pwrite(self, data, offset):
        if self.device:
            length = -(-len(data) // EXTENT_ALIGNMENT) * EXTENT_ALIGNMENT
            with mmap.mmap(-1, length) as buffer:
                buffer[:len(data)] = data
                os.pwritev(self.fd, [buffer], offset)
            return
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def ensure(self, end):
        if end <= self.capacity:
            return
        if self.device:
            raise RegionFull(f"memascend.storage_device {self.path}: {end} bytes needed, {self.capacity} available")
        grown = max(end, self.capacity + GROW_STEP)
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, self.capacity, grown - self.capacity)
        finally:
            os.close(fd)
        self.capacity = grown


class ExtentMap:
    """Swap path -> (offset, size) in the region; allocated once, never moved."""

    def __init__(self, region):
        self.region = region
        self.extents = {}
        self.written = {}  # path -> bytes written from its start (what a checkpoint file of it holds)
        self.next_offset = 0
        self.lock = threading.Lock()

    def reserve(self, path, nbytes):
        """The extent of `path`, allocating `nbytes` (aligned) on first use."""
        with self.lock:
            extent = self.extents.get(path)
            if extent is not None and extent[1] >= nbytes:
                return extent
            size = -(-int(nbytes) // EXTENT_ALIGNMENT) * EXTENT_ALIGNMENT
            offset = self.next_offset
            self.region.ensure(offset + size)
            self.next_offset = offset + size
            # a path rewritten larger than before moves to a new extent (DeepSpeed writes
            # each swap tensor whole and at one size, so this does not happen in practice)
            self.extents[path] = (offset, size)
            return self.extents[path]

    def locate(self, path, offset, nbytes, write=False):
        """(region path, region offset) for bytes [offset, offset+nbytes) of `path`."""
        if write:
            base, size = self.reserve(path, offset + nbytes)
            with self.lock:
                self.written[path] = max(self.written.get(path, 0), offset + nbytes)
        else:
            if path not in self.extents:
                self.take_file(path)
            base, size = self.extents[path]
        if offset + nbytes > size:
            raise RegionFull(f"{path}: {offset + nbytes} bytes beyond its {size}-byte extent")
        return self.region.path, base + offset

    def take_file(self, path):
        """A swap file DeepSpeed's load_checkpoint copied back: into the region, then removed."""
        if not os.path.isfile(path):
            raise SwapNeverWritten(f"memascend.storage=direct: {path} is read but was never written "
                                   "(and no checkpoint brought it)")
        with open(path, "rb") as f:
            data = f.read()
        base, _ = self.reserve(path, len(data))
        self.region.pwrite(data, base)
        with self.lock:
            self.written[path] = len(data)
        os.remove(path)

    def take_files(self, folder):
        """Every file in `folder` (what load_checkpoint copied back) into the region."""
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                self.take_file(path)

    def write_files(self, folder):
        """Each optimizer tensor under `folder` as the file stock DeepSpeed keeps there
        (gradients aside: DeepSpeed's checkpoint copy skips them); the paths written."""
        folder = os.path.join(folder, "")
        with self.lock:
            paths = [(p, n) for p, n in self.written.items() if p.startswith(folder) and "gradient" not in
                     os.path.basename(p)]
        for path, nbytes in paths:
            with open(path, "wb") as f:
                f.write(self.region.pread(nbytes, self.extents[path][0]))
        return [path for path, _ in paths]


ACTIVE = None  # the run's ExtentMap while direct storage is on (used by bounded staging)
# Installed into someone else's DeepSpeed program (no run swap folder known at install): one region
# per swap root, made where the first swap path under it is used, removed at exit (memlab made it).
_BY_ROOT = {}
_rooted = []
_sync_reads = {}  # id(aio handle) -> reads memlab completed itself, counted by the next wait()
_aio_pending = {}  # id(aio handle) -> operations submitted to aio since the last wait()


def read_into(fd, tensor, offset):
    """O_DIRECT pread of tensor.nbytes at offset; through an aligned bounce buffer
    when the tensor's address or size is not sector aligned."""
    nbytes = tensor.nbytes
    aligned = all(n % EXTENT_ALIGNMENT == 0 for n in (tensor.data_ptr(), nbytes, offset))
    if aligned:
        view = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
        done = os.preadv(fd, [view], offset)
    else:
        start = offset - offset % EXTENT_ALIGNMENT
        length = -(-(offset + nbytes - start) // EXTENT_ALIGNMENT) * EXTENT_ALIGNMENT
        with mmap.mmap(-1, length) as bounce:  # anonymous maps are page aligned
            done = os.preadv(fd, [bounce], start) - (offset - start)
            ctypes.memmove(tensor.data_ptr(), ctypes.addressof(ctypes.c_char.from_buffer(bounce, offset - start)),
                           nbytes)
    if done < nbytes:
        raise OSError(f"short read from the storage device: {done} of {nbytes} bytes")


def swap_root(path):
    """The nvme_path a DeepSpeed swap path lies under (`<nvme_path>/zero_stage_3/...`)."""
    marker = os.sep + "zero_stage_3" + os.sep
    return path.split(marker)[0] if marker in path else os.path.dirname(path)


def extents_for(path):
    """The ExtentMap that holds `path`, or None when direct storage is off."""
    if ACTIVE is not None or not _rooted:
        return ACTIVE
    root = swap_root(os.path.abspath(path))
    with _rooted[0]:
        if root not in _BY_ROOT:
            os.makedirs(root, exist_ok=True)
            # ranks of one program share its nvme_path: a region each
            _BY_ROOT[root] = ExtentMap(Region(os.path.join(root, f"{os.getpid()}-{REGION_NAME}"), 0))
        return _BY_ROOT[root]


def _remove_rooted_regions():
    for extents in _BY_ROOT.values():
        if os.path.exists(extents.region.path):
            os.remove(extents.region.path)
    _BY_ROOT.clear()


def submit_read(handle, buffer, path, offset=0):
    """Read bytes of a swap path into buffer: aio, or memlab's own read on a raw device."""
    target, region_offset = locate(path, offset, buffer.nbytes)
    extents = extents_for(path)
    if extents is not None and extents.region.device:
        read_into(extents.region.fd, buffer, region_offset)
        _sync_reads[id(handle)] = _sync_reads.get(id(handle), 0) + 1
        return
    _check_aio_offset(path, region_offset)
    assert handle.async_pread(buffer, target, region_offset) == 0
    _aio_pending[id(handle)] = _aio_pending.get(id(handle), 0) + 1


def submit_write(handle, buffer, path, offset=0):
    target, region_offset = locate(path, offset, buffer.nbytes, write=True)
    _check_aio_offset(path, region_offset)
    assert handle.async_pwrite(buffer, target, region_offset) == 0
    _aio_pending[id(handle)] = _aio_pending.get(id(handle), 0) + 1


def _check_aio_offset(path, offset):
    # aio opens with O_DIRECT: an unaligned file offset would read or write the wrong bytes silently
    if offset % 512:
        raise ValueError(f"{path}: I/O at offset {offset}, not a multiple of 512 bytes")


def locate(path, offset, nbytes, write=False):
    """Where bytes of a swap path live: the region under direct storage, else the file itself."""
    extents = extents_for(path)
    if extents is None:
        return path, offset
    return extents.locate(path, offset, nbytes, write)


def reserve(path, nbytes):
    """Give a path written in slices (bounded staging) its whole extent up front."""
    extents = extents_for(path)
    if extents is not None:
        extents.reserve(path, nbytes)


def install(knobs, context):
    import importlib

    global ACTIVE
    device = knobs["memascend.storage_device"]
    if device:
        region = Region(device, 0, device=True)
        ACTIVE = ExtentMap(region)
    elif "swap_path" in context:  # memlab's worker: the run's swap folder, if it swaps at all
        if not context["swap_path"]:
            return  # nothing is swapped to NVMe in this run
        region = Region(os.path.join(context["swap_path"], REGION_NAME), context.get("region_bytes", 0))
        ACTIVE = ExtentMap(region)
    else:  # attached to a program: regions where its swap paths are
        import atexit

        region = None
        _rooted.append(threading.Lock())
        atexit.register(_remove_rooted_regions)

    modules = [importlib.import_module(f"deepspeed.runtime.swap_tensor.{m}") for m in SWAP_MODULES]
    _require(modules[0], "swap_in_tensors")
    _require(modules[0], "swap_out_tensors")

    def swap_in_tensors(handle, buffers, paths):
        for buffer, path in zip(buffers, paths):
            submit_read(handle, buffer, path)

    def swap_out_tensors(handle, buffers, paths):
        for buffer, path in zip(buffers, paths):
            submit_write(handle, buffer, path)

    if region is not None and region.device:
        _count_sync_reads_in_wait()
    _write_files_for_checkpoints()

    for module in modules:  # each module imported the functions by name
        if hasattr(module, "swap_in_tensors"):
            patching.replace(module, "swap_in_tensors", swap_in_tensors)
        if hasattr(module, "swap_out_tensors"):
            patching.replace(module, "swap_out_tensors", swap_out_tensors)


def _write_files_for_checkpoints():
    """save_checkpoint copies the optimizer's swap folder: give it the files stock keeps there;
    load_checkpoint copies them back: take them into the region."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import stage3

    original_save = _require(DeepSpeedEngine, "save_checkpoint")

    def save_checkpoint(self, *args, **kwargs):
        swapper = getattr(self.optimizer, "optimizer_swapper", None)
        files = extents_for(swapper.swap_folder).write_files(swapper.swap_folder) if swapper is not None else []
        try:
            return original_save(self, *args, **kwargs)
        finally:
            for path in files:
                os.remove(path)

    patching.replace(DeepSpeedEngine, "save_checkpoint", save_checkpoint)

    # load_checkpoint copies the checkpoint's files into the swap folder, then rebuilds from them
    zero_cls = stage3.DeepSpeedZeroOptimizer_Stage3
    original_reset = _require(zero_cls, "reset_swap_buffers")

    def reset_swap_buffers(self):
        extents_for(self.optimizer_swapper.swap_folder).take_files(self.optimizer_swapper.swap_folder)
        return original_reset(self)

    patching.replace(zero_cls, "reset_swap_buffers", reset_swap_buffers)


def _count_sync_reads_in_wait():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    handle_cls = AsyncIOBuilder().load(verbose=False).aio_handle
    original_wait = _require(handle_cls, "wait")

    def wait(self):
        # aio's own wait asserts when nothing is pending: call it only for aio operations
        completed = original_wait(self) if _aio_pending.pop(id(self), 0) else 0
        return completed + _sync_reads.pop(id(self), 0)

    patching.replace(handle_cls, "wait", wait)
