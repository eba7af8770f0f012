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
import subprocess
import sys
import time
import traceback
from importlib import metadata

from .. import oplocks, protocol
from ..ds_rules import cuda_present
from ..errors import RunError
from ..protocol import REQUEST_FILE, SWAP_MARKER, events_file, no_space_left, remove_swap_folder
from ..summary import summarize
from ..telemetry import SCHEMA, EventWriter, Sampler, heap_reading

# Stop, Ctrl-C, `kill`: the run stops where it is and reports `stopped`.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The kernel's parent-death signal (prctl). Not SIGTERM: it also fires when the
# *thread* that started the worker ends while its process lives on, which must
# not stop the run; its handler asks whether the lab is really gone.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
# The op-lock watcher wakes the main thread with this (a real signal, unlike
# _thread.interrupt_main, interrupts a blocking wait and works whatever
# disposition of SIGINT the worker inherited).
LOCK_SIGNAL = signal.SIGUSR1


# Both raised by signal handlers, anywhere in the main thread: BaseException, as
# KeyboardInterrupt is, so that library code catching Exception (DeepSpeed wraps
# op-load errors in RuntimeError) lets them through.
class StopRequested(BaseException):
    """The run was asked to stop (Stop, Ctrl-C, SIGTERM, or its lab ended)."""


