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
import threading
import time

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
BACKENDS = ("aio-mlock", "native-mlock", "torch-pinned", "pageable")
PINNED_BACKENDS = frozenset({"aio-mlock", "native-mlock", "torch-pinned"})
STATUSES = ("ok", "failed", "stopped", "over_budget")
PAGE = os.sysconf("SC_PAGE_SIZE")


def page_round(nbytes):
    return -(-int(nbytes) // PAGE) * PAGE


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


def heap_free_bytes():
    """Bytes glibc's malloc arenas hold free (fordblks, which includes the top
    pad): the fragmentation of the ordinary heap. 0 where mallinfo2 is missing."""
    if _mallinfo2 is None:
        return 0
    return int(_mallinfo2().fordblks)


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
                    total += sum(b & 1 for b in bytes(vec)) * PAGE
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


class Sampler(threading.Thread):
    """Background thread emitting a `sample` event every `interval` seconds.

    `attribute(rss, page_cache)` is called on each tick and returns the fields the probes
    own (per-component bytes, pinned reserved/used). Page-cache residency of
    the swap files is read every `page_cache_every` ticks (it maps each file).
    """

    def __init__(self, writer, attribute, swap_files, interval=0.075, page_cache_every=8):
        super().__init__(name="memlab-sampler", daemon=True)
        self.writer = writer
        self.attribute = attribute
        self.swap_files = swap_files
        self.interval = interval
        self.page_cache_every = page_cache_every
        self._stop_event = threading.Event()
        self._page_cache = 0
        self.peak_rss = 0
        self.ticks = 0

    def sample_once(self):
        status = read_status()
        io = read_io()
        if self.ticks % self.page_cache_every == 0:
            self._page_cache = page_cache_bytes(self.swap_files())
        self.ticks += 1
        rss = status["VmRSS"]
        self.peak_rss = max(self.peak_rss, rss)
        fields = self.attribute(rss, self._page_cache)
        return self.writer.emit(
            "sample",
            rss=rss,
            vm_lck=status["VmLck"],
            vm_hwm=status["VmHWM"],
            page_cache=self._page_cache,
            io_read=io["read_bytes"],
            io_write=io["write_bytes"],
            **fields,
        )

    def run(self):
        while not self._stop_event.wait(self.interval):
            try:
                self.sample_once()
            except Exception as exc:  # the sampler must never take the run down
                self.writer.emit("log", message=f"sampler: {exc!r}")

    def stop(self):
        self._stop_event.set()
        self.join(timeout=2)
