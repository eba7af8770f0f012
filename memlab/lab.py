"""Lab: plans runs, launches the worker, follows it, keeps the run store.

`Lab.run()` validates everything before any process starts, then returns a
live Run at once: the worker trains in a child process while a background
thread follows its event file. The caller's thread (a notebook cell) is free.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from . import oplocks, protocol
from . import runs as R
from . import shapes
from .protocol import (EVENTS_FILE, IN_FLIGHT_PREFIX, REQUEST_FILE, SWAP_MARKER, WORKER_LOG, make_swap_folder,
                       no_space_left, rank_files, remove_swap_folder, swap_folder_owner)
from .knobs import DTYPE_BYTES, Knobs, KnobError
from .models import ModelSpec
from .budget import CgroupLimit, growing_component
from .sizing import nvme_footprint
from .summary import summarize
from .telemetry import read_status
from .telemetry import decode_lines
from .units import format_bytes, format_in

FOLLOW_INTERVAL = 0.1
# Stop: a worker ends itself at once (it raises where it is); one stuck in
# native code gets this long before its whole process group is killed.
STOP_GRACE_SECONDS = 5.0


def default_store():
    return os.environ.get("MEMLAB_STORE") or os.path.abspath("memlab-runs")


def default_swap_root():
    return os.environ.get("MEMLAB_SWAP_DIR") or os.path.join(tempfile.gettempdir(), "memlab-swap")


def new_run_id():
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_swap_root(path):
    """The swap root must be a writable folder on a file system with O_DIRECT
    (DeepSpeed's aio opens every swap file with it) that holds nothing but
    memlab's own run folders: memlab never writes beside files it does not own."""
    knob = "run.swap_dir"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise KnobError(knob, path, f"cannot create it ({exc.strerror})")
    if not os.path.isdir(path):
        raise KnobError(knob, path, "is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise KnobError(knob, path, "is not writable")
    foreign = sorted(name for name in os.listdir(path) if not name.startswith(IN_FLIGHT_PREFIX)
                     and not os.path.isfile(os.path.join(path, name, SWAP_MARKER)))
    if foreign:
        raise KnobError(knob, path, f"holds files memlab did not create ({foreign[0]!r}); name an empty folder "
                                    f"or one memlab made")
    probe = os.path.join(path, f"{IN_FLIGHT_PREFIX}odirect-{os.getpid()}-{secrets.token_hex(2)}")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
        os.close(fd)
    except OSError as exc:
        raise KnobError(knob, path, f"its file system does not support O_DIRECT ({exc.strerror})")
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


def remove_orphaned_swap_folders(root):
    """Swap folders of runs whose parent died without cleaning up (killed
    notebook kernel): memlab made them (marker), nobody follows them anymore."""
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        try:
            owner = swap_folder_owner(folder)
        except (OSError, ValueError, IndexError):
            continue
        if not protocol.alive(owner):
            remove_swap_folder(folder)


def check_free_space(path, needed, knob="run.swap_dir"):
    free = shutil.disk_usage(path).free
    if free < needed:
        raise KnobError(knob, path, f"has {format_in(free, 'MiB', 0)} free; this run swaps about "
                                    f"{format_in(needed, 'MiB', 0)} to it")


def mounted_devices():
    """Real paths of every block device that holds a mounted file system or swap."""
    found = set()
    for table, column in (("/proc/mounts", 0), ("/proc/swaps", 0)):
        try:
            with open(table) as f:
                for line in f:
                    source = line.split()[column]
                    if source.startswith("/dev/"):
                        found.add(os.path.realpath(source))
        except OSError:
            continue
    return found


def check_block_device(path):
    """A raw device for memascend.storage=direct: named explicitly, a block
    device, not mounted (nor a partition of it mounted), writable, O_DIRECT."""
    import stat

    knob = "memascend.storage_device"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KnobError(knob, path, f"cannot use it ({exc.strerror})")
    if not stat.S_ISBLK(mode):
        raise KnobError(knob, path, "is not a block device")
    real = os.path.realpath(path)
    name = os.path.basename(real)
    mounted = mounted_devices()
    partitions = {os.path.realpath(os.path.join("/dev", p)) for p in _partitions(name)}
    if real in mounted or partitions & mounted:
        raise KnobError(knob, path, "is mounted (or holds a mounted partition); memlab never writes a mounted device")
    if not os.access(path, os.W_OK):
        raise KnobError(knob, path, "is not writable")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError as exc:
        raise KnobError(knob, path, f"cannot be opened with O_DIRECT ({exc.strerror})")


def _partitions(name):
    try:
        return [p for p in os.listdir(f"/sys/class/block/{name}") if p.startswith(name)]
    except OSError:
        return []


def worker_command(resolved, run_dir, port):
    """One rank: the worker itself. Several ranks or nodes: DeepSpeed's own
    launcher, which starts one worker per rank with RANK, LOCAL_RANK and
    WORLD_SIZE set (and on several nodes reaches them through its hostfile)."""
    worker = ["-m", "memlab.engine.worker", run_dir]
    ranks, hostfile = resolved["run.ranks"], resolved["run.hostfile"]
    if ranks == 1 and hostfile is None:
        return [sys.executable, *worker]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port]
    if hostfile is not None:
        command += ["--hostfile", hostfile]
    return command + ["--module", "memlab.engine.worker", run_dir]


class WorkerProcess:
    """The child process of one run (the worker, or the launcher of its ranks)."""

    def __init__(self, argv, env, log_path, budget=None, name="memlab"):
        self.log = open(log_path, "ab")
        # Own session: Stop and cleanup reach the worker and anything it started.
        self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.stop_requested = False
        self.over_budget = None  # (rss, by whom) once the budget was exceeded
        self.budget = budget
        self.cgroup = CgroupLimit.create(name, budget) if budget else None
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.popen.pid)
            except OSError:
                self.cgroup.remove()
                self.cgroup = None
        self.max_rss_bytes = None  # the kernel's peak RSS of the worker, once it has exited
        self._poll_lock = threading.Lock()  # the follower and stop() both poll

    @property
    def pid(self):
        return self.popen.pid

    def poll(self):
        """Exit status (negative: killed by that signal) or None while running.
        Reaps with wait4 to keep the kernel's own peak-RSS figure of the child."""
        with self._poll_lock:
            if self.popen.returncode is None:
                pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
                if pid == 0:
                    return None
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.max_rss_bytes = usage.ru_maxrss * 1024  # Linux reports KiB
            return self.popen.returncode

    def check_budget(self):
        """Watchdog: kill the worker the moment its RSS passes the budget."""
        if not self.budget or self.over_budget or self.poll() is not None:
            return
        rss = self.group_rss()
        if rss > self.budget:
            self.over_budget = (rss, "watchdog")
            self._signal_group(signal.SIGKILL)

    def group_rss(self):
        """RSS of the worker and everything it started (all ranks under the launcher)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) == self.popen.pid:
                    total += read_status(pid)["VmRSS"]
            except (OSError, KeyError):
                continue
        return total

    def stop(self, timeout=STOP_GRACE_SECONDS):
        """SIGTERM (the worker stops where it is), then SIGKILL the group."""
        self.stop_requested = True
        if self.poll() is None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.poll() is None:
                self._signal_group(signal.SIGKILL)
                while self.poll() is None:
                    time.sleep(0.01)

    def _signal_group(self, sig):
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def _reap_group(self):
        # Nothing the worker started may outlive the run.
        self._signal_group(signal.SIGKILL)
        if self.cgroup is not None:
            if self.over_budget is None and self.cgroup.oom_killed():
                self.over_budget = (self.budget, "cgroup")
            self.cgroup.remove()
            self.cgroup = None
        if not self.log.closed:
            self.log.close()


class Lab:
    """Launches, follows and remembers runs. `Lab(store="memlab-runs")`."""

    def __init__(self, store=None):
        self.store = os.path.abspath(store or default_store())
        os.makedirs(self.store, exist_ok=True)
        self.live = []

    # -- planning (no process) ----------------------------------------------------
    def plan(self, knobs=None, model=None, engine=None, data=None, **overrides):
        """Validate and resolve a run; returns (Knobs, ModelSpec, ResolvedKnobs).
        Every error here is raised before any process starts."""
        if knobs is None:
            knobs = Knobs(engine=engine or "deepspeed")
        elif isinstance(knobs, dict):
            knobs = Knobs(knobs, engine=engine or "deepspeed")
        elif isinstance(knobs, (str, os.PathLike)):
            knobs = Knobs.from_ds_config(knobs, engine=engine or "deepspeed")
        elif engine is not None and engine != knobs.engine:
            if engine == "custom":
                raise KnobError("engine", engine, "set memascend.* switches one by one instead")
            knobs = knobs.with_engine(engine)
        if overrides:
            knobs = knobs.set({k if "." in k else f"run.{k}": v for k, v in overrides.items()})
        spec = ModelSpec.resolve(model if model is not None else "tiny-llama")
        resolved = knobs.resolve(spec)
        oplocks.check()  # a killed op build would make the worker wait forever
        if resolved["memascend.storage_device"]:
            check_block_device(resolved["memascend.storage_device"])
        if data is not None:
            _check_data(data, spec)
        return knobs, spec, resolved

    # -- running ----------------------------------------------------------------------
    def run(self, knobs=None, model=None, engine=None, data=None, wait=False, **overrides):
        """Start a real run; returns the live Run at once (or when done with wait=True).

        `knobs`: Knobs, a dict of dotted knob names, or a ds_config.json path.
        `model`: preset name, config.json path, checkpoint folder, dict or ModelSpec.
        `data`: texts or token-id lists to train on instead of random tokens. Texts
        use the checkpoint's tokenizer when the model is a folder that has one,
        else UTF-8 bytes as token ids.
        `overrides`: knob changes, `steps=5` or `**{"aio.block_size": 2**21}`."""
        knobs, spec, resolved = self.plan(knobs, model, engine, data, **overrides)
        warn_if_over_budget(knobs, spec, resolved)
        for risk in resolved.risks:
            warnings.warn(f"memlab: {risk}; running it", stacklevel=2)
        shapes.release()  # the shape helper holds torch: not beside the worker (Binder's 2 GB)
        run_id = new_run_id()
        footprint = nvme_footprint(
            [t.numel for t in spec.tensors()], DTYPE_BYTES[resolved["run.dtype"]], resolved["aio.block_size"],
            resolved["zero_optimization.sub_group_size"], resolved["aio.intra_op_parallelism"],
            resolved["zero_optimization.offload_param.device"] == "nvme",
            resolved["zero_optimization.offload_optimizer.device"] == "nvme")
        swap_path = self._make_swap_folder(resolved, run_id, footprint)  # checks the swap folder first
        run_dir = os.path.join(self.store, run_id)
        os.makedirs(run_dir)
        request = {
            "run_id": run_id,
            "vocab_size": spec.vocab_size,
            "knobs": resolved.values,
            "knobs_nested": resolved.to_dict(),
            "from_auto": resolved.from_auto,
            "risks": [risk.to_dict() for risk in resolved.risks],  # their explanations, should DeepSpeed assert
            "model": spec.to_dict(),
            "ds_config": resolved.to_ds_config(swap_path),
            "swap_path": swap_path,
            "region_bytes": footprint,
            "data": None if data is None else [r if isinstance(r, str) else list(r) for r in data],
            "t0": time.monotonic(),  # every rank's events count time from here (one clock per machine)
        }
        with open(os.path.join(run_dir, REQUEST_FILE), "w") as f:
            json.dump(request, f, indent=1)
        env = self._worker_env(resolved)
        try:
            process = WorkerProcess(worker_command(resolved, run_dir, env["MASTER_PORT"]), env,
                                    os.path.join(run_dir, WORKER_LOG), budget=resolved["run.budget"],
                                    name=f"memlab-{run_id}")
        except OSError:
            remove_swap_folder(swap_path)
            shutil.rmtree(run_dir, ignore_errors=True)  # memlab made it a moment ago; nothing ran
            raise
        run = R.Run(run_dir)
        run._process = process
        self.live.append(run)
        follower = threading.Thread(target=self._follow, args=(run, process, swap_path),
                                    name=f"memlab-follow-{run_id}", daemon=True)
        follower.start()
        if wait:
            run.wait()
        return run

    def _make_swap_folder(self, resolved, run_id, needed=0):
        on_nvme = "nvme" in (resolved["zero_optimization.offload_param.device"],
                             resolved["zero_optimization.offload_optimizer.device"])
        if not on_nvme:
            return None
        root = os.path.abspath(resolved["run.swap_dir"] or default_swap_root())
        check_swap_root(root)
        remove_orphaned_swap_folders(root)
        check_free_space(root, needed)
        return make_swap_folder(root, run_id)  # unique per run: never shared, never pre-existing

    def _worker_env(self, resolved):
        env = dict(os.environ)
        env.update({
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1",
            "MEMLAB_PARENT_PID": str(os.getpid()),
            "DS_PIN_MEMORY_BACKEND": resolved["allocator.DS_PIN_MEMORY_BACKEND"],
        })
        for name in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
            value = resolved[f"allocator.{name}"]
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        oplocks.use_extensions_root(env)  # the ops set-up built, for this environment
        # The worker imports memlab from wherever this process found it.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        return env

    def _follow(self, run, process, swap_path):
        offsets, partials = {}, {}  # events file -> bytes read, torn tail kept for the next read

        def read_new():
            new = []
            for path in rank_files(run.path).values():
                with open(path) as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    offsets[path] = f.tell()
                if not chunk:
                    continue
                lines = (partials.get(path, "") + chunk).splitlines(keepends=True)
                partials[path] = lines.pop() if not lines[-1].endswith("\n") else ""
                new += decode_lines(lines)[0]
            if new:
                run._ingest(R.sort_events(new))

        disk_full = False
        try:
            while process.poll() is None:
                read_new()
                process.check_budget()
                time.sleep(FOLLOW_INTERVAL)
            read_new()
            run._settle_order()
            returncode = process.poll()
            disk_full = no_space_left(swap_path)  # before our own files are removed
        finally:
            process._reap_group()
            remove_swap_folder(swap_path)
        expected = range(run_ranks(run))
        unreported = [r for r in expected if not any(e["kind"] == "run_end" and e.get("rank", 0) == r
                                                     for e in run.events)]
        status = error = None
        if process.over_budget is not None:
            status, error = "over_budget", _budget_cause(process, run.events)
        elif unreported:
            status = "stopped" if process.stop_requested else "failed"
            error = _death_cause(returncode, run.events, process.stop_requested)
            if len(expected) > 1:
                error = f"rank {', '.join(map(str, unreported))} ended without reporting why; {error}"
            if disk_full and not process.stop_requested:
                # DeepSpeed's aio aborts the process on a failed write: name the real cause
                error = f"no space left on {swap_path} ({error})"
        summary = summarize(run.events, status=status, error=error)
        R.write_summary(run.path, summary)
        run.worker_max_rss_bytes = process.max_rss_bytes
        if run in self.live:
            self.live.remove(run)
        run._finish(summary)

    # -- views ------------------------------------------------------------------------
    def dashboard(self, **options):
        """The notebook lab: knob panel, Run/Stop, live charts, run history and
        comparison, in one ipywidgets widget (memlab.views.dashboard.Dashboard)."""
        from .views.dashboard import Dashboard

        return Dashboard(self, **options)

    def compare(self, runs=None, labels=None):
        """A plotly figure comparing runs (Run objects, run ids or run folders;
        default: every run in the store) side by side: peaks and components at peak."""
        from .views.figures import compare_runs

        if runs is None:
            runs = self.runs()
        chosen = []
        for run in runs:
            if isinstance(run, R.Run):
                chosen.append(run)
                continue
            path = os.fspath(run)
            if not os.path.isdir(path):
                path = os.path.join(self.store, path)
            chosen.append(next((r for r in self.live if r.path == path), None) or R.load_run(path))
        return compare_runs(chosen, labels=labels)

    # -- the store ----------------------------------------------------------------------
    def runs(self):
        """Every run in the store, oldest first (runs that cannot be read are skipped with a warning)."""
        found = []
        for name in sorted(os.listdir(self.store)):
            path = os.path.join(self.store, name)
            if not os.path.isfile(os.path.join(path, EVENTS_FILE)):
                continue
            live = next((r for r in self.live if r.path == path), None)
            if live is not None:
                found.append(live)
                continue
            try:
                found.append(R.load_run(path))
            except (R.RunStoreError, OSError, ValueError) as exc:
                warnings.warn(f"memlab: skipping {path}: {exc}")
        return found


def warn_if_over_budget(knobs, spec, resolved):
    """Preflight: say so when the what-if model expects the run past its budget."""
    budget = resolved["run.budget"]
    if not budget:
        return
    from .sizing import Hardware, estimate

    predicted = estimate(spec, knobs, Hardware(ranks_per_node=resolved["run.ranks"]))
    peak = predicted.node_peak_host_bytes
    if peak > budget:
        largest = max(predicted.components.items(), key=lambda item: item[1])[0]
        warnings.warn(f"memlab: the estimate for this run peaks at {format_bytes(peak)}, over its "
                      f"{format_bytes(budget)} budget (largest component: {largest}); it will likely end over_budget",
                      stacklevel=3)


def run_ranks(run):
    """Ranks a run was started with (on this node)."""
    try:
        with open(os.path.join(run.path, REQUEST_FILE)) as f:
            return json.load(f)["knobs"].get("run.ranks", 1)
    except (OSError, ValueError, KeyError):
        return 1


def _death_cause(returncode, events, stop_requested):
    phase = next((e for e in reversed(events) if e["kind"] == "phase"), {})
    where = f"(last phase {phase.get('name', 'start')}, step {phase.get('step', 0)})"
    if stop_requested:
        return f"stopped by the user {where}"
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"worker killed by {name}{hint} {where}"
    return f"worker exited with status {returncode} without reporting why {where}"


def _budget_cause(process, events):
    phase = next((e for e in reversed(events) if e["kind"] == "phase"), {})
    samples = [e for e in events if e["kind"] == "sample"]
    rss, by = process.over_budget
    growing = growing_component(samples)
    return (f"over the {format_bytes(process.budget)} budget at step {phase.get('step', 0)} "
            f"({phase.get('name', 'start')}): RSS {format_bytes(max(rss, samples[-1]['rss'] if samples else 0))}"
            f"{', growing: ' + growing if growing else ''} (stopped by the {by})")


def _check_data(data, spec):
    if not isinstance(data, (list, tuple)) or not data:
        raise KnobError("data", type(data).__name__, "must be a non-empty list of token-id lists")
    for row in data:
        if isinstance(row, str):
            if not row:
                raise KnobError("data", row, "texts must not be empty")
            continue
        if not isinstance(row, (list, tuple)) or not row:
            raise KnobError("data", row, "each item must be a non-empty list of token ids")
        bad = next((t for t in row if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < spec.vocab_size),
                   None)
        if bad is not None:
            raise KnobError("data", bad, f"token ids must be integers in [0, {spec.vocab_size})")