class OpLockWentStale(BaseException):
    """The op build this worker waits on was killed; its lock will never go."""


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
        "cuda": cuda_present(),
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
        self.interruptible = False  # True while a stop may end the run where it is
        self.lock_error = None
        self.watchdog = None
        self.phase = "start"
        self.step_index = 0
        self.probes = None
        self.sampler = None

    # -- control -----------------------------------------------------------------
    # A stop raises StopRequested in the main thread at once, wherever it is
    # (an op-lock wait, DeepSpeed or model init, a step), not at the next phase:
    # the run is ending, and its swap files and buffers go with the process.
    # Native code that never returns to Python is the watchdog's (or the lab's)
    # to end.
    def _on_stop_signal(self, signum, frame):
        self.stop_requested = True
        if self.interruptible:
            self.interruptible = False  # once: the handlers below must run to the end
            raise StopRequested()

    def _on_parent_death(self, signum, frame):
        if self.parent_gone():
            self._on_stop_signal(signum, frame)

    def _on_lock_stale(self, signum, frame):
        if self.interruptible:
            self.interruptible = False
            raise OpLockWentStale(self.lock_error)

    def install_signal_handlers(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_death)
        signal.signal(LOCK_SIGNAL, self._on_lock_stale)

    def start_watchdog(self):
        """The process that ends this worker if its lab dies while the worker
        is stuck where no signal handler runs (memlab.engine.watchdog)."""
        lab = os.environ.get("MEMLAB_PARENT_PID")
        if lab is None:
            return  # started by hand: nobody to watch
        from . import watchdog

        swap = self.request.get("swap_path") if self.rank == 0 else None
        self.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", watchdog.__file__, str(os.getpid()), lab, self.writer.path,
             swap or "-", repr(self.writer.t0), str(self.rank) if self.world_size > 1 else "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)

    def parent_gone(self):
        """Is the process that follows this run (the lab) gone? Under the
        launcher the lab is not the direct parent, so ask whether it lives."""
        parent = os.environ.get("MEMLAB_PARENT_PID")
        return parent is not None and not protocol.alive(parent)

    def check_stop(self):
        if self.stop_requested:
            self.interruptible = False
            raise StopRequested()

    def enter_phase(self, name):
        self.phase = name
        self.writer.emit("phase", name=name, step=self.step_index)

    # -- the run -----------------------------------------------------------------
    def run(self):
        self.writer.emit("run_start", schema=SCHEMA, run_id=self.request["run_id"],
                         knobs=self.request["knobs_nested"], from_auto=self.request.get("from_auto", {}),
                         model=self.request["model"],
                         versions=library_versions(), host=host_facts())
        status, error = "ok", None
        self._watch_op_locks()
        try:
            try:
                self.interruptible = True
                self.check_stop()  # a stop that came before the handlers were live
                self._start_probes()
                self.train()
            finally:
                self.interruptible = False
        except StopRequested:
            who = "the parent process ended (kernel restarted or interrupted)" if self.parent_gone() else \
                "stopped by the user"
            status, error = "stopped", f"{who} at step {self.step_index} ({self.phase})"
        except BaseException as exc:  # DeepSpeed asserts included: report, then exit non-zero
            status = "failed"
            error = self.lock_error or self._disk_full_cause() or \
                f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            error += f" (phase {self.phase}, step {self.step_index})"
            for risk in self.request.get("risks", []):  # what memlab warned about before the run
                if risk["crash"] and risk["crash"] in error:
                    error += f"; memlab warned: {risk['knob']}={risk['value']!r}: {risk['reason']}"
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
        folder = self.request.get("swap_path")
        return f"no space left on {folder}" if no_space_left(folder) else None

    def _remove_own_swap_folder(self):
        remove_swap_folder(self.request.get("swap_path"))

    def _start_probes(self):
        from .probes import Probes

        self.probes = Probes(self.writer)
        if not self.knobs["run.telemetry"]:
            return  # step events only: the baseline of the overhead benchmark

        def attribute(rss, page_cache, heap):
            fields = self.probes.attribute(rss, page_cache, heap)
            for pool in self.probes.pool_events():
                self.writer.emit("pool", **pool)
            fields["phase"] = self.phase
            fields["step"] = self.step_index
            return fields

        self.sampler = Sampler(self.writer, attribute, self._swap_files, interval=1.0 / self.knobs["run.sample_hz"])
        self.probes.sample_now = self.sampler.sample_once
        self.sampler.start()

    def _watch_op_locks(self, every=5.0):
        """Until training starts, look for a DeepSpeed op build lock that went
        stale (its build was killed) while this worker waits on it: torch would
        wait forever. Interrupt the wait and fail with what to do instead."""
        import threading

        main_thread = threading.main_thread().ident

        def watch():
            while self.phase in ("start", "import", "model_init", "engine_init"):
                time.sleep(every)
                try:
                    oplocks.check()
                except oplocks.StaleOpLock as exc:
                    self.lock_error = str(exc)
                    signal.pthread_kill(main_thread, LOCK_SIGNAL)
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

        report_op_lock_waits(self.writer)
        # torch._dynamo must be imported before zero.Init patches Tensor.__new__: imported lazily under
        # the patch, the tensors it builds at import time would come from the patched constructor
        import torch._dynamo  # noqa: F401
        import deepspeed
        import transformers
        from transformers.integrations import HfDeepSpeedConfig

        from ..models import ModelSpec
        from . import build_ops, memascend

        build_ops.build_all(report=lambda message: self.writer.emit("log", message=message), load_built=False)
        from . import probes as probe_hooks

        spec = ModelSpec.from_dict(self.request["model"])
        context = {"probes": self.probes, "swap_path": self.request.get("swap_path"),
                   "region_bytes": self.request.get("region_bytes", 0)}
        installed = memascend.install(k, context)  # before the probes wrap what they patch
        if installed:
            self.writer.emit("log", message=f"memascend: {', '.join(installed)}")
        if k["run.telemetry"]:
            probe_hooks.install(self.probes)
        self.check_stop()

        self.enter_phase("model_init")
        torch.manual_seed(k["run.seed"])
        ds_config = self.request["ds_config"]
        # gloo on the CPU accelerator; on a GPU, the accelerator's own (nccl) runs ZeRO-3's collectives
        # on device tensors, where gloo would stage them through host memory the probes do not own.
        backend = self.request.get("dist_backend") or deepspeed.get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[k["run.dtype"]]
        config = spec.hf_config()
        # A live HfDeepSpeedConfig makes transformers build the model under
        # zero.Init itself and initialize the partitioned weights (without it
        # the partitions keep uninitialized memory: first losses in the hundreds).
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  kept alive until initialize
        self.probes.framework_bytes = _rss()
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=k["run.attn_implementation"])
        if k["run.gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        model.train()
        self.check_stop()

        self.enter_phase("engine_init")
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                      config=ds_config)
        if k["run.telemetry"]:
            probe_hooks.attribute_engine_buffers(self.probes, engine)
            self.probes.engine_ready(_rss(), heap_reading())
            self.sampler.sample_once()  # the runtime, as the engine stands ready
        resumed = self._resume(engine)
        self.probes.take_step_counters()  # init I/O is not a training step's
        batches = self._batches(torch, spec)
        micro_batches = k["run.grad_accum"]
        for _ in range(resumed * micro_batches):  # the batches the checkpointed run already trained on
            next(batches)
        self.check_stop()

        for index in range(k["run.steps"]):
            self.step_index = index + 1
            started, cpu_started = time.perf_counter(), time.process_time()
            telemetry_before = self.sampler.cpu_seconds if self.sampler else 0.0
            losses = []
            for micro in range(micro_batches):  # DeepSpeed sums their gradients and steps at the last
                input_ids = next(batches).to(engine.device)  # DeepSpeed does not move inputs (a GPU's model)
                self.enter_phase("forward")
                loss = engine(input_ids=input_ids, labels=input_ids).loss
                self.enter_phase("backward")
                engine.backward(loss)
                if micro == micro_batches - 1:
                    self.enter_phase("optimizer_step")
                engine.step()
                losses.append(float(loss.detach().float().item()))
            if index == 0 and k["run.telemetry"]:
                probe_hooks.attribute_optimizer_state(self.probes, optimizer)
            if k["allocator.malloc_trim"] == "each_step":
                _malloc_trim()
            seconds = time.perf_counter() - started
            if k["run.telemetry"]:
                self.probes.step_ended()
            counters = self.probes.take_step_counters()
            # CPU seconds of every thread of the worker (sampler included): the
            # cost of work, steadier than wall time on a shared machine
            counters["cpu_seconds"] = round(time.process_time() - cpu_started, 6)
            # what telemetry itself cost in this step, measured where it runs
            sampler_cpu = self.sampler.cpu_seconds if self.sampler else 0.0
            counters["telemetry_seconds"] = round(sampler_cpu - telemetry_before + self.probes.hook_seconds, 6)
            self.probes.hook_seconds = 0.0
            counters["swap_files"] = len(self._swap_files())  # files the swap folder holds (creations)
            value = sum(losses) / len(losses)  # the step's loss: the mean over its micro-batches
            self.writer.emit("step", index=self.step_index, seconds=round(seconds, 6), loss=value, **counters)
            print(f"memlab: rank {self.rank} step {self.step_index}/{k['run.steps']} loss {value:.4f} "
                  f"{seconds:.2f}s", file=sys.stderr, flush=True)
            if self.step_index == k["run.save_checkpoint_at"]:
                self._save_checkpoint(engine)
            self.check_stop()
        self.enter_phase("done")

    def _resume(self, engine):
        """run.resume_from: DeepSpeed's load_checkpoint; the steps the checkpoint holds."""
        folder = self.knobs["run.resume_from"]
        if folder is None:
            return 0
        self.enter_phase("checkpoint_load")
        path, _ = engine.load_checkpoint(folder)
        if path is None:
            raise RunError(f"run.resume_from {folder}: DeepSpeed found no checkpoint to load there")
        self.writer.emit("log", message=f"resumed from {path} at step {engine.global_steps}")
        return engine.global_steps

    def _save_checkpoint(self, engine):
        folder = self.knobs["run.checkpoint_dir"] or os.path.join(os.path.dirname(self.writer.path), "checkpoint")
        self.enter_phase("checkpoint_save")
        engine.save_checkpoint(folder)
        self.writer.emit("log", message=f"checkpoint saved to {folder} (step {engine.global_steps})")

    def _batches(self, torch, spec):
        """Token batches: the user's texts or token ids, else seeded random tokens."""
        k = self.knobs
        shape = (k["run.micro_batch"], k["run.seq_len"])
        data = self.request.get("data")
        generator = torch.Generator().manual_seed(k["run.seed"] + self.rank)  # each rank its own batches
        vocab_size = self.request["vocab_size"]  # the lab's (the model's input embedding rows)
        if data is None:
            while True:
                yield torch.randint(0, vocab_size, shape, generator=generator)
        tokens = torch.tensor([t for row in tokenize(data, spec, vocab_size) for t in row], dtype=torch.long)
        per_batch = shape[0] * shape[1]
        if tokens.numel() < per_batch:
            tokens = tokens.repeat(-(-per_batch // tokens.numel()))
        offset = 0
        while True:
            if offset + per_batch > tokens.numel():
                offset = 0
            yield tokens[offset:offset + per_batch].view(shape)
            offset += per_batch


def tokenize(data, spec, vocab_size):
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
            out.append([b % vocab_size for b in row.encode("utf-8")])
    return out


def report_op_lock_waits(writer):
    """Say so when loading an op waits for another process's build of it
    (torch's FileBaton: a lock file in the op's build folder). Without this
    line, a run waiting minutes for a build elsewhere looks hung."""
    from torch.utils import file_baton

    wait = file_baton.FileBaton.wait

    def reported_wait(baton):
        writer.emit("log", message=f"waiting for a DeepSpeed op build in another process (lock {baton.lock_file_path})")
        return wait(baton)

    file_baton.FileBaton.wait = reported_wait


def _rss():
    from ..telemetry import read_status

    return read_status()["VmRSS"]


def _malloc_trim():
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def die_with_parent():
    """Ask the kernel for a signal when the parent dies (a notebook kernel that
    is restarted or killed), so the worker never outlives whoever follows it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # DeepSpeed's launcher adds it; RANK says the same
    if len(argv) != 1:
        print("usage: python -m memlab.engine.worker RUN_DIR", file=sys.stderr)
        return 2
    worker = Worker(argv[0])
    worker.install_signal_handlers()
    die_with_parent()
    worker.start_watchdog()
    if worker.parent_gone():  # the parent died before the parent-death signal was asked for
        worker.stop_requested = True
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
