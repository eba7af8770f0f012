"""The worker: one real DeepSpeed ZeRO-3 offload fine-tuning run, in its own process.

    python -m memlab.engine.worker RUN_DIR

reads RUN_DIR/request.json (written by the parent), builds the model under
`deepspeed.zero.Init`, trains, and appends events to RUN_DIR/events.jsonl.
It knows nothing of widgets; the parent follows the event file.
"""
import json
import os
import platform
import signal
import sys
import time
import traceback
from importlib import metadata

from ..runs import SWAP_MARKER, events_file, summarize
from ..telemetry import SCHEMA, EventWriter, Sampler

REQUEST_FILE = "request.json"
STOP_SIGNAL = signal.SIGTERM


class StopRequested(Exception):
    """The parent asked the run to stop (SIGTERM)."""


class RecordingWriter(EventWriter):
    """EventWriter that keeps what it wrote, so the worker can summarize itself."""

    def __init__(self, path, clock_start=None, rank=None):
        super().__init__(path, clock_start, rank)
        self.events = []

    def emit(self, kind, **fields):
        event = super().emit(kind, **fields)
        self.events.append(event)
        return event


def library_versions():
    versions = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers", "memlab"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_facts():
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "cuda": os.path.exists("/proc/driver/nvidia/version"),
        "pid": os.getpid(),
    }


