"""memlab's CUDA paths, checked as far as a machine without a GPU allows.

No test here needs a GPU; none replaces the run on one (scripts/gpu_check.sh,
docs/GPU.md). CUDA is faked at its boundary: the accelerator DeepSpeed hands
the probes (a stand-in whose pin_memory returns what CUDA's would: a tensor
that reports is_pinned(), or one DeepSpeed's native backend marks ds_pinned),
torch.cuda's allocator statistics, and tensors' devices. What is checked:

- the probes on CUDA: a PyTorch-pinned buffer is attributed a power of two, a
  natively pinned one its page-rounded bytes, as memlab.sizing models them;
  the owner on the stack names the component; GPU and torch-pinned figures
  join samples and steps only where CUDA is initialized; CUDA's pinned host
  memory (not a malloc block) is not taken out of the heap's tensors in flight;
- sizing on CUDA: GPU figures present and positive (--gpus 1 --gpu-mem 80,
  through the command line too), pinned buffers power-of-two sized with the
  torch backend and page-sized with the native one, activations off the host;
- the GPU check's scripts: bash -n, the one-line refusal without a GPU (and
  without the carried wheels), gpu_compare.py on synthetic CUDA events (on a
  tiny real run, and gpu_pin_check.py on the CPU: tests/engine/test_cuda_paths_runs.py).
"""
import enum
import json
import os
import shutil
import sys
import types

import pytest
import torch
from helpers import SCRIPTS, gpu_compare, run_script, table_rows

from memlab import components as C
from memlab.engine import probes as P
from memlab.runs import summarize, write_summary
from memlab.sizing import GiB, MiB, PAGE_BYTES, Hardware, estimate, page_round, pow2_round
from memlab.telemetry import PINNED_BACKENDS, EventWriter, Heap

CUDA_80 = Hardware(gpus=1, gpu_bytes=80 * GiB, accelerator="cuda")


class Writer:
    """Stands in for the worker's event writer: keeps what the probes emit."""

    def __init__(self):
        self.events = []

    def emit(self, kind, **fields):
        self.events.append({"kind": kind, **fields})


def fake_pinned(nbytes, native=False):
    """What CUDA's pin_memory hands back, for sizes too large to allocate here:
    PyTorch's pinned tensor reports is_pinned(); DeepSpeed's native one is ds_pinned."""
    tensor = types.SimpleNamespace(nbytes=nbytes, device=types.SimpleNamespace(type="cpu"), is_pinned=lambda: True)
    if native:
        tensor.ds_pinned = True
    return tensor


# ------------------------------------------------------------------ the pinned-allocator rounding

SIZES = [1, 1792, 4095, 4096, 4097, MiB + 1, 3 * MiB, 988_065_536, 1 << 30, (1 << 30) + 1]


@pytest.mark.parametrize("nbytes", SIZES)
def test_torch_pinned_buffer_is_reserved_as_a_power_of_two_as_sizing_models_it(nbytes):
    reserved, backend = P.pinned_reservation(fake_pinned(nbytes))
    assert backend == "torch-pinned"
    assert reserved == pow2_round(nbytes) >= nbytes
    assert reserved & (reserved - 1) == 0 and reserved < 2 * nbytes + (nbytes == 1)


@pytest.mark.parametrize("nbytes", SIZES)
def test_native_pinned_buffer_is_reserved_to_the_page_as_sizing_models_it(nbytes):
    reserved, backend = P.pinned_reservation(fake_pinned(nbytes, native=True))
    assert backend == "native-mlock"
    assert reserved == page_round(nbytes) == -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    assert 0 <= reserved - nbytes < PAGE_BYTES


def test_a_cpu_tensor_the_accelerator_did_not_pin_is_pageable():
    tensor = torch.zeros(4097, dtype=torch.uint8)
    assert P.pinned_reservation(tensor) == (4097, "pageable")


# ------------------------------------------------------------------ the probes' hooks, CUDA faked at the accelerator

class DeepSpeedZeroOptimizer_Stage3:
    """Named as DeepSpeed's class: the probes find a buffer's owner by the
    function on the stack (its co_qualname), here `_setup_for_real_optimizer`."""

    def _setup_for_real_optimizer(self, accelerator, tensor):
        return accelerator.pin_memory(tensor)


class ZeroParamStatus(enum.Enum):
    AVAILABLE = 1
    NOT_AVAILABLE = 2


