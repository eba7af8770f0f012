"""Events between the worker and the parent, and the sampler that makes `sample` events.

The worker writes one JSON object per line to the run's event file; the parent
follows the same file. That file is the single source of truth: a live Run
and a Run loaded from disk are built from the same lines.
"""
import ctypes
import ctypes.util
import json
import mmap
import os
import sys
import threading
import time
from typing import NamedTuple

from . import ds_rules

SCHEMA = 1

KINDS = (
    "run_start",  # run_id, schema, knobs, model, versions, host
    "sample",  # rss, vm_lck, vm_hwm, page_cache, io_read, io_write, pinned_reserved, pinned_used, components
    "alloc",  # id, component, requested, reserved, backend
    "free",  # id, component, requested, reserved, backend
    "pool",  # name, capacity, buffers: [[capacity_bytes, used_bytes], ...]
    "phase",  # name, step
    "step",  # index, seconds, loss, swap_in_bytes, swap_out_bytes, pinned_used_peak, rss_peak
    "log",  # message
    "error",  # message, traceback
    "run_end",  # status, summary
)
STATUSES = ("ok", "failed", "stopped", "over_budget")  # run_end status, and the summary's `status`
BACKENDS = ("aio-mlock", "native-mlock", "torch-pinned", "pageable")
PINNED_BACKENDS = frozenset({"aio-mlock", "native-mlock", "torch-pinned"})
PAGE = os.sysconf("SC_PAGE_SIZE")


def page_round(nbytes):
    """ds_rules.page_round with this machine's page: what a locked buffer of nbytes takes here."""
    return ds_rules.page_round(nbytes, PAGE)


def encode(event):
    """One event as one line of JSON (no embedded newlines)."""
    if event.get("kind") not in KINDS:
        raise ValueError(f"unknown event kind {event.get('kind')!r}")
    return json.dumps(event, separators=(",", ":"), allow_nan=False) + "\n"


def decode_lines(lines):
    """Events from lines of an event file. A torn last line (a writer killed
    mid-write) is dropped; returns (events, number of lines dropped)."""
    events, dropped = [], 0
    for line in lines:
        if not line.endswith("\n"):
            dropped += 1  # incomplete: the writer died before the newline
            continue
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict) and "kind" in event:
            events.append(event)
        else:  # not an event: garbage in the file
            dropped += 1
    return events, dropped


class EventWriter:
    """Append-only, line-buffered writer; safe to call from several threads."""

    def __init__(self, path, clock_start=None, rank=None):
        self.path = path
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()
        # CLOCK_MONOTONIC is one clock for every process of a machine: ranks
        # started from the same clock_start share a time axis.
        self.t0 = time.monotonic() if clock_start is None else clock_start
        self.rank = rank  # tags every event of a multi-rank run

    def now(self):
        return time.monotonic() - self.t0

    def emit(self, kind, **fields):
        event = {"t": round(self.now(), 4), "kind": kind, **fields}
        if self.rank is not None:
            event["rank"] = self.rank
        line = encode(event)
        with self._lock:
            if not self._f.closed:
                self._f.write(line)
        return event

    def close(self):
        with self._lock:
            self._f.close()


# ---------------------------------------------------------------- /proc readers

