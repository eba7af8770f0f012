#!/usr/bin/env python3
"""The GPU check's Python side (scripts/gpu_check.sh, docs/GPU.md).

    python3 scripts/gpu_runs.py env --out ENV.json
    python3 scripts/gpu_runs.py runs --work DIR [--model qwen2.5-0.5b] [--steps 5]
                                [--configs stock,memascend] [--set KEY=VALUE ...]
                                [--gpus 1] [--gpu-mem-gib G] [--ram-gib R] [--deadline EPOCH]
    python3 scripts/gpu_runs.py worker RUN_DIR

`env` writes the machine's facts (GPU, driver, versions, CUDA_HOME, whether
memlab's CUDA detection sees the driver, gloo's collectives on CUDA tensors,
the swap folder candidates). `runs` takes each configuration through
`memlab estimate --json` (the command line, as a user would) and through a
real run with memlab's probes, one after the other, and writes DIR/manifest.json
(name -> run folder, estimate file, status), which scripts/gpu_compare.py reads.
`worker` is what those runs start instead of `python -m memlab.engine.worker`:
the same worker, with the token batches moved to the accelerator's device
(the worker hands the engine CPU tensors, which a CUDA model cannot take; a
no-op on DeepSpeed's CPU accelerator), and, where MEMLAB_GPU_DIST_BACKEND is
set (gpu_check.sh sets nccl when gloo fails on CUDA tensors), that
torch.distributed backend instead of the worker's gloo.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's memlab, wherever the script is started from

GiB = 1 << 30
# Every configuration shares these; --set changes them (JSON values).
BASE = {"run.dtype": "bf16", "run.seq_len": 1024, "run.micro_batch": 1}
# name -> (engine, knobs): what each run isolates
CONFIGS = {
    "stock": ("deepspeed", {}),  # DeepSpeed's behaviour: torch pinning (PyTorch's CachingHostAllocator)
    "memascend": ("memascend", {}),  # every MemAscend switch, exact (native) pinning among them
    "exact_pinning": ("deepspeed", {"memascend.pinning": "exact"}),  # stock but native pinning: the rounding alone
}
DEFAULT_CONFIGS = ("stock", "memascend")
SWAP_FOLDER = "memlab-gpu-swap"


def _value(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items):
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"gpu_runs: --set {item!r}: expected KEY=VALUE")
        out[key.strip()] = _value(text.strip())
    return out


# ----------------------------------------------------------------------------- env

def swap_candidates():
    given = os.environ.get("GPU_CHECK_SWAP_DIR")
    if given:
        return [given]
    return [os.path.join(root, SWAP_FOLDER) for root in ("/var/tmp", "/tmp", os.path.expanduser("~"))] + \
        [os.path.join(ROOT, "gpu-check-swap")]


def choose_swap_dir(needed_bytes=0):
    """The first candidate memlab accepts as a swap root (writable, O_DIRECT,
    only memlab's folders) with room for `needed_bytes`; (path, report)."""
    from memlab.knobs import KnobError
    from memlab.lab import check_swap_root

    report = []
    for path in swap_candidates():
        try:
            check_swap_root(path)
            free = shutil.disk_usage(path).free
        except (KnobError, OSError) as exc:
            report.append({"path": path, "ok": False, "why": str(exc)})
            continue
        entry = {"path": path, "free_bytes": free, "fs": _fs_type(path)}
        if free < needed_bytes:
            report.append({**entry, "ok": False, "why": f"{free} bytes free, {needed_bytes} needed"})
            continue
        report.append({**entry, "ok": True})
        return path, report
    return None, report


def _fs_type(path):
    best, fs = "", None
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) > len(best):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