@pytest.fixture
def fake_cuda_deepspeed(monkeypatch):
    """deepspeed's accelerator and native pinning as they behave on CUDA,
    in sys.modules for the probes' imports (the real ones are untouched)."""
    class NativePinnedMemory:
        @staticmethod
        def _release(handle, begin, *args):
            return True

        def unpin(self, tensor):
            tensor.ds_pinned = False
            return True

    class CUDA_Accelerator:  # noqa: N801  DeepSpeed's name
        def device_name(self):
            return "cuda"

        def pin_memory(self, tensor, make_copy=True, match_shape=True):
            out = tensor.clone()
            if os.environ.get("DS_PIN_MEMORY_BACKEND") == "native":
                out.ds_pinned, out.ds_pin_base = True, out.data_ptr()  # posix_memalign + mlock + cudaHostRegister
            else:
                out._cuda_pinned = True  # PyTorch's CachingHostAllocator: is_pinned() is True
            return out

    accelerator = CUDA_Accelerator()
    modules = {name: types.ModuleType(name) for name in (
        "deepspeed", "deepspeed.accelerator", "deepspeed.utils", "deepspeed.utils.pin_memory", "deepspeed.runtime",
        "deepspeed.runtime.zero", "deepspeed.runtime.zero.partition_parameters")}
    modules["deepspeed"].__version__ = "0.19.8"  # the release the patches know
    modules["deepspeed.accelerator"].get_accelerator = lambda: accelerator
    modules["deepspeed.utils.pin_memory"].NativePinnedMemory = NativePinnedMemory
    modules["deepspeed.utils"].pin_memory = modules["deepspeed.utils.pin_memory"]
    modules["deepspeed.runtime.zero.partition_parameters"].ZeroParamStatus = ZeroParamStatus
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: bool(getattr(self, "_cuda_pinned", False)),
                        raising=False)
    from memlab.engine import patching

    monkeypatch.setattr(patching, "_patches", [])  # the fakes' patches die with the test
    monkeypatch.setattr(patching, "_checked", [])
    probes = P.Probes(Writer())
    P._hook_accelerator_pinning(probes)
    return probes, accelerator, NativePinnedMemory


def test_torch_backend_on_cuda_records_the_power_of_two_for_its_owner(fake_cuda_deepspeed, monkeypatch):
    monkeypatch.setenv("DS_PIN_MEMORY_BACKEND", "torch")
    probes, accelerator, _ = fake_cuda_deepspeed
    requested = (3 << 19) + 1  # 1.5 MiB + 1 byte: reserved 2 MiB
    out = DeepSpeedZeroOptimizer_Stage3()._setup_for_real_optimizer(accelerator, torch.zeros(requested,
                                                                                             dtype=torch.uint8))
    (record,) = probes.live.values()
    assert record == {"id": f"p{out.data_ptr()}", "component": C.GRAD_FLAT, "requested": requested,
                      "reserved": 2 * MiB, "backend": "torch-pinned"}
    assert probes.pinned_reserved == 2 * MiB and probes.pinned_used() == requested
    fields = probes.attribute(rss=1 << 30, page_cache=0, heap=Heap())
    assert fields["components"][C.GRAD_FLAT] == 2 * MiB and fields["pinned_reserved"] == 2 * MiB
    assert probes.writer.events[-1]["kind"] == "alloc" and probes.writer.events[-1]["backend"] == "torch-pinned"


def test_native_backend_on_cuda_records_the_page_and_frees_on_unpin(fake_cuda_deepspeed, monkeypatch):
    monkeypatch.setenv("DS_PIN_MEMORY_BACKEND", "native")
    probes, accelerator, native = fake_cuda_deepspeed
    requested = (3 << 19) + 1
    out = DeepSpeedZeroOptimizer_Stage3()._setup_for_real_optimizer(accelerator, torch.zeros(requested,
                                                                                             dtype=torch.uint8))
    (record,) = probes.live.values()
    assert (record["component"], record["backend"]) == (C.GRAD_FLAT, "native-mlock")
    assert record["reserved"] == page_round(requested) == requested - 1 + PAGE_BYTES
    native().unpin(out)  # DeepSpeed's explicit unpin: the probes record the free
    assert probes.live == {} and probes.pinned_reserved == 0
    assert [e["kind"] for e in probes.writer.events] == ["alloc", "free"]