def read_status(pid="self"):
    """VmRSS, VmHWM and VmLck of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmLck"):
                out[key] = int(value.split()[0]) * 1024
    return out


def read_io(pid="self"):
    """Bytes this process made the storage layer read and write (/proc/pid/io)."""
    out = {"read_bytes": 0, "write_bytes": 0}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value)
    except OSError:
        pass
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_mallinfo2 = getattr(_libc, "mallinfo2", None)
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_MAP_FAILED = ctypes.c_void_p(-1).value


class Heap(NamedTuple):
    """One reading of glibc's malloc: `free`, bytes its arenas hold unused
    (fordblks, the top pad included: the fragmentation of the ordinary heap), and
    `live`, bytes handed out, not yet freed and in RAM (uordblks + hblkhd, less
    the pages of mmapped blocks nobody has written yet). Every tensor torch or
    DeepSpeed makes on the host is a malloc block (posix_memalign), so `live`
    counts them all, views once. Zeros where mallinfo2 is missing (`known` False)."""
    free: int = 0
    live: int = 0
    known: bool = True


def heap_reading():
    """glibc's heap now (Heap). mallinfo2 walks every free chunk (cheap on a tidy
    heap, tens of milliseconds on a fragmented one); the mmapped blocks' pages not
    in RAM are read from /proc/self/maps and mincore (unwritten_mmapped_bytes)."""
    if _mallinfo2 is None:
        return Heap(known=False)
    info = _mallinfo2()
    return Heap(free=info.fordblks, live=info.uordblks + info.hblkhd - unwritten_mmapped_bytes())


_IS_MMAPPED = 0x2  # glibc's chunk flag: this block is a mapping of its own
_SIZE_BITS = ~0x7
_RESIDENT_BIT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each page's byte


def unwritten_mmapped_bytes():
    """Bytes of glibc's mmapped blocks (those at or above the mmap threshold) not in
    RAM: a tensor made with torch.empty and never, or not wholly, written takes no
    RAM. Each such block is a mapping that starts with its chunk header (prev_size
    0, then its length with IS_MMAPPED set; an aligned block keeps that first
    header too), and adjacent blocks share one line of /proc/self/maps, so each
    anonymous line is walked header by header from its start, up to the first page
    that holds none. (Other memory can share a line, such as Python's own arenas;
    blocks after it in the same line are not seen and count as written: searching
    every page costs tens of milliseconds a reading, more than the sampler may spend.)"""
    unwritten = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        mem = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return 0
    try:
        for line in lines:
            fields = line.split()
            if fields[1] == "rw-p" and len(fields) <= 5:  # anonymous: not files, [heap], [stack], reserved space
                start, end = (int(x, 16) for x in fields[0].split("-"))
                unwritten += _unwritten_in_mapping(mem, start, end)
    finally:
        os.close(mem)
    return unwritten


def _unwritten_in_mapping(mem, start, end):
    """The unwritten bytes of the mmapped blocks at the start of one mapping. Headers
    are read through /proc/self/mem: another thread may unmap a block meanwhile, and
    a read there is an error, not a crash."""
    pages = (end - start) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), pages * PAGE, vec) != 0:
        return 0
    resident = bytes(vec).translate(_RESIDENT_BIT)  # one byte per page: 1 in RAM
    unwritten, page = 0, 0
    while page < pages - 1 and resident[page]:  # a header is written memory
        try:
            header = os.pread(mem, 16, start + page * PAGE)
        except OSError:
            break  # unmapped meanwhile
        if len(header) < 16:
            break
        prev_size, size = int.from_bytes(header[:8], sys.byteorder), int.from_bytes(header[8:], sys.byteorder)
        length = (size & _SIZE_BITS) // PAGE
        if prev_size != 0 or not size & _IS_MMAPPED or (size & _SIZE_BITS) % PAGE or not 0 < length <= pages - page:
            break  # not a glibc mmapped chunk
        unwritten += (length - resident.count(1, page, page + length)) * PAGE
        page += length
    return unwritten


def heap_free_bytes():
    """Bytes glibc's malloc arenas hold free (Heap.free); 0 where mallinfo2 is missing."""
    return heap_reading().free


def resident_bytes(address, nbytes):
    """Bytes of the memory at [address, address + nbytes) that are in RAM
    (mincore, page by page): a block malloc handed out but nobody wrote yet
    takes no RAM."""
    if nbytes <= 0:
        return 0
    start = address - address % PAGE
    length = address + nbytes - start
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(start), length, vec) != 0:
        return nbytes  # cannot tell: count it all
    return min(nbytes, (pages - bytes(vec).count(0)) * PAGE)