class Worker:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        with open(os.path.join(run_dir, REQUEST_FILE)) as f:
            self.request = json.load(f)
        self.knobs = self.request["knobs"]  # resolved, flat: dotted name -> value
        # Under DeepSpeed's launcher each rank is one worker with RANK/WORLD_SIZE set.
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        multi = self.world_size > 1
        self.writer = RecordingWriter(os.path.join(run_dir, events_file(self.rank)),
                                      clock_start=self.request.get("t0"), rank=self.rank if multi else None)
        self.stop_requested = False
        self.phase = "start"
        self.step_index = 0
        self.probes = None
        self.sampler = None

    # -- control -----------------------------------------------------------------
    def _on_stop_signal(self, signum, frame):
        self.stop_requested = True

    def parent_gone(self):
        """Is the process that follows this run (the lab) gone? Under the
        launcher the lab is not the direct parent, so ask whether it lives."""
        parent = os.environ.get("MEMLAB_PARENT_PID")
        if parent is None:
            return False
        try:
            os.kill(int(parent), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def check_stop(self):
        if self.stop_requested:
            raise StopRequested()

    def enter_phase(self, name):
        self.phase = name
        self.writer.emit("phase", name=name, step=self.step_index)

    # -- the run -----------------------------------------------------------------
    def run(self):
        signal.signal(STOP_SIGNAL, self._on_stop_signal)
        self.writer.emit("run_start", schema=SCHEMA, run_id=self.request["run_id"],
                         knobs=self.request["knobs_nested"], model=self.request["model"],
                         versions=library_versions(), host=host_facts())
        status, error = "ok", None
        self._watch_op_locks()
        try:
            self._start_probes()
            self.train()
        except StopRequested:
            who = "the parent process ended (kernel restarted or interrupted)" if self.parent_gone() else \
                "stopped by the user"
            status, error = "stopped", f"{who} at step {self.step_index} ({self.phase})"
        except BaseException as exc:  # DeepSpeed asserts included: report, then exit non-zero
            status = "failed"
            error = self.lock_error or self._disk_full_cause() or \
                f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            error += f" (phase {self.phase}, step {self.step_index})"
            self.writer.emit("error", message=error, traceback="".join(traceback.format_exc()).splitlines()[-25:],
                             phase=self.phase, step=self.step_index)
        finally:
            if self.sampler is not None:
                self.sampler.sample_once()  # a last sample after the final step
                self.sampler.stop()
        summary = summarize(self.writer.events, status=status, error=error)
        self.writer.emit("run_end", status=status, error=error, summary=summary)
        self.writer.close()
        if self.parent_gone() and self.rank == 0:
            self._remove_own_swap_folder()  # nobody else is left to do it
        return 0 if status == "ok" else 1

    def _disk_full_cause(self):
        """DeepSpeed reports a failed aio write as a bare assert: name the real cause."""
        from ..lab import no_space_left

        folder = self.request.get("swap_path")
        return f"no space left on {folder}" if no_space_left(folder) else None

    def _remove_own_swap_folder(self):
        import shutil

        folder = self.request.get("swap_path")
        if folder and os.path.isfile(os.path.join(folder, SWAP_MARKER)):
            shutil.rmtree(folder, ignore_errors=True)

    def _start_probes(self):
        from .probes import Probes

        self.probes = Probes(self.writer)
        if not self.knobs["run.telemetry"]:
            return  # step events only: the baseline of the overhead benchmark

        def attribute(rss, page_cache, heap_free):
            if self.parent_gone():
                self.stop_requested = True  # stops at the next phase boundary
            fields = self.probes.attribute(rss, page_cache, heap_free)
            for pool in self.probes.pool_events():
                self.writer.emit("pool", **pool)
            fields["phase"] = self.phase
            fields["step"] = self.step_index
            return fields

        self.sampler = Sampler(self.writer, attribute, self._swap_files, interval=1.0 / self.knobs["run.sample_hz"])
        self.sampler.start()

    def _watch_op_locks(self, every=5.0):
        """Until training starts, look for a DeepSpeed op build lock that went
        stale (its build was killed) while this worker waits on it: torch would
        wait forever. Interrupt the wait and fail with what to do instead."""
        import _thread
        import threading

        from .. import oplocks

        self.lock_error = None

        def watch():
            while self.phase in ("start", "import", "model_init", "engine_init"):
                time.sleep(every)
                try:
                    oplocks.check()
                except oplocks.StaleOpLock as exc:
                    self.lock_error = str(exc)
                    _thread.interrupt_main()
                    return

        threading.Thread(target=watch, name="memlab-op-locks", daemon=True).start()

    def _swap_files(self):
        folder = self.request.get("swap_path")
        if not folder or not os.path.isdir(folder):
            return []
        return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                if name != SWAP_MARKER]

    def train(self):
        k = self.knobs
        self.enter_phase("import")
        import torch
        import torch._dynamo  # noqa: F401  must be imported before zero.Init patches Tensor.__new__ (trap 4)
        import deepspeed
        import transformers
        from transformers.integrations import HfDeepSpeedConfig

        from ..models import ModelSpec
        from . import build_ops, memascend

        build_ops.build_all(report=lambda message: self.writer.emit("log", message=message), only_missing=True)
        from . import probes as probe_hooks

        spec = ModelSpec.from_dict(self.request["model"])
        from ..sizing import staging_plan

        plan = staging_plan([t.numel for t in spec.tensors()], k["zero_optimization.sub_group_size"],
                            k["memascend.staging_elements"])
        context = {"model": spec, "probes": self.probes, "staging_plan": plan,
                   "swap_path": self.request.get("swap_path"), "region_bytes": self.request.get("region_bytes", 0)}
        installed = memascend.install(k, context)  # before the probes wrap what they patch
        if installed:
            self.writer.emit("log", message=f"memascend: {', '.join(installed)}")
        if k["run.telemetry"]:
            probe_hooks.install(self.probes)
        self.check_stop()

        self.enter_phase("model_init")
        torch.manual_seed(k["run.seed"])
        ds_config = self.request["ds_config"]
        deepspeed.init_distributed(dist_backend=self.request.get("dist_backend", "gloo"), verbose=False)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[k["run.dtype"]]
        config = spec.hf_config()
        # A live HfDeepSpeedConfig makes transformers build the model under
        # zero.Init itself and initialize the partitioned weights (trap 5).
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  kept alive until initialize
        self.probes.framework_bytes = _rss()
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        if k["run.gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        model.train()
        self.check_stop()

        self.enter_phase("engine_init")
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                      config=ds_config)
        if k["run.telemetry"]:
            probe_hooks.attribute_engine_buffers(self.probes, engine)
        self.probes.take_step_counters()  # init I/O is not a training step's
        batches = self._batches(torch, spec)
        self.check_stop()

        for index in range(k["run.steps"]):
            self.step_index = index + 1
            input_ids = next(batches)
            started, cpu_started = time.perf_counter(), time.process_time()
            telemetry_before = self.sampler.cpu_seconds if self.sampler else 0.0
            self.enter_phase("forward")
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            self.enter_phase("backward")
            engine.backward(loss)
            self.enter_phase("optimizer_step")
            engine.step()
            if index == 0 and k["run.telemetry"]:
                probe_hooks.attribute_optimizer_state(self.probes, optimizer)
            if k["allocator.malloc_trim"] == "each_step":
                _malloc_trim()
            seconds = time.perf_counter() - started
            counters = self.probes.take_step_counters()
            # CPU seconds of every thread of the worker (sampler included): the
            # cost of work, steadier than wall time on a shared machine
            counters["cpu_seconds"] = round(time.process_time() - cpu_started, 6)
            # what telemetry itself cost in this step, measured where it runs
            sampler_cpu = self.sampler.cpu_seconds if self.sampler else 0.0
            counters["telemetry_seconds"] = round(sampler_cpu - telemetry_before + self.probes.hook_seconds, 6)
            self.probes.hook_seconds = 0.0
            counters["swap_files"] = len(self._swap_files())  # files the swap folder holds (creations)
            value = float(loss.detach().float().item())
            self.writer.emit("step", index=self.step_index, seconds=round(seconds, 6), loss=value, **counters)
            print(f"memlab: rank {self.rank} step {self.step_index}/{k['run.steps']} loss {value:.4f} "
                  f"{seconds:.2f}s", file=sys.stderr, flush=True)
            self.check_stop()
        self.enter_phase("done")

    def _batches(self, torch, spec):
        """Token batches: the user's texts or token ids, else seeded random tokens."""
        k = self.knobs
        shape = (k["run.micro_batch"], k["run.seq_len"])
        data = self.request.get("data")
        generator = torch.Generator().manual_seed(k["run.seed"] + self.rank)  # each rank its own batches
        if data is None:
            while True:
                yield torch.randint(0, spec.vocab_size, shape, generator=generator)
        tokens = torch.tensor([t for row in tokenize(data, spec) for t in row], dtype=torch.long)
        per_batch = shape[0] * shape[1]
        if tokens.numel() < per_batch:
            tokens = tokens.repeat(-(-per_batch // tokens.numel()))
        offset = 0
        while True:
            if offset + per_batch > tokens.numel():
                offset = 0
            yield tokens[offset:offset + per_batch].view(shape)
            offset += per_batch


def tokenize(data, spec):
    """Token ids for each item: lists pass through; texts go through the
    checkpoint's own tokenizer if it has one, else become UTF-8 bytes."""
    tokenizer = None
    if any(isinstance(row, str) for row in data) and spec.checkpoint_dir:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint_dir, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None  # no tokenizer files in the folder
    out = []
    for row in data:
        if not isinstance(row, str):
            out.append(list(row))
        elif tokenizer is not None:
            out.append(tokenizer(row)["input_ids"])
        else:
            out.append([b % spec.vocab_size for b in row.encode("utf-8")])
    return out


def _rss():
    from ..telemetry import read_status

    return read_status()["VmRSS"]


def _malloc_trim():
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def die_with_parent():
    """Ask the kernel for SIGTERM when the parent dies (a notebook kernel that is
    restarted or killed), so the worker never outlives whoever follows it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, STOP_SIGNAL)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # DeepSpeed's launcher adds it; RANK says the same
    if len(argv) != 1:
        print("usage: python -m memlab.engine.worker RUN_DIR", file=sys.stderr)
        return 2
    die_with_parent()
    worker = Worker(argv[0])
    if worker.parent_gone():  # the parent died before the request above was registered
        worker.stop_requested = True
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
