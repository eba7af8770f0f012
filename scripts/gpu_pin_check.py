#!/usr/bin/env python3
"""Pinned host memory through DeepSpeed's two pinning backends, measured (GPU check, docs/GPU.md).

    python3 scripts/gpu_pin_check.py --out pin-check.json [--model qwen2.5-0.5b --dtype bf16]
                                     [--sizes 1792,4097,...] [--backends torch,native]

Each backend runs in a process of its own (DS_PIN_MEMORY_BACKEND set there;
PyTorch's pinned cache is per process): `torch` is DeepSpeed's default,
PyTorch's CachingHostAllocator (cudaHostAlloc, a power of two per block, freed
blocks cached); `native` is DeepSpeed's page-locked allocator
(posix_memalign + mlock, then cudaHostRegister), what memascend.pinning=exact
selects. Each buffer is pinned the way the engine pins its flat buffers,
`get_accelerator().pin_memory(tensor)`, and recorded: the bytes requested;
the reservation memlab's probes attribute to it (probes.pinned_reservation)
and the one sizing predicts (pow2_round / page_round); and what was measured
around the call: VmRSS, VmLck and PyTorch's host allocator statistics. Then
every buffer is dropped and the same figures are read again (and once more
after torch.cuda.host_empty_cache, where torch has it).

On DeepSpeed's CPU accelerator the torch backend pins nothing (the tensor
comes back as it is) and native is mlock alone: the script runs there too,
which is how its test runs it.
"""
import argparse
import gc
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Edge sizes: a norm weight in bf16 (896 x 2), just past a page, one MiB, just past
# a power of two (the worst rounding: nearly 2x), three MiB.
EDGE_SIZES = (1792, 4097, 1 << 20, (1 << 20) + 1, 3 << 20)


def model_sizes(model, dtype):
    """Distinct sizes of the buffers the engine pins through pin_memory for this
    model (sizing's view of a stock run on CUDA), largest first."""
    from memlab.sizing import Hardware, estimate

    est = estimate(model, {"run.dtype": dtype}, Hardware.cuda_node(), engine="deepspeed")
    return sorted({b.requested for b in est.buffers if b.backend in ("torch-pinned", "native-mlock")}, reverse=True)


def _status():
    from memlab.telemetry import read_status

    s = read_status()
    return {"rss": s["VmRSS"], "vm_lck": s["VmLck"]}


def _torch_host(torch):
    from memlab.engine.probes import torch_host_pinned

    if not (torch.cuda.is_available() and torch.cuda.is_initialized() and hasattr(torch.cuda, "host_memory_stats")):
        return {}
    stats = torch.cuda.host_memory_stats()
    reserved, active = torch_host_pinned(stats)
    return {"torch_reserved": reserved, "torch_active": active}


def measure(torch):
    return {**_status(), **_torch_host(torch)}


def delta(after, before):
    return {k: (after[k] - before[k]) if isinstance(after.get(k), int) and isinstance(before.get(k), int) else None
            for k in after}


def one_backend(backend, sizes):
    """In this process (DS_PIN_MEMORY_BACKEND already set): pin each size, measure."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from memlab.engine.probes import pinned_reservation
    from memlab.sizing import page_round, pow2_round

    accelerator = get_accelerator()
    out = {"backend": backend, "accelerator": accelerator.device_name(),
           "env": os.environ.get("DS_PIN_MEMORY_BACKEND"), "rows": []}
    if torch.cuda.is_available():
        torch.cuda.init()  # a CUDA context first: its own host memory is not a buffer's
        torch.zeros(1, device="cuda")
    warm = accelerator.pin_memory(torch.ones(4096, dtype=torch.uint8))  # loads the op / sets the allocator up
    del warm
    gc.collect()
    kept = []
    start = measure(torch)
    out["start"] = start
    for n in sizes:
        source = torch.ones(n, dtype=torch.uint8)  # touched: its pages are the source's, not the pin's
        before = measure(torch)
        pinned = accelerator.pin_memory(source)
        after = measure(torch)
        del source
        gc.collect()
        reserved, kind = pinned_reservation(pinned)
        cuda = accelerator.device_name() == "cuda"
        if backend == "native":
            predicted = page_round(n)
        else:
            predicted = pow2_round(n) if cuda else n
        out["rows"].append({
            "requested": n,
            "pinned": bool(getattr(pinned, "ds_pinned", False) or (pinned.device.type == "cpu" and pinned.is_pinned())),
            "probe_backend": kind, "probe_reserved": reserved, "sizing_reserved": predicted,
            "measured": delta(after, before),
        })
        kept.append(pinned)
        del pinned
    out["all_pinned"] = delta(measure(torch), start)
    kept.clear()
    gc.collect()
    out["after_free"] = delta(measure(torch), start)
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_empty_cache"):
        torch.cuda.host_empty_cache()
        out["after_host_empty_cache"] = delta(measure(torch), start)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_pin_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file (default: stdout)")
    parser.add_argument("--model", default=None, help="add the sizes this model's engine pins (sizing's buffers)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sizes", default=None, help="comma-separated byte sizes (default: the edge sizes)")
    parser.add_argument("--backends", default="torch,native")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one backend, this process
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(EDGE_SIZES)
    if args.model:
        sizes += [s for s in model_sizes(args.model, args.dtype) if s not in sizes]
    if args.one:
        print(json.dumps(one_backend(args.one, sizes)))
        return 0
    result = {"sizes": sizes, "backends": {}}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        env = dict(os.environ, DS_PIN_MEMORY_BACKEND=backend)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", backend,
                               "--sizes", ",".join(map(str, sizes))], capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            result["backends"][backend] = {"backend": backend, "error": tail[:500]}
            print(f"gpu_pin_check: {backend}: failed: {tail}", file=sys.stderr)
            continue
        result["backends"][backend] = json.loads(lines[-1])
        print(f"gpu_pin_check: {backend}: {len(sizes)} buffers pinned and measured", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0 if all("error" not in b for b in result["backends"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