def _run(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def gloo_on_cuda(torch):
    """memlab's worker uses gloo; ZeRO-3 calls all_gather_into_tensor and
    reduce_scatter_tensor at world size 1 too. Do they take CUDA tensors?"""
    import tempfile

    import torch.distributed as dist

    out = {}
    store = tempfile.mktemp(prefix="memlab-gloo-")
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    except Exception as exc:
        return {"init": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        x = torch.arange(8, dtype=torch.float32, device="cuda")
        calls = {
            "all_reduce": lambda: dist.all_reduce(x.clone()),
            "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(torch.empty_like(x), x),
            "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(torch.empty_like(x), x.clone()),
        }
        for name, call in calls.items():
            try:
                call()
                torch.cuda.synchronize()
                out[name] = "ok"
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        dist.destroy_process_group()
        if os.path.exists(store):
            os.unlink(store)
    return out


def environment():
    from importlib import metadata

    facts = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hostname": platform.node(),
             "kernel": platform.release(), "python": platform.python_version(), "executable": sys.executable,
             "cpus": os.cpu_count(),
             "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
             # memlab's knobs and host facts call a machine CUDA when the driver exposes this file
             "proc_driver_nvidia_version": os.path.exists("/proc/driver/nvidia/version")}
    versions = {}
    for name in ("torch", "deepspeed", "transformers", "accelerate", "pydantic", "memlab"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    facts["versions"] = versions
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pci.bus_id", "--format=csv,noheader"])
    facts["nvidia_smi"] = smi
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            facts["gpu"] = {"name": props.name, "total_bytes": int(props.total_memory),
                            "capability": f"{props.major}.{props.minor}",
                            "multiprocessors": props.multi_processor_count}
            facts["gloo_on_cuda"] = gloo_on_cuda(torch)
            facts["host_memory_stats_keys"] = sorted(torch.cuda.host_memory_stats()) if hasattr(
                torch.cuda, "host_memory_stats") else None
        from torch.utils.cpp_extension import CUDA_HOME

        facts["cuda_home"] = CUDA_HOME
    except Exception as exc:
        facts["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    facts["nvcc"] = _run(["nvcc", "--version"])
    try:
        from deepspeed.accelerator import get_accelerator

        facts["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as exc:
        facts["deepspeed_accelerator"] = f"{type(exc).__name__}: {exc}"[:300]
    chosen, report = choose_swap_dir()
    facts["swap_dir"], facts["swap_candidates"] = chosen, report
    return facts


# ----------------------------------------------------------------------------- runs

def _worker_command(original):
    script = os.path.abspath(__file__)

    def worker_command(resolved, run_dir, port):
        if resolved["run.ranks"] == 1 and resolved["run.hostfile"] is None:
            return [sys.executable, script, "worker", run_dir]
        return original(resolved, run_dir, port)

    return worker_command


def estimate_via_cli(knobs_file, model, hardware, out_file):
    """`memlab estimate --json` for one configuration, through the command line."""
    argv = [sys.executable, "-m", "memlab.cli", "estimate", "--knobs", knobs_file, "--model", model,
            "--gpus", str(hardware["gpus"]), "--json"]
    if hardware.get("gpu_mem_gib"):
        argv += ["--gpu-mem", str(hardware["gpu_mem_gib"])]
    if hardware.get("ram_gib"):
        argv += ["--ram", str(hardware["ram_gib"])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1], "argv": argv}
    with open(out_file, "w") as f:
        f.write(done.stdout)
    return {"argv": argv}


def run_configs(args):
    import memlab.lab as lab_module
    from memlab import Knobs, Lab
    from memlab.sizing import Hardware, estimate

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"gpu_runs: unknown configuration {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    os.makedirs(args.work, exist_ok=True)
    sets = parse_sets(args.set)
    hardware = {"gpus": args.gpus, "gpu_mem_gib": args.gpu_mem_gib, "ram_gib": args.ram_gib}
    lab_module.worker_command = _worker_command(lab_module.worker_command)
    lab = Lab(os.path.join(args.work, "runs"))

    # the swap folder: room for the largest footprint among the configurations, plus a margin
    needed = 0
    for name in names:
        engine, extra = CONFIGS[name]
        knobs = Knobs({**BASE, **sets, **extra}, engine=engine)
        needed = max(needed, estimate(args.model, knobs, Hardware()).nvme_bytes)
    swap_dir = args.swap_dir
    swap_report = None
    if swap_dir is None:
        swap_dir, swap_report = choose_swap_dir(int(needed * 1.1) + GiB)
        if swap_dir is None:
            raise SystemExit(f"gpu_runs: no swap folder memlab accepts with {needed / GiB:.1f} GiB free: "
                             f"{json.dumps(swap_report)}")
    manifest = {"model": args.model, "steps": args.steps, "base": {**BASE, **sets}, "hardware": hardware,
                "dist_backend": os.environ.get("MEMLAB_GPU_DIST_BACKEND") or "gloo (the worker's own)",
                "swap_dir": swap_dir, "swap_candidates": swap_report, "configs": {}}
    manifest_path = os.path.join(args.work, "manifest.json")

    def save():
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)

    for index, name in enumerate(names):
        engine, extra = CONFIGS[name]
        knobs = Knobs({**BASE, **sets, **extra, "run.steps": args.steps, "run.swap_dir": swap_dir}, engine=engine)
        knobs_file = os.path.join(args.work, f"knobs-{name}.json")
        with open(knobs_file, "w") as f:
            json.dump(knobs.to_dict(), f, indent=1)
        estimate_file = os.path.join(args.work, f"estimate-{name}.json")
        entry = {"engine": knobs.engine, "knobs": knobs_file, "estimate": estimate_file}
        entry["estimate_call"] = estimate_via_cli(knobs_file, args.model, hardware, estimate_file)
        manifest["configs"][name] = entry
        save()
        budget = None
        if args.deadline:
            budget = (args.deadline - time.time()) / (len(names) - index)
            if budget < args.min_run_s:
                entry.update(status="skipped", error=f"{budget:.0f} s left for it, under {args.min_run_s} s")
                print(f"gpu_runs: {name}: skipped ({entry['error']})", file=sys.stderr, flush=True)
                save()
                continue
        print(f"gpu_runs: {name}: {args.model}, engine {knobs.engine}, {args.steps} steps"
              + (f", {budget:.0f} s at most" if budget else ""), file=sys.stderr, flush=True)
        started = time.time()
        run = lab.run(knobs, model=args.model)
        entry["run_dir"] = run.path
        save()
        summary = run.wait(timeout=budget)
        if summary is None:  # out of time: stop it; a stopped run keeps the steps it made
            print(f"gpu_runs: {name}: out of time, stopping", file=sys.stderr, flush=True)
            summary = run.stop() or run.wait(60)
        entry["wall_s"] = round(time.time() - started, 1)
        entry["status"] = summary["status"] if summary else "unknown"
        entry["error"] = summary.get("error") if summary else "no summary"
        entry["steps_done"] = summary.get("steps") if summary else 0
        print(f"gpu_runs: {name}: {entry['status']} after {entry['wall_s']} s, {entry['steps_done']} steps"
              + (f" ({entry['error']})" if entry["error"] else ""), file=sys.stderr, flush=True)
        save()
    return manifest_path


# ----------------------------------------------------------------------------- worker

def worker(run_dir):
    """memlab's worker, its token batches on the accelerator's device."""
    from memlab.engine import worker as memlab_worker

    original = memlab_worker.Worker._batches

    def _batches(self, torch, spec):
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().current_device_name())
        print(f"gpu_runs worker: token batches on {device}", file=sys.stderr, flush=True)  # in the run's worker.log
        for batch in original(self, torch, spec):
            yield batch if batch.device == device else batch.to(device)

    memlab_worker.Worker._batches = _batches
    backend = os.environ.get("MEMLAB_GPU_DIST_BACKEND")
    if backend:  # gloo cannot run ZeRO-3's collectives on this machine's CUDA tensors (gpu_check.sh decides)
        original_init = memlab_worker.Worker.__init__

        def __init__(self, run_dir):
            original_init(self, run_dir)
            self.request["dist_backend"] = backend

        memlab_worker.Worker.__init__ = __init__
    return memlab_worker.main([run_dir])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_runs.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="the machine's facts, as JSON")
    env.add_argument("--out", required=True)
    runs = sub.add_parser("runs", help="each configuration: memlab estimate --json, then a real run")
    runs.add_argument("--work", required=True, help="folder for knobs, estimates, the run store and manifest.json")
    runs.add_argument("--model", default="qwen2.5-0.5b")
    runs.add_argument("--steps", type=int, default=5)
    runs.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    runs.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a knob of every configuration")
    runs.add_argument("--gpus", type=int, default=1, help="for the estimate (0: DeepSpeed's CPU accelerator)")
    runs.add_argument("--gpu-mem-gib", type=float, default=None)
    runs.add_argument("--ram-gib", type=float, default=None)
    runs.add_argument("--swap-dir", default=None, help="default: the first of swap_candidates() memlab accepts")
    runs.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the runs must end")
    runs.add_argument("--min-run-s", type=float, default=60.0, help="skip a run with less time than this left")
    wk = sub.add_parser("worker", help="memlab's worker with its batches on the accelerator's device")
    wk.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "env":
        facts = environment()
        with open(args.out, "w") as f:
            json.dump(facts, f, indent=1)
        print(json.dumps({k: facts.get(k) for k in ("nvidia_smi", "torch_cuda", "cuda_home", "deepspeed_accelerator",
                                                     "swap_dir", "gloo_on_cuda")}), flush=True)
        return 0
    if args.command == "runs":
        path = run_configs(args)
        with open(path) as f:
            manifest = json.load(f)
        return 0 if all(c.get("status") == "ok" for c in manifest["configs"].values()) else 1
    return worker(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