def page_cache_bytes(paths):
    """Bytes of these files that sit in the kernel page cache (mmap + mincore,
    as fincore does). Files that vanish meanwhile count 0."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, _MAP_FAILED):
                continue
            try:
                pages = -(-size // PAGE)
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(addr, size, vec) == 0:
                    # one byte per page, bit 0 = resident (the other bits are reserved, 0)
                    total += (pages - bytes(vec).count(0)) * PAGE
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


class Budgeted:
    """A reading whose cost varies with the process (mallinfo2 walks every free
    heap chunk: 15 us on a tidy heap, 40 ms on a fragmented one; the page-cache
    scan maps every swap file). It is refreshed only as often as keeps its
    share of one core under `share`, and the last value is reused between."""

    def __init__(self, read, share=0.005):
        self.read = read
        self.share = share
        self.value = 0
        self.next_at = 0.0
        self.reads = 0

    def get(self, fresh=False):
        """The last value, read again if its budget allows it (or `fresh`)."""
        now = time.monotonic()
        if fresh or now >= self.next_at:
            started = time.thread_time()
            self.value = self.read()
            self.reads += 1
            self.next_at = now + (time.thread_time() - started) / self.share
        return self.value


class Sampler(threading.Thread):
    """Background thread emitting a `sample` event every `interval` seconds.

    `attribute(rss, page_cache, heap)` is called on each tick and returns
    the fields the probes own (per-component bytes, pinned reserved/used). The
    readings whose cost grows with the run (swap files' page-cache residency,
    glibc's heap) are refreshed within a CPU budget (Budgeted); the heap is read
    afresh whenever RSS reaches a new peak or has moved more than HEAP_DRIFT since
    it was last read, so the peak sample's split is never stale and no sample's
    split is off by more than that; a fresh heap reading is taken again (TRIES)
    while RSS moved by more than that during it.
    """

    HEAP_DRIFT = 16 << 20  # the sizing comparison's floor: a split good to it is good enough
    TRIES = 3  # readings of RSS and the heap until they agree (each a few ms at most)

    def __init__(self, writer, attribute, swap_files, interval=0.075):
        super().__init__(name="memlab-sampler", daemon=True)
        self.writer = writer
        self.attribute = attribute
        self.page_cache = Budgeted(lambda: page_cache_bytes(swap_files()))
        self.heap = Budgeted(heap_reading)
        self.heap_rss = 0  # RSS when the heap was last read
        self.interval = interval
        self._stop_event = threading.Event()
        self._lock = threading.Lock()  # a sample is also taken from the training thread (a transient's record)
        self.peak_rss = 0
        self.ticks = 0
        self.cpu_seconds = 0.0  # this thread's own CPU time: the sampler's cost, measured

    def sample_once(self):
        with self._lock:
            return self._sample()

    def _sample(self):
        for _ in range(self.TRIES):
            status = read_status()
            rss = status["VmRSS"]
            fresh = rss > self.peak_rss or abs(rss - self.heap_rss) > self.HEAP_DRIFT
            reads = self.heap.reads
            heap = self.heap.get(fresh=fresh)
            if self.heap.reads == reads:
                break
            self.heap_rss = rss
            # RSS and the heap are two readings: a large tensor written or freed between them would
            # put its bytes in one and not the other (in `other`); read both again if RSS moved
            if abs(read_status()["VmRSS"] - rss) <= self.HEAP_DRIFT:
                break
        io = read_io()
        page_cache = self.page_cache.get()
        self.ticks += 1
        self.peak_rss = max(self.peak_rss, rss)
        fields = self.attribute(rss, page_cache, heap)
        return self.writer.emit(
            "sample",
            rss=rss,
            vm_lck=status["VmLck"],
            vm_hwm=status["VmHWM"],
            page_cache=page_cache,
            io_read=io["read_bytes"],
            io_write=io["write_bytes"],
            **fields,
        )

    def run(self):
        while not self._stop_event.wait(self.interval):
            started = time.thread_time()
            try:
                self.sample_once()
            except Exception as exc:  # the sampler must never take the run down
                self.writer.emit("log", message=f"sampler: {exc!r}")
            self.cpu_seconds += time.thread_time() - started

    def stop(self):
        self._stop_event.set()
        self.join(timeout=2)