def test_a_pin_outside_any_owner_is_other(fake_cuda_deepspeed, monkeypatch):
    monkeypatch.setenv("DS_PIN_MEMORY_BACKEND", "torch")
    probes, accelerator, _ = fake_cuda_deepspeed
    accelerator.pin_memory(torch.zeros(5000, dtype=torch.uint8))
    (record,) = probes.live.values()
    assert (record["component"], record["reserved"]) == (C.OTHER, 8192)


def test_cuda_pinned_memory_is_not_taken_out_of_the_heap(fake_cuda_deepspeed, monkeypatch):
    """A torch-pinned buffer (cudaHostAlloc) is not a malloc block: the heap's
    growth after the engine is ready is all tensors in flight, and the pinned
    buffer is its own component beside them."""
    monkeypatch.setenv("DS_PIN_MEMORY_BACKEND", "torch")
    probes, accelerator, _ = fake_cuda_deepspeed
    probes.framework_bytes = 100 * MiB
    probes.engine_ready(rss=100 * MiB, heap=Heap(free=0, live=40 * MiB))
    DeepSpeedZeroOptimizer_Stage3()._setup_for_real_optimizer(accelerator, torch.zeros(3 << 19, dtype=torch.uint8))
    parts = probes.attribute(rss=200 * MiB, page_cache=0, heap=Heap(free=0, live=70 * MiB))["components"]
    assert parts[C.GRAD_FLAT] == 2 * MiB and parts[C.ACTIVATIONS] == 30 * MiB
    assert parts[C.OTHER] == 200 * MiB - 100 * MiB - 2 * MiB - 30 * MiB


# ------------------------------------------------------------------ GPU and torch-pinned figures in samples and steps

class FakeTorchCuda:
    """torch.cuda's allocator statistics as a CUDA process would report them."""

    def __init__(self, initialized=True, host_stats=None):
        self.initialized = initialized
        self.host_stats = {"allocated_bytes.current": 6 * MiB, "active_bytes.current": 4 * MiB} \
            if host_stats is None else host_stats
        self.resets = 0
        self.asked = []  # devices memory_allocated was asked about

    def is_initialized(self):
        return self.initialized

    def current_device(self):
        return 1  # the training thread's device (a sampler thread's own current device would be 0)

    def device_count(self):
        return 2

    def memory_allocated(self, device=None):
        self.asked.append(device)
        return 3 * GiB

    def memory_reserved(self, device=None):
        return 4 * GiB

    def max_memory_allocated(self):
        return 5 * GiB

    def max_memory_reserved(self):
        return 6 * GiB

    def reset_peak_memory_stats(self):
        self.resets += 1

    def host_memory_stats(self):
        return dict(self.host_stats)


