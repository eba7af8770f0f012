"""MemAscend's system-memory optimizations, and memlab's own, one module each.

Each module patches DeepSpeed 0.19 narrowly and on its own; `install` applies
the ones whose `memascend.*` switch is at its optimized value. The switch
table (names, stock and optimized values) lives in memlab.knobs so that the
parent can validate without importing this package.
"""
from ...knobs import MEMASCEND_SWITCHES


def install(knobs, context):
    """Apply every switched-on optimization. `knobs` is the resolved flat dict;
    `context` carries what a module needs from the worker (model spec, probes)."""
    from . import adaptive_pool, bounded_staging, direct_storage, exact_pinning, fused_checks

    modules = {
        "memascend.storage": direct_storage,
        "memascend.optimizer_staging": bounded_staging,
        "memascend.grad_checks": fused_checks,
        "memascend.pinning": exact_pinning,
        "memascend.pool": adaptive_pool,
    }
    installed = []
    for name, module in modules.items():
        stock, optimized = MEMASCEND_SWITCHES[name]
        if knobs[name] == optimized:
            module.install(knobs, context)
            installed.append(name)
    return installed
