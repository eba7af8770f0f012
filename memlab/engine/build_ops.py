"""Build DeepSpeed's JIT ops once, ahead of any run (set-up calls this).

DeepSpeed compiles async_io, cpu_adam, pin_memory and the shared-memory comm
op on first use (minutes on 2 cores). Doing it here means runs, tests and
notebooks never pay for it.
"""
import sys
import time

OPS = ("AsyncIOBuilder", "CPUAdamBuilder", "PinMemoryBuilder", "ShareMemCommBuilder")


def build_all(verbose=True):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for name in OPS:
        t0 = time.time()
        builder = acc.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"memlab: {name} not available on {acc.device_name()}, skipped", file=sys.stderr)
            continue
        print(f"memlab: building {builder.name} ...", file=sys.stderr, flush=True)
        builder.load(verbose=False)
        print(f"memlab: {builder.name} ready ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    build_all()
