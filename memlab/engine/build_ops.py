"""Build DeepSpeed's JIT ops once, ahead of any run (set-up calls this).

DeepSpeed compiles async_io, cpu_adam, pin_memory and the shared-memory comm
op on first use (minutes on 2 cores). Doing it here means runs, tests and
notebooks never pay for it; a worker that still finds one missing reports
each build as it goes. An op already built is loaded without a word.
"""
import sys
import time

from .. import oplocks

OPS = ("AsyncIOBuilder", "CPUAdamBuilder", "PinMemoryBuilder", "ShareMemCommBuilder")


def _built(builder):
    import glob
    import os

    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory(builder.name, verbose=False)
    return bool(glob.glob(os.path.join(folder, "*.so")))


def build_all(report=None, load_built=True):
    """Build every op memlab's runs use that is not built yet; `report(message)`
    gets a line before and after each build. With `load_built`, ops already
    built are loaded too (their sources are checked, quietly). Stale build
    locks fail loudly first."""
    from deepspeed.accelerator import get_accelerator

    report = report or (lambda message: print(f"memlab: {message}", file=sys.stderr, flush=True))
    oplocks.check()
    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            report(f"{name} is not available on {accelerator.device_name()}, skipped")
            continue
        if _built(builder):
            if load_built:
                builder.load(verbose=False)
            continue
        started = time.time()
        report(f"building DeepSpeed op {builder.name} (first use; minutes on 2 cores) ...")
        builder.load(verbose=False)
        report(f"DeepSpeed op {builder.name} ready ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    oplocks.use_extensions_root()  # before torch is imported: it reads the variable once
    try:
        build_all()
    except oplocks.StaleOpLock as exc:
        print(f"memlab: error: {exc}", file=sys.stderr)
        sys.exit(1)