@pytest.fixture
def fake_torch_cuda(monkeypatch):
    fake = FakeTorchCuda()
    for name in ("is_initialized", "current_device", "device_count", "memory_allocated", "memory_reserved",
                 "max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats", "host_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name), raising=False)
    monkeypatch.setattr(P, "_cuda_device", None)  # no training thread has reported its device yet
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return fake


def test_samples_and_steps_carry_gpu_figures_where_cuda_is_initialized(fake_torch_cuda):
    probes = P.Probes(Writer())
    fields = probes.attribute(rss=1 << 30, page_cache=0, heap=Heap())
    assert fields["gpu_allocated"] == 3 * GiB and fields["gpu_reserved"] == 4 * GiB
    assert (fields["torch_pinned_reserved"], fields["torch_pinned_active"]) == (6 * MiB, 4 * MiB)
    counters = probes.take_step_counters()
    assert (counters["gpu_peak_allocated"], counters["gpu_peak_reserved"]) == (5 * GiB, 6 * GiB)
    assert fake_torch_cuda.resets == 1  # the next step's peak is its own
    probes.attribute(rss=1 << 30, page_cache=0, heap=Heap())
    assert fake_torch_cuda.asked == [0, 1]  # this rank's device (LOCAL_RANK 0), then the training thread's


def test_samples_before_the_first_step_report_the_local_ranks_device(fake_torch_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    P.cuda_memory()
    monkeypatch.setenv("LOCAL_RANK", "5")  # more ranks than devices visible to this one: its only device
    P.cuda_memory()
    assert fake_torch_cuda.asked == [1, 0]


def test_no_gpu_figures_where_cuda_is_not_initialized(fake_torch_cuda):
    fake_torch_cuda.initialized = False
    probes = P.Probes(Writer())
    assert set(probes.attribute(rss=1 << 30, page_cache=0, heap=Heap())) == {"components", "pinned_reserved",
                                                                             "pinned_used"}
    assert not any(k.startswith("gpu_") for k in probes.take_step_counters())
    assert fake_torch_cuda.resets == 0


def test_no_gpu_figures_on_this_machine():
    """The real torch here: CUDA never initialized, nothing added, nothing initialized."""
    assert P.cuda_memory() == {} and P.cuda_step_peaks() == {}
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("stats, expected", [
    ({"allocated_bytes.current": 8, "active_bytes.current": 5}, (8, 5)),  # torch 2.13: allocated = owned
    ({"reserved_bytes.current": 8, "allocated_bytes.current": 5}, (8, 5)),  # a reserved/allocated scheme
    ({"num_host_alloc": 3}, (None, None)),
    ({}, (None, None)),
])
def test_torch_host_allocator_statistics_in_either_naming(stats, expected):
    assert P.torch_host_pinned(stats) == expected


def test_host_stats_missing_leaves_only_the_gpu_figures(fake_torch_cuda):
    fake_torch_cuda.host_stats = {}
    fields = P.cuda_memory()
    assert fields == {"gpu_allocated": 3 * GiB, "gpu_reserved": 4 * GiB}


# ------------------------------------------------------------------ sizing on CUDA

@pytest.fixture(scope="module")
def cuda_estimates():
    knobs = {"run.dtype": "bf16", "run.seq_len": 1024}
    return {engine: estimate("qwen2.5-0.5b", knobs, CUDA_80, engine=engine) for engine in ("deepspeed", "memascend")}


def test_gpu_figures_are_present_and_positive_on_one_80_gib_gpu(cuda_estimates):
    for est in cuda_estimates.values():
        g = est.gpu
        assert g is not None and est.gpu_peak_bytes == g["total"] > 0
        for term in ("persistent_params", "params_gathered", "activations", "reduce_bucket", "boundary_gradients"):
            assert g[term] >= 0
        assert g["params_gathered"] > 0 and g["activations"] > 0 and g["reduce_bucket"] > 0
        assert g["total"] == g["persistent_params"] + g["params_gathered"] + g["reduce_bucket"] + max(
            g["activations"], g["boundary_gradients"])
        assert est.fits(gpu_bytes=80 * GiB)
        assert est.components[C.ACTIVATIONS] == 0  # device-side tensors are GPU memory on CUDA


def test_the_command_line_estimate_has_the_gpu_figures(capsys):
    from memlab.cli import main

    assert main(["estimate", "--model", "qwen2.5-0.5b", "--set", "run.dtype=bf16", "--gpus", "1", "--gpu-mem", "80",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["accelerator"] == "cuda" and out["hardware"]["gpu_bytes"] == 80 * GiB
    assert out["gpu"]["total"] > 0 and out["fits"] is True
    assert all(isinstance(v, int) and v >= 0 for v in out["gpu"].values())


def test_stock_pins_through_pytorch_in_powers_of_two_and_memascend_to_the_page(cuda_estimates):
    stock, memascend = cuda_estimates["deepspeed"], cuda_estimates["memascend"]
    through_pin_memory = {C.GRAD_FLAT, C.SMALL_PARTITIONS, C.PARAM_CPU_FLAT, C.OPTIMIZER_TRANSIENTS,
                          C.OFFLOADED_CHECKPOINTS}
    for b in stock.buffers:
        if b.backend == "torch-pinned":
            assert b.component in through_pin_memory and b.reserved == pow2_round(b.requested)
            assert P.pinned_reservation(fake_pinned(b.requested)) == (b.reserved, "torch-pinned")  # probes agree
        elif b.backend == "aio-mlock":
            assert b.reserved == page_round(b.requested)
    assert any(b.backend == "torch-pinned" for b in stock.buffers)
    assert not any(b.backend == "torch-pinned" for b in memascend.buffers)
    for b in memascend.buffers:
        if b.backend in PINNED_BACKENDS:
            assert b.reserved == page_round(b.requested)
            if b.backend == "native-mlock":
                assert P.pinned_reservation(fake_pinned(b.requested, native=True)) == (b.reserved, "native-mlock")
    (grad,) = [b for b in stock.buffers if b.component == C.GRAD_FLAT]
    assert grad.requested == 494_032_768 * 2 and grad.reserved == 1 << 30  # bf16 gradients of 494M parameters
    waste = {k: e.pinned_reserved_bytes - e.pinned_requested_bytes for k, e in cuda_estimates.items()}
    assert waste["deepspeed"] > 64 * MiB > waste["memascend"] >= 0


def test_torch_pinning_rounds_only_on_cuda():
    knobs = {"run.dtype": "bf16"}
    on_cpu = estimate("tiny-llama", knobs, Hardware(), engine="deepspeed")
    on_cuda = estimate("tiny-llama", knobs, CUDA_80, engine="deepspeed")
    (cpu_grad,) = [b for b in on_cpu.buffers if b.component == C.GRAD_FLAT]
    (cuda_grad,) = [b for b in on_cuda.buffers if b.component == C.GRAD_FLAT]
    assert cpu_grad.backend == "pageable" and cpu_grad.reserved == cpu_grad.requested  # the CPU accelerator: a no-op
    assert cuda_grad.backend == "torch-pinned" and cuda_grad.reserved == pow2_round(cuda_grad.requested)
    assert on_cpu.gpu is None and on_cuda.gpu["total"] > 0


# ------------------------------------------------------------------ the GPU check's scripts

@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_scripts_parse(script):
    done = run_script(["bash", "-n", os.path.join(SCRIPTS, script)])
    assert done.returncode == 0, done.stderr


def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    done = run_script(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), "--check-only"],
                      env={"GPU_CHECK_NVIDIA_SMI": str(tmp_path / "no-nvidia-smi"), "OUT": str(out)})
    assert done.returncode == 3
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU here"), done.stderr
    assert not out.exists()  # nothing written, nothing installed


def fake_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, 580.159.04'\n")
    smi.chmod(0o755)
    return str(smi)


def test_gpu_check_refuses_when_torch_sees_no_cuda(tmp_path):
    """nvidia-smi answers but this python's torch (the CPU build) sees no GPU."""
    done = run_script(["bash", os.path.join(SCRIPTS, "gpu_check.sh"), "--check-only"],
                      env={"GPU_CHECK_NVIDIA_SMI": fake_nvidia_smi(tmp_path), "GPU_CHECK_PYTHON": sys.executable,
                           "OUT": str(tmp_path / "out")})
    assert done.returncode == 3
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "torch sees no CUDA GPU" in lines[0] and "NVIDIA H200" in lines[0]


def test_gpu_check_passes_its_gpu_check_and_refuses_without_the_carried_files(tmp_path):
    """A GPU faked at nvidia-smi and python (`true` answers 'CUDA available'):
    --check-only passes; a full start in a checkout without .whl/ and .deb/
    stops before installing anything, naming the preparation script."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(SCRIPTS, "gpu_check.sh"), checkout / "scripts")
    env = {"GPU_CHECK_NVIDIA_SMI": fake_nvidia_smi(tmp_path), "GPU_CHECK_PYTHON": shutil.which("true"),
           "OUT": str(tmp_path / "out")}
    done = run_script(["bash", str(checkout / "scripts" / "gpu_check.sh"), "--check-only"], env=env)
    assert done.returncode == 0 and "gpu_check: GPU: NVIDIA H200" in done.stdout
    done = run_script(["bash", str(checkout / "scripts" / "gpu_check.sh")], env=env)
    assert done.returncode == 3
    assert done.stderr.splitlines()[-1].startswith("gpu_check: .whl/ or .deb/ is missing: run 'bash scripts/gpu_prepare.sh'")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ gpu_compare.py

def synthetic_cuda_run(run_dir):
    """A run folder as the worker would write it on CUDA: a torch-pinned gradient
    buffer, samples and a step carrying GPU and torch-pinned figures."""
    os.makedirs(run_dir)
    writer = EventWriter(os.path.join(run_dir, "events.jsonl"), clock_start=0)
    events = []

    def emit(kind, **fields):
        events.append(writer.emit(kind, **fields))

    emit("run_start", schema=1, run_id="synthetic", knobs={"engine": "deepspeed"}, model={"name": "tiny-llama"},
         versions={}, host={})
    requested = (3 << 19) + 1
    emit("alloc", id="p1", component=C.GRAD_FLAT, requested=requested, reserved=2 * MiB, backend="torch-pinned")
    for phase, gpu in (("forward", 3 * GiB), ("backward", 5 * GiB)):
        emit("sample", rss=GiB, vm_lck=0, vm_hwm=GiB, page_cache=0, io_read=0, io_write=0,
             components={C.GRAD_FLAT: 2 * MiB, C.OTHER: GiB - 2 * MiB}, pinned_reserved=2 * MiB,
             pinned_used=requested, gpu_allocated=gpu, gpu_reserved=gpu + GiB, torch_pinned_reserved=4 * MiB,
             torch_pinned_active=2 * MiB, phase=phase, step=1)
    emit("step", index=1, seconds=1.0, loss=2.0, swap_in_bytes=0, swap_out_bytes=0, pinned_used_peak=requested,
         pinned_reserved=2 * MiB, gpu_peak_allocated=6 * GiB, gpu_peak_reserved=7 * GiB)
    emit("run_end", status="ok", error=None, summary={})
    writer.close()
    write_summary(run_dir, summarize(events))
    return requested


def test_compare_reports_gpu_and_pinned_rounding_from_cuda_events(tmp_path):
    run_dir = str(tmp_path / "run")
    requested = synthetic_cuda_run(run_dir)
    est = tmp_path / "estimate.json"
    est.write_text(json.dumps(estimate("tiny-llama", {"run.dtype": "bf16"}, CUDA_80, engine="deepspeed").to_dict()))
    md, js = tmp_path / "cmp.md", tmp_path / "cmp.json"
    gpu_compare("--config", "stock", run_dir, est, "--md", md, "--json", js)
    data = json.loads(js.read_text())
    measured = data["configs"]["stock"]["measured"]
    assert measured["gpu"]["peak_allocated"] == 6 * GiB  # the step's peak, above every sample
    assert measured["gpu"]["phase_peak_allocated"] == {"forward": 3 * GiB, "backward": 5 * GiB}
    assert measured["torch_pinned"] == {"peak_reserved": 4 * MiB, "peak_active": 2 * MiB}
    assert measured["pinned_at_peak"]["by_backend"]["torch-pinned"] == {"reserved": 2 * MiB, "requested": requested,
                                                                        "buffers": 1}
    text = md.read_text()
    assert "| measured: peak allocated (torch, max over samples and steps) | 6.00 GiB |" in text
    assert "| measured: peak allocated in backward | 5.00 GiB |" in text
    predicted_total = data["configs"]["stock"]["predicted"]["gpu"]["total"]
    assert predicted_total > 0 and "| predicted: total | – | " in text
    waste_row = next(line for line in text.splitlines() if line.startswith("| stock | torch-pinned |"))
    assert f"| {(2 * MiB - requested) / 1024:.2f} KiB |" in waste_row
    assert table_rows(text, "Host bytes per component at the peak") == list(C.ALL)


def test_the_checks_worker_moves_batches_to_the_accelerator_and_can_change_the_backend(tmp_path, monkeypatch):
    """scripts/gpu_runs.py worker: memlab's worker with its token batches on the
    accelerator's device (faked: 'meta'), and MEMLAB_GPU_DIST_BACKEND in its request."""
    import importlib.util

    from memlab.engine import worker as W

    spec = importlib.util.spec_from_file_location("gpu_runs", os.path.join(SCRIPTS, "gpu_runs.py"))
    gpu_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_runs)
    monkeypatch.setattr(W.Worker, "_batches", W.Worker._batches)  # restored after the test
    monkeypatch.setattr(W.Worker, "__init__", W.Worker.__init__)
    monkeypatch.setattr(W, "main", lambda argv: len(argv))
    accelerator = types.SimpleNamespace(current_device_name=lambda: "meta")
    for name in ("deepspeed", "deepspeed.accelerator"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["deepspeed.accelerator"].get_accelerator = lambda: accelerator
    monkeypatch.setenv("MEMLAB_GPU_DIST_BACKEND", "nccl")
    assert gpu_runs.worker(str(tmp_path)) == 1  # memlab's main, given the run folder

    (tmp_path / "request.json").write_text(json.dumps(
        {"run_id": "x", "vocab_size": 100, "knobs": {"run.micro_batch": 2, "run.seq_len": 8, "run.seed": 0}}))
    worker = W.Worker(str(tmp_path))
    try:
        assert worker.request["dist_backend"] == "nccl"
        batch = next(worker._batches(torch, types.SimpleNamespace(vocab_size=100)))
        assert batch.shape == (2, 8) and batch.device.type == "meta"
    finally:
        worker.writer.close()
