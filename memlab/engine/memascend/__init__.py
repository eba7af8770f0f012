"""MemAscend's system-memory optimizations, and memlab's own, one module each.

Each module patches DeepSpeed 0.19 narrowly (through memlab.engine.patching)
and on its own; `install` applies those whose `memascend.*` switch is at its
optimized value, in the order of their records in memlab.optimizations (the
parent validates from those records without importing this package).
"""
import importlib

from ...optimizations import OPTIMIZATIONS


def install(knobs, context):
    """Apply every switched-on optimization. `knobs` is the resolved flat dict;
    `context` carries what a module needs from the worker (model spec, probes)."""
    installed = []
    for optimization in OPTIMIZATIONS:
        if knobs[optimization.switch] == optimization.optimized:
            if optimization.installer is not None:  # None: the process's environment is the whole switch
                importlib.import_module(f"{__name__}.{optimization.installer}").install(knobs, context)
            installed.append(optimization.switch)
    return installed
